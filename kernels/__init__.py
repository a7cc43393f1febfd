"""Triton kernels (``@triton.jit`` only), shipped as ``posenc_triton.kernels``.

One file per kernel family.
"""
