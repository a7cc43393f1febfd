"""BLOOM: run every ``BloomAttention`` of a model through :func:`posenc_triton.alibi_attention`.

Re-exported by :mod:`posenc_triton.integrations.transformers`; transformers is imported only
when a function here is called (the ``hf`` extra).

What BLOOM computes (transformers 5.x, eager attention). ``BloomModel.forward`` builds, once
per forward, from the 2-D ``attention_mask`` ``M [B, Sk]`` (all ones when None):

* ``alibi [B*H, 1, Sk] = m_h * pos_b(j)`` with ``pos_b = (cumsum(M_b) - 1) * M_b``: a bias on
  the *key* position only, not on the distance;
* a 4-D additive mask ``[B, 1, Sq, Sk]`` (0 or the dtype's min): causal, with query ``i`` at
  key position ``past + i``, and the padding of ``M``.

Each ``BloomAttention`` then takes ``softmax(alibi + q.k / sqrt(D) + mask) @ v`` (``baddbmm``
with ``beta=1``, ``alpha=inv_norm_factor``). :func:`alibi_attention` with ``is_causal=True``
scores ``q.k * scale - m_h * (i' - j)`` for ``j <= i' = i + Sk - Sq`` (bottom-right), with a
``key_padding_mask``. Why the two agree:

* With a dynamic cache (or none) ``Sk = past + Sq``, so BLOOM's query ``i`` sits at key
  ``past + i = i'``: the causal parts coincide, and the 4-D mask is ``causal(i', j) and
  K[b, j]`` where ``K`` = the visible keys of the last query row (that row sees every
  unpadded key).
* If the kept keys of a row ``b`` are one contiguous run starting at ``s_b`` (no padding,
  right padding, left padding -- anything but holes), ``pos_b(j) = j - s_b`` on them, so
  BLOOM's score is ``q.k * scale + m_h * j - m_h * s_b`` and ours is
  ``q.k * scale + m_h * j - m_h * i'``. They differ by ``m_h * (i' - s_b)``, a constant of the
  query row, which softmax cancels: the probabilities are equal, for every visible key.

Both preconditions are *checked* at run time on the tensors BLOOM passes (the 4-D mask is
``causal(i', j) and K``, exactly 0 or "minus infinity", ``K`` contiguous per row, ``alibi ==
m_h * (cumsum(K) - 1) * K`` on the kept keys): one small device-to-host read per model forward
(the mask and alibi tensors are shared by all layers of a forward, and the verdict is cached
for them). Where a check fails the layer runs transformers' own forward.

Falls back to the original ``BloomAttention.forward`` (same outputs, same cache update) when:

* ``output_attentions=True`` (the kernel never materialises the probabilities);
* training with attention dropout ``p > 0`` (the kernel has no dropout);
* a ``head_mask`` is passed (transformers 5 no longer does);
* the mask is missing or is not a plain 4-D causal + padding mask over the key length
  (e.g. a static cache's prefill, where unfilled slots follow the keys, or a 2-D mask with
  holes, whose compressed positions are not a per-row shift), ``alibi`` is not
  ``[B*H, 1, Sk]`` or does not match BLOOM's formula, or ``beta != 1``;
* inside ``torch.compile`` with the default ``check_masks=True`` (the check reads the device);
  pass ``check_masks=False`` to skip the check -- then the mask is trusted to be what
  transformers builds for a dynamic cache with contiguous (left/right) padding.

Padded query rows. Rows that see no key (left padding, before the first real token) output 0
here, where transformers' eager softmax averages every value. Padded positions never reach
an unpadded one (their keys are masked everywhere), so logits at unpadded positions agree,
and so do the loss and every gradient as long as no label is scored with a padded
position's logits. A causal LM scores the label at ``t`` with the logits at ``t - 1``: with
left padding the *first real token* of a row is predicted from a padding position (a
meaningless term in both implementations) -- give it ``-100`` too, besides the padded
positions, to compare losses. Compare logits at unpadded positions only.

Precision: the kernel computes scores, softmax and ``P @ V`` with fp32 accumulation and an
exact fp32 bias, where BLOOM rounds the alibi and ``baddbmm`` to the model dtype (bf16/fp16).
The slopes are BLOOM's own (``_get_alibi_slopes``, fp32 ``pow`` of a rounded base): equal to
:func:`posenc_triton.alibi_slopes` (correctly rounded) up to 8 heads and for 6, a few ulps
off (< 2e-6 relative, up to 11 ulps at 128 heads) from 12 heads on.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

from posenc_triton.alibi import alibi_attention, alibi_slopes

__all__ = ["apply_to_bloom", "patch_bloom", "patched_bloom_attentions", "unpatch_bloom"]

_FLAG = "_posenc_check_masks"  # instance attribute set by patch_bloom


def _modeling_bloom():
    from posenc_triton.integrations.transformers import _require_transformers

    _require_transformers()
    from transformers.models.bloom import modeling_bloom

    return modeling_bloom


@functools.cache
def _slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """BLOOM's slopes, float32 ``[H]`` (as its ``build_alibi_tensor`` makes them)."""
    get = getattr(_modeling_bloom(), "_get_alibi_slopes", None)
    if get is None:  # older transformers: the same rule, correctly rounded
        return alibi_slopes(num_heads, device)
    return get(num_heads, device).to(torch.float32).contiguous()


