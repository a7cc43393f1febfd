"""Hugging Face transformers integration: the fused RoPE kernel as ``apply_rotary_pos_emb``.

Llama, Mistral, Qwen2 and most other rotary models in transformers rotate q and k with a
module-level function ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` that the
attention ``forward`` looks up in its module's globals at call time. This module provides

* :func:`fused_apply_rotary_pos_emb`, a drop-in for that function running
  :func:`posenc_triton.apply_rope` (one launch for q and k, math in fp32);
* :func:`patch_rope` / :func:`unpatch_rope`, which swap it into (and out of) the modeling
  modules of a model instance, of named modules, or of Llama, Mistral and Qwen2 by default;
* :func:`apply_to_llama`, ``patch_rope(model)`` returning the model.

Usage::

    from posenc_triton.integrations.transformers import patch_rope
    model = AutoModelForCausalLM.from_pretrained(...)
    patch_rope(model)            # every forward of this model class now uses the kernel

Patching replaces the module attribute, so it affects every model of the patched classes
in the process, not one instance; :func:`unpatch_rope` restores the originals.

transformers is an optional extra (``pip install 'posenc-triton[hf]'``); it is imported only
when a patch function is called, and :func:`fused_apply_rotary_pos_emb` does not need it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import warnings
from typing import Callable, Optional

import torch

from posenc_triton.integrations._bloom import (
    apply_to_bloom,
    patch_bloom,
    patched_bloom_attentions,
    unpatch_bloom,
)
from posenc_triton.rope import apply_rope

__all__ = [
    "DEFAULT_MODULES",
    "apply_to_bloom",
    "apply_to_llama",
    "fused_apply_rotary_pos_emb",
    "patch_bloom",
    "patch_rope",
    "patched_bloom_attentions",
    "patched_modules",
    "unpatch_bloom",
    "unpatch_rope",
]

#: Modeling modules patched by ``patch_rope()`` with no argument.
DEFAULT_MODULES = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
)

_FUNC_NAME = "apply_rotary_pos_emb"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# The drop-in
# ----------------------------------------------------------------------------------------


def _rotate_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half formula on ``x[..., :R]``; ``x[..., R:]`` passes through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def _eager(q, k, cos, sin, unsqueeze_dim):
    """The semantics of :func:`fused_apply_rotary_pos_emb` in plain PyTorch (fallback, probe)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate_eager(q, cos, sin), (None if k is None else _rotate_eager(k, cos, sin))


# Token-row indices ``arange(B*S).view(B, S)``, cached per (B, S, device) for the rare calls
# whose q/k cannot be flattened to one sequence (see fused_apply_rotary_pos_emb).
_ROWS_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_ROWS_CACHE_MAX = 64


