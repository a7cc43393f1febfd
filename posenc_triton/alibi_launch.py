"""What the dense and the split-KV ALiBi launchers share: views, strides, stand-in pointers.

The kernels address every tensor as ``[B, H, S, D]`` by four strides. Packed (varlen) tensors
``[total, H, D]`` travel as one batch of ``bshd``: ``[1, H, total, D]`` views whose rows are
addressed by their sequence's first row. Optional inputs the kernels never read (a constexpr
turns them off) get any valid pointer as a stand-in.
"""

from __future__ import annotations

from typing import Optional

import torch

from posenc_triton import _backend
from posenc_triton.alibi_configs import INTERPRETER_META


def bhsd(t: torch.Tensor, layout: str, varlen: bool = False) -> torch.Tensor:
    """The ``[B, H, S, D]`` view of ``t`` in ``layout`` (``[1, H, total, D]`` packed)."""
    if varlen:
        t = t.unsqueeze(0)
    return t.transpose(1, 2) if layout == "bshd" or varlen else t


def to_layout(t: torch.Tensor, layout: str, varlen: bool) -> torch.Tensor:
    """A ``[B, H, S, D]`` view back in the caller's layout (``[total, H, D]`` packed)."""
    return t.transpose(1, 2)[0] if varlen else bhsd(t, layout)


def empty_bhsd(shape, layout: str, like: torch.Tensor, varlen: bool = False,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Contiguous in the caller's layout, returned as a ``[B, H, S, D]`` view; ``like``'s
    dtype unless ``dtype`` is given (tests poison it)."""
    b, h, s, d = shape
    dtype = like.dtype if dtype is None else dtype
    if layout == "bshd" or varlen:
        return torch.empty((b, s, h, d), dtype=dtype, device=like.device).transpose(1, 2)
    return torch.empty((b, h, s, d), dtype=dtype, device=like.device)


def strides(*tensors: torch.Tensor, varlen: bool) -> list:
    """The 4 strides of each ``[B, H, S, D]`` view; packed rows are addressed by their
    sequence's first row, not by batch, so the batch stride is 0 then."""
    return [s for t in tensors for s in ((0,) if varlen else t.stride()[:1]) + t.stride()[1:]]


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple:
    """Batch and head strides of a ``[B, H, S]`` log-sum-exp (batch 0 when packed)."""
    return (0 if varlen else lse.stride(0)), lse.stride(1)


def slope_batch_stride(slopes: torch.Tensor) -> int:
    """0 for ``[Hq]`` slopes (shared by the batch), the row stride for ``[B, Hq]``."""
    return 0 if slopes.dim() == 1 else slopes.stride(0)


def key_mask_args(key_padding_mask: Optional[torch.Tensor], slopes: torch.Tensor):
    """``(pointer, stride_b, stride_n)`` for the kernels' ``KPM``: the bool mask read as bytes
    (a view, any strides), or a never-read stand-in when there is none (``HAS_KEY_MASK`` off)."""
    if key_padding_mask is None:
        return slopes, 0, 0
    return (key_padding_mask.view(torch.uint8), *key_padding_mask.stride())


def cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes: torch.Tensor) -> tuple:
    """``(CU_Q, CU_K)``; never-read stand-ins when not packed (``IS_VARLEN`` off)."""
    if cu_seqlens_q is None:
        return slopes, slopes
    return cu_seqlens_q, cu_seqlens_k


def launchable(kernel, wrap: bool):
    """``kernel``, through :func:`posenc_triton._backend.launcher` inside a ``torch.library``
    op (``wrap``) so that ``torch.compile`` sees it."""
    return _backend.launcher(kernel) if wrap else kernel


def common_meta(q: torch.Tensor, is_causal: bool, has_key_mask: bool, varlen: bool,
                dropout_p: float = 0.0) -> dict:
    """Constexprs shared by the dense kernels (and the fixed tile when interpreting)."""
    interpreting = _backend.interpreting()
    head_dim = q.shape[-1]
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, _backend.next_power_of_2(head_dim)),
        "IS_CAUSAL": is_causal,
        "HAS_KEY_MASK": has_key_mask,
        "IS_VARLEN": varlen,
        "HAS_DROPOUT": dropout_p > 0,
        # fp32 inputs get IEEE fp32 products (PyTorch's default matmul), not TF32.
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 or interpreting else None,
        # work around the interpreter's bf16 dot and bf16 rounding
        "INTERPRETER": interpreting,
    }
    if interpreting:
        meta.update(INTERPRETER_META)
    return meta
