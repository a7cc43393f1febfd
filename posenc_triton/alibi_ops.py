"""ALiBi attention launchers, registered as ``torch.library`` ops with autograd.

Layers, top-down, as in :mod:`posenc_triton.rope_ops`: the launchers ``launch_alibi_fwd`` /
``launch_alibi_bwd`` (kernels from :mod:`.alibi_configs`, arguments laid out by
:mod:`.alibi_launch`, TMA descriptors from :mod:`.alibi_tma`, split-KV calls handed to
:mod:`.alibi_decode`) → the ops ``posenc_triton::alibi_attention_fwd/bwd`` (the same,
visible to ``torch.compile``: ``triton_op``s on GPU, opaque ``custom_op``s under the
interpreter, see :func:`posenc_triton._backend.library_op`) → ``call_alibi_fwd/bwd`` (the op
under ``torch.compile``, the launcher otherwise) → ``AlibiAttentionFunction`` (autograd) →
``run_alibi``. Arguments arrive checked by :func:`posenc_triton.alibi.alibi_attention`.
Triton and the kernels are imported lazily, so the package imports where Triton is not
installed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from posenc_triton import _backend, alibi_configs, alibi_decode, alibi_launch, alibi_skip, alibi_tma

# ------------------------------------------------------------------------------------------
# Dropout: the Philox key and, for tests, the mask it draws
# ------------------------------------------------------------------------------------------


def draw_dropout_seed(device) -> torch.Tensor:
    """A fresh Philox key, int64 ``[1]`` on ``device``, drawn from that device's default
    generator: ``torch.manual_seed`` reproduces it, and CUDA-graph capture records the draw
    (the kernels read it from memory, never the host)."""
    return torch.randint(1 << 62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: torch.Tensor, dropout_p: float, batch: int, num_heads: int,
                      seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The keep-mask the kernels draw for ``seed``: bool ``[B, Hq, Sq, Sk]`` (``[B, Hq,
    max_seqlen_q, max_seqlen_k]`` for packed input, each sequence in its top-left corner).
    A test hook, like flash-attn's ``return_attn_probs``: it materialises ``Sq x Sk``."""
    from posenc_triton.kernels import dropout

    mask = torch.zeros((batch, num_heads, seqlen_q, seqlen_k), dtype=torch.uint8,
                       device=seed.device)
    if mask.numel() > 0:
        grid = (batch * num_heads, _backend.cdiv(seqlen_q, 16), _backend.cdiv(seqlen_k, 16))
        with _backend.device_guard(seed):
            dropout.dropout_mask_kernel[grid](seed, mask, dropout_p, seqlen_q, seqlen_k,
                                              BLOCK_M=16, BLOCK_N=16)
    return mask.bool()


# ------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops
# ------------------------------------------------------------------------------------------