def _token_rows(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced into the graph: no Python-side cache
        return torch.arange(batch * seqlen, device=device).view(batch, seqlen)
    key = (batch, seqlen, device)
    rows = _ROWS_CACHE.get(key)
    if rows is not None:
        return rows
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
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) and not (name == "k" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, H, S, D] (unsqueeze_dim=1) or [B, S, H, D] "
                         f"(unsqueeze_dim=2), got shape {tuple(q.shape)}")
    if cos.dim() != 3 or tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"cos and sin must both be [B or 1, S, R], got cos {tuple(cos.shape)} "
                         f"and sin {tuple(sin.shape)}")
    ud = unsqueeze_dim
    if isinstance(ud, int) and not isinstance(ud, bool) and ud < 0:
        ud += 4  # cos.unsqueeze(-3) / (-2) of a 3-D cos are dims 1 / 2
    if isinstance(ud, bool) or ud not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q/k [B, H, S, D]) or 2 (q/k [B, S, H, D]), "
                         f"got {unsqueeze_dim!r}")
    layout = "bhsd" if ud == 1 else "bshd"
    seq_dim = 2 if ud == 1 else 1
    batch, seqlen, dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    if k is not None and (k.dim() != 4 or (k.shape[0], k.shape[seq_dim], k.shape[3])
                          != (batch, seqlen, dim)):
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence "
                         f"length and head dim for unsqueeze_dim={unsqueeze_dim} (heads may "
                         f"differ)")
    cos_batch, cos_len, rot = cos.shape
    if cos_len != seqlen or cos_batch not in (1, batch):
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [1 or B={batch}, S={seqlen}, R] "
                         f"for q {tuple(q.shape)} with unsqueeze_dim={unsqueeze_dim}")
    if rot == 0 or rot % 2 or rot > dim:
        raise ValueError(f"cos/sin give rotary width R={rot}; expected an even 0 < R <= head "
                         f"dim {dim}")

    q_dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    k_dtype = None if k is None else torch.promote_types(
        torch.promote_types(k.dtype, cos.dtype), sin.dtype)
    if ((torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            or q_dtype not in _KERNEL_DTYPES or (k is not None and k_dtype != q_dtype)
            or cos.dtype not in _KERNEL_DTYPES or sin.dtype not in _KERNEL_DTYPES):
        return _eager(q, k, cos, sin, ud)
    if q.dtype != q_dtype:  # transformers would promote (e.g. bf16 q with fp32 cos): so do we
        q = q.to(q_dtype)
    if k is not None and k.dtype != q_dtype:
        k = k.to(q_dtype)

    half = rot // 2
    # Work in [B, S, H, D] views: the attention's q/k are transposes of the projection output.
    qs = q if layout == "bshd" else q.transpose(1, 2)
    ks = None if k is None else (k if layout == "bshd" else k.transpose(1, 2))
    if cos_batch == 1 or batch == 1 or (cos.stride(0) == 0 and sin.stride(0) == 0):
        # One row of cos/sin per position, shared by the batch: the table is cos[0].
        q_out, k_out = apply_rope(qs, ks, cos[0, :, :half], sin[0, :, :half], layout="bshd")
    else:
        # Per-sequence cos/sin (position_ids [B, S]: left padding, packed sequences): the
        # table has one row per token, b*S + s (a view of cos when it is contiguous).
        cos_t, sin_t = cos.flatten(0, 1)[:, :half], sin.flatten(0, 1)[:, :half]
        if _flattenable(qs) and (ks is None or _flattenable(ks)):
            # Token b*S + s of the flattened [1, B*S, H, D] view sits at position b*S + s:
            # no position tensor at all.
            qf = qs.reshape(1, batch * seqlen, *qs.shape[2:])
            kf = None if ks is None else ks.reshape(1, batch * seqlen, *ks.shape[2:])
            q_out, k_out = apply_rope(qf, kf, cos_t, sin_t, layout="bshd")
            q_out = q_out.view(qs.shape)
            k_out = None if k_out is None else k_out.view(ks.shape)
        else:
            rows = _token_rows(batch, seqlen, q.device)  # in the table by construction: no sync
            q_out, k_out = apply_rope(qs, ks, cos_t, sin_t, position_ids=rows, layout="bshd",
                                      check_positions=False)
    if layout == "bhsd":
        q_out = q_out.transpose(1, 2)
        k_out = None if k_out is None else k_out.transpose(1, 2)
    return q_out, k_out


# ----------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------

# module name -> the apply_rotary_pos_emb it had before patch_rope replaced it.
_ORIGINALS: dict[str, Callable] = {}
# function -> None if compatible with fused_apply_rotary_pos_emb, else why not.
_COMPAT_CACHE: dict[Callable, Optional[str]] = {}


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "posenc_triton.integrations.transformers needs Hugging Face transformers, an "
            "optional extra of posenc-triton: pip install 'posenc-triton[hf]'") from e
    return transformers


def _incompatibility(fn) -> Optional[str]:
    """None when ``fn`` computes what :func:`fused_apply_rotary_pos_emb` computes, else why not.

    Checked on the signature, then numerically on a small float32 probe (both
    ``unsqueeze_dim`` values, full and partial rotary width), so interleaved (GPT-J, Cohere),
    multimodal or single-tensor variants that share the name are refused, not mis-patched.
    """
    if fn is fused_apply_rotary_pos_emb:
        return None
    try:
        return _COMPAT_CACHE[fn]
    except (KeyError, TypeError):
        pass
    reason = _probe(fn)
    try:
        _COMPAT_CACHE[fn] = reason
    except TypeError:  # unhashable callable
        pass
    return reason


