"""Multi-head self-attention modules with RoPE or ALiBi, on the package's kernels.

Both are the textbook layer, ``o_proj(attention(q_proj(x), k_proj(x), v_proj(x)))``, with
grouped-query attention (``num_kv_heads``) and a boolean key padding mask; only the
position encoding and the attention call are the fast ones:

* :class:`RoPEAttention` rotates q and k with :class:`~posenc_triton.RotaryEmbedding` (one
  launch for both, reading the projections' ``[B, S, H, D]`` views in place), then calls
  ``F.scaled_dot_product_attention``.
* :class:`ALiBiAttention` calls :func:`~posenc_triton.alibi_attention` (the fused ALiBi
  kernel, padding mask included) on the ``[B, S, H, D]`` views.

Their plain counterparts, :class:`~posenc_triton.reference.RoPEAttentionReference` and
:class:`~posenc_triton.reference.ALiBiAttentionReference`, share the constructor, the forward
signature and the parameter names, so ``load_state_dict`` moves weights between them.

:class:`SinusoidalPositionalEncoding` is the Transformer's fixed encoding added to the token
embeddings (attention itself then carries no position), for comparisons with the two above.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from posenc_triton import _backend, _checks, reference
from posenc_triton._attention import SelfAttentionBase
from posenc_triton.alibi import MAX_HEAD_DIM, alibi_attention, alibi_slopes
from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL, check_skip_tol
from posenc_triton.rope import LAYOUTS, apply_rope
from posenc_triton.rope_scaling import rope_cos_sin, rope_frequencies

__all__ = ["ALiBiAttention", "RoPEAttention", "RotaryEmbedding", "SinusoidalPositionalEncoding"]

# Position tables: built in float64, stored in float32 whatever the weights are (the kernels
# read float32 tables; rounding angles or slopes to bf16 would move every position).
_FLOAT32_TABLES = ("inv_freq", "cos_sin_cached", "slopes")


class _Float32Tables:
    """Mixin: ``.to(dtype)``, ``.half()``, ``.double()`` move the position tables (RoPE's
    frequencies and cos/sin, ALiBi's slopes) with the module but keep them float32, as the
    kernels expect; the weights are cast as usual. A table that is a parameter (trainable
    ALiBi slopes) keeps its ``Parameter`` object, with its data and gradient float32."""

    def _apply(self, fn, recurse=True):
        tables = [(store, name, t, _float32_data(t))
                  for module in self.modules() for store in (module._buffers, module._parameters)
                  for name, t in store.items()
                  if name in _FLOAT32_TABLES and t is not None and t.dtype == torch.float32]
        super()._apply(fn, recurse)
        with torch.inference_mode(False):  # a cache moved under inference mode stays usable
            for store, name, before, (data, grad) in tables:
                after = store[name]
                if after is None or after.dtype == torch.float32:
                    continue
                if isinstance(after, torch.nn.Parameter):
                    after.data = data.to(after.device)
                    after.grad = None if grad is None else grad.to(after.device)
                else:
                    store[name] = before.to(after.device)
        return self


def _float32_data(t: torch.Tensor):
    """``(data, grad)`` of a Parameter: aliases of its storage, which a cast may swap out
    under the same object; ``(None, None)`` for a buffer."""
    if not isinstance(t, torch.nn.Parameter):
        return None, None
    return t.data, None if t.grad is None else t.grad.data


class RotaryEmbedding(_Float32Tables, torch.nn.Module):
    """RoPE for attention heads: owns the frequencies and a cos/sin cache that grows on demand.

    ``forward(q, k=None, position_ids=None, offset=0)`` returns ``(q_out, k_out)`` like
    :func:`~posenc_triton.apply_rope` (``layout`` picks ``"bshd"`` or ``"bhsd"``). With
    ``dynamic`` or ``longrope`` scaling the frequencies depend on the sequence length: they are
    rebuilt for the longest sequence seen so far, as Hugging Face's dynamic update does when it
    grows. Tensor positions are read on the host to size the cache (one sync); under
    ``torch.compile`` and CUDA-graph capture they are not, and the cache built so far (at
    least ``max_seq_len`` rows) must hold them: a position past it gives NaN rows.

    The tables (``inv_freq``, ``cos_sin_cached [2, T, R/2]``: cos then sin) are float32
    non-persistent buffers: they follow the module's device but stay float32 under
    ``.half()``/``.bfloat16()``/``.double()`` (long positions keep their phase); they are
    built as normal tensors even under ``torch.inference_mode()``, so a model served there can
    be trained later; cos and sin live in one buffer, so a thread never sees one grown
    without the other.
    """

    def __init__(self, head_dim: int, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 max_seq_len: int = 4096, scaling: Optional[dict] = None,
                 interleaved: bool = False, layout: str = "bshd", device=None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not _checks.is_int(head_dim) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not _checks.is_int(rotary_dim) or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be an int <= head_dim={head_dim}, "
                             f"got {rotary_dim!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, base
        self.max_seq_len, self.scaling = max_seq_len, scaling
        self.interleaved, self.layout = interleaved, layout
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        self._length_dependent = rope_type in ("dynamic", "longrope")
        self._build(max_seq_len, device)

    @property
    def cos_cached(self) -> torch.Tensor:
        return self.cos_sin_cached[0]

    @property
    def sin_cached(self) -> torch.Tensor:
        return self.cos_sin_cached[1]

    def _build(self, seq_len: int, device) -> None:
        """Frequencies for sequences of ``seq_len`` tokens, cos/sin for a power of two >= it."""
        with torch.inference_mode(False), torch.no_grad():
            inv_freq, attention_scaling = rope_frequencies(
                self.rotary_dim, self.base, self.scaling, device=device,
                max_position_embeddings=self.max_seq_len, seq_len=seq_len)
            cos_sin = torch.stack(rope_cos_sin(_backend.next_power_of_2(seq_len), inv_freq,
                                               attention_scaling))
        self._freq_seq_len = seq_len
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_sin_cached", cos_sin, persistent=False)

    def forward(self, q, k=None, position_ids=None, offset: Union[int, torch.Tensor] = 0):
        seqlen = q.shape[1] if self.layout == "bshd" else q.shape[2]
        lowest = 0
        if position_ids is None and not isinstance(offset, torch.Tensor):
            needed = seqlen + offset
        elif not _backend.host_read_allowed(q):
            needed = 0  # no host read here: the cache must already hold the positions
        else:  # one host sync for both bounds, as in Hugging Face's dynamic RoPE
            pos = reference.rope_positions(q.shape[0], seqlen, position_ids, offset, q.device)
            lowest, highest = torch.stack(torch.aminmax(pos)).tolist() if pos.numel() else (0, -1)
            needed = highest + 1
        if lowest < 0:
            raise ValueError(f"positions (position_ids + offset) must be >= 0, got {lowest}")
        cos_sin = self.cos_sin_cached
        if needed > cos_sin.shape[1] or (self._length_dependent and needed > self._freq_seq_len):
            self._build(needed, cos_sin.device)
            cos_sin = self.cos_sin_cached
        # The table now holds every position: apply_rope need not read them again.
        return apply_rope(q, k, cos_sin[0], cos_sin[1], position_ids=position_ids,
                          seqlen_offsets=offset, interleaved=self.interleaved,
                          layout=self.layout, check_positions=False)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}, layout={self.layout!r}")


class RoPEAttention(_Float32Tables, SelfAttentionBase):
    """Multi-head self-attention with rotary position embeddings (Llama / GPT-NeoX style).

    Args:
        d_model: model width; ``head_dim = d_model // num_heads``.
        num_heads: query heads; must divide ``d_model``.
        max_seq_len: initial size of the cos/sin cache (it grows on demand); the
            ``max_position_embeddings`` of length-dependent ``scaling``.
        dropout: attention dropout probability, applied in training mode only.
        num_kv_heads: key/value heads (GQA/MQA); must divide ``num_heads``. Default
            ``num_heads``.
        bias: whether the four projections have a bias.
        rotary_dim, base, scaling, interleaved: as for :class:`RotaryEmbedding`.

    ``forward(x, attention_mask=None, is_causal=False, *, position_ids=None)``:

    * ``x``: ``[B, S, d_model]``; returns ``[B, S, d_model]``.
    * ``attention_mask``: bool ``[B, S]``, True = a real token, False = padding (Hugging
      Face's / flash-attn's convention, as a bool). Padded keys are hidden from every query;
      a query that sees no key at all (a fully padded sequence, or left padding with
      ``is_causal``) outputs 0 (SDPA alone would give NaN). Padded queries still get an
      output; ignore it.
    * ``is_causal``: query ``i`` sees keys ``j <= i``; combined with ``attention_mask``.
    * ``position_ids``: optional integer ``[S]`` or ``[B, S]`` positions for the rotation
      (default ``arange(S)``), e.g. ``attention_mask.cumsum(-1) - 1`` for left padding.

    Without a mask, ``is_causal`` goes to SDPA as its flag (the flash kernels); with one, the
    mask is materialised as a bool ``[B, 1, S or 1, S]`` ``attn_mask``.
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int = 2048,
                 dropout: float = 0.0, *, num_kv_heads: Optional[int] = None,
                 bias: bool = False, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 scaling: Optional[dict] = None, interleaved: bool = False,
                 device=None, dtype=None):
        super().__init__(d_model, num_heads, max_seq_len, dropout, num_kv_heads=num_kv_heads,
                         bias=bias, device=device, dtype=dtype)
        rotary_dim = self._rotary_dim(rotary_dim)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_dim, base, max_seq_len, scaling,
                                      interleaved, layout="bshd", device=device)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x, attention_mask, is_causal)
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x)
        q, k = self.rotary(q, k, position_ids=position_ids)  # one launch, strided views
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views for SDPA
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.num_kv_heads != self.num_heads
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                 is_causal=is_causal, enable_gqa=gqa)
        else:
            keep = attention_mask[:, None, None, :]  # [B, 1, 1, S]
            if is_causal:
                causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
                keep = keep & causal  # [B, 1, S, S]
            # A row with no visible key would be NaN in SDPA: let it see every key, then
            # zero its output (which also zeroes its gradient).
            has_key = keep.any(dim=-1, keepdim=True)
            if gqa:  # SDPA's memory-efficient kernel (masks) takes no enable_gqa
                k, v = _repeat_kv(k, v, self.num_heads)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~has_key,
                                                 dropout_p=dropout_p)
            out = out.masked_fill(~has_key, 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.d_model))


