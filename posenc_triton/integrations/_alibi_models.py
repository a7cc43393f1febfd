"""BLOOM, MPT and Falcon (``alibi=True``): their attention through :func:`alibi_attention`.

Each patched layer's class is swapped for a subclass whose ``forward`` runs the fused kernel
(no ``S x S`` bias in memory) where it reproduces the model, and transformers' own forward
otherwise. What each model computes (transformers 5.x) and why the kernel's
``q.k * scale - m_h * (i' - j)`` (``i' = i + Sk - Sq``, bottom-right, masked keys skipped)
gives the same probabilities:

* **BLOOM** (``BloomAttention``): ``softmax(q.k / sqrt(D) + m_h * pos_b(j) + mask)`` with the
  key positions ``pos_b = (cumsum(M_b) - 1) * M_b`` of the 2-D mask ``M``. When the kept keys
  of a row are one contiguous run starting at ``s_b`` (no padding, left or right padding),
  ``pos_b(j) = j - s_b`` on them: BLOOM's score and ours differ by ``m_h * (i' - s_b)``, a
  constant of the query row, which softmax cancels. Slopes: BLOOM's ``_get_alibi_slopes``.
* **MPT** (``MptBlock``; its attention is called without ``output_attentions``, so the block
  is the patched unit): ``alibi_bias = m_h * arange(1 - max_seq_len, 1)`` sliced to the last
  ``Sk`` keys, i.e. ``m_h * (j + 1 - Sk)``: key positions only, padding ignored, so any
  padding pattern (holes too) differs from ours by a per-row constant. Slopes
  ``1 / 2^(k * 8 / n_pow2)`` (``alibi_bias_max=8``, as ``MptModel`` calls it; read back from
  the bias it passes), ``softmax_scale`` and ``clip_qkv`` from the layer.
* **Falcon** with ``alibi=True`` (``FalconAttention``): BLOOM's key positions and slopes, the
  slopes rounded to bf16 and the products ``bf16(m_h * pos)``. ``FalconModel`` folds
  ``alibi / sqrt(D)`` into the 4-D mask, which SDPA adds once; the eager path adds it to the
  scores as well, ``(q.k + alibi) / sqrt(D) + mask``: twice. Each path is matched (slope
  ``m_h / sqrt(D)`` for SDPA, ``2 m_h / sqrt(D)`` for eager). The kernel's bias is the exact
  linear one: equal to Falcon's bf16 products while they are exact (power-of-two slopes, up to
  8 heads, positions below 256), more accurate past that.

Preconditions are *checked* at run time on the tensors the model passes (the mask is causal
bottom-right and the padding of one key mask, the bias is the model's formula, BLOOM/Falcon's
kept keys contiguous): one small device-to-host read per model forward. The verdict is shared
by the layers of one forward through a per-thread table keyed weakly by the bias tensor (a
fresh one per forward), so nothing outlives the forward, keeps a user's mask alive, reads a
version counter (inference tensors have none) or is shared across threads. With
``check_masks=False`` nothing is read (for ``torch.compile`` and CUDA graphs) and the mask is
trusted to be what transformers builds for a dynamic cache with contiguous padding.

The original forward runs instead (same outputs, same cache update) for
``output_attentions=True``, attention dropout ``p > 0`` in training, a ``head_mask``, a mask or
bias the kernel does not reproduce (e.g. a static cache's prefill), and inside
``torch.compile`` with ``check_masks=True``.

Padded query rows (left padding, before the first real token) see no key: the kernel outputs
0 there where transformers' softmax averages every value. Padded positions never reach an
unpadded one, so logits at unpadded positions, the loss over labels scored from unpadded
positions, and every gradient agree. Compare logits at unpadded positions only.
"""

from __future__ import annotations

import torch

from posenc_triton import alibi_attention
from posenc_triton.integrations._alibi_checks import (
    BLOOM,
    FALCON,
    MPT,
    cached_verdict,
    check_keys,
    key_position_check,
    mask_value_check,
    model_slopes,
    plain,
    verdict,
)
from posenc_triton.integrations._hf import modeling

