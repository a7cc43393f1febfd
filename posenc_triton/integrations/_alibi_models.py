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
  ``alibi / sqrt(D)`` into the 4-D mask. Two conventions, one drop-in each:

  - transformers <= 5.24 also passes ``alibi`` to the layer. SDPA adds the folded mask once;
    the eager path adds ``alibi`` to the scores as well, ``(q.k + alibi) / sqrt(D) + mask``:
    twice (slope ``m_h / sqrt(D)`` for SDPA, ``2 m_h / sqrt(D)`` for eager).
  - transformers >= 5.25 passes only the mask, which eager and SDPA both add once (slope
    ``m_h / sqrt(D)``); the slopes and key padding are read back from the mask itself.

  The kernel's bias is the exact linear one: equal to Falcon's bf16 products while they are
  exact (power-of-two slopes, up to 8 heads, positions below 256), more accurate past that.

Each drop-in has the signature of the forward it replaces (:data:`FAMILIES` lists them by
convention); :mod:`._alibi_patch` installs the one whose signature the installed transformers
has, after a probe on a tiny model proves it computes what the original does.

Preconditions are *checked* at run time on the tensors the model passes (the mask is causal
bottom-right and the padding of one key mask, the bias is the model's formula, BLOOM/Falcon's
kept keys contiguous): one small device-to-host read per model forward. The verdict is shared
by the layers of one forward through a per-thread table keyed weakly by the bias tensor (a
fresh one per forward), so nothing outlives the forward, keeps a user's mask alive, reads a
version counter (inference tensors have none) or is shared across threads. With
``check_masks=False`` nothing is read (for ``torch.compile`` and CUDA graphs) and the mask is
trusted to be what transformers builds for a dynamic cache with contiguous padding.

Attention dropout (BLOOM's and Falcon's ``attention_dropout``, MPT's ``attn_dropout_p``:
an ``nn.Dropout`` up to transformers 5.24, a float since 5.25) is the kernel's fused
``dropout_p``: ``p`` in training, 0 in eval. As in transformers, the probabilities are
dropped and the survivors scaled by ``1 / (1 - p)``; the keep-mask is drawn from a Philox key
taken from PyTorch's generator (``torch.manual_seed`` reproduces a step) and regenerated in
the backward, never stored. It is not transformers' mask (their ``F.dropout`` draws its own
numbers), so a training step matches theirs in distribution, not bit for bit.

