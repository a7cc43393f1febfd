"""ALiBi attention: launchers, ``torch.library`` ops with autograd, and the public function.

Reads top-down: slopes → argument checks → autotune configs → launchers (the bodies of the
``triton_op``s) → autograd registration → :func:`alibi_attention`. Triton and the kernels are
imported lazily, so the package imports where Triton is not installed (the reference runs).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from posenc_triton import _backend
from posenc_triton.reference import alibi_attention_reference

MAX_HEAD_DIM = 256
_MAX_GRID = 65535  # grid axes 1 and 2 carry heads and batch
_LAYOUTS = ("bhsd", "bshd")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi slopes, float32 ``[num_heads]`` (Press et al.; BLOOM's rule for other counts).

    Bit for bit the slopes of BLOOM's ``build_alibi_tensor`` (float32 powers of a float32
    base, on the CPU), so checkpoints trained with them see exactly their slopes; they are
    within a few float32 ulps of the exact values of ``reference.alibi_slopes_list``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

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
    return alibi_slopes(num_heads, device)


def _default_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    # Cached in eager: no host-to-device copy per call (none during CUDA-graph capture).
    # A compiled graph holds them as a constant instead; Dynamo would bypass the cache.
    if torch.compiler.is_compiling():
        return alibi_slopes(num_heads, device)
    return _cached_slopes(num_heads, device)


def _check_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask=None) -> float:
    """Validate :func:`alibi_attention`'s arguments; returns the softmax scale."""
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
    if q.dtype == torch.float64 and q.device.type != "cpu":
        raise TypeError("q, k, v: float64 runs only on CPU (the reference); "
                        "use float16, bfloat16 or float32")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
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
    if batch > _MAX_GRID or num_heads > _MAX_GRID:
        raise ValueError(f"batch ({batch}) and q's head count ({num_heads}) must each be at most "
                         f"{_MAX_GRID} (CUDA grid limit); split the batch")
    num_kv_heads = k.shape[hd]
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count {num_heads} must be a multiple of k's and v's "
                         f"{num_kv_heads} (GQA/MQA)")
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor):
            raise TypeError(f"slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
        if slopes.dtype != torch.float32:
            raise TypeError(f"slopes must be float32, got {slopes.dtype}")
        if tuple(slopes.shape) not in ((num_heads,), (batch, num_heads)):
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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


# ------------------------------------------------------------------------------------------
# Autotuning: short config lists, pruned by head dim; one small fixed config when interpreting
# ------------------------------------------------------------------------------------------


def _config(block_m, block_n, num_warps, num_stages):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages)