__all__ = ["patch_alibi", "patched_alibi_layers", "unpatch_alibi"]

_FLAG = "_posenc_check_masks"  # instance attribute set by patch_alibi


# ----------------------------------------------------------------------------------------
# BLOOM
# ----------------------------------------------------------------------------------------


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                   use_cache=False, output_attentions=False, **kwargs):
    """``BloomAttention.forward`` with the attention in :func:`alibi_attention`."""
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, _FLAG, True)
    ok = False
    if not plain(self, self.attention_dropout.p, verify, attentions=output_attentions,
                  head_mask=kwargs.get("head_mask") is not None, beta=self.beta != 1.0,
                  empty=seqlen_q == 0,
                  mask=not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4,
                  alibi=not isinstance(alibi, torch.Tensor) or alibi.dim() != 3):
        seqlen_k = attention_mask.shape[-1]
        if (tuple(attention_mask.shape) in ((batch, 1, seqlen_q, seqlen_k),
                                            (batch, num_heads, seqlen_q, seqlen_k))
                and tuple(alibi.shape) == (batch * num_heads, 1, seqlen_k)
                and seqlen_k >= seqlen_q
                and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point())):
            slopes = model_slopes("bloom", num_heads, hidden_states.device)

            def compute():
                mask = attention_mask
                visible = mask if mask.dtype == torch.bool else mask == 0
                if not verify:
                    return True, visible[:, 0, -1, :]
                checks = [] if mask.dtype == torch.bool else [
                    mask_value_check(mask, visible, torch.zeros((), dtype=mask.dtype,
                                                                 device=mask.device))]
                ok, kpm = verdict(visible, seqlen_q, seqlen_k, checks, contiguous=True)
                if ok and not bool(key_position_check(alibi, visible[:, 0, -1, :], slopes,
                                                       batch, num_heads, seqlen_k)):
                    return False, None
                return ok, kpm

            ok, kpm = cached_verdict(alibi, attention_mask, (batch, seqlen_q, seqlen_k), compute)
    if not ok:
        return super(_FusedBloom, self).forward(
            hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
            use_cache=use_cache, output_attentions=output_attentions, **kwargs)

    fused_qkv = self.query_key_value(hidden_states)  # [B, Sq, 3 * H * D]
    query, key, value = self._reshape(fused_qkv)  # [B, H, Sq, D] views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    check_keys(key.shape[-2], seqlen_k, "BloomAttention")
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
    output = modeling(BLOOM).dropout_add(output, residual, self.hidden_dropout, self.training)
    return output, None


# ----------------------------------------------------------------------------------------
# MPT
# ----------------------------------------------------------------------------------------


