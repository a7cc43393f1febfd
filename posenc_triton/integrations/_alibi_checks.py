"""The run-time checks of :mod:`._alibi_models`: the models' slopes, and one verdict per
forward on whether the kernel reproduces a layer's mask and bias.

Caches here hold no inference tensor (slopes are built under ``inference_mode(False)``) and
nothing of the user's beyond one forward: verdicts live in a per-thread table keyed weakly by
the bias tensor that the model builds afresh in every forward.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from posenc_triton.integrations._hf import modeling

BLOOM = "transformers.models.bloom.modeling_bloom"
MPT = "transformers.models.mpt.modeling_mpt"
FALCON = "transformers.models.falcon.modeling_falcon"


# ----------------------------------------------------------------------------------------
# Slopes: cached per (model, heads, device), built outside inference mode
# ----------------------------------------------------------------------------------------

_SLOPES: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def _build_slopes(model: str, num_heads: int, device: torch.device) -> torch.Tensor:
    if model == "bloom":
        return modeling(BLOOM)._get_alibi_slopes(num_heads, device).float()
    # Falcon's own rounding: alibi at position 1 is bf16(m_h), as a float32 [H].
    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    alibi = modeling(FALCON).build_alibi_tensor(ones, num_heads, torch.float32)
    return alibi[:, 0, 1].contiguous()


def model_slopes(model: str, num_heads: int, device: torch.device) -> torch.Tensor:
    """float32 ``[H]``: BLOOM's slopes (``"bloom"``) or Falcon's bf16-rounded ones."""
    if torch.compiler.is_compiling():  # a constant of the graph, no Python-side cache
        return _build_slopes(model, num_heads, device)
    key = (model, num_heads, device)
    slopes = _SLOPES.get(key)
    if slopes is None:
        # A normal tensor even under inference mode: a cache filled while serving must not
        # hand an inference tensor to a later training step.
        with torch.inference_mode(False):
            slopes = _build_slopes(model, num_heads, device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return slopes  # lives in the graph's pool: this capture only
        _SLOPES[key] = slopes
    return slopes


# ----------------------------------------------------------------------------------------
# The mask / bias check: one verdict per forward, shared by its layers
# ----------------------------------------------------------------------------------------

_LOCAL = threading.local()


def _verdicts() -> WeakIdKeyDictionary:
    table = getattr(_LOCAL, "verdicts", None)
    if table is None:
        table = _LOCAL.verdicts = WeakIdKeyDictionary()
    return table


def cached_verdict(bias: torch.Tensor, mask: torch.Tensor, shape: tuple, compute):
    """``compute()``, once per (bias, mask, shape): the bias is built afresh by every model
    forward and shared by its layers; the entry dies with it."""
    if torch.compiler.is_compiling():
        return compute()
    table = _verdicts()
    hit = table.get(bias)
    if hit is not None and hit[0]() is mask and hit[1] == shape:
        return hit[2]
    result = compute()
    table[bias] = (weakref.ref(mask), shape, result)
    return result


def verdict(visible, seqlen_q, seqlen_k, checks, *, contiguous: bool):
    """``(ok, key_padding_mask or None)``. ``visible [B, 1 or H, Sq, Sk]`` must be causal
    (bottom-right) and the padding of its last query row; ``checks``: more bool scalars."""
    kpm = visible[:, 0, -1, :]  # the last query row sees every kept key (bottom-right)
    i = torch.arange(seqlen_q, device=visible.device).view(-1, 1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=visible.device).view(1, -1)
    expected = (j <= i)[None, None] & kpm[:, None, None, :]
    checks = [(visible == expected).all(), *checks]
    if contiguous:  # kept keys of each row form one run: pos = j - start on them
        starts = kpm[:, :1].sum(-1) + (kpm[:, 1:] & ~kpm[:, :-1]).sum(-1)
        checks.append((starts <= 1).all())
    checks.append(kpm.all())
    flags = torch.stack(checks).tolist()  # the one device-to-host read
    if not all(flags[:-1]):
        return False, None
    return True, (None if flags[-1] else kpm)


def key_position_check(alibi, kpm, slopes, batch, num_heads, seqlen_k, divisor=1.0):
    """``alibi == m_h * (cumsum(K) - 1) * K / divisor`` on the kept keys, each product rounded
    to the slopes' precision and then to ``alibi``'s dtype, as the models build it."""
    kept = kpm.to(torch.int64)
    pos = (kept.cumsum(-1) - 1) * kept
    ref = ((slopes[None, :, None] * pos[:, None, :]).to(alibi.dtype) / divisor).float()
    got = alibi.reshape(batch, num_heads, seqlen_k).float()
    tol = 2 * torch.finfo(alibi.dtype).eps
    return (((got - ref).abs() <= tol * ref.abs() + 1e-30) | ~kpm[:, None, :]).all()


def mask_value_check(mask, visible, expected):
    """A float mask holds ``expected`` (0, or Falcon's folded alibi) where visible and
    "minus infinity" elsewhere: no other bias hides in it."""
    low = torch.finfo(mask.dtype).min / 2
    return torch.where(visible, mask == expected, mask <= low).all()


def must_fall_back(verify: bool, **flags) -> bool:
    """Whether a layer must run transformers' own forward before looking at its tensors:
    one of ``flags`` is set, or the mask check cannot run (``verify`` inside a compile)."""
    return any(flags.values()) or (verify and torch.compiler.is_compiling())


def check_keys(got: int, want: int, where: str) -> None:
    if got != want:
        raise RuntimeError(f"{where} (posenc_triton): {got} keys after the cache update but "
                           f"the attention mask covers {want}")