def _model_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _slopes.__wrapped__(num_heads, device)
    return _slopes(num_heads, device)


# ----------------------------------------------------------------------------------------
# The mask / alibi check: one verdict per (mask, alibi) pair, shared by the layers
# ----------------------------------------------------------------------------------------

# (weakref(mask), mask._version, weakref(alibi), alibi._version, verdict)
_LAST_CHECK: list = []


def _visible(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Bool "key visible" of a 4-D mask, or None for a dtype that is not a mask."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask == 0
    return None


def _check(mask: torch.Tensor, alibi: torch.Tensor, slopes: torch.Tensor, batch: int,
           num_heads: int, seqlen_q: int, seqlen_k: int, verify: bool):
    """``(ok, key_padding_mask or None)`` for running the kernel on this layer's inputs."""
    visible = _visible(mask)
    if visible is None:
        return False, None
    kpm = visible[:, 0, -1, :]  # the last query row sees every kept key (bottom-right)
    if not verify:
        return True, kpm
    i = torch.arange(seqlen_q, device=mask.device).view(-1, 1) + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=mask.device).view(1, -1)
    expected = (j <= i)[None, None] & kpm[:, None, None, :]
    checks = [(visible == expected).all()]
    if mask.is_floating_point():  # a pure mask: 0 or "minus infinity", no other bias
        low = torch.finfo(mask.dtype).min / 2
        checks.append(((mask == 0) | (mask <= low)).all())
    # Kept keys of each row form one run: pos = j - start on them.
    starts = kpm[:, :1].sum(-1) + (kpm[:, 1:] & ~kpm[:, :-1]).sum(-1)
    checks.append((starts <= 1).all())
    # alibi is BLOOM's m_h * (cumsum(K) - 1) * K on the kept keys.
    kept = kpm.to(torch.int64)
    pos = (kept.cumsum(-1) - 1) * kept
    ref = (slopes[None, :, None] * pos[:, None, :]).to(alibi.dtype)
    got = alibi.reshape(batch, num_heads, seqlen_k)
    tol = 2 * torch.finfo(alibi.dtype).eps
    close = (got.float() - ref.float()).abs() <= tol * ref.float().abs() + 1e-30
    checks.append((close | ~kpm[:, None, :]).all())
    checks.append(kpm.all())
    flags = torch.stack(checks).tolist()  # the one device-to-host read
    if not all(flags[:-1]):
        return False, None
    return True, (None if flags[-1] else kpm)


def _cached_check(mask, alibi, *args, verify: bool):
    if not verify or torch.compiler.is_compiling():
        return _check(mask, alibi, *args, verify=verify)
    if _LAST_CHECK:
        mref, mver, aref, aver, shape, verdict = _LAST_CHECK
        if (mref() is mask and mver == mask._version and aref() is alibi
                and aver == alibi._version and shape == args[1:]):
            return verdict
    verdict = _check(mask, alibi, *args, verify=True)
    _LAST_CHECK[:] = [weakref.ref(mask), mask._version, weakref.ref(alibi), alibi._version,
                      args[1:], verdict]
    return verdict


# ----------------------------------------------------------------------------------------
# The fused forward
# ----------------------------------------------------------------------------------------


def _fused_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                   use_cache=False, output_attentions=False, **kwargs):
    """``BloomAttention.forward`` with the attention itself in :func:`alibi_attention`.

    Returns ``(output, None)`` (no attention probabilities); see the module docstring for
    the cases that run the original forward instead.
    """
    original = super(_FusedBloomAttentionMixin, self).forward
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, _FLAG, True)
    if (output_attentions or kwargs.get("head_mask") is not None
            or (self.training and self.attention_dropout.p > 0)
            or (verify and torch.compiler.is_compiling())
            or self.beta != 1.0 or seqlen_q == 0
            or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
            or not isinstance(alibi, torch.Tensor) or alibi.dim() != 3):
        return original(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                        use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    seqlen_k = attention_mask.shape[-1]
    if (tuple(attention_mask.shape) not in ((batch, 1, seqlen_q, seqlen_k),
                                           (batch, num_heads, seqlen_q, seqlen_k))
            or tuple(alibi.shape) != (batch * num_heads, 1, seqlen_k) or seqlen_k < seqlen_q):
        ok, kpm = False, None
    else:
        slopes = _model_slopes(num_heads, hidden_states.device)
        ok, kpm = _cached_check(attention_mask, alibi, slopes, batch, num_heads, seqlen_q,
                                seqlen_k, verify=verify)
    if not ok:
        return original(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                        use_cache=use_cache, output_attentions=output_attentions, **kwargs)

    fused_qkv = self.query_key_value(hidden_states)  # [B, Sq, 3 * H * D]
    query, key, value = self._reshape(fused_qkv)  # [B, H, Sq, D] views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    if key.shape[-2] != seqlen_k:
        raise RuntimeError(f"BloomAttention (posenc_triton): {key.shape[-2]} keys after the cache "
                           f"update but the attention mask covers {seqlen_k}")
    # bshd views (no copy): the output comes back contiguous [B, Sq, H, D].
    context = alibi_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              slopes, is_causal=True, scale=float(self.inv_norm_factor),
                              layout="bshd", key_padding_mask=kpm)
    context = context.reshape(batch, seqlen_q, num_heads * head_dim)

    # The rest as in transformers' BloomAttention.forward.
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for t in range(self.pretraining_tp):
            output = output + torch.nn.functional.linear(
                context[:, :, int(t * slices): int((t + 1) * slices)],
                self.dense.weight[:, int(t * slices): int((t + 1) * slices)])
    else:
        output = self.dense(context)
    output = _modeling_bloom().dropout_add(output, residual, self.hidden_dropout, self.training)
    return output, None


