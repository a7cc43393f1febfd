"""Installing the RoPE drop-ins of :mod:`._rope_dropins` into transformers, and taking them out.

transformers' attention ``forward`` looks its RoPE function (``apply_rotary_pos_emb``,
``apply_rotary_pos_emb_interleave``, ``apply_rotary_emb``) up in its module's globals at
call time, so replacing that global makes every layer of the class run the kernel. A
*kind* names the global and the drop-in that replaces it; before installing, the original is
*probed*: called on small float64 inputs in the kind's cos/sin layout (both ``unsqueeze_dim``
values, full and partial width) and once with fp32 q/k and float64 cos/sin (its dtype rule),
and compared with the drop-in. A function that computes anything else is refused, never
mis-patched.

The swap is module-wide (every model of those classes in the process), like Liger-Kernel's;
``unpatch`` puts the originals back. The layers of a model that a kind reaches are those
whose (unwrapped) ``forward`` names the global: :func:`rope_sites`.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from posenc_triton.integrations import _rope_dropins as dropins


@dataclass(frozen=True)
class RopeKind:
    """One RoPE behaviour class: the global it replaces and how to probe the original."""

    name: str
    function: str  # the module global the attention forward calls
    dropin: Callable
    # the signature family: "qk", "single", "gptj", "deinterleave", "complex" ([B, S, H, D]),
    # "complex_bhsd" ([B, H, S, D])
    call: str
    # cos/sin layout: "halves" cat(f, f), "pairs" repeat_interleave(f), "either" (the hub
    # function ``rotary_pos_emb``): cat(f, f), or else f, R/2 wide (GPT-OSS)
    table: str = "halves"


_APPLY = "apply_rotary_pos_emb"
KINDS: dict[str, RopeKind] = {k.name: k for k in (
    RopeKind("rotate_half", _APPLY, dropins.fused_apply_rotary_pos_emb, "qk"),
    RopeKind("rotate_half_fp32", _APPLY, dropins.fused_apply_rotary_pos_emb_fp32, "qk"),
    RopeKind("interleaved", _APPLY, dropins.fused_apply_rotary_pos_emb_glm, "qk"),
    RopeKind("interleaved_fp32", _APPLY, dropins.fused_apply_rotary_pos_emb_glm_fp32, "qk"),
    RopeKind("cohere", _APPLY, dropins.fused_apply_rotary_pos_emb_cohere, "qk", "pairs"),
    RopeKind("pairs", _APPLY, dropins.fused_apply_rotary_pos_emb_pairs, "qk", "pairs"),
    RopeKind("single", _APPLY, dropins.fused_apply_rotary_pos_emb_single, "single"),
    RopeKind("gptj", _APPLY, dropins.fused_apply_rotary_pos_emb_gptj, "gptj"),
    RopeKind("deinterleave", "apply_rotary_pos_emb_interleave",
             dropins.fused_apply_rotary_pos_emb_interleave, "deinterleave"),
    RopeKind("complex", "apply_rotary_emb", dropins.fused_apply_rotary_emb_complex, "complex"),
    RopeKind("complex_bhsd", "apply_rotary_emb", dropins.fused_apply_rotary_emb_complex_bhsd,
             "complex_bhsd"),
    RopeKind("rotary_pos_emb", _APPLY, dropins.fused_rotary_pos_emb, "qk", "either"),
    RopeKind("rotary_pos_emb_fp32", _APPLY, dropins.fused_rotary_pos_emb_fp32, "qk", "either"),
    RopeKind("rotary_pos_emb_interleaved", _APPLY, dropins.fused_rotary_pos_emb_interleaved,
             "qk", "direct"),
)}
#: The kinds of transformers' hub-kernel function ``rotary_pos_emb`` (the decorated
#: ``apply_rotary_pos_emb``), in the order a probe tries them.
HUB_KINDS = (KINDS["rotary_pos_emb"], KINDS["rotary_pos_emb_fp32"],
             KINDS["rotary_pos_emb_interleaved"])
#: For a model outside the table: the kinds its probe tries, in order, per module global.
PROBED = {
    _APPLY: tuple(KINDS[k] for k in ("rotate_half", "rotate_half_fp32", "interleaved",
                                     "interleaved_fp32", "pairs", "cohere", "single", "gptj")),
    "apply_rotary_pos_emb_interleave": (KINDS["deinterleave"],),
    "apply_rotary_emb": (KINDS["complex"], KINDS["complex_bhsd"]),
}
_DROPINS = {k.dropin: k for k in KINDS.values()}

# (module name, function name) -> the function it had before a drop-in replaced it.
_ORIGINALS: dict[tuple[str, str], Callable] = {}
# (function, kind name) -> None if the drop-in computes what it computes, else why not.
_PROBED: dict[tuple[Callable, str], Optional[str]] = {}


# ----------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------


def _probe_cases(kind: RopeKind, x_dtype: torch.dtype, table: str):
    """``(args, kwargs, partial)`` calls of the kind's signature on random inputs, cos/sin
    laid out as ``table`` says."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=x_dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    b, hq, hk, s, d = 2, 2, 1, 3, 8
    f64 = torch.float64
    for rot in (d, d // 2):
        partial = rot < d
        if partial and (kind.call in ("gptj", "deinterleave", "complex", "complex_bhsd")
                        or table == "direct"):
            continue  # their originals require the full width
        freqs = randn(b, s, rot // 2, dtype=f64) * 3
        if kind.call == "gptj":
            yield (randn(b, s, hq, rot), freqs.sin(), freqs.cos()), {}, partial
            continue
        if kind.call in ("complex", "complex_bhsd"):
            cis = torch.polar(torch.ones_like(freqs), freqs)
            q, k = ((randn(b, s, hq, d), randn(b, s, hk, d)) if kind.call == "complex"
                    else (randn(b, hq, s, d), randn(b, hk, s, d)))
            yield (q, k, cis), {}, partial
            continue
        emb = {"halves": torch.cat((freqs, freqs), -1), "direct": freqs,
               "pairs": freqs.repeat_interleave(2, -1)}[table]
        cos, sin = emb.cos(), emb.sin()
        for ud in (1, 2):
            q, k = randn(b, hq, s, d), randn(b, hk, s, d)
            if ud == 2:
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            args = (q, cos, sin) if kind.call == "single" else (q, k, cos, sin)
            yield args, {"unsqueeze_dim": ud}, partial


def _same(got, want, tol: float) -> bool:
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    if not (isinstance(got, (tuple, list)) and isinstance(want, (tuple, list))
            and len(got) == len(want)):
        return False
    return all(isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor)
               and g.shape == w.shape and g.dtype == w.dtype
               and torch.allclose(g, w, rtol=tol, atol=tol) for g, w in zip(got, want))


def probe(kind: RopeKind, fn) -> Optional[str]:
    """None when ``kind.dropin`` computes what ``fn`` computes, else why not (cached)."""
    if fn is kind.dropin:
        return None
    try:
        return _PROBED[(fn, kind.name)]
    except (KeyError, TypeError):
        pass
    reason = _probe(kind, fn)
    try:
        _PROBED[(fn, kind.name)] = reason
    except TypeError:  # unhashable callable
        pass
    return reason


def choose(sites, candidates) -> RopeKind:
    """The first of ``candidates`` whose drop-in computes what the function of every site
    (:func:`rope_sites` triples) computes; a ValueError says why none does."""
    reasons = []
    for rope in candidates:
        why = [f"{mod.__name__}.{rope.function}: {reason}"
               for mod in dict.fromkeys(m for _, m, _ in sites)
               if (reason := probe(rope, original(mod, rope.function)))]
        if not why:
            return rope
        reasons += why
    raise ValueError("; ".join(reasons) or f"no layer calls {candidates[0].function}")


def _probe(kind: RopeKind, fn) -> Optional[str]:
    if not callable(fn):
        return f"it is not callable ({type(fn).__name__})"
    if kind.table != "either":
        return _probe_table(kind, fn, kind.table)[0]
    # The original takes one of the two layouts: the other raises on its full-width call.
    reason, raised = _probe_table(kind, fn, "halves")
    return _probe_table(kind, fn, "direct")[0] if raised else reason


def _probe_table(kind: RopeKind, fn, table: str) -> tuple[Optional[str], bool]:
    """``(why not, or None; whether the original raised)`` on ``table``'s layout."""
    # float64 everywhere (the drop-in's plain-PyTorch path), then fp32 q/k with float64
    # cos/sin: the dtype of the result (promotion, or q's dtype for fp32-and-cast models).
    for x_dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        for args, kwargs, partial in _probe_cases(kind, x_dtype, table):
            try:
                with torch.no_grad():
                    want = fn(*args, **kwargs)
            except Exception as e:
                if partial:  # partial rotary unsupported by the original: ours accepts more
                    continue
                return (f"it raised {type(e).__name__}: {e} on {kind.name} inputs ({table} "
                        f"cos/sin)"), True
            with torch.no_grad():
                got = kind.dropin(*args, **kwargs)
            if not _same(got, want, tol):
                what = "partial" if partial else "full"
                return (f"it does not compute the {kind.name} rotation of "
                        f"{kind.dropin.__name__} ({what} rotary width, {kwargs or 'defaults'}, "
                        f"{x_dtype} inputs)"), False
    return None, False


# ----------------------------------------------------------------------------------------
# Where a kind applies in a model, installing and restoring
# ----------------------------------------------------------------------------------------


def _forward_of(module: torch.nn.Module):
    fwd = inspect.unwrap(type(module).forward)  # through functools.wraps decorators
    return fwd if isinstance(fwd, types.FunctionType) else None


def rope_sites(model: torch.nn.Module, kinds, rotates: Optional[Callable] = None
               ) -> list[tuple[str, types.ModuleType, RopeKind]]:
    """``(layer path, modeling module, kind)`` for every submodule whose ``forward`` calls
    the global that one of ``kinds`` replaces. Not RoPE layers: those declaring
    ``use_rope = False`` (Llama-4's and SmolLM3's NoPE layers) and, given ``rotates``, those
    for which ``rotates(layer)`` is false (the model's own condition around the call)."""
    sites = []
    for path, sub in model.named_modules():
        fwd = _forward_of(sub)
        if fwd is None or fwd is torch.nn.Module.forward or not getattr(sub, "use_rope", True):
            continue
        mod = sys.modules.get(fwd.__module__)
        if mod is None or mod.__dict__ is not fwd.__globals__:
            continue
        found = [kind for kind in kinds
                 if kind.function in fwd.__code__.co_names and hasattr(mod, kind.function)]
        if found and (rotates is None or rotates(sub)):  # (asked of calling layers only)
            sites.extend((path, mod, kind) for kind in found)
    return sites


def original(mod: types.ModuleType, name: str):
    """The function transformers defined as ``mod.name`` (under any drop-in of ours)."""
    current = getattr(mod, name)
    return _ORIGINALS.get((mod.__name__, name), current) if current in _DROPINS else current


def install(targets) -> list[str]:
    """Install ``[(module, kind)]``, all or nothing: every original is probed first.
    Returns ``"module.function"`` names; raises ValueError naming what computes otherwise."""
    bad = []
    for mod, kind in targets:
        reason = probe(kind, original(mod, kind.function))
        if reason is not None:
            bad.append(f"{mod.__name__}.{kind.function}: {reason}")
    if bad:
        raise ValueError("; ".join(bad))
    names = []
    for mod, kind in targets:
        current = getattr(mod, kind.function)
        if current is not kind.dropin:
            _ORIGINALS.setdefault((mod.__name__, kind.function), original(mod, kind.function))
            setattr(mod, kind.function, kind.dropin)
        names.append(f"{mod.__name__}.{kind.function}")
    return names


def restore(module_names, function: Optional[str] = None) -> list[str]:
    """Put back the originals in those modules (of ``function`` only, if given); a function
    someone else installed after ours is left in place. Returns the module names restored."""
    restored = []
    for key in list(_ORIGINALS):
        name, fn = key
        if name not in module_names or (function is not None and fn != function):
            continue
        orig = _ORIGINALS.pop(key)
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, fn, None) in _DROPINS:
            setattr(mod, fn, orig)
            if name not in restored:
                restored.append(name)
    return restored


def restore_all() -> list[str]:
    """Every original back, in every module patched so far; returns the module names."""
    return restore({name for name, _ in _ORIGINALS})


def patched_rope_layers(model: torch.nn.Module, rotates: Optional[Callable] = None
                        ) -> dict[str, list[str]]:
    """``{layer path: [kind names]}`` of the layers whose forward now calls a drop-in."""
    layers: dict[str, list[str]] = {}
    for path, mod, kind in rope_sites(model, KINDS.values(), rotates):
        if getattr(mod, kind.function) is kind.dropin:
            layers.setdefault(path, []).append(f"rope/{kind.name}")
    return layers
