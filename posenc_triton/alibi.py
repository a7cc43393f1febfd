"""ALiBi attention: the slopes, argument checks and the public :func:`alibi_attention`.

Reads top-down: slopes → argument checks (dense, then packed ``cu_seqlens`` input) →
:func:`alibi_attention`, which runs the ``torch.library`` ops of :mod:`.alibi_ops` on
CUDA (and in Triton's interpreter) and the reference otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from posenc_triton import _backend, _checks, alibi_ops
from posenc_triton.alibi_decode import call_alibi_kvcache, check_cache_seqlens
from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL, check_skip_tol
from posenc_triton.reference import (
    alibi_attention_kvcache_reference,
    alibi_attention_reference,
    alibi_attention_varlen_reference,
)

MAX_HEAD_DIM = 256
MAX_SEQLEN = 1 << 24  # positions are fp32 in the kernels: exact up to 2^24
_MAX_GRID = 65535  # grid axes 1 and 2 carry heads and batch
_LAYOUTS = ("bhsd", "bshd")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi slopes (Press et al.; BLOOM's rule for head counts that are not powers of 2).

    Bit for bit the slopes of BLOOM's ``build_alibi_tensor`` (float32 powers of a float32
    base, on the CPU), so checkpoints trained with them see exactly their slopes; they are
    within a few float32 ulps of the exact values of ``reference.alibi_slopes_list``.

    Args:
        num_heads: a positive int, the query heads.
        device: where to put them (default: the CPU).

    Returns:
        float32 ``[num_heads]``: ``2^(-8/n), 2^(-16/n), ...`` for ``n`` a power of 2.
    """
    _checks.positive_int("num_heads", num_heads)

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = torch.pow(_bloom_base(closest), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = min(closest, num_heads - closest)
        odd = torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(_bloom_base(2 * closest), odd)])
    return slopes.to(device)


def _bloom_base(n: int) -> torch.Tensor:
    """BLOOM's float32 base ``2^(-8/n)`` of the slopes of ``n`` heads."""
    return torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)


@functools.cache
def _cached_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # filled under inference mode, still fine to train with
        return alibi_slopes(num_heads, device)


def _default_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    # Cached in eager: no host-to-device copy per call (none during CUDA-graph capture).
    # A compiled graph holds them as a constant instead; Dynamo would bypass the cache.
    if torch.compiler.is_compiling():
        return alibi_slopes(num_heads, device)
    return _cached_slopes(num_heads, device)


