"""RoPE inverse frequencies with Hugging Face's scaling variants, and float64-exact cos/sin tables.

``rope_frequencies`` reproduces transformers' ``ROPE_INIT_FUNCTIONS`` (matched against 5.x, where
the dict lives in ``config.rope_parameters``; 4.x ``config.rope_scaling`` dicts are the same
shape). Where transformers reads other config fields, explicit arguments replace them:

* ``rotary_dim`` replaces ``int(head_dim * partial_rotary_factor)``; a ``partial_rotary_factor``
  key in ``scaling`` is ignored, because ``rotary_dim`` already is the rotary width -- except
  for ``proportional`` (Gemma-4, LFM-3), whose table always spans the head: there
  ``rotary_dim`` is the head dim and ``partial_rotary_factor`` the fraction of angles that
  rotate (the others get frequency 0: cos 1, sin 0, the pair passes through).
* ``base`` replaces ``rope_theta``; a ``rope_theta`` key in ``scaling`` must equal ``base``.
* ``max_position_embeddings`` replaces ``config.max_position_embeddings``: required by
  ``dynamic``; for ``yarn``/``llama3``/``longrope`` it fills a missing
  ``original_max_position_embeddings`` and (yarn, longrope) a missing ``factor`` as the ratio
  ``max_position_embeddings / original_max_position_embeddings``, as transformers does.
* ``seq_len`` is transformers' ``seq_len`` argument (``dynamic`` and ``longrope`` only).

Everything is computed in float64 on the CPU (MPS has no float64) and returned as float32;
transformers computes in float32, so results agree to a few float32 ulps (rtol 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch

from posenc_triton import _checks

__all__ = ["SUPPORTED_ROPE_TYPES", "rope_cos_sin", "rope_frequencies"]

_REQUIRED = object()


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value)  # transformers passes seq_len as max(position_ids) + 1, a 0-d tensor
    if not _checks.is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _param(p: Mapping, key: str, rt: str, default: Any = _REQUIRED, *, above=None, at_least=None):
    """``p[key]`` checked to be a finite number in range; None or absent gives ``default``."""
    if p.get(key) is None:
        if default is _REQUIRED:
            raise ValueError(f"scaling is missing the key {key!r} required by rope_type={rt!r}")
        return default
    value = _checks.real(f"scaling[{key!r}] (rope_type={rt!r})", p[key])
    if above is not None and not value > above:
        raise ValueError(f"scaling[{key!r}] (rope_type={rt!r}) must be > {above}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"scaling[{key!r}] (rope_type={rt!r}) must be >= {at_least}, got {value}")
    return value  # kept int or float as given, like transformers' arithmetic


def _original_max(p: Mapping, rt: str, max_pos: int | None):
    # transformers' standardize_rope_params fills this key from config.max_position_embeddings.
    if p.get("original_max_position_embeddings") is None and max_pos is not None:
        return max_pos
    return _param(p, "original_max_position_embeddings", rt, above=0)


def _factor_or_ratio(p: Mapping, rt: str, max_pos: int | None, original: float, at_least):
    # yarn / longrope: a missing factor is max_position_embeddings / original (DeepSeek-V3, Phi-3).
    if p.get("factor") is None and max_pos is not None:
        return max_pos / original
    return _param(p, "factor", rt, above=0, at_least=at_least)


def _plain(dim: int, base: float) -> torch.Tensor:
    """``base ** (-2i / dim)``, float64 ``[dim // 2]``."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


# Each variant: (rotary_dim, base, params, rope_type, max_position_embeddings, seq_len)
#               -> (float64 inv_freq [rotary_dim // 2], attention_scaling).
def _default(dim, base, p, rt, max_pos, seq_len):
    return _plain(dim, base), 1.0


def _linear(dim, base, p, rt, max_pos, seq_len):
    # Dividing inv_freq by factor == dividing positions by factor (position interpolation).
    # factor < 1 (compression) is well defined, so only > 0 is required.
    return _plain(dim, base) / _param(p, "factor", rt, above=0), 1.0


def _dynamic(dim, base, p, rt, max_pos, seq_len):
    factor = _param(p, "factor", rt, at_least=1)
    if max_pos is None:
        raise ValueError("rope_type='dynamic' needs max_position_embeddings")
    if dim == 2:  # the NTK exponent dim / (dim - 2) divides by zero
        raise ValueError("rope_type='dynamic' needs rotary_dim >= 4, got rotary_dim=2")
    # Like transformers: seq_len None (init time) or shorter than max_pos leaves base unscaled.
    seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _plain(dim, base), 1.0


def _yarn(dim, base, p, rt, max_pos, seq_len):
    original = _original_max(p, rt, max_pos)
    factor = _factor_or_ratio(p, rt, max_pos, original, at_least=1)
    attention = _param(p, "attention_factor", rt, None, above=0)
    mscale = _param(p, "mscale", rt, None)
    mscale_all_dim = _param(p, "mscale_all_dim", rt, None)
    beta_fast = _param(p, "beta_fast", rt, 0, at_least=0) or 32  # `or` (0 -> 32): transformers
    beta_slow = _param(p, "beta_slow", rt, 0, at_least=0) or 1
    if beta_fast < beta_slow:
        raise ValueError(f"scaling['beta_fast']={beta_fast} must be >= beta_slow={beta_slow}")
    truncate = p.get("truncate", True)  # an explicit None is falsy there too: no truncation
    if truncate is not None and not isinstance(truncate, bool):
        raise TypeError(f"scaling['truncate'] (rope_type='yarn') must be a bool, got {truncate!r}")
    if base == 1:  # find_correction_dim divides by log(base)
        raise ValueError("rope_type='yarn' needs base != 1")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention is None:
        if mscale and mscale_all_dim:  # truthiness, as in transformers (0 means "not set")
            attention = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention = get_mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a zero-width ramp, as transformers does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1 - ramp  # 1: keep the original (high) frequency, 0: interpolate by factor
    interpolated, original_freqs = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interpolated * (1 - extrapolation) + original_freqs * extrapolation, attention


def _llama3(dim, base, p, rt, max_pos, seq_len):
    factor = _param(p, "factor", rt, at_least=1)
    low_ff = _param(p, "low_freq_factor", rt, above=0)
    high_ff = _param(p, "high_freq_factor", rt, above=0)
    if not high_ff > low_ff:  # the smoothing divides by their difference
        raise ValueError(f"scaling['high_freq_factor']={high_ff} must be > low_freq_factor")
    old_len = _original_max(p, rt, max_pos)
    inv_freq = _plain(dim, base)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated
    # (continuous at both edges, so float32-vs-float64 edge flips cost nothing).
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _factor_list(p: Mapping, key: str, dim: int) -> torch.Tensor:
    value = p.get(key)
    if value is None:
        raise ValueError(f"scaling is missing the key {key!r} required by rope_type='longrope'")
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"scaling[{key!r}] (longrope) must be a list of numbers: {e}") from None
    if t.shape != (dim // 2,):
        raise ValueError(f"scaling[{key!r}] (longrope) must have length rotary_dim // 2 = "
                         f"{dim // 2}, got shape {tuple(t.shape)}")
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"scaling[{key!r}] (longrope) must hold finite numbers > 0")
    return t