def _mpt_block_forward(self, hidden_states, position_bias, attention_mask, layer_past=None,
                       use_cache=False, output_attentions=False, **kwargs):
    """``MptBlock.forward`` with its attention in :func:`alibi_attention`."""
    attn = self.attn
    batch, seqlen_q, _ = hidden_states.shape
    verify = getattr(self, _FLAG, True)
    ok = False
    if not plain(self, attn.attn_dropout_p, verify, attentions=output_attentions,
                  empty=seqlen_q == 0,
                  mask=not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
                  or attention_mask.dtype != torch.bool,
                  bias=not isinstance(position_bias, torch.Tensor) or position_bias.dim() != 3):
        seqlen_k = attention_mask.shape[-1]
        if (tuple(attention_mask.shape) == (batch, 1, seqlen_q, seqlen_k)
                and position_bias.shape[:2] == (attn.n_heads, 1)
                and position_bias.shape[-1] >= max(seqlen_k, 2) and seqlen_k >= seqlen_q):
            # alibi_bias[h, 0, -2] = -m_h exactly (an int32 -1 times the float32 slope).
            slopes = -position_bias[:, 0, -2].float()

            def compute():
                visible = ~attention_mask  # MPT's bool mask is True where masked
                if not verify:
                    return True, visible[:, 0, -1, :]
                length = position_bias.shape[-1]
                ramp = torch.arange(1 - length, 1, device=slopes.device, dtype=torch.float32)
                linear = (position_bias.float() == slopes[:, None, None] * ramp).all()
                return verdict(visible, seqlen_q, seqlen_k, [linear], contiguous=False)

            ok, kpm = cached_verdict(position_bias, attention_mask,
                                      (batch, seqlen_q, seqlen_k), compute)
    if not ok:
        return super(_FusedMpt, self).forward(
            hidden_states, position_bias, attention_mask, layer_past=layer_past,
            use_cache=use_cache, output_attentions=output_attentions, **kwargs)

    # As MptBlock.forward and MptAttention.forward, with the attention fused.
    residual = hidden_states
    mixed = attn.Wqkv(self.norm_1(hidden_states))
    if attn.clip_qkv:
        mixed = mixed.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
    query, key, value = (t.reshape(batch, seqlen_q, attn.n_heads, attn.head_dim)
                         for t in mixed.chunk(3, dim=2))  # [B, Sq, H, D] views
    if layer_past is not None:
        key, value = layer_past.update(key.transpose(1, 2), value.transpose(1, 2),
                                       attn.layer_idx, kwargs={})
        key, value = key.transpose(1, 2), value.transpose(1, 2)
    check_keys(key.shape[1], seqlen_k, "MptAttention")
    context = alibi_attention(query, key, value, slopes, is_causal=True,
                              scale=float(attn.softmax_scale), layout="bshd",
                              key_padding_mask=kpm)
    hidden_states = self.resid_attn_dropout(attn.out_proj(context.reshape(batch, seqlen_q, -1)))
    hidden_states = hidden_states + residual
    return self.ffn(self.norm_2(hidden_states), hidden_states), None


# ----------------------------------------------------------------------------------------
# Falcon with alibi=True
# ----------------------------------------------------------------------------------------


def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None,
                    layer_past=None, use_cache=False, output_attentions=False,
                    position_embeddings=None, **kwargs):
    """``FalconAttention.forward`` (ALiBi branch) with the attention in
    :func:`alibi_attention`; the RoPE branch (``alibi=None``) is transformers' own."""
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, _FLAG, True)
    ok = False
    if not plain(self, self.attention_dropout.p, verify, attentions=output_attentions,
                  empty=seqlen_q == 0, alibi=not isinstance(alibi, torch.Tensor),
                  mask=not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
                  or not attention_mask.is_floating_point()):
        seqlen_k = attention_mask.shape[-1]
        if (tuple(attention_mask.shape) == (batch, num_heads, seqlen_q, seqlen_k)
                and alibi.numel() == batch * num_heads * seqlen_k and seqlen_k >= seqlen_q):
            slopes = model_slopes("falcon", num_heads, hidden_states.device)

            def compute():
                mask = attention_mask
                visible = mask > torch.finfo(mask.dtype).min / 2
                if not verify:
                    return True, visible[:, 0, -1, :]
                # FalconModel folds alibi / sqrt(D) into the mask: exactly that, nothing else.
                folded = alibi.reshape(batch, num_heads, 1, seqlen_k) / (head_dim ** 0.5)
                checks = [mask_value_check(mask, visible, folded.to(mask.dtype))]
                ok, kpm = verdict(visible, seqlen_q, seqlen_k, checks, contiguous=True)
                if ok and not bool(key_position_check(alibi, visible[:, 0, -1, :],
                                                       slopes.bfloat16(), batch, num_heads,
                                                       seqlen_k)):
                    return False, None
                return ok, kpm

            ok, kpm = cached_verdict(alibi, attention_mask, (batch, seqlen_q, seqlen_k), compute)
    if not ok:
        return super(_FusedFalcon, self).forward(
            hidden_states, alibi, attention_mask, position_ids=position_ids,
            layer_past=layer_past, use_cache=use_cache, output_attentions=output_attentions,
            position_embeddings=position_embeddings, **kwargs)

    fused_qkv = self.query_key_value(hidden_states)
    num_kv_heads = num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(fused_qkv)  # [B, Sq, heads, D]
    query = query.transpose(1, 2).reshape(batch, num_heads, seqlen_q, head_dim)
    key = key.transpose(1, 2).reshape(batch, num_kv_heads, seqlen_q, head_dim)
    value = value.transpose(1, 2).reshape(batch, num_kv_heads, seqlen_q, head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    check_keys(key.shape[-2], seqlen_k, "FalconAttention")
    # SDPA adds the folded alibi / sqrt(D) once; the eager path adds alibi * inv_norm too.
    times = 1.0 if self.config._attn_implementation == "sdpa" else 2.0
    context = alibi_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              slopes * (times * self.inv_norm_factor), is_causal=True,
                              scale=float(self.inv_norm_factor), layout="bshd",
                              key_padding_mask=kpm)
    context = context.reshape(batch, seqlen_q, num_heads * head_dim)
    return self.dense(context), None