def _prune_configs(configs, named_args, **kwargs):
    """Above D = 128 keep the small tiles and shallow pipelines that fit shared memory."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if block_d <= 128:
        return configs
    small = [c for c in configs
             if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 and c.num_stages <= 2]
    return small or configs[-1:]


# The last config of each list is the conservative one that fits D = 256 on any recent GPU.
_FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)]
_DKDV_CONFIGS = [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 32, 4, 1)]
_DQ_CONFIGS = [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)]
_AUTOTUNE_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_KEY_MASK",
                 "INPUT_PRECISION"]
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
_PREPROCESS_BLOCK_M = 64


@functools.cache
def _kernels(interpreting: bool):
    """``(fwd, preprocess, dkdv, dq)``; autotuned on GPU, raw kernels under the interpreter."""
    import triton

    from posenc_triton.kernels import alibi_attention as kern

    kernels = (kern._alibi_attn_fwd, kern._alibi_attn_bwd_dkdv, kern._alibi_attn_bwd_dq)
    if not interpreting:
        kernels = tuple(
            triton.autotune([_config(*c) for c in configs], key=_AUTOTUNE_KEY,
                            prune_configs_by={"early_config_prune": _prune_configs})(kernel)
            for kernel, configs in zip(kernels, (_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS)))
    fwd, dkdv, dq = kernels
    return fwd, kern._alibi_attn_bwd_preprocess, dkdv, dq


def _common_meta(q: torch.Tensor, is_causal: bool, has_key_mask: bool) -> dict:
    """Constexprs shared by the kernels (and the fixed tile when interpreting)."""
    interpreting = _backend.interpreting()
    head_dim = q.shape[-1]
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, _backend.next_power_of_2(head_dim)),
        "IS_CAUSAL": is_causal,
        "HAS_KEY_MASK": has_key_mask,
        # fp32 inputs get IEEE fp32 products (PyTorch's default matmul), not TF32.
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 or interpreting else None,
        # work around the interpreter's bf16 dot and bf16 rounding
        "INTERPRETER": interpreting,
    }
    if interpreting:
        meta.update(_INTERPRETER_META)
    return meta


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _empty_bhsd(shape, layout: str, like: torch.Tensor) -> torch.Tensor:
    """Contiguous in the caller's layout, returned as a ``[B, H, S, D]`` view."""
    b, h, s, d = shape
    if layout == "bshd":
        return torch.empty((b, s, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty((b, h, s, d), dtype=like.dtype, device=like.device)


def _slope_batch_stride(slopes: torch.Tensor) -> int:
    return 0 if slopes.dim() == 1 else slopes.stride(0)


def _key_mask_args(key_padding_mask: Optional[torch.Tensor], slopes: torch.Tensor):
    """``(pointer, stride_b, stride_n)`` for the kernels' ``KPM``: the bool mask read as bytes
    (a view, any strides), or a never-read stand-in when there is none (``HAS_KEY_MASK`` off)."""
    if key_padding_mask is None:
        return slopes, 0, 0
    return (key_padding_mask.view(torch.uint8), *key_padding_mask.stride())


# ------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops
# ------------------------------------------------------------------------------------------


@torch.library.triton_op("posenc_triton::alibi_attention_fwd", mutates_args=())
def alibi_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            slopes: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                            is_causal: bool, scale: float,
                            layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: ``out`` like ``q`` (contiguous in ``layout``), ``lse`` float32
    ``[B, Hq, Sq]`` (natural log, ``+inf`` for rows that see no key).

    ``slopes`` is contiguous float32 ``[Hq]`` or ``[B, Hq]``, ``key_padding_mask`` bool
    ``[B, Sk]`` (any strides) or None; arguments are already checked.
    """
    q, k, v = (_bhsd(t, layout) for t in (q, k, v))
    batch, num_heads, seqlen_q, _ = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    out = _empty_bhsd(q.shape, layout, q)
    lse = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return _bhsd(out, layout), lse
    fwd = _kernels(_backend.interpreting())[0]
    meta = _common_meta(q, is_causal, key_padding_mask is not None)
    mask, stride_mb, stride_mn = _key_mask_args(key_padding_mask, slopes)
    grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
    _backend.launcher(fwd)[grid](
        q, k, v, out, lse, slopes, mask, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        _slope_batch_stride(slopes), stride_mb, stride_mn,
        num_heads, num_heads // num_kv_heads, seqlen_q, seqlen_k,
        _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k), **meta)
    return _bhsd(out, layout), lse


@torch.library.triton_op("posenc_triton::alibi_attention_bwd", mutates_args=())
def alibi_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, slopes: torch.Tensor,
                             key_padding_mask: Optional[torch.Tensor], out: torch.Tensor,
                             lse: torch.Tensor, is_causal: bool, scale: float,
                             layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped like ``q, k, v``, each contiguous in ``layout``."""
    grad_out, q, k, v, out = (_bhsd(t, layout) for t in (grad_out, q, k, v, out))
    batch, num_heads, seqlen_q, head_dim = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    dq = _empty_bhsd(q.shape, layout, q)
    dk = _empty_bhsd(k.shape, layout, k)
    dv = _empty_bhsd(v.shape, layout, v)
    _, preprocess, dkdv, dq_kernel = _kernels(_backend.interpreting())
    meta = _common_meta(q, is_causal, key_padding_mask is not None)
    launch = _backend.launcher
    mask, stride_mb, stride_mn = _key_mask_args(key_padding_mask, slopes)
    common = (_slope_batch_stride(slopes), stride_mb, stride_mn,
              num_heads, num_heads // num_kv_heads, seqlen_q, seqlen_k,
              _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k))
    if dq.numel() > 0:
        delta = torch.empty_like(lse)
        block_m = meta.get("BLOCK_M", _PREPROCESS_BLOCK_M)
        launch(preprocess)[(_backend.cdiv(seqlen_q, block_m), num_heads, batch)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, seqlen_q,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block_m)
        grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
        launch(dq_kernel)[grid](
            q, k, v, grad_out, dq, lse, delta, slopes, mask, scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            *common, **meta)
    else:
        delta = lse  # no query rows: the dk/dv kernel never reads it
    if dk.numel() > 0:
        grid = lambda m: (_backend.cdiv(seqlen_k, m["BLOCK_N"]), num_kv_heads, batch)
        launch(dkdv)[grid](
            q, k, v, grad_out, dk, dv, lse, delta, slopes, mask, scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
            *dv.stride(), *common, **meta)
    return _bhsd(dq, layout), _bhsd(dk, layout), _bhsd(dv, layout)


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, key_padding_mask, is_causal, scale, layout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, slopes, key_padding_mask, out, lse)
    ctx.is_causal, ctx.scale, ctx.layout = is_causal, scale, layout


def _backward(ctx, grad_out, grad_lse):
    q, k, v, slopes, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.posenc_triton.alibi_attention_bwd(
        grad_out, q, k, v, slopes, key_padding_mask, out, lse, ctx.is_causal, ctx.scale,
        ctx.layout)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("posenc_triton::alibi_attention_fwd", _backward,
                                setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slopes: Optional[torch.Tensor] = None, *, is_causal: bool = True,
                    scale: Optional[float] = None, layout: str = "bhsd",
                    key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention with the ALiBi bias, like ``F.scaled_dot_product_attention``.

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hk, Sk, D]`` (``layout="bhsd"``) or ``[B, S, H, D]``
    (``"bshd"``), any strides, ``Hq % Hk == 0``, ``D <= 256``; ``slopes`` float32 ``[Hq]`` or
    ``[B, Hq]`` (default :func:`alibi_slopes`), no gradient. Query ``i`` sits at key position
    ``i + Sk - Sq`` (bottom-right); a causal row that sees no key outputs 0. ``scale``
    defaults to ``1/sqrt(D)``. ``key_padding_mask`` bool ``[B, Sk]`` (True = keep, like
    flash-attn's ``attention_mask``; any strides) hides padded keys from every query: a row
    left with no key outputs 0, and padded keys get ``dk = dv = 0``. Returns ``out`` shaped
    like ``q`` in ``layout``.
    """
    scale = _check_args(q, k, v, slopes, is_causal, scale, layout, key_padding_mask)
    if slopes is None:
        slopes = _default_slopes(q.shape[1 if layout == "bhsd" else 2], q.device)
    if not _backend.use_triton(q) or q.dtype == torch.float64:
        return alibi_attention_reference(q, k, v, slopes, is_causal=is_causal, scale=scale,
                                         layout=layout, upcast=True,
                                         key_padding_mask=key_padding_mask)
    out, _ = torch.ops.posenc_triton.alibi_attention_fwd(
        q, k, v, slopes.contiguous(), key_padding_mask, is_causal, scale, layout)
    return out