def check_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask=None, *,
                num_seqs=None) -> float:
    """Validate :func:`alibi_attention`'s arguments; returns the softmax scale. Packed input
    comes as one batch of ``bshd`` with ``num_seqs`` sequences (the batch of ``slopes``)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    names = "[B, H, S, D]" if layout == "bhsd" else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {names} (layout={layout!r}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: "
                            "q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: "
                             "q, k and v must be on one device")
    _checks.check_bool("is_causal", is_causal)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    hd = 1 if layout == "bhsd" else 2
    batch, num_heads, head_dim = q.shape[0], q.shape[hd], q.shape[3]
    if k.shape[0] != batch:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v have head dim {k.shape[3]} but q has {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q, k, v) must be in 1..{MAX_HEAD_DIM}, "
                         f"got {head_dim}")
    batch = batch if num_seqs is None else num_seqs
    if batch > _MAX_GRID or num_heads > _MAX_GRID:
        raise ValueError(f"batch ({batch}) and q's head count ({num_heads}) must each be at most "
                         f"{_MAX_GRID} (CUDA grid limit); split the batch")
    if num_seqs is None:  # packed input checks its sequences' bounds instead
        _check_seqlens(q.shape[2 if layout == "bhsd" else 1], k.shape[2 if layout == "bhsd" else 1])
    num_kv_heads = k.shape[hd]
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count {num_heads} must be a multiple of k's and v's "
                         f"{num_kv_heads} (GQA/MQA)")
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor):
            raise TypeError(f"slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
        if slopes.dtype != torch.float32:
            raise TypeError(f"slopes must be float32, got {slopes.dtype}")
        if not _checks.shape_in(slopes, (num_heads,), (batch, num_heads)):
            raise ValueError(f"slopes must have shape [{num_heads}] or [{batch}, {num_heads}] "
                             f"([Hq] or [B, Hq]), got {tuple(slopes.shape)}")
        if slopes.device != q.device:
            raise ValueError(f"slopes is on {slopes.device} but q is on {q.device}")
    if key_padding_mask is not None:
        seqlen_k = k.shape[1 if layout == "bshd" else 2]
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("key_padding_mask must be a torch.Tensor or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = keep), "
                            f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask must have shape [{batch}, {seqlen_k}] ([B, Sk]), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} "
                             f"but q is on {q.device}")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _checks.finite_real("scale", scale)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  key_padding_mask) -> None:
    """Validate what is particular to packed input; :func:`check_args` does the rest."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [total_tokens, H, D] with cu_seqlens "
                             f"(packed input), got shape {tuple(t.shape)}")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask does not apply to packed input (cu_seqlens): "
                         "packed sequences hold no padding")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor [B + 1] of cumulative "
                             f"sequence lengths, got {cu.dtype} {tuple(cu.shape)}")
        if isinstance(q, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens_q has "
                         f"{cu_seqlens_q.numel()}: both are [B + 1] for the same B sequences")
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if bound is not None and (not _checks.is_int(bound) or bound < 0):
            raise TypeError(f"{name} must be a non-negative int or None, got {bound!r}")


def _varlen_bounds(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k) -> tuple[int, int]:
    """``(max_seqlen_q, max_seqlen_k)``, read from ``cu_seqlens`` where not given, after
    checking ``cu_seqlens``' values (one sync; skipped where a sync is not allowed)."""
    bounds = [max_seqlen_q, max_seqlen_k]
    if not _backend.host_read_allowed(q):
        if None in bounds:
            raise ValueError("max_seqlen_q and max_seqlen_k must be given under torch.compile "
                             "and CUDA-graph capture (reading them from cu_seqlens syncs)")
        _check_seqlens(*bounds)
        return tuple(bounds)
    # One device sync checks both: [first, last, shortest, longest] of each.
    stats = torch.stack([_cu_seqlens_stats(cu) for cu in (cu_seqlens_q, cu_seqlens_k)])
    for i, (first, last, shortest, longest) in enumerate(stats.tolist()):
        name, total, owner = (("cu_seqlens_q", q.shape[0], "q"),
                              ("cu_seqlens_k", k.shape[0], "k and v"))[i]
        if first != 0 or last != total or shortest < 0:
            raise ValueError(f"{name} must rise from 0 to {total} (the token count of {owner}) "
                             f"and never decrease; got first {first}, last {last}, "
                             f"smallest step {shortest}")
        if bounds[i] is None:
            bounds[i] = longest
        elif longest > bounds[i]:
            raise ValueError(f"max_seqlen_{'qk'[i]}={bounds[i]} is shorter than the longest "
                             f"sequence in {name} ({longest})")
    _check_seqlens(*bounds)
    return tuple(bounds)


def _check_seqlens(seqlen_q: int, seqlen_k: int) -> None:
    if max(seqlen_q, seqlen_k) > MAX_SEQLEN:
        raise ValueError(f"sequence lengths up to {MAX_SEQLEN} (2^24) are supported, got "
                         f"Sq={seqlen_q}, Sk={seqlen_k}")


def _cu_seqlens_stats(cu: torch.Tensor) -> torch.Tensor:
    steps = cu.diff() if cu.numel() > 1 else cu.new_zeros(1)
    return torch.stack([cu[0], cu[-1], steps.min(), steps.max()])


