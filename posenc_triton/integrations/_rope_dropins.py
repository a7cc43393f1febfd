"""Fused drop-ins for transformers' RoPE functions, one per behaviour class.

Each keeps the exact signature of the function it replaces, rotates with
:func:`posenc_triton.apply_rope` (one launch for q and k, fp32 math, one rounding) and returns
what transformers returns: the same shapes, and its dtype rule (the promotion of q with
cos/sin, or q's dtype for the models that compute in fp32 and cast back).

============================================  =====================================  ==========
drop-in (replaces)                            models (cos/sin layout)                pairs
============================================  =====================================  ==========
``fused_apply_rotary_pos_emb``                Llama, Mistral, Qwen, Gemma, NeoX,     rotate-half
(``apply_rotary_pos_emb``)                    Phi, Falcon, ... (``cat(f, f)``)
``fused_apply_rotary_pos_emb_fp32``           OLMo, OLMo-2 (fp32, cast)              rotate-half
``fused_apply_rotary_pos_emb_glm``            GLM, GLM-4, Helium (``cat(f, f)``)     interleaved
``fused_apply_rotary_pos_emb_glm_fp32``       ERNIE-4.5 (fp32, cast back)            interleaved
``fused_apply_rotary_pos_emb_cohere``         Cohere (``repeat_interleave(f)``)      interleaved
``fused_apply_rotary_pos_emb_pairs``          GLM-4V (``repeat_interleave(f)``)      interleaved
``fused_apply_rotary_pos_emb_single``         Gemma-3n, Gemma-4: one tensor a call   rotate-half
``fused_apply_rotary_pos_emb_gptj``           GPT-J, CodeGen: ``(x, sin, cos)``      interleaved
``fused_apply_rotary_pos_emb_interleave``     DeepSeek-V3 (de-interleave, rotate)    interleaved
``fused_apply_rotary_emb_complex``            Llama-4 (complex ``freqs_cis``)        interleaved
``fused_apply_rotary_emb_complex_bhsd``       DeepSeek-V2 (complex, bhsd q/k)        interleaved
``fused_rotary_pos_emb`` (``_fp32``,          the hub function ``rotary_pos_emb``    rotate-half
``_interleaved``)                             (``cat(f, f)``, or GPT-OSS's ``f``)    (or pairs)
============================================  =====================================  ==========

The cos/sin layout is the model's rotary embedding's: the drop-ins read one value per pair
from it (the first half of ``cat(f, f)``, every other entry of ``repeat_interleave``), which
is why :mod:`._rope_patch` only installs a drop-in after checking, on float64 probes in that
layout, that it computes what the original computes. A rotary width below the head dim
(``cos.shape[-1] < D``) is partial rotary: ``x[..., R:]`` passes through.

cos/sin that require grad (no transformers model does this) or a dtype without a kernel
(float64) run the same math in plain PyTorch (:func:`_eager`).
"""

from __future__ import annotations

import torch

from posenc_triton import apply_rope

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# The shared core: checks, the kernel call, the eager math
# ----------------------------------------------------------------------------------------


