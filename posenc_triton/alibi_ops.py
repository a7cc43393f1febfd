"""ALiBi attention launchers, registered as ``torch.library`` ops with autograd.

Layers, top-down, as in :mod:`posenc_triton.rope_ops`: autotune configs → launch helpers →
the forward and backward launchers → the ops ``posenc_triton::alibi_attention_fwd/bwd`` (the
same, visible to ``torch.compile``: ``triton_op``s on GPU, opaque ``custom_op``s under the
interpreter, see :func:`posenc_triton._backend.library_op`) → ``AlibiAttentionFunction``
(autograd). Arguments arrive checked by :func:`posenc_triton.alibi.alibi_attention`.
Triton and the kernels are imported lazily, so the package imports where Triton is not
installed.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from posenc_triton import _backend

# ------------------------------------------------------------------------------------------
# Autotuning: short config lists, pruned by bytes per head row; one fixed tile when interpreting
# ------------------------------------------------------------------------------------------


def _config(block_m, block_n, num_warps, num_stages, pre_hook=None):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


def _prune_configs(configs, named_args, kernel=None, **kwargs):
    """Keep the configs that neither spill registers nor overflow sm_90's 227 KiB of shared
    memory (``python -m posenc_triton.bench.audit`` checks both on the sm_90 machine code).

    fp32 (IEEE products: no tensor cores, both operand tiles in registers) runs
    ``_IEEE_TILE`` only, the tile that fits every head dim. Shared memory: every tile up to 256
    bytes per head row (bf16/fp16 at D <= 128); small tiles with shallow pipelines beyond
    (D = 256). Registers: ``_SPILLS`` lists the tiles that spill in a variant.
    """
    def get(name):
        return kwargs.get(name, named_args.get(name))

    if get("INPUT_PRECISION") == "ieee":
        return [_config(*_IEEE_TILE, pre_hook=configs[0].pre_hook)]

    on = {"all": True, "symmetric": not get("IS_CAUSAL"), "gqa": get("group") != 1,
          "mha": get("group") == 1, "tma": bool(get("USE_TMA")),
          "dropout": get("HAS_DROPOUT"), "slope_grad": get("HAS_SLOPE_GRAD"),
          "pointers": not get("USE_TMA"), "key_mask": get("HAS_KEY_MASK"),
          "varlen": get("IS_VARLEN"),
          "sm80": _arch(get("Q")) < 90, "triton38": _triton_version() < (3, 9),
          "triton39": _triton_version() >= (3, 9)}
    drop = {tile for variant, tiles in _SPILLS.get(kernel, {}).items()
            if all(on[part] for part in variant.split("+")) for tile in tiles}
    kept = [c for c in configs if _tile(c) not in drop] or configs[-1:]
    if get("BLOCK_D") <= 128:
        # A warp's tensor-core ops take 16 rows of the score tile (keys in dkdv): with fewer
        # rows than 16 a warp, warps compute the same scores twice. Such tiles (8 warps on 64
        # or 32 rows) serve D = 256's registers only.
        rows = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
        return [c for c in kept if c.kwargs[rows] >= 16 * c.num_warps] or kept

    def small(cs):
        return [c for c in cs
                if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 and c.num_stages == 2]

    return small(kept) or small(configs)  # a spill is slow, too much shared memory fails


@functools.cache
def _triton_version() -> tuple:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def _arch(t) -> int:
    """``t``'s GPU as ``10 * major + minor``; sm_90 for anything else (the static audit)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages), largest first; the last config of each list is
# the conservative one that fits D = 256 on any recent GPU. Left out, because they spill on
# sm_90 at D = 128 (bench/NOTES.md has the audit): forward (128, 64, 4, 3), which spills in
# the tutorial too; dq (128, 32, 4, 5) (the tutorial too); dkdv (64, 128, 8, 3) and
# (32, 128, 4, 5) (the tutorial too), (32, 128, 8, 2), (64, 64, 4, 3) and (64, 64, 8, 2);
# at D = 256 (the small tiles below) dq (64, 32, 4, 2) and (32, 32, 4, 1), dkdv (32, 32, 4, 1)
# and (16, 64, 8, 2), hence dq's (64, 32, 4, 3) and the D = 256 ends dq (64, 16, 4, 2) and dkdv
# (32, 32, 8, 2). dkdv's BLOCK_M must divide the largest one (``_bias_period``).
_FWD_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                (64, 64, 8, 2), (64, 32, 4, 2)]
_DKDV_CONFIGS = [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3), (16, 64, 4, 1),
                 (32, 32, 8, 2)]
_DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 2)]
# Tiles that spill in one variant only, kept for the others ("a+b": both at once). Forward:
# the big tiles fit 255 registers only with TMA loads (pointer loads hold 16 addresses per
# thread more; the bias column term needs 32 registers on top of the tutorial's 228); the
# symmetric forward's four loop stages spill 44-68 B at (128, 64, 8, 3) with pointers; the
# dropout mask's Philox rounds spill 144-184 B at the big tiles and 32-60 B at (64, 64, 4, 3);
# on sm_80 the key mask's loads spill 40 B at (128, 64, 8, 3). dq (with TMA it holds 16-32
# registers of score terms across its loop, which dropout leaves no room for): the Philox
# rounds spill 76 B at (64, 64, 4, 3) with pointers (255 registers; the (128, 64, 8, 3) tile,
# the same per thread, fits in 250; with TMA it fits), and with the slope gradient's row sums
# as well 428 B at (128, 64, 8, 3) and 248-508 B at (64, 64, 4, 3) (with TMA);
# packed input's sequence bounds spill 24-92 B at (64, 64, 4, 3).
# dkdv: the loop over the query heads of a KV head (GQA, group > 1) spills 88-300 B at
# (32, 128, 8, 3) with pointers (with TMA it fits, 240-252 registers) and 172-872 B of
# scalars at (32, 64, 4, 3); dropout spills 72-332 B at (32, 128, 8, 3), symmetric dropout
# 40 B at (32, 64, 4, 3) with pointers (with TMA it fits) and, with GQA, 72-84 B at
# (16, 128, 8, 3); with TMA, MHA spills 24 B at (32, 32, 8, 2). dq dropout fits
# (64, 64, 4, 3) with TMA (230-236 registers). sm_80 (A100: mma.sync, pointer loads) spills
# 12-3312 B at dq's 128-row tiles (and 44-144 B at (64, 64, 4, 3) with the slope gradient
# or a key mask), 12-528 B at dkdv's 128-key tiles and 436 B at (32, 64, 4, 3) with dropout.
# Triton 3.8 (what torch 2.14 pins) allocates registers a little worse than 3.9 (sm_90, D = 128,
# bench/results/audit/triton-3.8.md): the symmetric forward's big TMA tiles spill 56 B; dkdv
# with GQA 64-196 B at (32, 128, 8, 3) and 40-124 B at (16, 128, 8, 3) when symmetric or
# with dropout, and 52-72 B at (32, 64, 4, 3) with dropout; dq 16 B at (64, 64, 4, 3) with
# dropout (TMA) and 8 B there when symmetric with the slope gradient.
_SPILLS = {
    "fwd": {"pointers": [(128, 128, 8, 3), (64, 128, 4, 3)],
            "pointers+symmetric": [(128, 64, 8, 3)],
            "dropout": [(128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)],
            "sm80+key_mask": [(128, 64, 8, 3)],
            "triton38+symmetric": [(128, 128, 8, 3), (64, 128, 4, 3)]},
    "dq": {"pointers+dropout": [(64, 64, 4, 3)],
           "dropout+slope_grad": [(128, 64, 8, 3), (64, 64, 4, 3)],
           "varlen": [(64, 64, 4, 3)], "sm80": [(128, 64, 8, 3), (128, 32, 8, 3)],
           "sm80+slope_grad": [(64, 64, 4, 3)], "sm80+key_mask": [(64, 64, 4, 3)],
           "triton38+dropout": [(64, 64, 4, 3)],
           "triton38+symmetric+slope_grad": [(64, 64, 4, 3)]},
    "dkdv": {"gqa": [(32, 64, 4, 3)], "pointers+gqa": [(32, 128, 8, 3)],
             "dropout": [(32, 128, 8, 3), (16, 64, 4, 1)],
             "pointers+symmetric+dropout": [(32, 64, 4, 3)],
             "symmetric+dropout+gqa": [(16, 128, 8, 3)],
             "tma+mha": [(32, 32, 8, 2)], "sm80": [(32, 128, 8, 3), (16, 128, 8, 3)],
             "sm80+dropout": [(32, 64, 4, 3)],
             "triton38+gqa": [(32, 128, 8, 3)], "triton38+symmetric+gqa": [(16, 128, 8, 3)],
             "triton38+dropout": [(32, 64, 4, 3)], "triton38+dropout+gqa": [(16, 128, 8, 3)],
             # (16, 64, 4, 1): on Triton 3.8, the symmetric GQA dkdv's tile (the others spill)
             "triton39": [(16, 64, 4, 1)], "key_mask": [(16, 64, 4, 1)],
             "varlen": [(16, 64, 4, 1)]},
}