def _reference_reason(q: torch.Tensor) -> str:
    why = ("float64 inputs run the PyTorch reference (use fp16, bf16 or fp32 for the kernel)"
           if q.dtype == torch.float64 else
           f"{q.device.type} tensors run the PyTorch reference (the Triton kernels need CUDA, "
           "or TRITON_INTERPRET=1 set before import for Triton's interpreter)")
    return f"alibi_attention: {why}; it materialises the Sq x Sk scores"


# ------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------


def resolve_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask, cu_seqlens_q,
                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, cache_seqlens, dropout_p, skip_tol):
    """:func:`alibi_attention`'s arguments checked: ``(slopes, scale, layout, max_seqlen_q,
    max_seqlen_k, dropout_p, skip_tol)`` with the defaults filled in (packed input: layout
    ``"bshd"``, the bounds read or checked; dense: bounds 0)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    dropout_p = _checks.probability("dropout_p", dropout_p)
    skip_tol = check_skip_tol(skip_tol)
    slopes_grad = (torch.is_grad_enabled() and isinstance(slopes, torch.Tensor)
                   and slopes.requires_grad)
    if cache_seqlens is not None and (dropout_p > 0 or slopes_grad):
        raise ValueError("cache_seqlens is for inference (forward only): pass dropout_p=0 "
                         "and slopes that do not require grad")
    if varlen and cache_seqlens is not None:
        raise ValueError("cache_seqlens does not apply to packed input (cu_seqlens): packed "
                         "sequences carry their key lengths in cu_seqlens_k")
    if varlen:
        _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      key_padding_mask)
        layout = "bshd"
        scale = check_args(*(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t
                              for t in (q, k, v)), slopes, is_causal, scale, layout,
                            num_seqs=cu_seqlens_q.numel() - 1)
        max_seqlen_q, max_seqlen_k = _varlen_bounds(q, k, cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q, max_seqlen_k)
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q and max_seqlen_k apply to packed input only: "
                             "pass them with cu_seqlens_q and cu_seqlens_k")
        scale = check_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask)
        max_seqlen_q = max_seqlen_k = 0
        if cache_seqlens is not None:
            check_cache_seqlens(q, k, v, cache_seqlens, layout)
    if slopes is None:
        slopes = _default_slopes(q.shape[-2 if varlen else 1 if layout == "bhsd" else 2],
                                 q.device)
    return slopes, scale, layout, max_seqlen_q, max_seqlen_k, dropout_p, skip_tol


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slopes: Optional[torch.Tensor] = None, *, is_causal: bool = True,
                    scale: Optional[float] = None, layout: str = "bhsd",
                    key_padding_mask: Optional[torch.Tensor] = None,
                    cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None,
                    max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None,
                    cache_seqlens: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0,
                    skip_tol: float = DEFAULT_SKIP_TOL) -> torch.Tensor:
    """Softmax attention with the ALiBi bias, like ``F.scaled_dot_product_attention``:
    ``softmax(scale * q k^T - slopes[h] * |i - j|) v``, fused forward and backward.

    One implementation, three modes: dense (below), packed variable-length input
    (``cu_seqlens_*``: :func:`alibi_attention_varlen` documents it) and a KV cache filled to
    a different length per sequence (``cache_seqlens``: :func:`alibi_attention_with_kvcache`).

    Args:
        q: ``[B, Hq, Sq, D]`` (``layout="bhsd"``) or ``[B, Sq, Hq, D]`` (``"bshd"``), any
            strides; fp16, bf16 or fp32 run the kernels (fp32 with IEEE products), float64
            the PyTorch reference (for checking: it materialises the scores). ``D <= 256``,
            ``Sq <= 2^24``.
        k, v: ``[B, Hk, Sk, D]`` (or ``[B, Sk, Hk, D]``), q's dtype and device,
            ``Hq % Hk == 0`` (GQA/MQA).
        slopes: float32 ``[Hq]`` or ``[B, Hq]``; default :func:`alibi_slopes`. Slopes that
            require grad get their gradient from the fused backward (deterministic).
        is_causal: query ``i`` sees keys up to its position ``i + Sk - Sq`` (bottom-right
            aligned, as FlashAttention-2); ``False``: every key, the bias symmetric.
            Default True. A causal row that sees no key outputs 0.
        scale: the score scale; default ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (default) or ``"bshd"``, for q, k, v and the output.
        key_padding_mask: bool ``[B, Sk]``, True = keep (flash-attn's ``attention_mask``),
            any strides; padded keys are hidden from every query and get ``dk = dv = 0``.
            The queries stay aligned to the padded length ``Sk`` (for a right-padded cache
            with several new tokens use ``cache_seqlens``).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed input (see
            :func:`alibi_attention_varlen`); default None.
        cache_seqlens: int ``[B]`` valid key lengths (see
            :func:`alibi_attention_with_kvcache`); default None.
        dropout_p: probability in ``[0, 1)`` of dropping an attention probability (the rest
            scaled by ``1 / (1 - dropout_p)``, as SDPA; pass 0 in eval mode). Default 0.0.
            The mask comes from a Philox key drawn from the device's default generator
            (``torch.manual_seed`` reproduces it; CUDA-graph capture works); the backward
            regenerates it.
        skip_tol: certified tile skipping: key tiles are left out only where a bound
            proves that together they weigh at most ``skip_tol`` of each row's largest term
            (:mod:`posenc_triton.alibi_skip`; ``posenc_triton.alibi_tile_counts`` counts
            them), in the forward, the backward and decoding. Default ``2**-24``; ``0.0``
            computes every tile.

    Returns:
        ``out`` shaped like ``q`` in ``layout``, q's dtype.

    Raises:
        ValueError / TypeError naming the argument: ranks, shapes, dtypes, devices,
        ``Hq % Hk``, head dim, lengths, slopes, masks, ``dropout_p``, mode mix-ups.

    Few query rows against many keys (decoding, chunked prefill) run a split-KV kernel,
    chosen by shape (:func:`posenc_triton.alibi_decode.use_split`), with the same results;
    calls with dropout run the dense kernel.
    """
    args = resolve_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cache_seqlens,
                        dropout_p, skip_tol)
    slopes, scale, layout, max_seqlen_q, max_seqlen_k, dropout_p, skip_tol = args
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if not _backend.use_triton(q) or q.dtype == torch.float64:
        _backend.warn_once(_reference_reason(q))
        if cache_seqlens is not None:
            return alibi_attention_kvcache_reference(
                q, k, v, cache_seqlens, slopes, is_causal=is_causal, scale=scale, layout=layout,
                key_padding_mask=key_padding_mask)
        if varlen:
            return alibi_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, slopes,
                                                    is_causal=is_causal, scale=scale,
                                                    dropout_p=dropout_p)
        return alibi_attention_reference(q, k, v, slopes, is_causal=is_causal, scale=scale,
                                         layout=layout, upcast=True,
                                         key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    if cache_seqlens is not None:
        return call_alibi_kvcache(q, k, v, slopes.contiguous(), key_padding_mask,
                                  cache_seqlens.contiguous(), is_causal, scale, layout,
                                  skip_tol)[0]
    if varlen:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    seed = alibi_ops.draw_dropout_seed(q.device) if dropout_p > 0 else None
    return alibi_ops.run_alibi(q, k, v, slopes.contiguous(), key_padding_mask, cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                               layout, dropout_p, seed, skip_tol)


def alibi_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                           slopes: Optional[torch.Tensor] = None, *, is_causal: bool = True,
                           scale: Optional[float] = None,
                           dropout_p: float = 0.0,
                           skip_tol: float = DEFAULT_SKIP_TOL) -> torch.Tensor:
    """ALiBi attention of packed variable-length sequences, in flash-attn's
    ``flash_attn_varlen_func`` convention and argument order (:func:`alibi_attention` with
    ``cu_seqlens_*``).

    Sequence ``b`` holds rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k``, ``v``, and attends within itself,
    bottom-right aligned.

    Args:
        q: ``[total_q, Hq, D]``, fp16, bf16 or fp32 (float64: the reference), ``D <= 256``.
        k, v: ``[total_k, Hk, D]``, q's dtype and device, ``Hq % Hk == 0``.
        cu_seqlens_q, cu_seqlens_k: int32/int64 ``[B + 1]``, cumulative lengths from 0 to
            ``total_q`` / ``total_k``, non-decreasing.
        max_seqlen_q, max_seqlen_k: ints bounding the lengths, or None to read them from
            ``cu_seqlens`` (a device sync; ``torch.compile`` and CUDA-graph capture need them
            given, and skip the check of ``cu_seqlens``' values, which is also a sync).
        slopes: float32 ``[Hq]`` or ``[B, Hq]`` (sequence ``b`` takes ``slopes[b]``); default
            :func:`alibi_slopes`; trainable if they require grad.
        is_causal: default True (each sequence's rows see its keys up to their position).
        scale: default ``1 / sqrt(D)``.
        dropout_p: in ``[0, 1)``, default 0.0 (as :func:`alibi_attention`).
        skip_tol: certified tile skipping, default ``2**-24`` (as :func:`alibi_attention`).

    Returns:
        ``out [total_q, Hq, D]``, q's dtype.
    """
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor [B + 1], got {type(cu).__name__}")
    return alibi_attention(q, k, v, slopes, is_causal=is_causal, scale=scale,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           dropout_p=dropout_p, skip_tol=skip_tol)


def alibi_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                                 slopes: Optional[torch.Tensor] = None, *,
                                 is_causal: bool = True, scale: Optional[float] = None,
                                 layout: str = "bhsd",
                                 key_padding_mask: Optional[torch.Tensor] = None,
                                 skip_tol: float = DEFAULT_SKIP_TOL) -> torch.Tensor:
    """ALiBi attention against a KV cache filled to a different length per sequence, in
    flash-attn's ``flash_attn_with_kvcache`` convention (the new keys already written; forward
    only; :func:`alibi_attention` with ``cache_seqlens``). Runs the split-KV decode kernel.

    Keys of sequence ``b`` from ``cache_seqlens[b]`` on are invisible, and query ``i`` sits
    at key position ``i + cache_seqlens[b] - Sq``.

    Args:
        q: ``[B, Hq, Sq, D]`` (``layout="bhsd"``) or ``[B, Sq, Hq, D]`` (``"bshd"``), fp16,
            bf16 or fp32 (float64: the reference), ``D <= 256``; must not require grad.
        k_cache, v_cache: ``[B, Hk, Sk, D]`` (or ``[B, Sk, Hk, D]``), q's dtype and device,
            ``Hq % Hk == 0``.
        cache_seqlens: int32/int64 ``[B]``, ``0 <= cache_seqlens[b] <= Sk``, the valid keys
            of each sequence (the current queries' included). Its values are checked with
            one device sync, skipped under ``torch.compile`` and capture.
        slopes: float32 ``[Hq]`` or ``[B, Hq]``, not requiring grad; default
            :func:`alibi_slopes`.
        is_causal: default True; ``False`` lets every query see all valid keys.
        scale: default ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (default) or ``"bshd"``.
        key_padding_mask: bool ``[B, Sk]``, True = keep, hiding keys inside the valid
            lengths too; default None.
        skip_tol: certified skipping of the splits and tiles whose keys weigh at most that
            much of each row's largest term, default ``2**-24`` (as :func:`alibi_attention`).

    Returns:
        ``out`` shaped like ``q`` in ``layout``, q's dtype.
    """
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an integer tensor [B], got {cache_seqlens!r}")
    return alibi_attention(q, k_cache, v_cache, slopes, is_causal=is_causal, scale=scale,
                           layout=layout, key_padding_mask=key_padding_mask,
                           cache_seqlens=cache_seqlens, skip_tol=skip_tol)
