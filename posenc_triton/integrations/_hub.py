"""transformers' own hub-kernel hook, pointed at the ``kernels`` layer repository inside the
package (``hub_kernel/``): no monkey patch, nothing fetched.

transformers ≥ 5.25 decorates ``apply_rotary_pos_emb`` of most RoPE models with
``use_kernel_forward_from_hub("rotary_pos_emb")`` and their attention classes with
``use_kernelized_func``: each attention instance holds a private ``Func`` module for it (in
``layer._kernel_funcs``) that ``kernels.kernelize`` gives another forward. :func:`install`
kernelizes exactly those ``Func`` modules of one model with our layer (never the model's other
hub layers), :func:`restore` gives them transformers' own forward back.

``kernel_mapping()`` / ``kernel_config()`` are the public ways in for users of ``kernels`` and
of ``from_pretrained(..., kernel_config=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from posenc_triton.integrations import _rope_dropins as dropins
from posenc_triton.integrations import _rope_patch

#: The name transformers registers its decorated RoPE function under.
LAYER_NAME = "rotary_pos_emb"
#: The repository folder (the layout ``kernels.LocalLayerRepository`` loads).
REPOSITORY = Path(__file__).resolve().parent / "hub_kernel"
_DEVICES = ("cuda", "cpu")


class RotaryPosEmb(torch.nn.Module):
    """``rotary_pos_emb`` through the fused kernel: ``forward(q, k, cos, sin, unsqueeze_dim=1)``
    as transformers' ``apply_rotary_pos_emb`` (q/k ``[B, H, S, D]``, cos/sin ``[B or 1, S, D]``
    ``cat(f, f)`` or ``[B or 1, S, D/2]``); returns ``(q_embed, k_embed)``, the promotion of
    q/k with cos/sin."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return dropins.fused_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


class RotaryPosEmbFP32(torch.nn.Module):
    """:class:`RotaryPosEmb` cast back to q's/k's dtype (the models that rotate in fp32)."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return dropins.fused_rotary_pos_emb_fp32(q, k, cos, sin, unsqueeze_dim)


class RotaryPosEmbInterleaved(torch.nn.Module):
    """``rotary_pos_emb`` of the models rotating interleaved pairs ``(2i, 2i+1)`` by
    ``cos/sin [B or 1, S, D/2]``."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return dropins.fused_rotary_pos_emb_interleaved(q, k, cos, sin, unsqueeze_dim)


#: rope kind name (:data:`._rope_patch.HUB_KINDS`) -> the repository layer computing it.
LAYERS = {"rotary_pos_emb": RotaryPosEmb, "rotary_pos_emb_fp32": RotaryPosEmbFP32,
          "rotary_pos_emb_interleaved": RotaryPosEmbInterleaved}


def unavailable() -> Optional[str]:
    """Why the hub route cannot run here (None when it can)."""
    value = os.environ.get("USE_HUB_KERNELS", "YES")
    if value.upper() not in ("1", "ON", "YES", "TRUE"):  # transformers' own reading of it
        return f"USE_HUB_KERNELS={value} disables transformers' hub kernels"
    try:
        import kernels  # noqa: F401
    except ImportError:
        return "Hugging Face's kernels package is not installed"
    return None


def kernel_mapping(layer: str = "RotaryPosEmb") -> dict:
    """The ``kernels`` mapping of ``rotary_pos_emb`` to our layer, for ``cuda`` and ``cpu`` and
    every mode (``Mode.TRAINING``, ``Mode.INFERENCE``, each with ``Mode.TORCH_COMPILE``)."""
    from kernels import LocalLayerRepository, Mode

    repo = LocalLayerRepository(repo_path=REPOSITORY, layer_name=layer, check_arch=False)
    modes = (Mode.TRAINING, Mode.INFERENCE, Mode.TRAINING | Mode.TORCH_COMPILE,
             Mode.INFERENCE | Mode.TORCH_COMPILE)
    return {LAYER_NAME: {device: dict.fromkeys(modes, repo) for device in _DEVICES}}


