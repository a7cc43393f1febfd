"""Installing the ALiBi drop-ins of :mod:`._alibi_models` into a model's layers, and out.

A patched layer's class is swapped for a subclass whose ``forward`` is the drop-in (per
instance; ``unpatch_alibi`` gives the class back). Before any layer is touched, the drop-in is
chosen and proven for the installed transformers:

1. **Signature.** Each convention's drop-in has the signature of the forward it replaces; the
   one whose signature the layer class's ``forward`` has is chosen. None matching means
   transformers changed its arguments: refused, so no call can raise a ``TypeError`` later.
2. **Behaviour.** A *probe* builds a one-layer float64 copy of the model's config (heads and
   options kept, widths shrunk), runs it unpatched and patched on a right-padded prefill and
   one cached decode step, and requires the fused path in every call and the same hidden
   states. A changed convention (a bias handed over differently) fails here, not mid-forward.

Verdicts are cached per (layer class, probe config).
"""

from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch

from posenc_triton import _backend
from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL, check_skip_tol
from posenc_triton.integrations import _alibi_models as models
from posenc_triton.integrations._alibi_models import (
    FAMILIES,
    FLAG,
    SKIP_TOL,
    Convention,
    Family,
    Fused,
)
from posenc_triton.integrations._hf import modeling

__all__ = ["patch_alibi", "patched_alibi_layers", "prepare_alibi", "unpatch_alibi"]

_FUSED_CLASSES: dict[tuple[type, str], type] = {}  # (original class, convention) -> subclass
_PROBED: dict[tuple, Optional[str]] = {}  # (class, convention, probe config) -> failure or None


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def convention(family: Family, cls: type) -> Convention:
    """The drop-in written for ``cls.forward``'s signature; ValueError naming both otherwise."""
    theirs = _params(inspect.unwrap(cls.forward))
    for conv in family.conventions:
        if _params(conv.forward) == theirs:
            return conv
    raise ValueError(
        f"{cls.__name__}.forward{inspect.signature(inspect.unwrap(cls.forward))} has none of "
        f"the signatures the drop-ins were written for: " + "; ".join(
            f"{c.name}: {inspect.signature(c.forward)}" for c in family.conventions))


def _fused_class(cls: type, family: Family, conv: Convention) -> type:
    fused = _FUSED_CLASSES.get((cls, conv.name))
    if fused is None:
        name = f"Fused{cls.__name__}"
        kind = next(k for k, f in FAMILIES.items() if f is family)
        fused = type(name, (Fused, cls), {
            "__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__,
            "posenc_kind": f"alibi/{kind}", "forward": conv.forward})
        _FUSED_CLASSES[(cls, conv.name)] = fused
    return fused


def __getattr__(name: str):
    # ``FusedBloomAttention`` & co. resolve by name, so a patched model pickles (torch.save)
    # and unpickles in a fresh process, with the drop-in of the transformers installed there.
    for family in FAMILIES.values():
        if name == f"Fused{family.layer}":
            cls = getattr(modeling(family.module), family.layer)
            return _fused_class(cls, family, convention(family, cls))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------


def _probe_config(config):
    """A one-layer copy of ``config``: its heads, KV heads and options, head dim 4."""
    cfg = copy.deepcopy(config)
    heads = cfg.num_attention_heads
    cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size = 1, 4 * heads, 32
    if getattr(cfg, "pad_token_id", None) is not None:
        cfg.pad_token_id = 0
    for name in ("ffn_hidden_size", "intermediate_size"):
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, 8 * heads)
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "emb_pdrop", "embd_pdrop"):
        if isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)
    return cfg


def _probe(family: Family, cls: type, conv: Convention, config) -> Optional[str]:
    cfg = _probe_config(config)
    key = (cls, conv.name, cfg._attn_implementation, cfg.to_json_string(use_diff=False))
    if key not in _PROBED:
        try:
            _PROBED[key] = _run_probe(family, cls, conv, cfg)
        except Exception as e:  # building the tiny model itself failed
            _PROBED[key] = f"the probe model could not run: {type(e).__name__}: {e}"
    return _PROBED[key]


