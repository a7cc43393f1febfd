"""Pure-PyTorch references: the specification the kernels are tested and benchmarked against.

Nothing here imports a kernel. Everything is written as the maths reads (the README's API
and "Correctness contract"): materialised scores, explicit masks, softmax in float32 or wider;
float64 inputs give the ground truth."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from posenc_triton._attention import SelfAttentionBase

# ----------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------


def rope_positions(
    batch: int,
    seqlen: int,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    device=None,
) -> torch.Tensor:
    """Position of every token: ``position_ids`` (or ``arange(S)``) plus ``seqlen_offsets``.

    Args:
        batch, seqlen: ``B`` and ``S``.
        position_ids: integer ``[S]``, ``[1, S]`` or ``[B, S]``, or None (default: ``arange(S)``).
        seqlen_offsets: int, or integer 0-d or ``[B]`` tensor. Default ``0``.
        device: device of ``arange(S)`` when ``position_ids`` is None. Default None.

    Returns:
        int64 ``[B, S]``.
    """
    if position_ids is None:
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
    else:
        pos = position_ids.to(torch.int64).expand(batch, seqlen)
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(torch.int64).reshape(-1, 1)  # 0-d or [B]
    return pos + seqlen_offsets


def rope_rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate ``x`` by the rows ``positions`` of ``cos``/``sin``; math in float32 (or float64).

    Args:
        x: ``[B, S, H, D]``, any float dtype; ``x[..., R:]`` passes through.
        cos, sin: ``[T, R/2]`` tables, ``R <= D``.
        positions: integer ``[B, S]`` rows of the tables.
        interleaved: rotate pairs ``(x[2i], x[2i+1])`` instead of halves. Default False.

    Returns:
        ``[B, S, H, D]`` in ``x``'s dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    half = cos.shape[-1]
    rot = 2 * half
    c = cos.to(compute)[positions].unsqueeze(2)  # [B, S, 1, R/2]
    s = sin.to(compute)[positions].unsqueeze(2)
    xr = x[..., :rot].to(compute)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def apply_rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
    layout: str = "bshd",
):
    """Reference for :func:`posenc_triton.apply_rope`, on :func:`rope_rotate`.

    Args:
        q, k, cos, sin, position_ids, seqlen_offsets, interleaved, layout: as for
            :func:`~posenc_triton.apply_rope` (``q [B, S, Hq, D]`` or ``[B, Hq, S, D]``,
            ``k`` likewise with ``Hk`` heads or None, ``cos, sin [T, R/2]``; defaults None,
            ``0``, False, ``"bshd"``). No checks.

    Returns:
        ``(q_out, k_out)``: ``q``'s and ``k``'s shapes and dtypes; ``k_out`` None if ``k`` is.
    """
    if layout == "bhsd":
        q = q.transpose(1, 2)
        k = None if k is None else k.transpose(1, 2)
    batch, seqlen = q.shape[0], q.shape[1]
    pos = rope_positions(batch, seqlen, position_ids, seqlen_offsets, device=q.device)
    q_out = rope_rotate(q, cos, sin, pos, interleaved)
    k_out = None if k is None else rope_rotate(k, cos, sin, pos, interleaved)
    if layout == "bhsd":
        q_out = q_out.transpose(1, 2)
        k_out = None if k_out is None else k_out.transpose(1, 2)
    return q_out, k_out


# ----------------------------------------------------------------------------------------
# ALiBi
# ----------------------------------------------------------------------------------------


def alibi_slopes_list(num_heads: int) -> list:
    """ALiBi slopes, a list of ``n`` Python floats (Press et al.; BLOOM's rule for any ``n``).

    Args:
        num_heads: ``n >= 1``. A power of two gets ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``; other
            ``n`` those of the closest power of two ``c < n``, then every other one of ``2c``.
    """

    def geometric(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest)
    if closest != num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return slopes


def alibi_bias(
    slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, is_causal: bool, pos_offset: int = 0
) -> torch.Tensor:
    """ALiBi additive bias: query ``i`` sits at key ``i + Sk - Sq + pos_offset``.

    Args:
        slopes: float ``[H]`` or ``[B, H]``. ``seqlen_q``, ``seqlen_k``: ``Sq`` and ``Sk``.
        is_causal: set keys ``j`` after query ``i`` to ``-inf``.
        pos_offset: how far past bottom-right alignment the queries sit; default 0.

    Returns:
        ``[B or 1, H, Sq, Sk]`` in ``slopes``' dtype: ``-slope * |i - j|``, masked keys ``-inf``.
    """
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    i = torch.arange(seqlen_q, device=slopes.device).view(-1, 1) + (seqlen_k - seqlen_q
                                                                     + pos_offset)
    j = torch.arange(seqlen_k, device=slopes.device).view(1, -1)
    dist = (i - j).to(slopes.dtype)  # [Sq, Sk]
    bias = -slopes[:, :, None, None] * dist.abs()
    if is_causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


def alibi_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: Optional[torch.Tensor] = None,
    *,
    is_causal: bool = True,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    upcast: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    pos_offset: int = 0,
) -> torch.Tensor:
    """Reference for :func:`posenc_triton.alibi_attention`, materialising ``Sq x Sk`` scores.

    Args:
        q: ``[B, Hq, Sq, D]`` (``layout="bhsd"``) or ``[B, Sq, Hq, D]`` (``"bshd"``), any float.
        k, v: the same with ``Sk`` keys and ``Hk`` heads (``Hk`` divides ``Hq``), ``q``'s dtype.
        slopes: float ``[Hq]`` or ``[B, Hq]``, or None (default: :func:`alibi_slopes_list`).
        is_causal: causal bias, bottom-right aligned (:func:`alibi_bias`). Default True.
        scale: score scale. Default None: ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (default) or ``"bshd"``.
        upcast: True (default) computes in float32 (float64 for float64 inputs); False runs
            the matmuls in the input dtype with a float32 softmax (the same-dtype baseline).
        key_padding_mask: bool ``[B, Sk]`` (True = keep) or None (default); rows with no
            visible key give 0.
        dropout_p: drop probabilities with this chance and rescale the rest by
            ``1 / (1 - dropout_p)``, as SDPA does. Default ``0.0``.
        dropout_mask: bool ``[B, Hq, Sq, Sk]`` (True = keep) or None (default): the survivors,
            instead of drawing them (the kernels' mask, for tests).
        pos_offset: as for :func:`alibi_bias`. Default 0.

    Returns:
        ``q``'s shape, dtype and layout.
    """
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32) if upcast else dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    num_heads = q.shape[1]
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if slopes is None:
        slopes = torch.tensor(alibi_slopes_list(num_heads), device=q.device)
    soft = torch.promote_types(compute, torch.float32)
    bias = alibi_bias(slopes.to(soft), q.shape[2], k.shape[2], is_causal, pos_offset)
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    scores = (q @ k.transpose(-1, -2)).to(soft) * scale + bias
    # Rows with no visible key (causal with Sq > Sk, or all keys padded) output 0 and pass
    # no gradient.
    empty = torch.isinf(bias).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = probs.to(compute) @ v
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out.to(dtype)


def alibi_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    slopes: Optional[torch.Tensor] = None,
    *,
    is_causal: bool = True,
    scale: Optional[float] = None,
    upcast: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference for packed (varlen) input: each sequence attended alone.

    Args:
        q: ``[total_q, Hq, D]``; ``k, v``: ``[total_k, Hk, D]``.
        cu_seqlens_q, cu_seqlens_k: integer ``[B + 1]``; sequence ``b`` is rows
            ``cu_seqlens[b] : cu_seqlens[b + 1]``.
        slopes: ``[Hq]``, ``[B, Hq]`` (``slopes[b]`` for sequence ``b``) or None (default).
        is_causal, scale, upcast, dropout_p: as for :func:`alibi_attention_reference`
            (defaults True, None, True, ``0.0``).
        dropout_mask: bool ``[B, Hq, max_Sq, max_Sk]`` or None (default); sequence ``b``
            uses the top-left ``[Hq, Sq_b, Sk_b]`` corner of ``dropout_mask[b]``.

    Returns:
        ``[total_q, Hq, D]`` in ``q``'s dtype.
    """
    if slopes is None:
        slopes = torch.tensor(alibi_slopes_list(q.shape[1]), device=q.device)
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:],
                 cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])
    outs = []
    for b, (q0, q1, k0, k1) in enumerate(bounds):
        keep = None if dropout_mask is None else dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0]
        outs.append(alibi_attention_reference(
            q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0), v[k0:k1].unsqueeze(0),
            slopes if slopes.dim() == 1 else slopes[b:b + 1], is_causal=is_causal,
            scale=scale, layout="bshd", upcast=upcast, dropout_p=dropout_p,
            dropout_mask=keep)[0])
    return torch.cat(outs) if outs else q * 0


