"""Hugging Face transformers: every RoPE and ALiBi attention of a model through the kernels.

Usage::

    from posenc_triton.integrations.transformers import apply, patched_layers, unpatch
    model = apply(AutoModelForCausalLM.from_pretrained(...))
    patched_layers(model)   # {"model.layers.0.self_attn": ["rope/rotate_half"], ...}
    unpatch(model)          # transformers' own code again, exactly

:func:`apply` dispatches on ``model.config.model_type`` through :data:`ARCHITECTURES`, a table
from model type to *patch kinds*:

* ``rope/<kind>``: the model's RoPE function (a module global its attention calls) is
  replaced by a fused drop-in of :mod:`._rope_dropins`, after a probe proves the two compute
  the same (:mod:`._rope_patch`). Module-wide: every model of those classes in the process,
  until :func:`unpatch`.
* ``alibi/<model>``: the model's ALiBi layers get a fused subclass running
  :func:`posenc_triton.alibi_attention` (:mod:`._alibi_models`), once the drop-in written for
  the installed transformers' signature has been probed on a tiny model (:mod:`._alibi_patch`).
  Per instance.

After :func:`apply`, every layer :func:`patched_layers` lists runs the kernel (the tests count
the launches per layer); a model type outside the table is refused with a ValueError listing
the supported ones. The older entry points (:func:`patch_rope`, :func:`apply_to_llama`,
:func:`patch_bloom`, :func:`apply_to_bloom`, ...) keep working.

transformers is an optional extra (``pip install 'posenc-triton[hf]'``), imported only when a
patch function runs (:mod:`._hf`).
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable, Union

import torch

from posenc_triton.integrations import _alibi_patch, _rope_patch
from posenc_triton.integrations._hf import modeling, require_transformers
from posenc_triton.integrations._rope_dropins import fused_apply_rotary_pos_emb
from posenc_triton.integrations._rope_patch import KINDS

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODULES",
    "apply",
    "apply_to_bloom",
    "apply_to_llama",
    "fused_apply_rotary_pos_emb",
    "patch_bloom",
    "patch_rope",
    "patched_bloom_attentions",
    "patched_layers",
    "patched_modules",
    "supported_model_types",
    "unpatch",
    "unpatch_bloom",
    "unpatch_rope",
]


def _deepseek(config) -> tuple[str, ...]:
    # The attention calls apply_rotary_pos_emb_interleave or apply_rotary_pos_emb by config.
    return ("rope/deinterleave",) if getattr(config, "rope_interleave", True) \
        else ("rope/rotate_half",)


def _falcon(config) -> tuple[str, ...]:
    return ("alibi/falcon",) if getattr(config, "alibi", False) else ("rope/rotate_half",)


_HALF, _HALF32 = ("rope/rotate_half",), ("rope/rotate_half_fp32",)
#: ``model_type`` -> its patch kinds (or a function of the config giving them). Each entry is
#: exercised by tests/test_integrations_models.py on a tiny random model.
ARCHITECTURES: dict[str, Union[tuple[str, ...], Callable]] = {
    # rotate-half, full width
    "llama": _HALF, "mistral": _HALF, "mixtral": _HALF, "qwen2": _HALF, "qwen3": _HALF,
    "qwen3_moe": _HALF, "gemma": _HALF, "gemma2": _HALF, "granite": _HALF,
    "starcoder2": _HALF, "smollm3": _HALF,
    # rotate-half, partial width (inside the function or sliced by the attention)
    "phi": _HALF, "phi3": _HALF, "gpt_neox": _HALF, "stablelm": _HALF, "persimmon": _HALF,
    "nemotron": _HALF,
    # rotate-half in fp32, cast back
    "olmo": _HALF32, "olmo2": _HALF32,
    # interleaved pairs
    "glm": ("rope/interleaved",), "glm4": ("rope/interleaved",),
    "helium": ("rope/interleaved",), "ernie4_5": ("rope/interleaved_fp32",),
    "cohere": ("rope/cohere",), "cohere2": ("rope/cohere",),
    "gptj": ("rope/gptj",), "codegen": ("rope/gptj",),
    # de-interleave, then rotate the rope sub-dimension (MLA)
    "deepseek_v3": _deepseek,
    # one tensor per call
    "gemma3n_text": ("rope/single",), "gemma4_text": ("rope/single",),
    # complex freqs_cis (its NoPE layers, use_rope=False, untouched)
    "llama4_text": ("rope/complex",),
    # ALiBi (Falcon: RoPE unless config.alibi)
    "bloom": ("alibi/bloom",), "mpt": ("alibi/mpt",), "falcon": _falcon,
}


#: ``model_type`` -> which of its layers rotate, where the attention calls the RoPE function
#: under a condition of its own (Cohere-2: only its sliding-window layers use RoPE).
ROPE_LAYERS: dict[str, Callable] = {
    "cohere2": lambda layer: getattr(layer, "sliding_window", None) is not None,
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values :func:`apply` accepts, sorted."""
    return sorted(ARCHITECTURES)