def launch_alibi_fwd(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p=0.0,
                     seed=None, skip_tol=0.0, wrap=False, pos_offset=0, out_dtype=None,
                     counts=None):
    """``(out, lse)``: ``out`` like ``q`` (contiguous in ``layout``), ``lse`` float32
    ``[B, Hq, Sq]`` (``[1, Hq, total_q]`` packed; natural log, ``+inf`` for rows that see no
    key).

    ``slopes`` is contiguous float32 ``[Hq]`` or ``[B, Hq]``, ``key_padding_mask`` bool
    ``[B, Sk]`` (any strides) or None. With ``cu_seqlens_q``/``cu_seqlens_k`` (int ``[B + 1]``)
    ``q``, ``k``, ``v`` are packed ``[total, H, D]`` and ``max_seqlen_*`` bound the lengths.
    ``dropout_p > 0`` drops probabilities with the Philox key ``seed`` (int64 ``[1]``, from
    :func:`draw_dropout_seed`). Arguments are already checked. ``wrap`` launches through
    :func:`_backend.launcher` (the body of the ``torch.library`` op, seen by
    ``torch.compile``). Few query rows against many keys run split-KV, without dropout
    (:func:`posenc_triton.alibi_decode.launch_alibi_decode`; the rule is its ``use_split``).
    ``pos_offset`` moves every query that many positions past its bottom-right alignment
    (a chunk pair of :mod:`posenc_triton.distributed`, which also asks ``out_dtype`` float32
    to merge the pairs unrounded); such calls run the dense kernel, every tile.
    ``skip_tol > 0`` skips the key tiles that a bound proves weigh at most that much of each
    row's largest term (:mod:`posenc_triton.alibi_skip`). ``counts``, a dict, receives
    ``"forward": (tiles computed, tiles of the dense kernel)`` as the kernels count them
    (and ``"bytes"`` from the split-KV kernel).
    """
    dense_only = dropout_p > 0 or pos_offset != 0 or out_dtype is not None
    if not dense_only and alibi_decode.use_split(q, k, layout, cu_seqlens_q, max_seqlen_q,
                                                 max_seqlen_k):
        return alibi_decode.launch_alibi_decode(
            q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, is_causal, scale, layout, skip_tol=skip_tol, wrap=wrap,
            counts=counts)
    skip = skip_tol > 0 and pos_offset == 0
    varlen = cu_seqlens_q is not None
    q, k, v = (alibi_launch.bhsd(t, layout, varlen) for t in (q, k, v))
    num_heads, seqlen_q, num_kv_heads, seqlen_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = alibi_launch.empty_bhsd(q.shape, layout, q, varlen, out_dtype)
    lse = torch.empty((q.shape[0], num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if varlen:
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    if out.numel() > 0 and seqlen_q > 0:
        meta = alibi_launch.common_meta(q, is_causal, key_padding_mask is not None, varlen,
                                        dropout_p)
        meta["USE_TMA"], *descs = 0, None, None
        if alibi_tma.tma_eligible(q, wrap, varlen, key_padding_mask):
            meta["USE_TMA"], *descs = alibi_tma.tma_descriptors(
                k, v, meta["BLOCK_D"], alibi_configs.INTERPRETER_META["BLOCK_N"])
        fwd = alibi_configs.dense_kernels(_backend.interpreting(), meta["USE_TMA"] > 0)[0]
        grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
        mask, stride_mb, stride_mn = alibi_launch.key_mask_args(key_padding_mask, slopes)
        kmax, stride_xb = alibi_skip.key_norm_args(skip, slopes, k, key_padding_mask,
                                                   cu_seqlens_k)
        buffer = alibi_skip.count_buffer(
            counts is not None, slopes,
            _backend.cdiv(seqlen_q, alibi_configs.min_block_m("fwd")) * num_heads * batch)
        with _backend.device_guard(q):
            alibi_launch.launchable(fwd, wrap)[grid](
                q, k, v, out, lse, slopes, mask,
                *alibi_launch.cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes),
                slopes if seed is None else seed, kmax, buffer, *descs, scale, dropout_p,
                alibi_skip.skip_log2(skip_tol) if skip else 0.0,
                *alibi_launch.strides(q, k, v, out, varlen=varlen),
                *alibi_launch.lse_strides(lse, varlen),
                alibi_launch.slope_batch_stride(slopes), stride_mb, stride_mn, stride_xb,
                num_heads // num_kv_heads, seqlen_q, seqlen_k, pos_offset,
                _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k),
                SKIP=skip, COUNT=counts is not None, **meta)
        if counts is not None:
            counts["forward"] = alibi_skip.counted(buffer)
    elif counts is not None:
        counts["forward"] = (0, 0)
    return alibi_launch.to_layout(out, layout, varlen), lse