def _check(q, k, cos, sin, unsqueeze_dim, rot: int) -> bool:
    """Validate a drop-in's tensors; returns whether q/k are ``[B, H, S, D]`` (else bshd)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) and not (name == "k" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, H, S, D] (unsqueeze_dim=1) or [B, S, H, D] "
                         f"(unsqueeze_dim=2), got shape {tuple(q.shape)}")
    if cos.dim() != 3 or tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"cos and sin must both be [B or 1, S, R] (or [S, R]), got cos "
                         f"{tuple(cos.shape)} and sin {tuple(sin.shape)}")
    ud = unsqueeze_dim
    if isinstance(ud, int) and not isinstance(ud, bool) and ud < 0:
        ud += 4  # cos.unsqueeze(-3) / (-2) of a 3-D cos are dims 1 / 2
    if isinstance(ud, bool) or ud not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q/k [B, H, S, D]) or 2 (q/k [B, S, H, D]), "
                         f"got {unsqueeze_dim!r}")
    seq_dim = 2 if ud == 1 else 1
    batch, seqlen, dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    if k is not None and (k.dim() != 4 or (k.shape[0], k.shape[seq_dim], k.shape[3])
                          != (batch, seqlen, dim)):
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence "
                         f"length and head dim for unsqueeze_dim={unsqueeze_dim} (heads may "
                         f"differ)")
    if cos.shape[1] != seqlen or cos.shape[0] not in (1, batch):
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [1 or B={batch}, S={seqlen}, R] "
                         f"for q {tuple(q.shape)} with unsqueeze_dim={unsqueeze_dim}")
    if rot == 0 or rot % 2 or rot > dim:
        raise ValueError(f"cos/sin give rotary width R={rot}; expected an even 0 < R <= head "
                         f"dim {dim}")
    return ud == 1


def _batched(cos, sin, unsqueeze_dim):
    """Unbatched tables ``[S, R]`` (Pixtral's, broadcast by ``unsqueeze(0)`` over
    ``[B, H, S, D]`` or ``unsqueeze(1)`` over ``[B, S, H, D]``) as ``[1, S, R]`` with the
    ``unsqueeze_dim`` that broadcasts them the same way; anything else unchanged."""
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
            and cos.dim() == 2 and sin.dim() == 2):
        return cos, sin, unsqueeze_dim
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (0, 1, -3, -2):
        raise ValueError(f"unbatched cos/sin [S, R] need unsqueeze_dim 0 (q/k [B, H, S, D]) or "
                         f"1 (q/k [B, S, H, D]), got {unsqueeze_dim!r}")
    return cos[None], sin[None], 1 if unsqueeze_dim in (0, -3) else 2


# Token-row indices ``arange(B*S).view(B, S)``, cached per (B, S, device) for the rare calls
# whose q/k cannot be flattened to one sequence (see _rotate). Integer tensors built outside
# inference mode, so a cache filled while serving never leaks an inference tensor to training.
_ROWS_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_ROWS_CACHE_MAX = 64


def _token_rows(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced into the graph: no Python-side cache
        return torch.arange(batch * seqlen, device=device).view(batch, seqlen)
    key = (batch, seqlen, device)
    rows = _ROWS_CACHE.get(key)
    if rows is not None:
        return rows
    with torch.inference_mode(False):
        rows = torch.arange(batch * seqlen, device=device).view(batch, seqlen)
    # A tensor allocated during CUDA-graph capture lives in the graph's private pool: use it
    # for this capture only, never cache it.
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if len(_ROWS_CACHE) >= _ROWS_CACHE_MAX:
            _ROWS_CACHE.clear()
        _ROWS_CACHE[key] = rows
    return rows


def _flattenable(x: torch.Tensor) -> bool:
    """Whether ``[B, S, ...]`` merges its first two dims into one without a copy."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _rotate(q, k, cos, sin, bhsd: bool, interleaved: bool):
    """``(q_out, k_out)``: q (and k, or None) rotated by the tables ``cos/sin [B or 1, S, R/2]``
    (one row per token) in one :func:`apply_rope` launch, in q's dtype."""
    batch = q.shape[0]
    # Work in [B, S, H, D] views: the attention's q/k are transposes of the projection output.
    qs = q.transpose(1, 2) if bhsd else q
    ks = None if k is None else (k.transpose(1, 2) if bhsd else k)
    seqlen = qs.shape[1]
    if cos.shape[0] == 1 or batch == 1 or (cos.stride(0) == 0 and sin.stride(0) == 0):
        # One row of cos/sin per position, shared by the batch: the table is cos[0].
        q_out, k_out = apply_rope(qs, ks, cos[0], sin[0], interleaved=interleaved)
    else:
        # Per-sequence cos/sin (position_ids [B, S]: left padding, packed sequences): the
        # table has one row per token, b*S + s (a view of cos when it is contiguous).
        cos_t, sin_t = cos.flatten(0, 1), sin.flatten(0, 1)
        if _flattenable(qs) and (ks is None or _flattenable(ks)):
            # Token b*S + s of the flattened [1, B*S, H, D] view sits at position b*S + s:
            # no position tensor at all.
            qf = qs.reshape(1, batch * seqlen, *qs.shape[2:])
            kf = None if ks is None else ks.reshape(1, batch * seqlen, *ks.shape[2:])
            q_out, k_out = apply_rope(qf, kf, cos_t, sin_t, interleaved=interleaved)
            q_out = q_out.view(qs.shape)
            k_out = None if k_out is None else k_out.view(ks.shape)
        else:
            rows = _token_rows(batch, seqlen, q.device)  # in the table by construction: no sync
            q_out, k_out = apply_rope(qs, ks, cos_t, sin_t, position_ids=rows,
                                      interleaved=interleaved, check_positions=False)
    if bhsd:
        q_out = q_out.transpose(1, 2)
        k_out = None if k_out is None else k_out.transpose(1, 2)
    return q_out, k_out


