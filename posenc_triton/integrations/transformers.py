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
the supported ones.

transformers is an optional extra (``pip install 'posenc-triton[hf]'``), imported only when a
patch function runs (:mod:`._hf`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch

from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL
from posenc_triton.integrations import _alibi_patch, _hub, _rope_patch
from posenc_triton.integrations._hf import require_transformers
from posenc_triton.integrations._hub import kernel_config, kernel_mapping
from posenc_triton.integrations._rope_patch import HUB_KINDS, KINDS

__all__ = ["ARCHITECTURES", "ROPE_LAYERS", "apply", "kernel_config", "kernel_mapping",
           "patched_layers", "supported_model_types", "unpatch"]


def _deepseek(config) -> tuple[str, ...]:
    # The attention calls apply_rotary_pos_emb_interleave or apply_rotary_pos_emb by config.
    return ("rope/deinterleave",) if getattr(config, "rope_interleave", True) \
        else ("rope/rotate_half",)


def _falcon(config) -> tuple[str, ...]:
    return ("alibi/falcon",) if getattr(config, "alibi", False) else ("rope/rotate_half",)


ROTATE_HALF, ROTATE_HALF_FP32 = ("rope/rotate_half",), ("rope/rotate_half_fp32",)
#: ``model_type`` -> its patch kinds (or a function of the config giving them). Each entry is
#: exercised by tests/test_integrations_models.py on a tiny random model.
ARCHITECTURES: dict[str, Union[tuple[str, ...], Callable]] = {
    # rotate-half, full width
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma",
                     "gemma2", "granite", "starcoder2", "smollm3"), ROTATE_HALF),
    # rotate-half, partial width (inside the function or sliced by the attention)
    **dict.fromkeys(("phi", "phi3", "gpt_neox", "stablelm", "persimmon", "nemotron"),
                    ROTATE_HALF),
    # rotate-half in fp32, cast back
    "olmo": ROTATE_HALF_FP32, "olmo2": ROTATE_HALF_FP32,
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
    **dict.fromkeys(("cohere2", "flint", "lara_mini"),
                    lambda layer: getattr(layer, "sliding_window", None) is not None),
    **dict.fromkeys(("exaone4", "exaone4_5", "exaone_moe", "kolibri1"),
                    lambda layer: getattr(layer, "sliding_window", None) is None
                    or getattr(layer, "is_sliding", False)),
    "kolibri1_1": lambda layer: (getattr(layer, "is_sliding", False)
                                 and not getattr(layer, "is_kv_shared_layer", False)),
    "afmoe": lambda layer: getattr(layer, "is_local_attention", False),
    # the model passes no position embeddings to a layer whose RoPE theta is 0 / unset
    **dict.fromkeys(("muse_glimmer", "muse_glimmer_text", "muse_spark", "muse_spark_text"),
                    lambda layer: bool(
        layer.config.layer_rope_theta[layer.layer_idx])),
    "zamba2": lambda layer: layer.config.use_mem_rope,
    "granitemoehybrid": lambda layer: layer.config.position_embedding_type == "rope",
}


def supported_model_types() -> list[str]:
    """The model types :func:`apply` accepts.

    Returns:
        ``list[str]`` of ``config.model_type`` values, sorted.
    """
    return sorted(ARCHITECTURES)