def launch_alibi_bwd(grad_out, q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, out, lse, is_causal, scale, layout,
                     dropout_p=0.0, seed=None, slopes_grad=False, skip_tol=0.0, wrap=False,
                     pos_offset=0, partial_rows=False, counts=None):
    """``(dq, dk, dv, dslopes)``: the first three shaped like ``q, k, v``, each contiguous in
    ``layout``; ``dslopes`` float32 like ``slopes`` with ``slopes_grad``, else empty.
    ``pos_offset`` as for :func:`launch_alibi_fwd`; ``partial_rows``: the keys are part of each
    row's (a chunk pair of :mod:`posenc_triton.distributed`), ``out`` (best fp32) and ``lse``
    the whole row's, and the slope gradient takes its ``delta`` from them (every tile runs).
    ``skip_tol`` and ``counts`` as for :func:`launch_alibi_fwd`, the bound from the exact
    ``lse``; ``counts`` receives ``"dq"`` and ``"dkdv"``."""
    varlen = cu_seqlens_q is not None
    grad_out, q, k, v, out = (alibi_launch.bhsd(t, layout, varlen)
                              for t in (grad_out, q, k, v, out))
    num_heads, seqlen_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dq = alibi_launch.empty_bhsd(q.shape, layout, q, varlen)
    dk = alibi_launch.empty_bhsd(k.shape, layout, k, varlen)
    dv = alibi_launch.empty_bhsd(v.shape, layout, v, varlen)
    meta = alibi_launch.common_meta(q, is_causal, key_padding_mask is not None, varlen,
                                    dropout_p)
    (dq_tma, *kv_descs), (dkdv_tma, *qdo_descs) = (0, None, None), (0, None, None)
    if alibi_tma.tma_eligible(q, wrap, varlen, key_padding_mask):
        rows = alibi_configs.INTERPRETER_META
        dq_tma, *kv_descs = alibi_tma.tma_descriptors(k, v, meta["BLOCK_D"], rows["BLOCK_N"])
        dkdv_tma, *qdo_descs = alibi_tma.tma_descriptors(q, grad_out, meta["BLOCK_D"],
                                                         rows["BLOCK_M"])
    interpreting = _backend.interpreting()
    preprocess = alibi_configs.dense_kernels(interpreting)[1]
    dq_kernel = alibi_configs.dense_kernels(interpreting, dq_tma > 0)[3]
    dkdv = alibi_configs.dense_kernels(interpreting, dkdv_tma > 0)[2]
    mask, stride_mb, stride_mn = alibi_launch.key_mask_args(key_padding_mask, slopes)
    cu_q, cu_k = alibi_launch.cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes)
    seed = slopes if seed is None else seed
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    # the dkdv kernel's query terms, from the preprocess: [0] after the keys, [1] before
    # (symmetric only)
    lse_bias = torch.empty((1 if is_causal else 2, *lse.shape), dtype=torch.float32,
                           device=q.device)
    bias_period = alibi_configs.bias_period()
    # One fp32 partial slope gradient per dq program, in slots enough for the smallest tile
    # the autotuner may pick (slots it does not reach stay 0); summed below, deterministic.
    slots = _backend.cdiv(max_seqlen_q if varlen else seqlen_q, alibi_configs.min_block_m())
    slots = slots if slopes_grad else 0
    dslope_parts = torch.zeros((batch, num_heads, slots), dtype=torch.float32, device=q.device)
    # (without query rows the preprocess writes no bounds, and dkdv has no row to skip)
    skip = skip_tol > 0 and pos_offset == 0 and not partial_rows and dq.numel() > 0
    log2_tol = alibi_skip.skip_log2(skip_tol) if skip else 0.0
    if skip and slopes_grad:  # the slope gradient weighs each skipped term by its distance
        log2_tol -= math.log2(max(max_seqlen_k if varlen else seqlen_k, 2))
    kmax, stride_xb = alibi_skip.key_norm_args(skip, slopes, k, key_padding_mask, cu_seqlens_k)
    # the preprocess's per-row negligible keys, laid out as lse_bias, then per-key row bounds
    # (without skipping or counting, never-read stand-ins)
    lim = torch.empty(lse_bias.shape, dtype=torch.int32, device=q.device) if skip else slopes
    bounds = lim
    count = counts is not None
    dq_counts = alibi_skip.count_buffer(
        count, slopes, _backend.cdiv(seqlen_q, alibi_configs.min_block_m()) * num_heads * batch)
    dkdv_counts = alibi_skip.count_buffer(
        count, slopes,
        _backend.cdiv(seqlen_k, alibi_configs.min_block_n()) * num_kv_heads * batch)
    with _backend.device_guard(q):
        if varlen:
            seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        if dq.numel() > 0 and seqlen_q > 0:
            block_m = meta.get("BLOCK_M", alibi_configs.PREPROCESS_BLOCK_M)
            grid = (_backend.cdiv(seqlen_q, block_m), num_heads, batch)
            alibi_launch.launchable(preprocess, wrap)[grid](
                out, grad_out, delta, lse, lse_bias, slopes, cu_q, cu_k, q, kmax, lim, scale,
                log2_tol, *alibi_launch.strides(out, grad_out, q, varlen=varlen),
                *alibi_launch.lse_strides(lse, varlen),
                alibi_launch.slope_batch_stride(slopes), lse.numel(), stride_xb,
                num_heads // num_kv_heads, seqlen_q, seqlen_k,
                HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block_m,
                BIAS_PERIOD=bias_period, IS_CAUSAL=is_causal, IS_VARLEN=varlen, SKIP=skip)
            if skip:
                bounds = alibi_skip.dkdv_query_bounds(lim, k.shape[2], is_causal)
        common = (*alibi_launch.lse_strides(lse, varlen),
                  alibi_launch.slope_batch_stride(slopes), stride_mb, stride_mn,
                  num_heads // num_kv_heads, seqlen_q, seqlen_k, pos_offset,
                  _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k))
        if dq.numel() > 0 and seqlen_q > 0:
            grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
            alibi_launch.launchable(dq_kernel, wrap)[grid](
                q, k, v, grad_out, dq, lse, delta, slopes, mask, cu_q, cu_k, seed,
                dslope_parts, lim, dq_counts, *kv_descs, scale, dropout_p,
                *alibi_launch.strides(q, k, v, grad_out, dq, varlen=varlen), *common[:5],
                *dslope_parts.stride()[:2], lse.numel(), *common[5:],
                HAS_SLOPE_GRAD=slopes_grad, PARTIAL_ROWS=partial_rows, SKIP=skip, COUNT=count,
                **{**meta, "USE_TMA": dq_tma})
        if dk.numel() > 0 and seqlen_k > 0:
            grid = lambda m: (_backend.cdiv(seqlen_k, m["BLOCK_N"]), num_kv_heads, batch)
            bound_strides = ((bounds.stride(0), 0 if varlen else bounds.stride(1),
                              bounds.stride(2)) if skip else (0, 0, 0))
            alibi_launch.launchable(dkdv, wrap)[grid](
                q, k, v, grad_out, dk, dv, lse_bias, delta, slopes, mask, cu_q, cu_k, seed,
                bounds, dkdv_counts, *qdo_descs, scale, dropout_p,
                *alibi_launch.strides(q, k, v, grad_out, dk, dv, varlen=varlen),
                *common[:5], lse.numel(), *bound_strides, *common[5:],
                BIAS_PERIOD=bias_period, SKIP=skip, COUNT=count,
                **{**meta, "USE_TMA": dkdv_tma})
    if count:
        counts["dq"] = alibi_skip.counted(dq_counts)
        counts["dkdv"] = alibi_skip.counted(dkdv_counts)
    dslopes = dslope_parts.sum(-1)  # [B, Hq]
    if slopes_grad and slopes.dim() == 1:
        dslopes = dslopes.sum(0)
    dslopes = dslopes.reshape(slopes.shape) if slopes_grad else dslopes.new_empty(0)
    return (*(alibi_launch.to_layout(t, layout, varlen) for t in (dq, dk, dv)), dslopes)