class ALiBiAttention(_Float32Tables, SelfAttentionBase):
    """Multi-head self-attention with ALiBi (BLOOM / MPT style) on the fused kernel.

    Args: ``d_model``, ``num_heads``, ``max_seq_len`` (unused by ALiBi, accepted for a
    common signature), ``dropout``, ``num_kv_heads``, ``bias`` as for :class:`RoPEAttention`;
    ``head_dim = d_model // num_heads`` must be at most 256. The slopes
    (:func:`alibi_slopes`) are a float32 non-persistent buffer ``slopes [num_heads]``: they
    follow the module's device, stay float32 when the weights are cast, are not in the
    ``state_dict``, and may be replaced by custom slopes. ``trainable_slopes=True`` makes
    them a parameter instead (initialised the same, float32 whatever the weights' dtype, in
    the ``state_dict``), whose gradient comes from the fused backward. ``skip_tol``:
    :func:`alibi_attention`'s certified tile skipping (default ``2**-24``; 0.0: every tile).

    ``forward(x, attention_mask=None, is_causal=False)``: ``x [B, S, d_model]`` →
    ``[B, S, d_model]``; ``attention_mask`` bool ``[B, S]`` (True = real token, False =
    padding) hides padded keys from every query, and a query with no visible key outputs 0;
    ``is_causal`` uses the causal ALiBi bias (``-m (i - j)`` for ``j <= i``), otherwise the
    symmetric one (``-m |i - j|``, encoders).

    Attention dropout (training mode) runs inside the fused kernel
    (:func:`alibi_attention`'s ``dropout_p``): no configuration falls back to the reference.
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int = 2048,
                 dropout: float = 0.0, *, num_kv_heads: Optional[int] = None,
                 bias: bool = False, trainable_slopes: bool = False,
                 skip_tol: float = DEFAULT_SKIP_TOL, device=None, dtype=None):
        super().__init__(d_model, num_heads, max_seq_len, dropout, num_kv_heads=num_kv_heads,
                         bias=bias, device=device, dtype=dtype)
        self.skip_tol = check_skip_tol(skip_tol)
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim = d_model // num_heads = {d_model} // {num_heads} = "
                             f"{self.head_dim} exceeds ALiBi's maximum {MAX_HEAD_DIM}")
        if not isinstance(trainable_slopes, bool):
            raise TypeError(f"trainable_slopes must be a bool, got {trainable_slopes!r}")
        slopes = alibi_slopes(num_heads, device)
        if trainable_slopes:
            self.slopes = torch.nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        self._check_input(x, attention_mask, is_causal)
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x)  # [B, S, H, D] views: the kernel reads them in place
        out = alibi_attention(q, k, v, self.slopes, is_causal=is_causal, layout="bshd",
                              key_padding_mask=attention_mask,
                              dropout_p=self.dropout if self.training else 0.0,
                              skip_tol=self.skip_tol)
        return self.o_proj(out.reshape(batch, seqlen, self.d_model))


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int):
    """``[B, Hk, S, D]`` → ``[B, num_heads, S, D]``: each k/v head serves its query group."""
    group = num_heads // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


class SinusoidalPositionalEncoding(torch.nn.Module):
    """The Transformer's fixed sinusoidal position encoding, added to the token embeddings.

    ``PE(p, 2i) = sin(p / base^(2i / d_model))``, ``PE(p, 2i+1) = cos(p / base^(2i / d_model))``
    (Vaswani et al., 2017: sine and cosine interleaved; an odd ``d_model`` ends with a sine).

    ``forward(x, position_ids=None)``: ``x [B, S, d_model]`` → ``x + PE`` in ``x``'s dtype
    (the sum in float32, or float64 for float64 ``x``), at positions ``arange(S)`` or the
    integer ``position_ids`` ``[S]`` or ``[B, S]`` (any value: the formula has no table).
    ``encoding(positions)`` returns the table itself, ``[*positions.shape, d_model]``.

    No parameters and no buffers: the angles are formed in float64 at each call (a float32
    angle drifts by ~1e-3 rad at position 1e4), which costs ``S x d_model`` sines, nothing
    next to the layers the sum feeds.
    """

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.base = float(_checks.real("base", base, positive=True))

    def encoding(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """``PE`` at integer ``positions`` (any shape), ``[*positions.shape, d_model]``."""
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        # MPS has no float64: form the angles on the CPU there (as rope_cos_sin does).
        work = torch.device("cpu") if positions.device.type == "mps" else positions.device
        exponent = torch.arange(0, self.d_model, 2, dtype=torch.float64, device=work)
        inv_freq = self.base ** (-exponent / self.d_model)  # [ceil(d_model / 2)]
        angles = positions.to(work, torch.float64)[..., None] * inv_freq
        pe = torch.empty(*positions.shape, self.d_model, dtype=torch.float64, device=work)
        pe[..., 0::2] = torch.sin(angles)
        pe[..., 1::2] = torch.cos(angles[..., : self.d_model // 2])
        return pe.to(positions.device, dtype)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        _checks.check_activations(x, self.d_model)
        batch, seqlen, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=x.device)
        elif not isinstance(position_ids, torch.Tensor):
            raise TypeError("position_ids must be a torch.Tensor or None, "
                            f"got {type(position_ids).__name__}")
        elif not _checks.shape_in(position_ids, (seqlen,), (batch, seqlen)):
            raise ValueError(f"position_ids must be [S] = [{seqlen}] or [B, S] = "
                             f"[{batch}, {seqlen}], got {list(position_ids.shape)}")
        elif position_ids.device != x.device:
            raise ValueError(f"position_ids is on {position_ids.device} but x is on {x.device}")
        compute = torch.promote_types(x.dtype, torch.float32)
        return (x.to(compute) + self.encoding(position_ids, compute)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, base={self.base}"