def _eager(x, cos, sin, bhsd: bool, interleaved: bool, dtype: torch.dtype) -> torch.Tensor:
    """``x * cos + rotate(x) * sin`` in plain PyTorch for one tensor, with per-element tables
    ``cos/sin [B or 1, S, R]`` as the model multiplies them (so gradients reach every entry
    it uses), computed and returned in ``dtype``; ``x[..., R:]`` passes through. The
    fallback, and what the patcher's probe compares originals with."""
    c, s = (t.unsqueeze(1 if bhsd else 2).to(dtype) for t in (cos, sin))
    rot = c.shape[-1]
    xr, xp = x[..., :rot].to(dtype), x[..., rot:].to(dtype)
    if interleaved:
        turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        turned = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), dim=-1)
    out = xr * c + turned * s
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def _rotate_q_k(q, k, cos, sin, unsqueeze_dim=1, *, table: str, interleaved: bool,
                keep_dtype: bool):
    """Every drop-in in one: ``table`` says how the model lays out cos/sin (``"halves"``:
    ``cat(f, f)``; ``"pairs"``: ``repeat_interleave(f, 2)``; ``"direct"``: ``f``, R/2 wide);
    ``keep_dtype``: the result has q's/k's dtype (fp32 math cast back) instead of their
    promotion with cos/sin."""
    cos, sin, unsqueeze_dim = _batched(cos, sin, unsqueeze_dim)
    width = cos.shape[-1] if isinstance(cos, torch.Tensor) else 0
    rot = 2 * width if table == "direct" else width
    bhsd = _check(q, k, cos, sin, unsqueeze_dim, rot)
    full = (cos, sin)  # per element, as the model multiplies them (the eager path)
    if table == "halves":
        cos, sin = cos[..., :rot // 2], sin[..., :rot // 2]
        if interleaved:  # GLM / DeepSeek: cos[..., :R/2].repeat_interleave(2)
            full = (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
    elif table == "pairs":
        cos, sin = cos[..., 0::2], sin[..., 0::2]
    elif interleaved:  # "direct" pairs
        full = (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
    else:  # "direct" halves
        full = (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))

    def out_dtype(x):
        return x.dtype if keep_dtype else torch.promote_types(
            torch.promote_types(x.dtype, cos.dtype), sin.dtype)

    q_dtype = out_dtype(q)
    k_dtype = None if k is None else out_dtype(k)
    if ((torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            or q_dtype not in _KERNEL_DTYPES or (k is not None and k_dtype != q_dtype)
            or cos.dtype not in _KERNEL_DTYPES or sin.dtype not in _KERNEL_DTYPES):
        def eager(x, dtype):
            compute = torch.promote_types(dtype, torch.float32) if keep_dtype else dtype
            return _eager(x, *full, bhsd, interleaved, compute).to(dtype)

        return eager(q, q_dtype), (None if k is None else eager(k, k_dtype))
    q = q.to(q_dtype)  # transformers would promote (e.g. bf16 q with fp32 cos): so do we
    k = None if k is None else k.to(q_dtype)
    return _rotate(q, k, cos, sin, bhsd, interleaved)


# ----------------------------------------------------------------------------------------
# The drop-ins, with the signatures of the functions they replace
# ----------------------------------------------------------------------------------------


def fused_apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Drop-in for transformers' Llama-family ``apply_rotary_pos_emb``, fused into one kernel.

    Args:
        q: ``[B, Hq, S, D]`` for ``unsqueeze_dim=1`` (transformers' attention layout) or
            ``[B, S, Hq, D]`` for ``unsqueeze_dim=2``; any strides.
        k: the same with ``Hk`` heads (or None: ``k_embed`` is then None).
        cos, sin: ``[B or 1, S, R]``, already gathered per position, each ``cat(freqs, freqs)``
            as transformers' rotary embeddings build them (the kernel reads the first half).
            ``R < D`` is partial rotary: ``q[..., R:]`` passes through, as in Phi-3 / GLM /
            GPT-NeoX (Llama's own function raises a broadcast error there).
        position_ids: ignored, as in transformers (deprecated and unused there: cos/sin are
            already gathered). An ``int`` here is taken as ``unsqueeze_dim``, for callers of
            the newer signature ``(q, k, cos, sin, unsqueeze_dim=1)`` passing it positionally.
        unsqueeze_dim: 1 or 2 (or -3 / -2), as in transformers.

    Returns:
        ``(q_embed, k_embed)`` with q's and k's shapes, in the dtype transformers would
        return (the promotion of q/k with cos/sin: q's dtype for its own models). The
        rotation is computed in fp32 and rounded once, at least as accurate as
        transformers' computation in the input dtype.

    Gradients flow to q and k. If cos or sin require grad (no transformers model does this),
    or a dtype has no kernel (float64), the call runs the same math in plain PyTorch.
    """
    if isinstance(position_ids, int) and not isinstance(position_ids, bool):
        unsqueeze_dim = position_ids
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="halves", interleaved=False,
               keep_dtype=False)


def fused_apply_rotary_pos_emb_fp32(q, k, cos, sin, unsqueeze_dim=1):
    """Rotate-half computed in fp32 and cast back to q's/k's dtype (OLMo, OLMo-2)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="halves", interleaved=False,
               keep_dtype=True)


def _hub_table(q, cos) -> str:
    # The decorated function multiplies q by cos element-wise, so cos is as wide as q there
    # (``cat(f, f)``); a table half as wide is GPT-OSS's ``f`` (its halves rotate by it).
    if (isinstance(q, torch.Tensor) and isinstance(cos, torch.Tensor) and q.dim() == 4
            and cos.dim() >= 1 and 2 * cos.shape[-1] == q.shape[-1]):
        return "direct"
    return "halves"


def fused_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' hub-kernel function ``rotary_pos_emb``: the ``apply_rotary_pos_emb``
    that model types decorate with ``use_kernel_forward_from_hub("rotary_pos_emb")``.

    Rotate-half, full width: ``cos/sin [B or 1, S, D]`` as ``cat(f, f)`` (Llama and most), or
    ``[B or 1, S, D/2]`` as ``f`` (GPT-OSS). The result is the promotion of q/k with cos/sin."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table=_hub_table(q, cos),
                       interleaved=False, keep_dtype=False)


def fused_rotary_pos_emb_fp32(q, k, cos, sin, unsqueeze_dim=1):
    """:func:`fused_rotary_pos_emb` cast back to q's/k's dtype (ModernBERT, ESM, HunYuan-VL)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table=_hub_table(q, cos),
                       interleaved=False, keep_dtype=True)


def fused_rotary_pos_emb_interleaved(q, k, cos, sin, unsqueeze_dim=1):
    """The hub function ``rotary_pos_emb`` of the models that rotate interleaved pairs
    ``(2i, 2i+1)`` by ``cos/sin [B or 1, S, D/2]`` (OpenAI's privacy filter)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="direct", interleaved=True,
                       keep_dtype=False)


def fused_apply_rotary_pos_emb_glm(q, k, cos, sin, unsqueeze_dim=1):
    """Interleaved pairs with ``cat(f, f)`` cos/sin, partial width ``R = cos.shape[-1]``
    (GLM, GLM-4, Helium: ``cos[..., :R/2].repeat_interleave(2)`` then rotate every two)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="halves", interleaved=True,
               keep_dtype=False)


def fused_apply_rotary_pos_emb_glm_fp32(q, k, cos, sin, unsqueeze_dim=1):
    """:func:`fused_apply_rotary_pos_emb_glm` in fp32, cast back to q's dtype (ERNIE-4.5)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="halves", interleaved=True,
               keep_dtype=True)


def fused_apply_rotary_pos_emb_cohere(q, k, cos, sin, unsqueeze_dim=1):
    """Cohere: interleaved pairs, cos/sin ``repeat_interleave(f, 2)``, fp32 cast back."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="pairs", interleaved=True,
               keep_dtype=True)


def fused_apply_rotary_pos_emb_pairs(q, k, cos, sin, unsqueeze_dim=1):
    """Interleaved pairs, cos/sin ``repeat_interleave(f, 2)``, partial width ``R =
    cos.shape[-1]``, the dtype their promotion (GLM-4V's and GLM-OCR's text attention)."""
    return _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="pairs", interleaved=True,
                       keep_dtype=False)


def fused_apply_rotary_pos_emb_single(x, cos, sin, unsqueeze_dim=1):
    """Gemma-3n / Gemma-4: one tensor per call, rotate-half with ``cat(f, f)`` cos/sin."""
    return _rotate_q_k(x, None, cos, sin, unsqueeze_dim, table="halves", interleaved=False,
               keep_dtype=False)[0]


def fused_apply_rotary_pos_emb_gptj(tensor, sin, cos):
    """GPT-J / CodeGen: ``tensor [B, S, H, R]`` rotated in interleaved pairs by ``sin/cos
    [B, S, R/2]`` (note the order: sin first), the dtype their promotion."""
    if isinstance(tensor, torch.Tensor) and isinstance(cos, torch.Tensor) \
            and tensor.dim() == 4 and tensor.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"tensor {tuple(tensor.shape)} must be [B, S, H, R] with R = 2 * "
                         f"cos.shape[-1] = {2 * cos.shape[-1]}")
    return _rotate_q_k(tensor, None, cos, sin, 2, table="direct", interleaved=True,
               keep_dtype=False)[0]


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]`` along the last dim (a copy)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def fused_apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """DeepSeek-V3's ``apply_rotary_pos_emb_interleave``: the rope sub-dimension's pairs
    ``(2i, 2i+1)`` rotate by ``cat(f, f)[..., i]`` and come out de-interleaved (evens first).
    q/k must be exactly the rope width (``R = cos.shape[-1]``), as there."""
    if isinstance(q, torch.Tensor) and isinstance(cos, torch.Tensor) and q.dim() == 4 \
            and q.shape[-1] != cos.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} must be exactly the rope width "
                         f"R = cos.shape[-1] = {cos.shape[-1]} (the rope sub-dimension)")
    q_out, k_out = _rotate_q_k(q, k, cos, sin, unsqueeze_dim, table="halves", interleaved=True,
                       keep_dtype=False)
    return _deinterleave(q_out), (None if k_out is None else _deinterleave(k_out))


def _rotate_complex(xq, xk, freqs_cis, unsqueeze_dim: int):
    """``xq/xk`` rotated in interleaved pairs by the complex ``freqs_cis [B or 1, S, D/2]``
    (broadcast over the heads at ``unsqueeze_dim``), fp32 math, cast back to their dtypes."""
    if not (isinstance(freqs_cis, torch.Tensor) and freqs_cis.is_complex()):
        raise TypeError(f"freqs_cis must be a complex tensor, got "
                        f"{getattr(freqs_cis, 'dtype', type(freqs_cis).__name__)}")
    parts = torch.view_as_real(freqs_cis)
    return _rotate_q_k(xq, xk, parts[..., 0], parts[..., 1], unsqueeze_dim, table="direct",
                       interleaved=True, keep_dtype=True)


def fused_apply_rotary_emb_complex(xq, xk, freqs_cis):
    """Llama-4's ``apply_rotary_emb``: ``xq/xk [B, S, H, D]`` rotated in interleaved pairs by
    the complex ``freqs_cis [B or 1, S, D/2]``, fp32 math, cast back to their dtypes."""
    return _rotate_complex(xq, xk, freqs_cis, 2)


def fused_apply_rotary_emb_complex_bhsd(xq, xk, freqs_cis):
    """DeepSeek-V2's ``apply_rotary_emb``: :func:`fused_apply_rotary_emb_complex` with
    ``xq/xk [B, H, S, D]``."""
    return _rotate_complex(xq, xk, freqs_cis, 1)