# fp32 inputs: with IEEE products every larger tile spills on sm_90, up to 150 KB at D = 256
# (bench/NOTES.md); this one holds 66-128 registers at D = 64-256 with pointer loads.
_IEEE_TILE = (16, 16, 4, 1)
_AUTOTUNE_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_KEY_MASK",
                 "IS_VARLEN", "HAS_DROPOUT", "INPUT_PRECISION"]
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
_PREPROCESS_BLOCK_M = 64


# TMA (sm_90 and later): the tiles each kernel loops over (K and V in the forward and dq, Q
# and dO in dkdv) through tensor descriptors, whose block follows the config's tile (an
# autotune pre-hook). torch.compile refuses configs with hooks, so the TMA kernels are a
# second set of autotuned kernels, for eager launches only.
_DESC_BLOCKS = {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N", "Q_DESC": "BLOCK_M",
                "DO_DESC": "BLOCK_M"}


def _descriptor_blocks(nargs):
    for name, block in _DESC_BLOCKS.items():
        desc = nargs.get(name)
        if desc is not None:  # the rows' dimension is the one whose block is not 1
            rows = 1 if desc.block_shape[1] != 1 else 2
            desc.block_shape = [nargs[block] if d == rows else 1 for d in range(3)] + [
                nargs["BLOCK_D"]]


def _tma_capable(t: torch.Tensor) -> bool:
    """Hopper or later, unless ``POSENC_TRITON_TMA=0``; never under the interpreter (tests
    patch this to run the descriptor path there)."""
    if _backend.interpreting() or not t.is_cuda or os.environ.get("POSENC_TRITON_TMA") == "0":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def _tma_view(t: torch.Tensor):
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


def _tma_descriptors(a: torch.Tensor, b: torch.Tensor, block_d: int, block: str = "BLOCK_N"
                     ) -> tuple:
    """``(mode, desc_a, desc_b)``: descriptors of two ``[B, H, S, D]`` tensors laid out alike,
    blocks of ``block`` rows (the pre-hook sets it on GPU), ``mode`` as
    :func:`_tma_view`'s (the kernels' ``USE_TMA``); ``(0, None, None)`` where TMA cannot load
    them."""
    views = [_tma_view(t) for t in (a, b)]
    if not (_tma_capable(a) and all(views) and views[0][0] == views[1][0]):
        return 0, None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    mode = views[0][0]
    rows = _INTERPRETER_META[block]
    shape = [1, rows, 1, block_d] if mode == 2 else [1, 1, rows, block_d]
    return (mode, *(TensorDescriptor(v, list(v.shape), st, shape) for _, v, st in views))


def _tma_eligible(q: torch.Tensor, wrap: bool, varlen: bool, key_padding_mask) -> bool:
    """Padded keys are never read (masked loads); packed sequences end inside the tensor;
    ``torch.compile`` graphs take no pre-hooks; IEEE fp32 products need the registers TMA
    tiles take."""
    return not (wrap or varlen or key_padding_mask is not None or q.dtype == torch.float32)


@functools.cache
def _kernels(interpreting: bool, tma: bool = False):
    """``(fwd, preprocess, dkdv, dq)``; autotuned on GPU (``tma``: with the pre-hook that sizes
    the descriptors' blocks), raw kernels under the interpreter."""
    import triton

    from posenc_triton.kernels import alibi_attention as kern
    from posenc_triton.kernels import alibi_attention_bwd as bwd

    kernels = (kern._alibi_attn_fwd, bwd._alibi_attn_bwd_dkdv, bwd._alibi_attn_bwd_dq)
    if not interpreting:
        kernels = tuple(
            triton.autotune([_config(*c, pre_hook=_descriptor_blocks if tma else None)
                             for c in configs], key=_AUTOTUNE_KEY + extra_key,
                            prune_configs_by={"early_config_prune": functools.partial(
                                _prune_configs, kernel=name)})(kernel)
            for kernel, configs, name, extra_key in zip(
                kernels, (_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS), ("fwd", "dkdv", "dq"),
                ([], ["group"], ["HAS_SLOPE_GRAD"])))
    fwd, dkdv, dq = kernels
    return fwd, bwd._alibi_attn_bwd_preprocess, dkdv, dq


