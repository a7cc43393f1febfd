"""Pure-PyTorch references: the specification the kernels are tested and benchmarked against.

Nothing here imports a kernel. Everything is written as plainly as the maths in DESIGN.md;
pass float64 inputs to get the ground truth.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

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
    """Position of every token, int64 ``[B, S]``: ``position_ids`` (or ``arange(S)``) + offset."""
    if position_ids is None:
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
    else:
        pos = position_ids.to(torch.int64).expand(batch, seqlen)
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(torch.int64).view(batch, 1)
    return pos + seqlen_offsets


def rope_rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by the rows ``positions [B, S]`` of ``cos``/``sin [T, R/2]``.

    Math in ``float32`` (``float64`` for ``float64`` input); the result has ``x``'s dtype.
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
    """Reference for :func:`posenc_triton.apply_rope`; same arguments, returns ``(q_out, k_out)``."""
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
    """ALiBi slopes as Python floats (Press et al.; BLOOM's rule for other head counts).

    For ``n`` a power of two: ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. Otherwise the slopes of
    the closest power of two ``c < n``, then every other slope of ``2c`` for the rest.
    """

    def geometric(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest)
    if closest != num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return slopes


def alibi_bias(
    slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, is_causal: bool
) -> torch.Tensor:
    """Additive bias ``[B or 1, H, Sq, Sk]`` in ``slopes``' dtype; masked keys are ``-inf``.

    Bottom-right aligned: query ``i`` sits at key position ``i + Sk - Sq``.
    """
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    i = torch.arange(seqlen_q, device=slopes.device).view(-1, 1) + (seqlen_k - seqlen_q)
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
) -> torch.Tensor:
    """Reference for :func:`posenc_triton.alibi_attention`, materialising ``Sq x Sk`` scores.

    ``upcast=True`` computes in ``float32`` (``float64`` for ``float64`` inputs);
    ``upcast=False`` runs the matmuls in the input dtype with a ``float32`` softmax, which is
    the "same-dtype PyTorch" baseline of the error rule. ``key_padding_mask`` bool ``[B, Sk]``
    (True = keep) masks padded keys for every query. Rows with no visible key give 0.
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
    bias = alibi_bias(slopes.to(soft), q.shape[2], k.shape[2], is_causal)
    if key_padding_mask is not None:
        bias = bias.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    scores = (q @ k.transpose(-1, -2)).to(soft) * scale + bias
    # Rows with no visible key (causal with Sq > Sk, or all keys padded) output 0 and pass
    # no gradient.
    empty = torch.isinf(bias).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = probs.to(compute) @ v
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out.to(dtype)