# ----------------------------------------------------------------------------------------
# Class swapping
# ----------------------------------------------------------------------------------------


class _Fused:
    """Base of the fused mixins: ``isinstance(m, _Fused)`` marks a patched layer."""

    posenc_kind = ""


class _FusedBloom(_Fused):
    posenc_kind = "alibi/bloom"
    forward = _bloom_forward


class _FusedMpt(_Fused):
    posenc_kind = "alibi/mpt"
    forward = _mpt_block_forward


class _FusedFalcon(_Fused):
    posenc_kind = "alibi/falcon"
    forward = _falcon_forward


# model name -> (modeling module, class to swap, mixin)
MODELS = {
    "bloom": (BLOOM, "BloomAttention", _FusedBloom),
    "mpt": (MPT, "MptBlock", _FusedMpt),
    "falcon": (FALCON, "FalconAttention", _FusedFalcon),
}

_FUSED_CLASSES: dict[type, type] = {}  # original class -> its fused subclass


def _fused_class(cls: type, mixin: type) -> type:
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        name = f"Fused{cls.__name__}"
        fused = type(name, (mixin, cls),
                     {"__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__})
        _FUSED_CLASSES[cls] = fused
    return fused


def __getattr__(name: str):
    # ``FusedBloomAttention`` & co. resolve by name, so a patched model pickles (torch.save)
    # and unpickles in a fresh process.
    for module, cls_name, mixin in MODELS.values():
        if name == f"Fused{cls_name}":
            return _fused_class(getattr(modeling(module), cls_name), mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_alibi(model: torch.nn.Module, which: str, *, check_masks: bool = True) -> int:
    """Swap every ``which`` (``"bloom"``, ``"mpt"``, ``"falcon"``) ALiBi layer of ``model`` for
    its fused subclass; returns how many (idempotent: a repeated call updates
    ``check_masks``). Raises ValueError when there is none, or a subclass overrides the
    forward being replaced."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(check_masks, bool):
        raise TypeError(f"check_masks must be a bool, got {type(check_masks).__name__}")
    module, cls_name, mixin = MODELS[which]
    base = getattr(modeling(module), cls_name)
    layers = [m for m in model.modules() if isinstance(m, base)]
    for m in layers:
        if not isinstance(m, _Fused) and type(m).forward is not base.forward:
            raise ValueError(f"cannot patch {type(m).__qualname__}: it overrides "
                             f"{cls_name}.forward")
    if not layers:
        raise ValueError(f"cannot patch {which} ALiBi attention into {type(model).__name__}: "
                         f"it has no {cls_name} layer")
    for m in layers:
        if not isinstance(m, _Fused):
            m.__class__ = _fused_class(type(m), mixin)
        setattr(m, _FLAG, check_masks)
    return len(layers)


def unpatch_alibi(model: torch.nn.Module) -> int:
    """Give every fused ALiBi layer of ``model`` its original class; returns how many."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for m in model.modules():
        if isinstance(m, _Fused):
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, _Fused))
            m.__dict__.pop(_FLAG, None)
            count += 1
    return count


def patched_alibi_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{layer path: [kind]}`` of the fused ALiBi layers of ``model``."""
    return {path: [m.posenc_kind] for path, m in model.named_modules() if isinstance(m, _Fused)}