def _kinds(model) -> tuple[str, tuple[str, ...]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        raise ValueError(
            f"posenc_triton cannot patch {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}")
    return model_type, (entry(config) if callable(entry) else entry)


def apply(model: torch.nn.Module, *, check_masks: bool = True,
          strict: bool = True) -> torch.nn.Module:
    """Route every RoPE / ALiBi attention layer of ``model`` through the fused kernels.

    Every patch kind is checked before anything is installed: each RoPE function the layers
    call is probed against its drop-in, each ALiBi layer class must have the signature its
    drop-in was written for and pass a probe on a tiny copy of the model.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`ARCHITECTURES`.
        check_masks: ALiBi models only: verify once per forward (one device-to-host read)
            that the mask and bias are what the kernel reproduces, else run transformers'
            forward; ``False`` trusts them (for ``torch.compile`` / CUDA graphs).
        strict: a kind whose check fails raises (nothing patched); ``False`` leaves that kind
            unpatched with one warning and patches the others.

    Returns:
        ``model`` (patched in place; patching twice is a no-op).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: an unsupported model type (the message lists the supported ones), or (with
            ``strict``) a kind that cannot be patched: no layer calling the function the table
            names, an attention implementation the drop-in does not cover, or an installed
            transformers whose function / layer differs from what the drop-in was written for.
            The message names the model type, the transformers version and what differed;
            the model is left exactly as it was.
        ImportError: transformers is not installed.
    """
    transformers = require_transformers()
    model_type, kinds = _kinds(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    installs = []
    for kind in kinds:
        try:
            installs.append(_prepare(model, model_type, kind, check_masks))
        except ValueError as e:
            message = (f"cannot patch {kind} into {model_type} model {type(model).__name__} "
                       f"(transformers {transformers.__version__}): {e}")
            if strict:
                raise ValueError(message) from None
            warnings.warn(f"{message}; left unpatched", stacklevel=2)
    for install in installs:
        install()
    return model


def _prepare(model, model_type: str, kind: str, check_masks: bool) -> Callable:
    """Check one patch kind against ``model``; returns the function that installs it."""
    family, name = kind.split("/", 1)
    if family == "alibi":
        return _alibi_patch.prepare_alibi(model, name, check_masks=check_masks)
    rope = KINDS[name]
    sites = _rope_patch.rope_sites(model, [rope], ROPE_LAYERS.get(model_type))
    if not sites:
        raise ValueError(f"no layer calls {rope.function}")
    targets = list({mod.__name__: (mod, rope) for _, mod, _ in sites}.values())
    reasons = [f"{mod.__name__}.{rope.function}: {reason}" for mod, _ in targets
               if (reason := _rope_patch.probe(rope, _rope_patch.original(mod, rope.function)))]
    if reasons:
        raise ValueError("; ".join(reasons))
    return lambda: _rope_patch.install(targets)


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: the RoPE functions of the modules ``model``'s layers use get their
    originals back (module-wide) and its ALiBi layers their classes. Returns ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sites = _rope_patch.rope_sites(model, KINDS.values())
    _rope_patch.restore({mod.__name__ for _, mod, _ in sites})
    _alibi_patch.unpatch_alibi(model)
    return model


def patched_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{layer path: [patch kinds]}`` of the layers of ``model`` now running our kernels,
    e.g. ``{"model.layers.0.self_attn": ["rope/rotate_half"]}``; empty when none."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rope = _rope_patch.patched_rope_layers(model, ROPE_LAYERS.get(model_type))
    return {**rope, **_alibi_patch.patched_alibi_layers(model)}


# ----------------------------------------------------------------------------------------
# The module-level RoPE API (rotate-half only): patch_rope / unpatch_rope / apply_to_llama
# ----------------------------------------------------------------------------------------

#: Modeling modules patched by ``patch_rope()`` with no argument.
DEFAULT_MODULES = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
)
_FUNC_NAME = "apply_rotary_pos_emb"


def _modules_of(target) -> tuple[list[types.ModuleType], str, bool]:
    """``(modules, description, from_model)`` for a patch/unpatch target."""
    if target is None:
        return [modeling(n) for n in DEFAULT_MODULES], "the default modules", False
    if isinstance(target, str):
        return [modeling(target)], repr(target), False
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
    """Make transformers' attention use :func:`fused_apply_rotary_pos_emb` (rotate-half).

    Args:
        model_or_module: a model instance (every modeling module of its submodules' classes
            that defines ``apply_rotary_pos_emb`` is patched); a modeling module or its dotted
            name, or a list of them; or None for Llama, Mistral and Qwen2
            (:data:`DEFAULT_MODULES`). :func:`apply` covers the other RoPE variants.

    Returns:
        The names of the patched modules (already patched ones included: idempotent).

    Raises:
        ImportError: transformers is not installed (the ``hf`` extra).
        ValueError: the model's modules have no ``apply_rotary_pos_emb`` (ALiBi or learned
            positions: BLOOM, GPT-2, ...), or theirs computes something else (interleaved,
            single-tensor variants); the message names the module and reason. A model
            instance with both kinds gets the compatible ones patched and a warning.
    """
    require_transformers()
    modules, what, from_model = _modules_of(model_or_module)
    candidates = [m for m in modules if hasattr(m, _FUNC_NAME)]
    if not candidates:
        names = ", ".join(m.__name__ for m in modules) or "none"
        raise ValueError(
            f"cannot patch RoPE into {what}: no module defining its classes ({names}) has an "
            f"{_FUNC_NAME} function. patch_rope supports models that rotate q and k with "
            f"Llama's {_FUNC_NAME} (Llama, Mistral, Qwen2, ...); models with ALiBi (BLOOM) or "
            f"learned absolute positions (GPT-2) have nothing to patch")
    if from_model and getattr(getattr(model_or_module, "config", None), "model_type",
                              None) in ARCHITECTURES:
        model_type, kinds = _kinds(model_or_module)
        if "rope/rotate_half" not in kinds:
            # e.g. DeepSeek-V3 defines apply_rotary_pos_emb but rotates with
            # apply_rotary_pos_emb_interleave: patching it would report a patch that never runs.
            raise ValueError(f"cannot patch RoPE into {what}: its {model_type} layers do not "
                             f"rotate with the rotate-half {_FUNC_NAME} ({', '.join(kinds)}); "
                             f"use posenc_triton.integrations.transformers.apply(model)")
    kind = KINDS["rotate_half"]
    good, bad = [], []
    for mod in candidates:
        reason = _rope_patch.probe(kind, _rope_patch.original(mod, _FUNC_NAME))
        (good if reason is None else bad).append((mod, reason))
    if bad and (not good or not from_model):
        detail = "; ".join(f"{m.__name__}.{_FUNC_NAME}: {r}" for m, r in bad)
        raise ValueError(f"cannot patch RoPE into {what}: {detail}")
    for mod, reason in bad:
        warnings.warn(f"patch_rope({what}): left {mod.__name__}.{_FUNC_NAME} unpatched: {reason}",
                      stacklevel=2)
    _rope_patch.install([(mod, kind) for mod, _ in good])
    return [mod.__name__ for mod, _ in good]


def unpatch_rope(model_or_module=None) -> list[str]:
    """Restore the original ``apply_rotary_pos_emb`` where a drop-in replaced it.

    ``model_or_module`` as for :func:`patch_rope`, except that None restores every module
    patched so far (not only the defaults). Returns the names of the modules restored.
    """
    if model_or_module is None:
        names = {n for n, fn in _rope_patch._ORIGINALS if fn == _FUNC_NAME}
    else:
        names = {m.__name__ for m in _modules_of(model_or_module)[0]}
    return _rope_patch.restore(names, _FUNC_NAME)


def patched_modules() -> list[str]:
    """Names of the modules whose ``apply_rotary_pos_emb`` is currently the fused one."""
    return [n for n, fn in _rope_patch._ORIGINALS if fn == _FUNC_NAME
            and getattr(sys.modules.get(n), fn, None) is fused_apply_rotary_pos_emb]


def apply_to_llama(model):
    """``patch_rope(model)``, returning ``model`` (for ``model = apply_to_llama(model)``)."""
    patch_rope(model)
    return model


# ----------------------------------------------------------------------------------------
# The BLOOM API: patch_bloom / unpatch_bloom / apply_to_bloom
# ----------------------------------------------------------------------------------------


def patch_bloom(model: torch.nn.Module, *, check_masks: bool = True) -> int:
    """Run the attention of every ``BloomAttention`` in ``model`` through the ALiBi kernel
    (per instance; see :mod:`._alibi_models`). Returns the number of patched layers
    (idempotent; a repeated call updates ``check_masks``).

    Raises ImportError without transformers, TypeError for a non-module, ValueError when the
    model has no ``BloomAttention`` layer (:func:`apply` handles rotary models).
    """
    require_transformers()
    return _alibi_patch.patch_alibi(model, "bloom", check_masks=check_masks)


def unpatch_bloom(model: torch.nn.Module) -> int:
    """Give every patched ALiBi layer of ``model`` its original class; returns how many."""
    return _alibi_patch.unpatch_alibi(model)


def patched_bloom_attentions(model: torch.nn.Module) -> int:
    """How many ALiBi layers of ``model`` currently run the fused kernel."""
    return len(_alibi_patch.patched_alibi_layers(model))


def apply_to_bloom(model: torch.nn.Module, *, check_masks: bool = True) -> torch.nn.Module:
    """``patch_bloom(model)``, returning ``model`` (for ``model = apply_to_bloom(model)``)."""
    patch_bloom(model, check_masks=check_masks)
    return model
