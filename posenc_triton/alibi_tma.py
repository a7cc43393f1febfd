"""TMA tensor descriptors for the dense ALiBi kernels (sm_90 and later).

The tiles each kernel loops over (K and V in the forward and dq, Q and dO in dkdv) load
through tensor descriptors, whose block follows the autotuned tile (an autotune pre-hook).
``torch.compile`` refuses configs with hooks, so the TMA kernels are a second set of
autotuned kernels, for eager launches only (:func:`posenc_triton.alibi_configs.dense_kernels`).
"""

from __future__ import annotations

import os

import torch

from posenc_triton import _backend

# the kernels' descriptor arguments and the tile dimension their blocks follow
DESC_BLOCKS = {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N", "Q_DESC": "BLOCK_M",
               "DO_DESC": "BLOCK_M"}


def descriptor_blocks(nargs):
    """The autotune pre-hook: each descriptor's block takes the launched config's tile."""
    for name, block in DESC_BLOCKS.items():
        desc = nargs.get(name)
        if desc is not None:  # the rows' dimension is the one whose block is not 1
            rows = 1 if desc.block_shape[1] != 1 else 2
            desc.block_shape = [nargs[block] if d == rows else 1 for d in range(3)] + [
                nargs["BLOCK_D"]]


def tma_capable(t: torch.Tensor) -> bool:
    """Hopper or later, unless ``POSENC_TRITON_TMA=0``; never under the interpreter (tests
    patch this to run the descriptor path there)."""
    if _backend.interpreting() or not t.is_cuda or os.environ.get("POSENC_TRITON_TMA") == "0":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def tma_view(t: torch.Tensor):
    """``(mode, view, strides)`` for a descriptor of ``t [B, H, S, D]`` in memory order (a
    tensor map describes a row-major layout, padding allowed): ``mode`` 1 keeps ``[B, H, S,
    D]``, 2 addresses ``[B, S, H, D]`` (``bshd`` input); a dimension of size 1 takes the packed
    stride. None where TMA cannot address ``t`` (16-byte aligned base and strides, unit last
    stride; no empty dimension)."""
    if t.numel() == 0:
        return None
    mode = 2 if t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2) else 1
    view = t.transpose(1, 2) if mode == 2 else t
    strides = list(view.stride())
    for i in (2, 1, 0):
        if view.shape[i] == 1:
            strides[i] = strides[i + 1] * view.shape[i + 1]
    unit = 16 // t.element_size()
    if (t.data_ptr() % 16 or strides[-1] != 1 or any(st % unit for st in strides[:-1])
            or any(strides[i] < strides[i + 1] * view.shape[i + 1] for i in range(3))):
        return None
    return mode, view, strides


def tma_descriptors(a: torch.Tensor, b: torch.Tensor, block_d: int, rows: int) -> tuple:
    """``(mode, desc_a, desc_b)``: descriptors of two ``[B, H, S, D]`` tensors laid out alike,
    blocks of ``rows`` rows (on GPU the pre-hook sets the config's), ``mode`` as
    :func:`tma_view`'s (the kernels' ``USE_TMA``); ``(0, None, None)`` where TMA cannot load
    them."""
    views = [tma_view(t) for t in (a, b)]
    if not (tma_capable(a) and all(views) and views[0][0] == views[1][0]):
        return 0, None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    mode = views[0][0]
    shape = [1, rows, 1, block_d] if mode == 2 else [1, 1, rows, block_d]
    return (mode, *(TensorDescriptor(v, list(v.shape), st, shape) for _, v, st in views))


def tma_eligible(q: torch.Tensor, wrap: bool, varlen: bool, key_padding_mask) -> bool:
    """Padded keys are never read (masked loads); packed sequences end inside the tensor;
    ``torch.compile`` graphs take no pre-hooks; IEEE fp32 products need the registers TMA
    tiles take."""
    return not (wrap or varlen or key_padding_mask is not None or q.dtype == torch.float32)