The original forward runs instead (same outputs, same cache update) for
``output_attentions=True``, a ``head_mask``, a mask or bias the kernel does not reproduce
(e.g. a static cache's prefill), and inside ``torch.compile`` with ``check_masks=True``.

Padded query rows (left padding, before the first real token) see no key: the kernel outputs
0 there where transformers' softmax averages every value. Padded positions never reach an
unpadded one, so logits at unpadded positions, the loss over labels scored from unpadded
positions, and every gradient agree. Compare logits at unpadded positions only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from posenc_triton import alibi_attention
from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL
from posenc_triton.integrations._alibi_checks import (
    BLOOM,
    FALCON,
    MPT,
    cached_verdict,
    check_keys,
    key_position_check,
    mask_value_check,
    model_slopes,
    must_fall_back,
    verdict,
)
from posenc_triton.integrations._hf import modeling

__all__ = ["FAMILIES", "Convention", "Family"]

FLAG = "_posenc_check_masks"  # instance attributes set by patch_alibi
SKIP_TOL = "_posenc_skip_tol"
PROBE = threading.local()  # .calls: a list while _alibi_patch probes a drop-in


def _attention(layer, *args, **kwargs) -> torch.Tensor:
    """:func:`alibi_attention` with the ``skip_tol`` ``layer`` was patched with, counted
    while a probe watches (the fused path ran)."""
    calls = getattr(PROBE, "calls", None)
    if calls is not None:
        calls.append(1)
    return alibi_attention(*args, skip_tol=getattr(layer, SKIP_TOL, DEFAULT_SKIP_TOL), **kwargs)


class Fused:
    """Base of the fused subclasses (built by :mod:`._alibi_patch`): marks a patched layer."""

    posenc_kind = ""


def _theirs(layer):
    """transformers' own ``forward`` of a fused layer, bound to it."""
    cls = next(c for c in type(layer).__mro__ if not issubclass(c, Fused))
    return cls.forward.__get__(layer)


def _dropout_p(layer, dropout) -> float:
    """The probability the kernel drops attention probabilities with: ``dropout`` (an
    ``nn.Dropout`` up to transformers 5.24, a float since 5.25) in training, 0 in eval."""
    return float(getattr(dropout, "p", dropout) or 0.0) if layer.training else 0.0


# ----------------------------------------------------------------------------------------
# BLOOM
# ----------------------------------------------------------------------------------------


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                   use_cache=False, output_attentions=False, **kwargs):
    """``BloomAttention.forward`` with the attention in :func:`alibi_attention`."""
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, FLAG, True)
    ok = False
    if not must_fall_back(
            verify, attentions=output_attentions,
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
        return _theirs(self)(
            hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
            use_cache=use_cache, output_attentions=output_attentions, **kwargs)

    fused_qkv = self.query_key_value(hidden_states)  # [B, Sq, 3 * H * D]
    query, key, value = self._reshape(fused_qkv)  # [B, H, Sq, D] views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    check_keys(key.shape[-2], seqlen_k, "BloomAttention")
    # bshd views (no copy): the output comes back contiguous [B, Sq, H, D].
    context = _attention(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              slopes, is_causal=True, scale=float(self.inv_norm_factor),
                              layout="bshd", key_padding_mask=kpm,
                              dropout_p=_dropout_p(self, self.attention_dropout))
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
    verify = getattr(self, FLAG, True)
    ok = False
    if not must_fall_back(
            verify, attentions=output_attentions,
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
        return _theirs(self)(
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
    context = _attention(self, query, key, value, slopes, is_causal=True,
                         scale=float(attn.softmax_scale), layout="bshd", key_padding_mask=kpm,
                         dropout_p=_dropout_p(attn, attn.attn_dropout_p))
    hidden_states = self.resid_attn_dropout(attn.out_proj(context.reshape(batch, seqlen_q, -1)))
    hidden_states = hidden_states + residual
    return self.ffn(self.norm_2(hidden_states), hidden_states), None


# ----------------------------------------------------------------------------------------
# Falcon with alibi=True
# ----------------------------------------------------------------------------------------


def _falcon_alibi_forward(self, hidden_states, alibi, attention_mask, position_ids=None,
                    layer_past=None, use_cache=False, output_attentions=False,
                    position_embeddings=None, **kwargs):
    """``FalconAttention.forward`` of transformers <= 5.24 (``alibi`` passed to the layer) with
    the attention in :func:`alibi_attention`; the RoPE branch (``alibi=None``) is
    transformers' own."""
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, FLAG, True)
    ok = False
    if not must_fall_back(
            verify, attentions=output_attentions,
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
        return _theirs(self)(
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
    context = _attention(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              slopes * (times * self.inv_norm_factor), is_causal=True,
                              scale=float(self.inv_norm_factor), layout="bshd",
                              key_padding_mask=kpm,
                              dropout_p=_dropout_p(self, self.attention_dropout))
    context = context.reshape(batch, seqlen_q, num_heads * head_dim)
    return self.dense(context), None




def _falcon_folded_forward(self, hidden_states, attention_mask, position_ids=None,
                           layer_past=None, use_cache=False, output_attentions=False,
                           position_embeddings=None, **kwargs):
    """``FalconAttention.forward`` of transformers >= 5.25 (the bias folded into the mask, no
    ``alibi`` argument) with the attention in :func:`alibi_attention`."""
    batch, seqlen_q, _ = hidden_states.shape
    num_heads, head_dim = self.num_heads, self.head_dim
    verify = getattr(self, FLAG, True)
    ok = False
    if self.config.alibi and not must_fall_back(
            verify, attentions=output_attentions,
            empty=seqlen_q == 0,
            mask=not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
            or not attention_mask.is_floating_point()):
        seqlen_k = attention_mask.shape[-1]
        if (tuple(attention_mask.shape) == (batch, num_heads, seqlen_q, seqlen_k)
                and seqlen_k >= seqlen_q):
            slopes = model_slopes("falcon", num_heads, hidden_states.device)

            def compute():
                mask = attention_mask
                visible = mask > torch.finfo(mask.dtype).min / 2
                if not verify:
                    return True, visible[:, 0, -1, :]
                # Every row holds the last row's bias where visible (the last query row sees
                # every kept key), and that bias is Falcon's alibi / sqrt(D): nothing else.
                bias = mask[:, :, -1:, :]
                checks = [mask_value_check(mask, visible, bias)]
                ok, kpm = verdict(visible, seqlen_q, seqlen_k, checks, contiguous=True)
                if ok and not bool(key_position_check(bias, visible[:, 0, -1, :],
                                                       slopes.bfloat16(), batch, num_heads,
                                                       seqlen_k, divisor=head_dim ** 0.5)):
                    return False, None
                return ok, kpm

            # The mask is built afresh by every model forward and shared by its layers.
            ok, kpm = cached_verdict(attention_mask, attention_mask,
                                      (batch, seqlen_q, seqlen_k), compute)
    if not ok:
        return _theirs(self)(
            hidden_states, attention_mask, position_ids=position_ids, layer_past=layer_past,
            use_cache=use_cache, output_attentions=output_attentions,
            position_embeddings=position_embeddings, **kwargs)

    # As transformers 5.25 splits the heads: [B, Sq, heads, D] views.
    fused_qkv = self.query_key_value(hidden_states).view(batch, seqlen_q, -1, head_dim)
    if self.new_decoder_architecture:  # per KV group: its queries, then its key and value
        grouped = fused_qkv.view(batch, seqlen_q, self.num_kv_heads, -1, head_dim)
        query = grouped[..., :-2, :].flatten(-3, -2)
        key, value = grouped[..., -2, :], grouped[..., -1, :]
    elif self.multi_query:
        query, key, value = fused_qkv.split([num_heads, 1, 1], dim=-2)
    else:  # query, key and value interleaved per head
        query, key, value = fused_qkv.unflatten(-2, (num_heads, 3)).unbind(-2)
    if layer_past is not None:
        key, value = layer_past.update(key.transpose(1, 2), value.transpose(1, 2),
                                       self.layer_idx)
        key, value = key.transpose(1, 2), value.transpose(1, 2)
    check_keys(key.shape[1], seqlen_k, "FalconAttention")
    # FalconModel folds alibi / sqrt(head_dim) into the mask; the scores are scaled by .scaling.
    context = _attention(self, query, key, value, slopes / head_dim ** 0.5, is_causal=True,
                         scale=float(self.scaling), layout="bshd", key_padding_mask=kpm,
                         dropout_p=_dropout_p(self, self.attention_dropout))
    return self.dense(context.reshape(batch, seqlen_q, num_heads * head_dim)), None


# ----------------------------------------------------------------------------------------
# The drop-ins by family and convention
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Convention:
    """What one range of transformers versions hands a layer, and the drop-in written for it
    (its signature is the original forward's)."""

    name: str
    forward: Callable


@dataclass(frozen=True)
class Family:
    """An ALiBi model: the layer class swapped, its base model (for the probe), the drop-ins."""

    module: str
    layer: str
    model: str
    conventions: tuple[Convention, ...]
    # The attention implementations the drop-ins reproduce (None: the layer has only its own).
    implementations: Optional[tuple[str, ...]] = None


FAMILIES = {
    "bloom": Family(BLOOM, "BloomAttention", "BloomModel", (
        Convention("alibi and a 4-D mask passed to BloomAttention", _bloom_forward),)),
    "mpt": Family(MPT, "MptBlock", "MptModel", (
        Convention("position_bias and a bool mask passed to MptBlock", _mpt_block_forward),)),
    "falcon": Family(FALCON, "FalconAttention", "FalconModel", (
        Convention("alibi passed to FalconAttention (transformers <= 5.24)",
                   _falcon_alibi_forward),
        Convention("alibi / sqrt(head_dim) folded into the mask (transformers >= 5.25)",
                   _falcon_folded_forward)), implementations=("eager", "sdpa")),
}