def _longrope(dim, base, p, rt, max_pos, seq_len):
    short, long = _factor_list(p, "short_factor", dim), _factor_list(p, "long_factor", dim)
    original = _original_max(p, rt, max_pos)
    factor = _factor_or_ratio(p, rt, max_pos, original, at_least=None)
    attention = _param(p, "attention_factor", rt, None, above=0)
    if attention is None:  # the paper's magnitude correction
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    # transformers picks the long set once seq_len exceeds the pretraining length.
    ext = long if seq_len and seq_len > original else short
    return 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)), attention


def _proportional(dim, base, p, rt, max_pos, seq_len):
    # Exponents over the whole head dim, the first int(fraction * dim // 2) angles nonzero.
    fraction = _param(p, "partial_rotary_factor", rt, 1.0, at_least=0)
    if fraction > 1:
        raise ValueError(f"scaling['partial_rotary_factor'] (rope_type={rt!r}) must be in "
                         f"[0, 1], got {fraction}")
    factor = _param(p, "factor", rt, 1.0, above=0)
    angles = int(fraction * dim // 2)
    inv_freq = torch.zeros(dim // 2, dtype=torch.float64)
    inv_freq[:angles] = _plain(dim, base)[:angles]
    return inv_freq / factor, 1.0


_VARIANTS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "longrope": _longrope,
    "proportional": _proportional,
}
SUPPORTED_ROPE_TYPES = tuple(_VARIANTS)


def rope_frequencies(
    rotary_dim: int,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    *,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies, optionally scaled like transformers' ``ROPE_INIT_FUNCTIONS``.

    Args:
        rotary_dim: even int ``R >= 2``, the rotary width.
        base: ``rope_theta``, a positive number. Default ``10000.0``.
        scaling: None (default: unscaled) or a ``rope_scaling`` / ``rope_parameters`` dict
            whose ``rope_type`` (or legacy ``type``) is one of ``SUPPORTED_ROPE_TYPES``.
        device: where ``inv_freq`` goes. Default None (the CPU).
        max_position_embeddings: int ``>= 1`` or None (default); stands in for the config
            field (see the module docstring).
        seq_len: int ``>= 0`` or None (default); transformers' ``seq_len`` (``dynamic``,
            ``longrope``).

    Returns:
        ``(inv_freq, attention_scaling)``: float32 ``[R // 2]`` on ``device``, and a float.

    Raises:
        TypeError, ValueError: a bad argument, an unknown ``rope_type`` or scaling key.
    """
    rotary_dim = _int("rotary_dim", rotary_dim, 1)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    base = _checks.real("base", base, positive=True)
    max_pos = max_position_embeddings
    if max_pos is not None:
        max_pos = _int("max_position_embeddings", max_pos, 1)
    if seq_len is not None:
        seq_len = _int("seq_len", seq_len, 0)
    scaling = {} if scaling is None else scaling
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling must be None or a dict, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if "type" in scaling and scaling["type"] != rope_type:
        raise ValueError(f"scaling has rope_type={rope_type!r} but type={scaling['type']!r}")
    if rope_type not in _VARIANTS:
        raise ValueError(f"unknown rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    theta = scaling.get("rope_theta")
    if theta is not None and _checks.real("scaling['rope_theta']", theta) != base:
        # 5.x rope_parameters carry rope_theta; refusing a mismatch beats silently picking one.
        raise ValueError(f"scaling['rope_theta']={theta} differs from base={base}")
    variant = _VARIANTS[rope_type]
    inv_freq, attention = variant(rotary_dim, base, scaling, rope_type, max_pos, seq_len)
    return inv_freq.to(device=device, dtype=torch.float32), float(attention)


def rope_cos_sin(
    seq_len_or_positions: int | torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, float32 ``[S, R/2]`` each, on ``inv_freq``'s device.

    Angles are formed in float64 (a float32 angle at position 1e7 is off by ~1 rad), then
    cos/sin are multiplied by ``attention_scaling`` and rounded to float32.

    Args:
        seq_len_or_positions: int ``S >= 0`` (rows ``arange(S)``) or 1-D integer ``[S]``
            positions on ``inv_freq``'s device.
        inv_freq: floating ``[R/2]``, e.g. from :func:`rope_frequencies`.
        attention_scaling: positive float multiplying cos and sin. Default ``1.0``.

    Returns:
        ``(cos, sin)``: float32 ``[S, R/2]`` each, on ``inv_freq``'s device.

    Raises:
        TypeError, ValueError: a non-tensor, non-floating or non-1-D ``inv_freq``; non-integer,
            non-1-D or other-device positions.
    """
    if not isinstance(inv_freq, torch.Tensor):
        raise TypeError(f"inv_freq must be a tensor, got {type(inv_freq).__name__}")
    if not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be a floating tensor, got dtype {inv_freq.dtype}")
    if inv_freq.ndim != 1:
        raise ValueError(f"inv_freq must be 1-D [R/2], got shape {tuple(inv_freq.shape)}")
    scale = _checks.real("attention_scaling", attention_scaling, positive=True)
    device = inv_freq.device
    if isinstance(seq_len_or_positions, torch.Tensor):
        positions = seq_len_or_positions
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"seq_len_or_positions must be integer, got {positions.dtype}")
        if positions.ndim != 1:
            raise ValueError(f"seq_len_or_positions must be 1-D [S], got {tuple(positions.shape)}")
        if positions.device != device:
            raise ValueError(f"seq_len_or_positions is on {positions.device}, inv_freq on {device}")
    else:
        seq_len = _int("seq_len_or_positions", seq_len_or_positions, 0)
        positions = torch.arange(seq_len, device=device)
    # MPS has no float64: form the angles on the CPU there and move the float32 result back.
    work = torch.device("cpu") if device.type == "mps" else device
    angles = torch.outer(positions.to(work, torch.float64), inv_freq.to(work, torch.float64))
    cos = (torch.cos(angles) * scale).to(device=device, dtype=torch.float32)
    sin = (torch.sin(angles) * scale).to(device=device, dtype=torch.float32)
    return cos, sin
