"""Certified tile skipping for the ALiBi kernels: what the launchers compute for it.

ALiBi's bias ``-m_h * d`` makes far keys' weights vanish. The kernels skip a key tile only
where a bound proves it negligible (``kernels/alibi_attention.py``, ``_reach``): by
Cauchy-Schwarz every score at distance ``d`` is at most ``scale * |q_i| * max_j |k_j| - m_h
* d``, and against a lower bound of the row's largest term (the forward's running max after
the diagonal band, the saved log-sum-exp in the backward, the query's own key in decode)
the keys left out weigh at most ``skip_tol`` of that term per row, all together. Here: the
key-norm maxima the bound needs (one reduction over K), the backward's per-key query bounds
for the ``dkdv`` kernel (a scan and a search over the preprocess's per-row reaches), the
kernels' tile counters and the check of ``skip_tol``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

DEFAULT_SKIP_TOL = 2.0 ** -24


def check_skip_tol(skip_tol) -> float:
    """``skip_tol`` as a float: a finite real number ``>= 0``, else ValueError/TypeError."""
    if isinstance(skip_tol, bool) or not isinstance(skip_tol, (int, float)):
        raise TypeError(f"skip_tol must be a float >= 0 (0.0 computes every tile), "
                        f"got {type(skip_tol).__name__}")
    if not math.isfinite(skip_tol) or skip_tol < 0:
        raise ValueError(f"skip_tol must be a finite float >= 0 (the bound on a row's skipped "
                         f"probability mass, relative to its largest term; 0.0 computes every "
                         f"tile), got {skip_tol}")
    return float(skip_tol)


def skip_log2(skip_tol: float) -> float:
    """The kernels' threshold in log2 units: half of ``skip_tol``, a margin for the rounding
    of the norms, the scores and the running max (each far below a factor of 2)."""
    return math.log2(skip_tol) - 1.0


def key_norm_max(k: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                 cu_seqlens_k: Optional[torch.Tensor] = None,
                 cache_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 ``[B, Hk]``: the largest ``|k_j|`` of each sequence and KV head, over the keys
    a query may see (padded keys and keys past ``cache_seqlens`` hold anything and are left
    out). ``k`` is ``[B, Hk, Sk, D]`` (any strides), or packed ``[1, Hk, total_k, D]`` with
    ``cu_seqlens_k`` (``B + 1`` entries): then one row per sequence."""
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32)  # [B, Hk, Sk]
    seen = None
    if key_padding_mask is not None:
        seen = key_padding_mask[:, None, :]
    if cache_seqlens is not None:
        valid = torch.arange(k.shape[2], device=k.device) < cache_seqlens[:, None]
        seen = valid[:, None, :] if seen is None else seen & valid[:, None, :]
    if seen is not None:
        norms = norms.masked_fill(~seen, 0.0)
    if cu_seqlens_k is None:
        return norms.amax(-1) if norms.shape[-1] else norms.new_zeros(norms.shape[:2])
    keys = torch.arange(k.shape[2], device=k.device, dtype=cu_seqlens_k.dtype)
    seq = torch.searchsorted(cu_seqlens_k, keys, right=True) - 1
    out = norms.new_zeros((cu_seqlens_k.numel() - 1, k.shape[1]))
    return out.scatter_reduce_(0, seq[:, None].expand(-1, k.shape[1]), norms[0].t(), "amax")


def key_norm_args(skip: bool, standin: torch.Tensor, k: torch.Tensor,
                  key_padding_mask: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None,
                  cache_seqlens: Optional[torch.Tensor] = None) -> tuple:
    """``(KMAX, stride_xb)`` for the kernels: :func:`key_norm_max` and its batch stride, or
    a never-read stand-in (``SKIP`` off) and 0."""
    if not skip:
        return standin, 0
    kmax = key_norm_max(k, key_padding_mask, cu_seqlens_k, cache_seqlens)
    return kmax, kmax.stride(0)


def dkdv_query_bounds(lim: torch.Tensor, num_keys: int, is_causal: bool) -> torch.Tensor:
    """int32 ``[1 or 2, B, Hq, num_keys]`` from the preprocess's per-row limits ``lim`` (int32
    ``[1 or 2, B, Hq, Sq]``, rows packed when varlen, keys in packed coordinates).

    ``lim[0][r]``: keys ``<= lim[0][r]`` are negligible for query row ``r`` (they precede it
    by its reach or more); ``lim[1][r]``, symmetric only: keys ``>= lim[1][r]`` are. For the
    ``dkdv`` kernel, per key ``j``: ``[0][j]`` the first row from which every later row finds
    ``j`` negligible (a suffix minimum searched), ``[1][j]`` the first row that does not find
    ``j`` negligible where every earlier one does (a prefix maximum searched)."""
    keys = torch.arange(num_keys, device=lim.device, dtype=lim.dtype)
    keys = keys.expand(*lim.shape[1:-1], num_keys).contiguous()
    after = lim[0].flip(-1).cummin(-1).values.flip(-1)  # non-decreasing along the rows
    bounds = [torch.searchsorted(after, keys, out_int32=True)]
    if not is_causal:
        before = lim[1].cummax(-1).values
        bounds.append(torch.searchsorted(before, keys, right=True, out_int32=True))
    return torch.stack(bounds)


def count_buffer(count: bool, standin: torch.Tensor, programs: int) -> torch.Tensor:
    """Zeroed int32 ``[programs, 2]`` for the kernels' ``COUNTS`` (programs that return early
    count nothing), or a never-read stand-in (``COUNT`` off)."""
    if not count:
        return standin
    return torch.zeros((programs, 2), dtype=torch.int32, device=standin.device)


def counted(buffer: torch.Tensor) -> tuple:
    """``(computed, dense)`` tile totals of a ``COUNTS`` buffer (a device sync)."""
    done, dense = buffer.sum(0, dtype=torch.int64).tolist()
    return done, dense