def kernel_config():
    """A ``transformers.KernelConfig`` (``use_local_kernel=True``) mapping ``rotary_pos_emb``
    to our layer for ``from_pretrained(..., kernel_config=...)``."""
    from transformers import KernelConfig

    class PosencKernelConfig(KernelConfig):
        # transformers' own conversion maps one device (and refuses "cpu"): ours is built
        # already, for every device and mode, so train()/eval() re-kernelize to it too.
        def sanitize_kernel_mapping(self, model):
            self.store_registered_layer_names(model)
            if LAYER_NAME not in self.registered_layer_names.values():
                raise ValueError(
                    f"{type(model).__name__} registers no '{LAYER_NAME}' hub function (its "
                    f"attention is not decorated with use_kernelized_func(apply_rotary_pos_emb))"
                    f"; use posenc_triton.integrations.transformers.apply(model) instead")
            # The layer that computes what this model's function computes (probed), or a
            # ValueError naming what differs: never a silently different rotation.
            sites = _rope_patch.rope_sites(model, _rope_patch.HUB_KINDS[:1])
            self.posenc_layer = LAYERS[choose_kind(sites).name].__name__

        def create_compatible_mapping(self, model, compile=False):
            # The model's other hub layers keep transformers' own code (an empty entry: no
            # download, no "no mapping" warning per layer).
            names = set(self.registered_layer_names.values()) - {LAYER_NAME}
            others = {name: {} for name in names}
            self.kernel_mapping = {**others, **kernel_mapping(self.posenc_layer)}

    return PosencKernelConfig(kernel_mapping={LAYER_NAME: f"{REPOSITORY}:RotaryPosEmb"},
                              use_local_kernel=True)


def choose_kind(sites) -> _rope_patch.RopeKind:
    """The first of :data:`._rope_patch.HUB_KINDS` whose drop-in computes what the function of
    every site (``rope_sites`` triples) computes; a ValueError says why none does."""
    return _rope_patch.choose(sites, _rope_patch.HUB_KINDS)


def is_hub_func(fn) -> bool:
    return getattr(type(fn), "kernel_layer_name", None) == LAYER_NAME


def hub_func(layer: torch.nn.Module, function) -> Optional[torch.nn.Module]:
    """The private ``Func`` module through which ``layer`` calls ``function`` (the decorated
    module global, itself a ``Func`` instance), or None."""
    if not is_hub_func(function):
        return None
    for fn in (layer.__dict__.get("_kernel_funcs") or {}).values():
        if type(fn) is type(function):
            return fn
    return None


def _kernelize(funcs, mapping, device_type: str, fallback: bool = False) -> None:
    from kernels import Mode, kernelize, use_kernel_mapping

    container = torch.nn.ModuleList(funcs)  # only these: the model's other hub layers stay
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(container, mode=Mode.TRAINING, device=device_type, use_fallback=fallback)


def install(model: torch.nn.Module, funcs, kind_name: str, device_type: str) -> None:
    """Kernelize ``funcs`` (``Func`` modules of ``model``'s layers) with our layer for
    ``kind_name``; a transformers model keeps it when it re-kernelizes itself."""
    layer = LAYERS[kind_name].__name__
    _kernelize(funcs, kernel_mapping(layer), device_type)
    if hasattr(model, "kernel_config") and "_posenc_kernel_config" not in model.__dict__:
        # transformers re-kernelizes on train()/eval() (use_kernels) with model.kernel_config:
        # keep its default mapping for the other layers, ours for rotary_pos_emb.
        from transformers import KernelConfig

        model.__dict__["_posenc_kernel_config"] = model.kernel_config
        model.kernel_config = KernelConfig(kernel_mapping=kernel_mapping(layer),
                                           use_local_kernel=False, inherit_mapping=True)


def restore(model: torch.nn.Module, funcs, device_type: str) -> None:
    """transformers' own forward back in ``funcs``; ``model.kernel_config`` as it was."""
    if funcs:
        _kernelize(funcs, {LAYER_NAME: {}}, device_type, fallback=True)  # the original
    if "_posenc_kernel_config" in model.__dict__:
        model.kernel_config = model.__dict__.pop("_posenc_kernel_config")


def ours(fn) -> Optional[str]:
    """The kind name of our layer running in ``Func`` module ``fn``, or None."""
    forward = fn.__dict__.get("forward")
    for name, cls in LAYERS.items():
        if getattr(forward, "__func__", None) is cls.forward:
            return name
    return None


def user_mapping(model: torch.nn.Module) -> bool:
    """Whether the user's own ``model.kernel_config`` maps ``rotary_pos_emb`` (respected)."""
    config = getattr(model, "kernel_config", None)
    if config is None or "_posenc_kernel_config" in model.__dict__:
        return False
    mapping = getattr(config, "kernel_mapping", None) or {}
    if LAYER_NAME not in mapping:
        return False
    # Ours, whichever of our layers it names (kernel_config() maps the one its probe chose).
    ours = [repo for name in LAYERS.values()
            for repo in _leaves(kernel_mapping(name.__name__)[LAYER_NAME])]
    return not all(repo in ours for repo in _leaves(mapping[LAYER_NAME]))


def _leaves(entry) -> list:
    """The repositories of a mapping entry: ``{device: repo}`` or ``{device: {mode: repo}}``
    (or, before transformers converts it, a repository id string)."""
    if isinstance(entry, dict):
        return [leaf for value in entry.values() for leaf in _leaves(value)]
    return [entry]
