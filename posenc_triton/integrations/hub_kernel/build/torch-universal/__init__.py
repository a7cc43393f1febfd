"""posenc_triton's RoPE as a Hugging Face ``kernels`` layer repository (one universal build:
the Triton kernels ship in the posenc_triton wheel this folder lives in)."""

from . import layers

__all__ = ["layers"]
