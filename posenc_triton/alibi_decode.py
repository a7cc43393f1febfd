"""Split-KV (flash-decoding) forward of ALiBi attention: few query rows against many keys.

KV-cache decoding and chunked prefill have ``Sq`` from 1 to a few dozen rows and ``Sk`` in
the thousands. The dense forward then has ``cdiv(Sq, BLOCK_M) * Hq * B`` programs, too few to
fill a GPU at small batch, each streaming all the keys and re-reading every K/V tile once per
query head of a GQA group. Here (:mod:`posenc_triton.kernels.alibi_decode`) the keys are
split across programs and a program packs the ``group x Sq`` query rows of one KV head into
its tile, so K/V are read once per group; a second launch merges the splits by their
log-sum-exp. The result is the dense forward's ``(out, lse)``, and its backward runs from it.

:func:`use_split` is the rule by which :func:`posenc_triton.alibi_ops.launch_alibi_fwd` hands
a call to :func:`launch_alibi_decode` (so the op, autograd and ``torch.compile`` paths are
unchanged). Per-batch valid key lengths (``cache_seqlens``) run only here, forward only,
through the op ``posenc_triton::alibi_decode_fwd`` (:func:`call_alibi_kvcache`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from posenc_triton import _backend, alibi_launch, alibi_skip

# Dispatch (see use_split): at most this many query rows, at least this many keys.
MAX_SEQLEN_Q = 64
MIN_SEQLEN_K = 512
# Keys per split; None picks it by shape. Tests set it to get several splits on tiny shapes.
SPLIT_SIZE: Optional[int] = None
_MAX_SPLITS = 128
_MIN_KEYS_PER_SPLIT = 128  # two K/V tiles: below this the partials and the merge cost more
_MAX_BLOCK_M = 64
_MERGE_BLOCK_M = 16
_INTERPRETER_BLOCK_N = 16
_DEFAULT_SMS = 132  # H100 SXM; used where the device cannot be asked (CPU, interpreter)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_split(q, k, layout: str, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int) -> bool:
    """Whether the split-KV path runs a call of the dense op (checked arguments).

    The rule: at most :data:`MAX_SEQLEN_Q` query rows (the longest sequence when packed)
    against at least :data:`MIN_SEQLEN_K` keys and 8 keys per query row, and then either GQA
    (``Hq > Hk``: the split path reads each K/V tile once per group instead of once per
    query head) or a dense grid of fewer than two programs per SM (it could not fill the
    GPU). Otherwise the dense forward, whose tiles are then full.
    """
    if cu_seqlens_q is not None:  # packed [total, H, D]
        seqlen_q, seqlen_k, heads, batch = max_seqlen_q, max_seqlen_k, 1, cu_seqlens_q.numel() - 1
    else:
        s = 2 if layout == "bhsd" else 1
        seqlen_q, seqlen_k, heads, batch = q.shape[s], k.shape[s], 3 - s, q.shape[0]
    if seqlen_q > MAX_SEQLEN_Q or seqlen_k < max(MIN_SEQLEN_K, 8 * seqlen_q):
        return False
    if q.shape[heads] > k.shape[heads]:
        return True
    return _backend.cdiv(seqlen_q, 128) * q.shape[heads] * batch < 2 * _num_sms(q.device)


def _split_blocks(q: torch.Tensor, rows: int) -> dict:
    """``BLOCK_*`` and launch options of the split kernel for ``rows`` packed query rows.

    Fixed rather than autotuned: a decode step is short enough that the autotuner's key
    costs host time, and one tile is memory-bound at every size. Sized so that no config
    spills on sm_90 (``ptxas -v``, specialised as launched): up to 64 rows in fp16/bf16,
    ``4096 / BLOCK_D`` in fp32 (IEEE products run on the FMA units, in registers); 8 warps
    from 16 KiB of query tile; two ``BLOCK_N``-row K/V tiles per stage in shared memory."""
    interpreting = _backend.interpreting()
    block_d = max(16, _backend.next_power_of_2(q.shape[-1]))
    row_bytes = block_d * q.element_size()
    max_m = _MAX_BLOCK_M if q.element_size() == 2 else max(16, 4096 // block_d)
    block_m = min(max_m, max(16, _backend.next_power_of_2(rows)))
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": _INTERPRETER_BLOCK_N if interpreting else 64 if row_bytes <= 256 else 32,
        "num_warps": 8 if block_m * row_bytes >= 16384 else 4,
        "num_stages": 1 if interpreting else 3 if row_bytes <= 256 else 2,
    }


def _splits(seqlen_k: int, programs: int, block_n: int, device: torch.device) -> tuple:
    """``(num_splits, split_size)``: enough programs for two per SM, each split a multiple of
    ``block_n`` keys and at least ``_MIN_KEYS_PER_SPLIT`` (or :data:`SPLIT_SIZE` if set)."""
    if SPLIT_SIZE is not None:
        size = _backend.cdiv(max(SPLIT_SIZE, 1), block_n) * block_n
    else:
        want = min(_MAX_SPLITS, _backend.cdiv(2 * _num_sms(device), max(programs, 1)),
                   _backend.cdiv(seqlen_k, _MIN_KEYS_PER_SPLIT))
        size = _backend.cdiv(_backend.cdiv(seqlen_k, max(want, 1)), block_n) * block_n
    size = max(size, block_n)
    return max(_backend.cdiv(seqlen_k, size), 1), size


def _empty_f32(shape, device) -> torch.Tensor:
    """The log-sum-exp and the partials (tests poison them)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def launch_alibi_decode(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, is_causal, scale, layout,
                        cache_seqlens=None, skip_tol=0.0, wrap=False, counts=None):
    """``(out, lse)`` exactly as :func:`posenc_triton.alibi_ops.launch_alibi_fwd` returns them
    (same arguments), computed split-KV; ``cache_seqlens`` (int ``[B]``, dense input only)
    limits batch ``b`` to its first ``cache_seqlens[b]`` keys, its queries aligned to that
    length. ``counts`` receives ``"forward"`` (K/V tiles read, tiles without skipping) and
    ``"bytes"`` (bytes of K and V read, the key-norm pass included, and without skipping)."""
    from posenc_triton.kernels import alibi_decode as kern

    varlen = cu_seqlens_q is not None
    q, k, v = (alibi_launch.bhsd(t, layout, varlen) for t in (q, k, v))
    num_heads, rows_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    seqlen_q = max_seqlen_q if varlen else rows_q
    if varlen:
        seqlen_k = max_seqlen_k
    out = alibi_launch.empty_bhsd(q.shape, layout, q, varlen)
    lse = _empty_f32((q.shape[0], num_heads, rows_q), q.device)
    if out.numel() == 0 or seqlen_q == 0 or batch == 0:
        return alibi_launch.to_layout(out, layout, varlen), lse

    group = num_heads // num_kv_heads
    interpreting = _backend.interpreting()
    meta = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, _backend.next_power_of_2(head_dim)),
            "IS_CAUSAL": is_causal, "HAS_KEY_MASK": key_padding_mask is not None,
            "HAS_SEQLENS": cache_seqlens is not None, "IS_VARLEN": varlen,
            # fp32 inputs get IEEE fp32 products (PyTorch's default matmul), not TF32
            "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 or interpreting else None,
            "INTERPRETER": interpreting}  # works around its bf16 dot and rounding
    blocks = _split_blocks(q, group * seqlen_q)
    m_blocks = _backend.cdiv(group * seqlen_q, blocks["BLOCK_M"])
    num_splits, split_size = _splits(seqlen_k, m_blocks * num_kv_heads * batch,
                                     blocks["BLOCK_N"], q.device)
    # fp32 partials, rows addressed like the output's (packed: one batch of total_q rows)
    part_out = _empty_f32((num_splits, q.shape[0], num_heads, rows_q, head_dim), q.device)
    part_lse = _empty_f32(part_out.shape[:-1], q.device)
    part_strides = (part_out.stride(0), 0 if varlen else part_out.stride(1),
                    *part_out.stride()[2:4], part_lse.stride(0),
                    0 if varlen else part_lse.stride(1), part_lse.stride(2))
    mask, stride_mb, stride_mn = alibi_launch.key_mask_args(key_padding_mask, slopes)
    seqlens = slopes if cache_seqlens is None else cache_seqlens  # never read when None
    skip = skip_tol > 0
    kmax, stride_xb = alibi_skip.key_norm_args(skip, slopes, k, key_padding_mask, cu_seqlens_k,
                                               cache_seqlens)
    grid = (m_blocks * num_splits, num_kv_heads, batch)
    buffer = alibi_skip.count_buffer(counts is not None, slopes, grid[0] * grid[1] * grid[2])
    with _backend.device_guard(q):
        split = alibi_launch.launchable(kern.alibi_decode_split_kernel, wrap)
        split[grid](
            q, k, v, part_out, part_lse, slopes, mask,
            *alibi_launch.cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes), seqlens, kmax,
            buffer, scale, alibi_skip.skip_log2(skip_tol) if skip else 0.0,
            *alibi_launch.strides(q, k, v, varlen=varlen), *part_strides,
            alibi_launch.slope_batch_stride(slopes), stride_mb, stride_mn, stride_xb,
            group, seqlen_q, seqlen_k, num_splits, split_size, SKIP=skip,
            COUNT=counts is not None, **meta, **blocks)
        merge_grid = (_backend.cdiv(rows_q, _MERGE_BLOCK_M), num_heads, q.shape[0])
        alibi_launch.launchable(kern.alibi_decode_merge_kernel, wrap)[merge_grid](
            part_out, part_lse, out, lse, *part_out.stride()[:4], *part_lse.stride()[:3],
            *out.stride(), *lse.stride()[:2], rows_q, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=_MERGE_BLOCK_M,
            INTERPRETER=interpreting)
    if counts is not None:
        done, dense = counts["forward"] = alibi_skip.counted(buffer)
        tile = 2 * blocks["BLOCK_N"] * head_dim * k.element_size()  # a K and a V tile
        norms = k.numel() * k.element_size() if skip else 0  # the key-norm pass reads all K
        counts["bytes"] = (done * tile + norms, dense * tile)
    return alibi_launch.to_layout(out, layout, varlen), lse