def _probe(fn) -> Optional[str]:
    if not callable(fn):
        return f"it is not callable ({type(fn).__name__})"
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "its signature cannot be inspected"
    if params[:4] != ["q", "k", "cos", "sin"] or "unsqueeze_dim" not in params:
        return f"its signature {params} is not (q, k, cos, sin, ..., unsqueeze_dim)"
    gen = torch.Generator().manual_seed(0)
    b, hq, hk, s, d = 2, 2, 1, 3, 8
    q = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float32)
    k = torch.randn(b, hk, s, d, generator=gen, dtype=torch.float32)
    for rot in (d, d // 2):
        freqs = torch.randn(b, s, rot // 2, generator=gen, dtype=torch.float32) * 3
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for ud in (1, 2):
            qq, kk = (q, k) if ud == 1 else (q.transpose(1, 2), k.transpose(1, 2))
            try:
                got = fn(qq, kk, cos, sin, unsqueeze_dim=ud)
            except Exception as e:
                if rot < d:  # partial rotary unsupported by the original: ours accepts more
                    break
                return f"it raised {type(e).__name__}: {e} on Llama-style inputs"
            want = _eager(qq, kk, cos, sin, ud)
            if not (isinstance(got, (tuple, list)) and len(got) == 2
                    and all(isinstance(g, torch.Tensor) and g.shape == w.shape
                            and torch.allclose(g, w, rtol=1e-5, atol=1e-5)
                            for g, w in zip(got, want))):
                what = "full" if rot == d else "partial"
                return (f"it does not compute Llama's rotate-half rotation ({what} rotary width, "
                        f"unsqueeze_dim={ud})")
    return None


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"cannot import modeling module {name!r}: {e}") from e


def _modules_of(target) -> tuple[list[types.ModuleType], str, bool]:
    """``(modules, description, from_model)`` for a patch/unpatch target."""
    if target is None:
        return [_import(n) for n in DEFAULT_MODULES], "the default modules", False
    if isinstance(target, str):
        return [_import(target)], repr(target), False
    if isinstance(target, types.ModuleType):
        return [target], repr(target.__name__), False
    if isinstance(target, torch.nn.Module):
        seen: dict[str, types.ModuleType] = {}
        for sub in target.modules():
            name = type(sub).__module__
            mod = sys.modules.get(name)
            if mod is not None and name not in seen:
                seen[name] = mod
        return list(seen.values()), type(target).__name__, True
    if isinstance(target, (list, tuple)):
        mods: list[types.ModuleType] = []
        for t in target:
            if not isinstance(t, (str, types.ModuleType)):
                raise TypeError(f"a list target must hold module names or modules, got "
                                f"{type(t).__name__}")
            mods += _modules_of(t)[0]
        return mods, repr([getattr(m, "__name__", m) for m in mods]), False
    raise TypeError(f"patch_rope/unpatch_rope take None, a torch.nn.Module, a module or a module "
                    f"name, got {type(target).__name__}")


def patch_rope(model_or_module=None) -> list[str]:
    """Make transformers' attention use :func:`fused_apply_rotary_pos_emb`.

    Args:
        model_or_module: a model instance (every modeling module of its submodules' classes
            that defines ``apply_rotary_pos_emb`` is patched, e.g.
            ``transformers.models.llama.modeling_llama``); a modeling module or its dotted
            name, or a list of them; or None for Llama, Mistral and Qwen2
            (:data:`DEFAULT_MODULES`).

    Returns:
        The names of the patched modules (already patched ones included: idempotent).

    Raises:
        ImportError: transformers is not installed (the ``hf`` extra).
        ValueError: the model's modules have no ``apply_rotary_pos_emb`` (ALiBi or learned
            positions: BLOOM, GPT-2, ...), or theirs computes something else (interleaved,
            multimodal, single-tensor variants); the message names the class and reason.
            A model instance with both kinds gets the compatible ones patched and a warning.

    The swap is module-wide: all models of those classes in the process use the kernel
    until :func:`unpatch_rope`.
    """
    _require_transformers()
    modules, what, from_model = _modules_of(model_or_module)
    candidates = [m for m in modules if hasattr(m, _FUNC_NAME)]
    if not candidates:
        names = ", ".join(m.__name__ for m in modules) or "none"
        raise ValueError(
            f"cannot patch RoPE into {what}: no module defining its classes ({names}) has an "
            f"{_FUNC_NAME} function. patch_rope supports models that rotate q and k with "
            f"Llama's {_FUNC_NAME} (Llama, Mistral, Qwen2, ...); models with ALiBi (BLOOM) or "
            f"learned absolute positions (GPT-2) have nothing to patch")
    good, bad = [], []
    for mod in candidates:
        current = getattr(mod, _FUNC_NAME)
        original = _ORIGINALS.get(mod.__name__, current) if current is fused_apply_rotary_pos_emb \
            else current
        reason = _incompatibility(original)
        (good if reason is None else bad).append((mod, reason))
    if bad and (not good or not from_model):
        detail = "; ".join(f"{m.__name__}.{_FUNC_NAME}: {r}" for m, r in bad)
        raise ValueError(f"cannot patch RoPE into {what}: {detail}")
    for mod, reason in bad:
        warnings.warn(f"patch_rope({what}): left {mod.__name__}.{_FUNC_NAME} unpatched: {reason}",
                      stacklevel=2)
    patched = []
    for mod, _ in good:
        current = getattr(mod, _FUNC_NAME)
        if current is not fused_apply_rotary_pos_emb:
            _ORIGINALS[mod.__name__] = current
            setattr(mod, _FUNC_NAME, fused_apply_rotary_pos_emb)
        patched.append(mod.__name__)
    return patched


def unpatch_rope(model_or_module=None) -> list[str]:
    """Restore the original ``apply_rotary_pos_emb`` where :func:`patch_rope` replaced it.

    ``model_or_module`` as for :func:`patch_rope`, except that None restores every module
    patched so far (not only the defaults). Modules that are not patched are skipped, and a
    function someone else installed after ours is left in place. Returns the names of the
    modules restored.
    """
    if model_or_module is None:
        names = list(_ORIGINALS)
    else:
        names = [m.__name__ for m in _modules_of(model_or_module)[0]]
    restored = []
    for name in names:
        if name not in _ORIGINALS:
            continue
        original = _ORIGINALS.pop(name)
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, _FUNC_NAME, None) is fused_apply_rotary_pos_emb:
            setattr(mod, _FUNC_NAME, original)
            restored.append(name)
    return restored


def patched_modules() -> list[str]:
    """Names of the modules whose ``apply_rotary_pos_emb`` is currently the fused one."""
    return [n for n in _ORIGINALS
            if getattr(sys.modules.get(n), _FUNC_NAME, None) is fused_apply_rotary_pos_emb]


def apply_to_llama(model):
    """``patch_rope(model)``, returning ``model`` (for ``model = apply_to_llama(model)``)."""
    patch_rope(model)
    return model