def _kinds(model) -> tuple[str, tuple[str, ...]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        return model_type, _probed_kinds(model, model_type, config)
    return model_type, (entry(config) if callable(entry) else entry)


def _probed_kinds(model, model_type, config) -> tuple[str, ...]:
    """A model outside the table: for each RoPE global its layers call, the kind whose probe
    matches (transformers' hub function ``rotary_pos_emb`` where it is decorated: ``_prepare``
    picks its route and layer); MLA's de-interleaving function only where the config asks."""
    rotates = ROPE_LAYERS.get(model_type)
    kinds, reasons = [], []
    for function, candidates in _rope_patch.PROBED.items():
        sites = _rope_patch.rope_sites(model, candidates[:1], rotates)
        if not sites or (function == "apply_rotary_pos_emb_interleave"
                         and not getattr(config, "rope_interleave", True)):
            continue
        if any(_hub.is_hub_func(_rope_patch.original(mod, function)) for _, mod, _ in sites):
            kinds.append(f"rope/{HUB_KINDS[0].name}")
            continue
        try:
            kinds.append(f"rope/{_rope_patch.choose(sites, candidates).name}")
        except ValueError as e:
            reasons.append(str(e))
    if not kinds or reasons:
        why = (f": its RoPE function computes none of the probed kinds ({'; '.join(reasons)})"
               if reasons else f"; supported model types: {', '.join(supported_model_types())}, "
               f"and any whose attention calls a RoPE function that a probe matches with one "
               f"of ours")
        raise ValueError(f"posenc_triton cannot patch {type(model).__name__} "
                         f"(model_type={model_type!r}){why}")
    return tuple(kinds)


def apply(model: torch.nn.Module, *, check_masks: bool = True, strict: bool = True,
          skip_tol: float = DEFAULT_SKIP_TOL) -> torch.nn.Module:
    """Route every RoPE / ALiBi attention layer of ``model`` through the fused kernels.

    Every patch kind is checked before anything is installed: each RoPE function the layers
    call is probed against its drop-in, each ALiBi layer class must have the signature its
    drop-in was written for and pass a probe on a tiny copy of the model.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`ARCHITECTURES`,
            or any other whose layers call a RoPE function (``apply_rotary_pos_emb``,
            ``apply_rotary_emb``, ``apply_rotary_pos_emb_interleave``) that transformers
            decorates for its hub hook or that a probe matches with one of our kinds.
        check_masks: ALiBi models only: verify once per forward (one device-to-host read)
            that the mask and bias are what the kernel reproduces, else run transformers'
            forward; ``False`` trusts them (for ``torch.compile`` / CUDA graphs).
        strict: a kind whose check fails raises (nothing patched); ``False`` leaves that kind
            unpatched with one warning and patches the others.
        skip_tol: ALiBi models only: :func:`posenc_triton.alibi_attention`'s certified tile
            skipping (default ``2**-24``; ``0.0`` computes every tile).

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
            installs.append(_prepare(model, model_type, kind, check_masks, skip_tol))
        except ValueError as e:
            message = (f"cannot patch {kind} into {model_type} model {type(model).__name__} "
                       f"(transformers {transformers.__version__}): {e}")
            if strict:
                raise ValueError(message) from None
            warnings.warn(f"{message}; left unpatched", stacklevel=2)
    for install in installs:
        install()
    return model


def _prepare(model, model_type: str, kind: str, check_masks: bool,
             skip_tol: float = DEFAULT_SKIP_TOL) -> Callable:
    """Check one patch kind against ``model``; returns the function that installs it."""
    family, name = kind.split("/", 1)
    if family == "alibi":
        return _alibi_patch.prepare_alibi(model, name, check_masks=check_masks,
                                          skip_tol=skip_tol)
    rope = KINDS[name]
    sites = _rope_patch.rope_sites(model, [rope], ROPE_LAYERS.get(model_type))
    if not sites:
        raise ValueError(f"no layer calls {rope.function}")
    hub = _prepare_hub(model, sites, rope)
    if hub is not None:
        return hub
    # The kind probed against every site's function (a hub function, here through the patch
    # table: the one of its kinds that fits); a ValueError names what computes otherwise.
    rope = _rope_patch.choose(sites, HUB_KINDS if rope in HUB_KINDS else (rope,))
    targets = list({mod.__name__: (mod, rope) for _, mod, _ in sites}.values())
    return lambda: _rope_patch.install(targets)


def _prepare_hub(model, sites, rope) -> Optional[Callable]:
    """The install function of the hub route for ``sites``, or None where it does not apply:
    a function not decorated for the hook at every site, or the hook unavailable here. A user's
    own ``KernelConfig`` mapping ``rotary_pos_emb`` is respected: a ValueError says so."""
    if rope.function != "apply_rotary_pos_emb":
        return None
    funcs = [_hub.hub_func(model.get_submodule(path), _rope_patch.original(mod, rope.function))
             for path, mod, _ in sites]
    if not funcs or any(fn is None for fn in funcs) or _hub.unavailable() is not None:
        return None
    if _hub.user_mapping(model):
        raise ValueError("its kernel_config maps rotary_pos_emb to the user's own kernel (kept)")
    device = _device_type(model)
    if device not in ("cuda", "cpu"):
        return None
    kind = _hub.choose_kind(sites)
    return lambda: _hub.install(model, funcs, kind.name, device)


def _device_type(model) -> str:
    """Where ``model``'s weights live (``"cpu"`` for a model without any)."""
    return next((p.device.type for p in model.parameters()), "cpu")


def _hub_funcs_of(model) -> list:
    """Every ``rotary_pos_emb`` ``Func`` module of ``model``'s layers running our layer."""
    funcs = []
    for layer in model.modules():
        for fn in (layer.__dict__.get("_kernel_funcs") or {}).values():
            if _hub.ours(fn) is not None:
                funcs.append(fn)
    return funcs


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: the RoPE functions of the modules ``model``'s layers use get their
    originals back (module-wide) and its ALiBi layers their classes.

    Args:
        model: a ``torch.nn.Module`` (patched or not: nothing to undo is fine).

    Returns:
        ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sites = _rope_patch.rope_sites(model, KINDS.values())
    _rope_patch.restore({mod.__name__ for _, mod, _ in sites})
    funcs = _hub_funcs_of(model)
    if funcs or "_posenc_kernel_config" in model.__dict__:
        device = _device_type(model)
        _hub.restore(model, funcs, device)
    _alibi_patch.unpatch_alibi(model)
    return model


def patched_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """The layers of ``model`` now running our kernels.

    Args:
        model: a ``torch.nn.Module``.

    Returns:
        ``{layer path: [patch kinds]}``, e.g. ``{"model.layers.0.self_attn":
        ["rope/rotate_half"]}``; empty when none.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rotates = ROPE_LAYERS.get(model_type)
    layers = _rope_patch.patched_rope_layers(model, rotates)
    for path, mod, kind in _rope_patch.rope_sites(model, HUB_KINDS[:1], rotates):
        fn = _hub.hub_func(model.get_submodule(path), _rope_patch.original(mod, kind.function))
        name = None if fn is None else _hub.ours(fn)
        if name is not None and path not in layers:
            layers[path] = [f"hub/{name}"]
    return {**layers, **_alibi_patch.patched_alibi_layers(model)}