@_backend.library_op("posenc_triton::alibi_attention_fwd", mutates_args=())
def _alibi_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            slopes: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                            max_seqlen_k: int, is_causal: bool, scale: float, layout: str,
                            dropout_p: float, seed: Optional[torch.Tensor], skip_tol: float,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_alibi_fwd(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p,
                            seed, skip_tol, wrap=True)


@_backend.library_op("posenc_triton::alibi_attention_bwd", mutates_args=())
def _alibi_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, slopes: torch.Tensor,
                            key_padding_mask: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                            max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor,
                            is_causal: bool, scale: float, layout: str, dropout_p: float,
                            seed: Optional[torch.Tensor], slopes_grad: bool, skip_tol: float,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_alibi_bwd(grad_out, q, k, v, slopes, key_padding_mask, cu_seqlens_q,
                            cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, is_causal,
                            scale, layout, dropout_p, seed, slopes_grad, skip_tol, wrap=True)


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------


def call_alibi_fwd(*args):
    """``(out, lse)`` through the forward op (under ``torch.compile``) or its launcher."""
    return _backend.call_op(torch.ops.posenc_triton.alibi_attention_fwd, launch_alibi_fwd, *args)


def call_alibi_bwd(*args):
    """``(dq, dk, dv, dslopes)`` through the backward op (under ``torch.compile``) or its
    launcher."""
    return _backend.call_op(torch.ops.posenc_triton.alibi_attention_bwd, launch_alibi_bwd, *args)


class AlibiAttentionFunction(torch.autograd.Function):
    """ALiBi attention of checked arguments (:func:`call_alibi_fwd`'s); backward recomputes the
    probabilities from the saved log-sum-exp (FlashAttention-2), and the dropout mask from
    ``seed``, and returns ``dq, dk, dv`` and, when ``slopes`` requires it, the slope gradient
    (from the fused backward: no ``Sq x Sk`` tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p, seed,
                skip_tol):
        out, lse = call_alibi_fwd(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, is_causal, scale, layout,
                                 dropout_p, seed, skip_tol)
        ctx.save_for_backward(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                              out, lse, seed)
        ctx.args = (max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p, skip_tol)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, slopes, key_padding_mask, cu_q, cu_k, out, lse, seed = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p, skip_tol = ctx.args
        slopes_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dslopes = call_alibi_bwd(
            grad_out, q, k, v, slopes, key_padding_mask, cu_q, cu_k, max_seqlen_q,
            max_seqlen_k, out, lse, is_causal, scale, layout, dropout_p, seed, slopes_grad,
            skip_tol)
        return dq, dk, dv, dslopes if slopes_grad else None, *(None,) * 11


def run_alibi(*args) -> torch.Tensor:
    """``out`` of checked arguments (:class:`AlibiAttentionFunction`'s), through autograd when
    an input requires grad, through the op alone otherwise (no autograd node)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
        return AlibiAttentionFunction.apply(*args)
    return call_alibi_fwd(*args)[0]
