"""How much of the causal triangle (or the square) the ALiBi kernels compute: their own tile
counters, read back (:func:`alibi_tile_counts`)."""

from __future__ import annotations

from typing import Optional

import torch

from posenc_triton import _backend, alibi, alibi_decode, alibi_ops
from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL


def alibi_tile_counts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slopes: Optional[torch.Tensor] = None, *, is_causal: bool = True,
                      skip_tol: float = DEFAULT_SKIP_TOL, scale: Optional[float] = None,
                      layout: str = "bhsd", key_padding_mask: Optional[torch.Tensor] = None,
                      cu_seqlens_q: Optional[torch.Tensor] = None,
                      cu_seqlens_k: Optional[torch.Tensor] = None,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                      cache_seqlens: Optional[torch.Tensor] = None,
                      dropout_p: float = 0.0) -> dict:
    """The KV tiles the kernels compute for :func:`posenc_triton.alibi_attention` with these
    arguments (the same keywords, checked the same way), counted by the kernels themselves:
    each program stores what it ran and what the dense kernels run for it.

    Returns ``{"forward": (computed, dense), "dq": (...), "dkdv": (...)}``: tiles of keys
    (forward, ``dq``) or of queries (``dkdv``, over each KV head's query heads), against
    ``skip_tol=0.0``'s. Calls that run the split-KV decode kernel count its K/V tiles and
    add ``"bytes": (read, dense)``, the bytes of K and V it reads (with skipping, the
    key-norm pass's included); ``cache_seqlens`` calls are forward only. The backward runs
    as for slopes that require grad when ``slopes`` does. One device sync per kernel; needs
    the kernels (CUDA, or Triton's interpreter for CPU tensors), fp16, bf16 or fp32.
    """
    slopes_grad = isinstance(slopes, torch.Tensor) and slopes.requires_grad
    with torch.no_grad():
        args = alibi.resolve_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask,
                                  cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  cache_seqlens, dropout_p, skip_tol)
        slopes, scale, layout, max_seqlen_q, max_seqlen_k, dropout_p, skip_tol = args
        if not _backend.use_triton(q) or q.dtype == torch.float64:
            raise ValueError(f"alibi_tile_counts reads the Triton kernels' counters: q must be "
                             f"fp16, bf16 or fp32 on CUDA (or on CPU with TRITON_INTERPRET=1 "
                             f"set before import), got {q.dtype} on {q.device}")
        slopes = slopes.detach().contiguous()
        counts: dict = {}
        if cache_seqlens is not None:
            alibi_decode.launch_alibi_decode(
                q, k, v, slopes, key_padding_mask, None, None, 0, 0, is_causal, scale, layout,
                cache_seqlens.contiguous(), skip_tol, counts=counts)
            return counts
        if cu_seqlens_q is not None:
            cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        seed = alibi_ops.draw_dropout_seed(q.device) if dropout_p > 0 else None
        out, lse = alibi_ops.launch_alibi_fwd(q, k, v, slopes, key_padding_mask, *packed,
                                              is_causal, scale, layout, dropout_p, seed,
                                              skip_tol, counts=counts)
        alibi_ops.launch_alibi_bwd(torch.zeros_like(out), q, k, v, slopes, key_padding_mask,
                                   *packed, out, lse, is_causal, scale, layout, dropout_p,
                                   seed, slopes_grad, skip_tol, counts=counts)
    return counts