# ------------------------------------------------------------------------------------------
# Per-batch valid key lengths (cache_seqlens): forward only, as flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------


def check_cache_seqlens(q, k, v, cache_seqlens, layout) -> None:
    """Validate ``cache_seqlens`` (dense input): int32/int64 ``[B]`` on q's device, values in
    ``0..Sk`` (one sync, skipped where a sync is not allowed), and no gradient asked for."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor or None, "
                        f"got {type(cache_seqlens).__name__}")
    batch, seqlen_k = q.shape[0], k.shape[2 if layout == "bhsd" else 1]
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (
            batch,):
        raise ValueError(f"cache_seqlens must be a 1-D int32/int64 tensor [B] = [{batch}] of "
                         f"valid key lengths, got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    rows = q.shape[1 if layout == "bhsd" else 2] * q.shape[2 if layout == "bhsd" else 1]
    if rows >= 2 ** 31:  # the split kernel indexes a KV head's query rows in int32
        raise ValueError(f"with cache_seqlens, q's heads x query length must be below 2^31, "
                         f"got {rows}; split the query into chunks")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("cache_seqlens is for inference (forward only, like flash-attn's "
                         "flash_attn_with_kvcache) but q, k or v requires grad: run under "
                         "torch.no_grad(), or train with key_padding_mask or cu_seqlens")
    if batch and _backend.host_read_allowed(q):
        shortest, longest = torch.stack([cache_seqlens.min(), cache_seqlens.max()]).tolist()
        if shortest < 0 or longest > seqlen_k:
            raise ValueError(f"cache_seqlens must lie in 0..{seqlen_k} (Sk, the cache's length), "
                             f"got values from {shortest} to {longest}")


def _launch_kvcache(q, k, v, slopes, key_padding_mask, cache_seqlens, is_causal, scale,
                     layout, skip_tol, wrap=False):
    return launch_alibi_decode(q, k, v, slopes, key_padding_mask, None, None, 0, 0, is_causal,
                                scale, layout, cache_seqlens, skip_tol, wrap)


@_backend.library_op("posenc_triton::alibi_decode_fwd", mutates_args=())
def _alibi_decode_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         slopes: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                         cache_seqlens: torch.Tensor, is_causal: bool, scale: float,
                         layout: str, skip_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_kvcache(q, k, v, slopes, key_padding_mask, cache_seqlens, is_causal, scale,
                            layout, skip_tol, wrap=True)


def call_alibi_kvcache(q, k, v, slopes, key_padding_mask, cache_seqlens, is_causal, scale,
                       layout, skip_tol=0.0):
    """``(out, lse)`` of checked arguments with ``cache_seqlens``; the op under compile."""
    return _backend.call_op(torch.ops.posenc_triton.alibi_decode_fwd, _launch_kvcache, q, k,
                            v, slopes, key_padding_mask, cache_seqlens, is_causal, scale, layout,
                            skip_tol)