def alibi_attention_kvcache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    slopes: Optional[torch.Tensor] = None,
    *,
    is_causal: bool = True,
    scale: Optional[float] = None,
    layout: str = "bhsd",
    upcast: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference for per-batch valid key lengths (flash-attn's ``flash_attn_with_kvcache``).

    Batch ``b`` attends its first ``cache_seqlens[b]`` keys alone, queries bottom-right
    aligned to them, by :func:`alibi_attention_reference`.

    Args:
        q: ``[B, Hq, Sq, D]`` (``layout="bhsd"``) or ``[B, Sq, Hq, D]`` (``"bshd"``).
        k, v: ``[B, Hk, Sk, D]`` or ``[B, Sk, Hk, D]``, the cache.
        cache_seqlens: integer ``[B]``, each ``<= Sk``.
        slopes: ``[Hq]``, ``[B, Hq]`` (``slopes[b]`` for batch ``b``) or None (default).
        is_causal, scale, layout, upcast: as for :func:`alibi_attention_reference`
            (defaults True, None, ``"bhsd"``, True).
        key_padding_mask: bool ``[B, Sk]`` or None (default); batch ``b`` uses its first
            ``cache_seqlens[b]`` entries.

    Returns:
        ``q``'s shape, dtype and layout.
    """
    seq = 2 if layout == "bhsd" else 1
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        mask = None if key_padding_mask is None else key_padding_mask[b:b + 1, :n]
        outs.append(alibi_attention_reference(
            q[b:b + 1], k[b:b + 1].narrow(seq, 0, n), v[b:b + 1].narrow(seq, 0, n),
            slopes if slopes is None or slopes.dim() == 1 else slopes[b:b + 1],
            is_causal=is_causal, scale=scale, layout=layout, upcast=upcast,
            key_padding_mask=mask))
    return torch.cat(outs) if outs else q * 0


# ----------------------------------------------------------------------------------------
# Attention modules: the textbook multi-head self-attention with each encoding
# ----------------------------------------------------------------------------------------


class RoPEAttentionReference(SelfAttentionBase):
    """Reference for :class:`posenc_triton.RoPEAttention`: same constructor, forward, parameters.

    Rotates q and k with :func:`apply_rope_reference`, then materialises the scores
    ``q k^T / sqrt(D)``, masks them, applies softmax (float32, or float64 for float64
    modules), dropout (training mode) and multiplies by ``v``. The matmuls run in the
    module's dtype: in float64 this is the ground truth, in bf16/fp16 the same-dtype baseline.

    Args:
        d_model, num_heads, max_seq_len, dropout, num_kv_heads, bias, rotary_dim, base,
            scaling, interleaved, device, dtype: as for :class:`~posenc_triton.RoPEAttention`.
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int = 2048,
                 dropout: float = 0.0, *, num_kv_heads: Optional[int] = None,
                 bias: bool = False, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 scaling: Optional[dict] = None, interleaved: bool = False,
                 device=None, dtype=None):
        super().__init__(d_model, num_heads, max_seq_len, dropout, num_kv_heads=num_kv_heads,
                         bias=bias, device=device, dtype=dtype)
        rotary_dim = self._rotary_dim(rotary_dim)
        self.rotary_dim, self.base, self.scaling = rotary_dim, base, scaling
        self.interleaved = interleaved

    def _cos_sin(self, seqlen: int, position_ids: Optional[torch.Tensor], device):
        """Tables for positions ``0 .. max position``; length-dependent scalings (dynamic,
        longrope) use ``max(max_seq_len, positions)`` as the sequence length."""
        from posenc_triton.rope_scaling import rope_cos_sin, rope_frequencies

        needed = seqlen
        if position_ids is not None:
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        inv_freq, attention_scaling = rope_frequencies(
            self.rotary_dim, self.base, self.scaling, device=device,
            max_position_embeddings=self.max_seq_len, seq_len=max(needed, self.max_seq_len))
        return rope_cos_sin(needed, inv_freq, attention_scaling)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Self-attention of ``x``.

        Args:
            x: ``[B, S, d_model]`` in the module's dtype.
            attention_mask: bool ``[B, S]`` (True = keep) or None (default): hides padded
                keys; a query row with no visible key outputs 0.
            is_causal: query ``i`` sees keys ``j <= i``. Default False.
            position_ids: integer ``[S]`` or ``[B, S]``, or None (default: ``arange(S)``).

        Returns:
            ``[B, S, d_model]`` in ``x``'s dtype.
        """
        self._check_input(x, attention_mask, is_causal)
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x)
        cos, sin = self._cos_sin(seqlen, position_ids, x.device)
        q, k = apply_rope_reference(q, k, cos, sin, position_ids=position_ids,
                                    interleaved=self.interleaved)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        soft = torch.promote_types(q.dtype, torch.float32)
        scores = (q @ k.transpose(-1, -2)).to(soft) / math.sqrt(self.head_dim)
        # keep[b, 0, i, j]: query i may look at key j
        keep = torch.ones(1, 1, 1, seqlen, dtype=torch.bool, device=x.device)
        if is_causal:
            keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
        empty = ~keep.any(dim=-1, keepdim=True)  # rows with no visible key output 0
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        probs = torch.nn.functional.dropout(probs, self.dropout, self.training)
        out = probs.to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.d_model))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")


class ALiBiAttentionReference(SelfAttentionBase):
    """Reference for :class:`posenc_triton.ALiBiAttention`: same constructor, forward, parameters.

    Projects, then runs :func:`alibi_attention_reference` (materialised scores, ALiBi bias,
    masks, softmax, dropout in training mode, PV) in the module's dtype.

    Args:
        d_model, num_heads, max_seq_len, dropout, num_kv_heads, bias, device, dtype: as for
            :class:`~posenc_triton.ALiBiAttention`.
        trainable_slopes: bool (else ``TypeError``). Default False: the default slopes
            :func:`alibi_slopes_list`; True: a parameter ``slopes [num_heads]`` (float32,
            initialised from :func:`alibi_slopes_list`; cast with the module).
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int = 2048,
                 dropout: float = 0.0, *, num_kv_heads: Optional[int] = None,
                 bias: bool = False, trainable_slopes: bool = False, device=None, dtype=None):
        super().__init__(d_model, num_heads, max_seq_len, dropout, num_kv_heads=num_kv_heads,
                         bias=bias, device=device, dtype=dtype)
        if not isinstance(trainable_slopes, bool):
            raise TypeError(f"trainable_slopes must be a bool, got {trainable_slopes!r}")
        slopes = torch.tensor(alibi_slopes_list(num_heads), dtype=torch.float32, device=device)
        self.register_parameter("slopes", torch.nn.Parameter(slopes) if trainable_slopes else None)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Self-attention of ``x``.

        Args:
            x: ``[B, S, d_model]`` in the module's dtype.
            attention_mask: bool ``[B, S]`` (True = keep) or None (default).
            is_causal: causal ALiBi bias; otherwise the symmetric one. Default False.

        Returns:
            ``[B, S, d_model]`` in ``x``'s dtype.
        """
        self._check_input(x, attention_mask, is_causal)
        batch, seqlen, _ = x.shape
        q, k, v = self._project(x)
        out = alibi_attention_reference(
            q, k, v, self.slopes, is_causal=is_causal, layout="bshd", upcast=False,
            key_padding_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.reshape(batch, seqlen, self.d_model))