def _run_probe(family: Family, cls: type, conv: Convention, cfg) -> Optional[str]:
    with torch.random.fork_rng(devices=[]), _backend.quiet(), torch.no_grad():
        torch.manual_seed(0)
        model = getattr(modeling(family.module), family.model)(cfg).double().eval()
        ids = torch.randint(3, cfg.vocab_size, (2, 7))
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0  # right padding: the key padding path
        # The cache argument: ``cache`` since transformers 5.25, ``past_key_values`` before.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"

        def run():
            cache = modeling("transformers").DynamicCache()
            out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True,
                        **{cache_arg: cache})
            nxt = model(input_ids=ids[:, 6:], attention_mask=mask, use_cache=True,
                        **{cache_arg: cache})
            return out.last_hidden_state, nxt.last_hidden_state

        want = run()
        layers = [m for m in model.modules() if type(m) is cls]
        if not layers:
            return f"its {family.model} has no {cls.__name__} layer"
        fused = _fused_class(cls, family, conv)
        for m in layers:
            m.__class__ = fused
        models.PROBE.calls = calls = []
        try:
            got = run()
        except Exception as e:
            return f"the drop-in for {conv.name!r} raised {type(e).__name__}: {e}"
        finally:
            models.PROBE.calls = None
            for m in layers:
                m.__class__ = cls
    if len(calls) != 2 * len(layers):
        return (f"the drop-in for {conv.name!r} ran the kernel in {len(calls)} of "
                f"{2 * len(layers)} layer calls: the mask or bias is not what it expects")
    keep = mask[:, :6].bool()
    for g, w, where in ((got[0][keep], want[0][keep], "prefill"), (got[1], want[1], "decode")):
        err = ((g - w).abs().max() / w.abs().max()).item()
        if not err <= 1e-6:  # the models build their bias in float32 (Falcon: bf16 products)
            return (f"the drop-in for {conv.name!r} computes something else ({where} relative "
                    f"error {err:.1e})")
    return None


# ----------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------


def prepare_alibi(model: torch.nn.Module, which: str, *, check_masks: bool = True,
                  skip_tol: float = DEFAULT_SKIP_TOL):
    """Check that ``which`` (``"bloom"``, ``"mpt"``, ``"falcon"``) can be patched into
    ``model``; returns a function that patches it and returns the number of layers. Raises
    ValueError (nothing touched) when there is no such layer, a subclass overrides the
    forward, the attention implementation is not covered, or the probe fails. The layers
    run :func:`posenc_triton.alibi_attention` with ``skip_tol``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(check_masks, bool):
        raise TypeError(f"check_masks must be a bool, got {type(check_masks).__name__}")
    skip_tol = check_skip_tol(skip_tol)
    family = FAMILIES[which]
    base = getattr(modeling(family.module), family.layer)
    layers = [m for m in model.modules() if isinstance(m, base)]
    if not layers:
        raise ValueError(f"cannot patch {which} ALiBi attention into {type(model).__name__}: "
                         f"it has no {family.layer} layer")
    for m in layers:
        if not isinstance(m, Fused) and type(m).forward is not base.forward:
            raise ValueError(f"cannot patch {type(m).__qualname__}: it overrides "
                             f"{family.layer}.forward")
    config = getattr(model, "config", None) or getattr(layers[0], "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if family.implementations is not None and impl not in family.implementations:
        raise ValueError(f"its attention implementation {impl!r} is not one the {which} drop-in "
                         f"reproduces ({', '.join(family.implementations)})")
    conv = convention(family, base)
    if config is not None:
        reason = _probe(family, base, conv, config)
        if reason is not None:
            raise ValueError(reason)

    def install() -> int:
        for m in layers:
            if not isinstance(m, Fused):
                m.__class__ = _fused_class(type(m), family, conv)
            setattr(m, FLAG, check_masks)
            setattr(m, SKIP_TOL, skip_tol)
        return len(layers)

    return install


def patch_alibi(model: torch.nn.Module, which: str, *, check_masks: bool = True,
                skip_tol: float = DEFAULT_SKIP_TOL) -> int:
    """Swap every ``which`` ALiBi layer of ``model`` for its fused subclass; returns how many
    (idempotent: a repeated call updates ``check_masks`` and ``skip_tol``). ValueError as
    :func:`prepare_alibi`."""
    return prepare_alibi(model, which, check_masks=check_masks, skip_tol=skip_tol)()


def unpatch_alibi(model: torch.nn.Module) -> int:
    """Give every fused ALiBi layer of ``model`` its original class; returns how many."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for m in model.modules():
        if isinstance(m, Fused):
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, Fused))
            m.__dict__.pop(FLAG, None)
            m.__dict__.pop(SKIP_TOL, None)
            count += 1
    return count


def patched_alibi_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{layer path: [kind]}`` of the fused ALiBi layers of ``model``."""
    return {path: [m.posenc_kind] for path, m in model.named_modules() if isinstance(m, Fused)}