def _common_meta(q: torch.Tensor, is_causal: bool, has_key_mask: bool, varlen: bool,
                 dropout_p: float = 0.0) -> dict:
    """Constexprs shared by the kernels (and the fixed tile when interpreting)."""
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
        meta.update(_INTERPRETER_META)
    return meta


# Packed (varlen) tensors [total, H, D] travel as one batch of bshd: [1, H, total, D] views.


def _bhsd(t: torch.Tensor, layout: str, varlen: bool = False) -> torch.Tensor:
    if varlen:
        t = t.unsqueeze(0)
    return t.transpose(1, 2) if layout == "bshd" or varlen else t


def _layout(t: torch.Tensor, layout: str, varlen: bool) -> torch.Tensor:
    """A ``[B, H, S, D]`` view back in the caller's layout (``[total, H, D]`` packed)."""
    return t.transpose(1, 2)[0] if varlen else _bhsd(t, layout)


def _empty_bhsd(shape, layout: str, like: torch.Tensor, varlen: bool = False) -> torch.Tensor:
    """Contiguous in the caller's layout, returned as a ``[B, H, S, D]`` view."""
    b, h, s, d = shape
    if layout == "bshd" or varlen:
        return torch.empty((b, s, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty((b, h, s, d), dtype=like.dtype, device=like.device)


def _strides(*tensors: torch.Tensor, varlen: bool) -> list:
    """The 4 strides of each ``[B, H, S, D]`` view; packed rows are addressed by their
    sequence's first row, not by batch, so the batch stride is 0 then."""
    return [s for t in tensors for s in ((0,) if varlen else t.stride()[:1]) + t.stride()[1:]]


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple:
    return (0 if varlen else lse.stride(0)), lse.stride(1)


def _slope_batch_stride(slopes: torch.Tensor) -> int:
    return 0 if slopes.dim() == 1 else slopes.stride(0)


def _key_mask_args(key_padding_mask: Optional[torch.Tensor], slopes: torch.Tensor):
    """``(pointer, stride_b, stride_n)`` for the kernels' ``KPM``: the bool mask read as bytes
    (a view, any strides), or a never-read stand-in when there is none (``HAS_KEY_MASK`` off)."""
    if key_padding_mask is None:
        return slopes, 0, 0
    return (key_padding_mask.view(torch.uint8), *key_padding_mask.stride())


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
            dropout._dropout_mask_kernel[grid](seed, mask, dropout_p, seqlen_q, seqlen_k,
                                               BLOCK_M=16, BLOCK_N=16)
    return mask.bool()


def _cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes: torch.Tensor) -> tuple:
    """``(CU_Q, CU_K)``; never-read stand-ins when not packed (``IS_VARLEN`` off)."""
    if cu_seqlens_q is None:
        return slopes, slopes
    return cu_seqlens_q, cu_seqlens_k


# ------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops
# ------------------------------------------------------------------------------------------


def alibi_attention_forward(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, is_causal, scale, layout,
                            dropout_p=0.0, seed=None, wrap=False):
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
    (:mod:`posenc_triton.alibi_decode`; the rule is its ``use_split``).
    """
    from posenc_triton import alibi_decode  # lazily: it reuses this module's helpers

    if dropout_p == 0 and alibi_decode.use_split(q, k, layout, cu_seqlens_q, max_seqlen_q,
                                                 max_seqlen_k):
        return alibi_decode.alibi_decode_forward(
            q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, is_causal, scale, layout, wrap=wrap)
    varlen = cu_seqlens_q is not None
    q, k, v = (_bhsd(t, layout, varlen) for t in (q, k, v))
    num_heads, seqlen_q, num_kv_heads, seqlen_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = _empty_bhsd(q.shape, layout, q, varlen)
    lse = torch.empty((q.shape[0], num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if varlen:
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    if out.numel() > 0 and seqlen_q > 0:
        meta = _common_meta(q, is_causal, key_padding_mask is not None, varlen, dropout_p)
        meta["USE_TMA"], *descs = 0, None, None
        if _tma_eligible(q, wrap, varlen, key_padding_mask):
            meta["USE_TMA"], *descs = _tma_descriptors(k, v, meta["BLOCK_D"])
        fwd = _kernels(_backend.interpreting(), meta["USE_TMA"] > 0)[0]
        grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
        mask, stride_mb, stride_mn = _key_mask_args(key_padding_mask, slopes)
        with _backend.device_guard(q):
            _launch(fwd, wrap)[grid](
                q, k, v, out, lse, slopes, mask,
                *_cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes),
                slopes if seed is None else seed, *descs, scale, dropout_p,
                *_strides(q, k, v, out, varlen=varlen), *_lse_strides(lse, varlen),
                _slope_batch_stride(slopes), stride_mb, stride_mn,
                num_heads // num_kv_heads, seqlen_q, seqlen_k,
                _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k), **meta)
    return _layout(out, layout, varlen), lse


def alibi_attention_backward(grad_out, q, k, v, slopes, key_padding_mask, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, is_causal, scale,
                             layout, dropout_p=0.0, seed=None, slopes_grad=False, wrap=False):
    """``(dq, dk, dv, dslopes)``: the first three shaped like ``q, k, v``, each contiguous in
    ``layout``; ``dslopes`` float32 like ``slopes`` with ``slopes_grad``, else empty."""
    varlen = cu_seqlens_q is not None
    grad_out, q, k, v, out = (_bhsd(t, layout, varlen) for t in (grad_out, q, k, v, out))
    num_heads, seqlen_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dq = _empty_bhsd(q.shape, layout, q, varlen)
    dk = _empty_bhsd(k.shape, layout, k, varlen)
    dv = _empty_bhsd(v.shape, layout, v, varlen)
    meta = _common_meta(q, is_causal, key_padding_mask is not None, varlen, dropout_p)
    (dq_tma, *kv_descs), (dkdv_tma, *qdo_descs) = (0, None, None), (0, None, None)
    if _tma_eligible(q, wrap, varlen, key_padding_mask):
        dq_tma, *kv_descs = _tma_descriptors(k, v, meta["BLOCK_D"])  # dq's tiles
        dkdv_tma, *qdo_descs = _tma_descriptors(q, grad_out, meta["BLOCK_D"], "BLOCK_M")
    interpreting = _backend.interpreting()
    preprocess = _kernels(interpreting)[1]
    dq_kernel = _kernels(interpreting, dq_tma > 0)[3]
    dkdv = _kernels(interpreting, dkdv_tma > 0)[2]
    mask, stride_mb, stride_mn = _key_mask_args(key_padding_mask, slopes)
    cu_q, cu_k = _cu_seqlens_args(cu_seqlens_q, cu_seqlens_k, slopes)
    seed = slopes if seed is None else seed
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    # the dkdv kernel's query terms, from the preprocess: [0] after the keys, [1] before
    # (symmetric only)
    lse_bias = torch.empty((1 if is_causal else 2, *lse.shape), dtype=torch.float32,
                           device=q.device)
    bias_period = _bias_period()
    # One fp32 partial slope gradient per dq program, in slots enough for the smallest tile
    # the autotuner may pick (slots it does not reach stay 0); summed below, deterministic.
    slots = _backend.cdiv(max_seqlen_q if varlen else seqlen_q, _min_block_m())
    slots = slots if slopes_grad else 0
    dslope_parts = torch.zeros((batch, num_heads, slots), dtype=torch.float32, device=q.device)
    with _backend.device_guard(q):
        if varlen:
            seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        if dq.numel() > 0 and seqlen_q > 0:
            block_m = meta.get("BLOCK_M", _PREPROCESS_BLOCK_M)
            _launch(preprocess, wrap)[(_backend.cdiv(seqlen_q, block_m), num_heads, batch)](
                out, grad_out, delta, lse, lse_bias, slopes, cu_q,
                *_strides(out, grad_out, varlen=varlen), *_lse_strides(lse, varlen),
                _slope_batch_stride(slopes), lse.numel(), seqlen_q,
                HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block_m,
                BIAS_PERIOD=bias_period, IS_CAUSAL=is_causal, IS_VARLEN=varlen)
        common = (*_lse_strides(lse, varlen), _slope_batch_stride(slopes), stride_mb, stride_mn,
                  num_heads // num_kv_heads, seqlen_q, seqlen_k,
                  _backend.next_power_of_2(seqlen_q), _backend.next_power_of_2(seqlen_k))
        if dq.numel() > 0 and seqlen_q > 0:
            grid = lambda m: (_backend.cdiv(seqlen_q, m["BLOCK_M"]), num_heads, batch)
            _launch(dq_kernel, wrap)[grid](
                q, k, v, grad_out, dq, lse, delta, slopes, mask, cu_q, cu_k, seed,
                dslope_parts, *kv_descs, scale, dropout_p,
                *_strides(q, k, v, grad_out, dq, varlen=varlen), *common[:5],
                *dslope_parts.stride()[:2], *common[5:], HAS_SLOPE_GRAD=slopes_grad,
                **{**meta, "USE_TMA": dq_tma})
        if dk.numel() > 0 and seqlen_k > 0:
            grid = lambda m: (_backend.cdiv(seqlen_k, m["BLOCK_N"]), num_kv_heads, batch)
            _launch(dkdv, wrap)[grid](
                q, k, v, grad_out, dk, dv, lse_bias, delta, slopes, mask, cu_q, cu_k, seed,
                *qdo_descs, scale, dropout_p, *_strides(q, k, v, grad_out, dk, dv, varlen=varlen),
                *common[:5], lse.numel(), *common[5:], BIAS_PERIOD=bias_period,
                **{**meta, "USE_TMA": dkdv_tma})
    dslopes = dslope_parts.sum(-1)  # [B, Hq]
    if slopes_grad and slopes.dim() == 1:
        dslopes = dslopes.sum(0)
    return (*(_layout(t, layout, varlen) for t in (dq, dk, dv)), dslopes.reshape(slopes.shape)
            if slopes_grad else dslopes.new_empty(0))


def _bias_period() -> int:
    """The period of the dkdv kernel's query terms: every ``BLOCK_M`` it may run with divides
    it, and it is no larger, so the terms stay as small as a tile's. Interpreted, twice the
    tile, so that the tests see query tiles that start inside a period (as a GPU's smaller
    tiles do)."""
    if _backend.interpreting():
        return 2 * _INTERPRETER_META["BLOCK_M"]
    return max(max(c[0] for c in _DKDV_CONFIGS), _IEEE_TILE[0])


def _min_block_m() -> int:
    """The smallest ``BLOCK_M`` the ``dq`` kernel may run with."""
    if _backend.interpreting():
        return _INTERPRETER_META["BLOCK_M"]
    return min(min(c[0] for c in _DQ_CONFIGS), _IEEE_TILE[0])


def _launch(kernel, wrap: bool):
    return _backend.launcher(kernel) if wrap else kernel


@_backend.library_op("posenc_triton::alibi_attention_fwd", mutates_args=())
def _alibi_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            slopes: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                            max_seqlen_k: int, is_causal: bool, scale: float, layout: str,
                            dropout_p: float, seed: Optional[torch.Tensor],
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return alibi_attention_forward(q, k, v, slopes, key_padding_mask, cu_seqlens_q,
                                   cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                                   layout, dropout_p, seed, wrap=True)


@_backend.library_op("posenc_triton::alibi_attention_bwd", mutates_args=())
def _alibi_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, slopes: torch.Tensor,
                            key_padding_mask: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                            max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor,
                            is_causal: bool, scale: float, layout: str, dropout_p: float,
                            seed: Optional[torch.Tensor], slopes_grad: bool,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return alibi_attention_backward(grad_out, q, k, v, slopes, key_padding_mask, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse,
                                    is_causal, scale, layout, dropout_p, seed, slopes_grad,
                                    wrap=True)


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------


def alibi_forward(*args):
    """``(out, lse)`` through the forward op (under ``torch.compile``) or its launcher."""
    return _backend.call_op(torch.ops.posenc_triton.alibi_attention_fwd,
                            alibi_attention_forward, *args)


class AlibiAttentionFunction(torch.autograd.Function):
    """ALiBi attention of checked arguments (:func:`alibi_forward`'s); backward recomputes the
    probabilities from the saved log-sum-exp (FlashAttention-2), and the dropout mask from
    ``seed``, and returns ``dq, dk, dv`` and, when ``slopes`` requires it, the slope gradient
    (from the fused backward: no ``Sq x Sk`` tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p, seed):
        out, lse = alibi_forward(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, is_causal, scale, layout,
                                 dropout_p, seed)
        ctx.save_for_backward(q, k, v, slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                              out, lse, seed)
        ctx.args = (max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, slopes, key_padding_mask, cu_q, cu_k, out, lse, seed = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, is_causal, scale, layout, dropout_p = ctx.args
        slopes_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dslopes = _backend.call_op(
            torch.ops.posenc_triton.alibi_attention_bwd, alibi_attention_backward,
            grad_out, q, k, v, slopes, key_padding_mask, cu_q, cu_k, max_seqlen_q,
            max_seqlen_k, out, lse, is_causal, scale, layout, dropout_p, seed, slopes_grad)
        return dq, dk, dv, dslopes if slopes_grad else None, *(None,) * 10