class _FusedBloomAttentionMixin:
    """Put before a ``BloomAttention`` class: its ``forward`` runs the fused kernel."""

    forward = _fused_forward


# original class -> its fused subclass
_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        name = f"Fused{cls.__name__}"
        fused = type(name, (_FusedBloomAttentionMixin, cls),
                     {"__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__})
        _FUSED_CLASSES[cls] = fused
    return fused


def __getattr__(name: str):
    # ``FusedBloomAttention`` resolves by name, so a patched model pickles (torch.save) and
    # unpickles in a fresh process.
    if name == "FusedBloomAttention":
        return _fused_class(_modeling_bloom().BloomAttention)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_fused(module) -> bool:
    return isinstance(module, _FusedBloomAttentionMixin)


def patch_bloom(model: torch.nn.Module, *, check_masks: bool = True) -> int:
    """Run the attention of every ``BloomAttention`` in ``model`` through the ALiBi kernel.

    The instances' class is swapped for a subclass whose ``forward`` calls
    :func:`posenc_triton.alibi_attention` (``is_causal=True``, BLOOM's slopes and
    ``1/sqrt(head_dim)``, the padding as ``key_padding_mask``): training, KV-cache decoding
    (one token or a chunk) and left/right padding. Other models, and other instances of
    the class, are untouched; parameters, state dict and ``isinstance`` are unchanged.

    Args:
        model: a BLOOM model (``BloomForCausalLM``, ``BloomModel``, ...) or any module
            containing ``BloomAttention`` layers.
        check_masks: verify, once per model forward (one device-to-host read), that the
            mask and alibi BLOOM passes are what the kernel reproduces, and run transformers'
            forward where not. ``False`` skips the check (no sync: for ``torch.compile`` and
            CUDA graphs) and trusts that the mask is transformers' causal + contiguous
            padding mask over a dynamic cache.

    Returns:
        The number of patched attention layers (already patched ones included: idempotent;
        a repeated call updates ``check_masks``).

    Raises:
        ImportError: transformers is not installed (the ``hf`` extra).
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` has no ``BloomAttention`` layer.

    Falls back to the original forward where the kernel does not apply (attention output
    requested, attention dropout in training, ``head_mask``, a mask that is not a plain
    causal + padding mask); see :mod:`posenc_triton.integrations._bloom`. Padded query rows
    output 0 (transformers averages the values): compare logits at unpadded positions, and
    with left padding set the first real token's label to -100 as well (it is scored with a
    padded position's logits).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_bloom takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(check_masks, bool):
        raise TypeError(f"check_masks must be a bool, got {type(check_masks).__name__}")
    base = _modeling_bloom().BloomAttention
    count = 0
    for module in model.modules():
        if not isinstance(module, base):
            continue
        if not _is_fused(module):
            cls = type(module)
            if cls.forward is not base.forward:
                raise ValueError(f"cannot patch {cls.__qualname__}: it overrides "
                                 f"BloomAttention.forward")
            module.__class__ = _fused_class(cls)
        setattr(module, _FLAG, check_masks)
        count += 1
    if not count:
        raise ValueError(f"cannot patch BLOOM attention into {type(model).__name__}: it has no "
                         f"BloomAttention layer (patch_rope handles rotary models)")
    _LAST_CHECK.clear()
    return count


def unpatch_bloom(model: torch.nn.Module) -> int:
    """Give every patched ``BloomAttention`` of ``model`` its original class (and forward).

    Returns the number of layers restored (0 when none was patched). Needs no transformers
    import when nothing is patched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch_bloom takes a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if _is_fused(module):
            module.__class__ = type(module).__mro__[2]  # (Fused, Mixin, original, ...)
            module.__dict__.pop(_FLAG, None)
            count += 1
    _LAST_CHECK.clear()
    return count


def patched_bloom_attentions(model: torch.nn.Module) -> int:
    """How many ``BloomAttention`` layers of ``model`` currently run the fused kernel."""
    return sum(1 for m in model.modules() if _is_fused(m))


def apply_to_bloom(model: torch.nn.Module, *, check_masks: bool = True) -> torch.nn.Module:
    """``patch_bloom(model)``, returning ``model`` (for ``model = apply_to_bloom(model)``)."""
    patch_bloom(model, check_masks=check_masks)
    return model
