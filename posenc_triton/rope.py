"""Rotary position embedding: the argument checks and the public :func:`apply_rope`.

:func:`apply_rope` validates, then runs :mod:`.rope_ops` (launcher, ``torch.library`` op,
autograd) on CUDA and in Triton's interpreter, and the reference otherwise. The module that
owns frequencies and a cos/sin cache, :class:`~posenc_triton.nn.RotaryEmbedding`, lives in
:mod:`posenc_triton.nn`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from posenc_triton import _checks, reference, rope_ops
from posenc_triton._backend import host_read_allowed, use_triton
from posenc_triton.rope_scaling import rope_cos_sin, rope_frequencies

__all__ = ["LAYOUTS", "apply_rope", "rope_cos_sin", "rope_frequencies"]

# float64 is for checking (gradcheck, debugging): it runs the PyTorch reference.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("bshd", "bhsd")


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


_INT_DTYPES = (torch.int32, torch.int64)


def _validate(q, k, cos, sin, position_ids, seqlen_offsets, layout, check_positions=True):
    """Check every argument of :func:`apply_rope`; return ``(batch, seqlen)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _checks.check_tensor("q", q, _FLOAT_DTYPES, 4)
    batch, seqlen = (q.shape[0], q.shape[1]) if layout == "bshd" else (q.shape[0], q.shape[2])
    dim = q.shape[3]
    if k is not None:
        _checks.check_tensor("k", k, _FLOAT_DTYPES, 4)
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
        if k.device != q.device:
            raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
        kb, ks = (k.shape[0], k.shape[1]) if layout == "bshd" else (k.shape[0], k.shape[2])
        if (kb, ks, k.shape[3]) != (batch, seqlen, dim):
            raise ValueError(
                f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence length "
                f"and head dim for layout={layout!r} (heads may differ)")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(name, t, _TABLE_DTYPES, 2)
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    rot = 2 * cos.shape[1]
    if rot == 0 or rot > dim:
        raise ValueError(
            f"cos/sin [T, R/2] give rotary width R = {rot}; expected 0 < R <= head dim {dim}")
    if position_ids is not None:
        _checks.check_tensor("position_ids", position_ids, _INT_DTYPES)
        if position_ids.device != q.device:
            raise ValueError(f"position_ids must be on q's device {q.device}, "
                             f"got {position_ids.device}")
        if not _checks.shape_in(position_ids, (seqlen,), (1, seqlen), (batch, seqlen)):
            raise ValueError(f"position_ids must be [S]={[seqlen]}, [1, S] or "
                             f"[B, S]={[batch, seqlen]}, got {list(position_ids.shape)}")
    if isinstance(seqlen_offsets, torch.Tensor):
        _checks.check_tensor("seqlen_offsets", seqlen_offsets, _INT_DTYPES)
        if seqlen_offsets.device != q.device:
            raise ValueError(f"seqlen_offsets must be on q's device {q.device}, "
                             f"got {seqlen_offsets.device}")
        if not _checks.shape_in(seqlen_offsets, (), (batch,)):
            raise ValueError(f"seqlen_offsets must be an int, a 0-d or a [B]={[batch]} tensor, "
                             f"got shape {list(seqlen_offsets.shape)}")
    elif not _checks.is_int(seqlen_offsets):
        raise TypeError(f"seqlen_offsets must be an int or an integer tensor, "
                        f"got {type(seqlen_offsets).__name__}")
    _checks.check_bool("check_positions", check_positions)
    # The reference path indexes the table in PyTorch (a negative row would wrap): it checks.
    _check_positions(seqlen, cos.shape[0], position_ids, seqlen_offsets,
                     check_positions or not use_triton(q))
    return batch, seqlen


def _check_positions(seqlen, table, position_ids, seqlen_offsets, read_tensors=True):
    """Positions must index the cos/sin table: ``0 <= position < T``.

    Tensor positions need their min/max, a device sync; it is skipped when asked
    (``read_tensors=False``) and where a sync is not allowed (``torch.compile``, CUDA-graph
    capture), and there the kernel reads NaN for a position past the table instead of memory
    it does not own.
    """
    tensors = [t for t in (position_ids, seqlen_offsets) if isinstance(t, torch.Tensor)]
    if seqlen == 0 or any(t.numel() == 0 for t in tensors):  # no tokens
        return
    if tensors and not (read_tensors and host_read_allowed(tensors[0])):
        return
    # One sync for all tensor bounds: [min, max] of each tensor, read in a single transfer.
    bounds = iter(torch.stack([torch.stack(torch.aminmax(t)).to(torch.int64)
                               for t in tensors]).tolist()) if tensors else iter(())
    lo, hi = (0, seqlen - 1) if position_ids is None else next(bounds)
    off_lo, off_hi = next(bounds) if isinstance(seqlen_offsets, torch.Tensor) else (
        seqlen_offsets, seqlen_offsets)
    lo, hi = lo + off_lo, hi + off_hi
    if lo < 0 or hi >= table:
        raise ValueError(
            f"positions (position_ids + seqlen_offsets) span [{lo}, {hi}], outside the cos/sin "
            f"table's {table} rows: build cos/sin for at least {hi + 1} positions")


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    interleaved: bool = False,
    layout: str = "bshd",
    inplace: bool = False,
    check_positions: bool = True,
):
    """Rotate ``q`` and ``k`` by RoPE in one kernel launch; returns ``(q_out, k_out)``.

    Args:
        q: ``[B, S, Hq, D]`` (``layout="bshd"``) or ``[B, Hq, S, D]`` (``"bhsd"``); any strides;
            fp16, bf16 or fp32 (math in fp32); float64 runs the reference (for checking).
        k: the same with ``Hk`` heads, or None to rotate ``q`` alone (``k_out`` is then None).
        cos, sin: ``[T, R/2]`` tables from :func:`rope_cos_sin`; ``R <= D`` is the rotary
            width, ``q[..., R:]`` passes through.
        position_ids: integer ``[S]``, ``[1, S]`` or ``[B, S]``: the table row of each token.
        seqlen_offsets: int, or integer 0-d or ``[B]`` tensor, added to every position
            (KV-cache decode).
        interleaved: rotate pairs ``(x[2i], x[2i+1])`` (GPT-J) instead of halves (NeoX/Llama).
        layout: ``"bshd"`` (default) or ``"bhsd"``, for ``q`` and ``k``.
        inplace: write into ``q`` and ``k`` instead of new tensors (views too; under autograd
            the rotation is recorded as a copy into them).
        check_positions: raise ``ValueError`` for a position outside the table. For tensor
            positions this reads their min and max, a device sync; ``False`` skips it (decode
            loops, positions known to fit), and then a position past the table gives NaN in
            its rows, never a read of memory outside the table (as under ``torch.compile``
            and CUDA-graph capture, which skip the sync anyway).

    Returns:
        ``(q_out, k_out)``: ``q``'s and ``k``'s shape and dtype (``q`` and ``k`` themselves with
        ``inplace``); ``k_out`` is None when ``k`` is.

    Raises:
        TypeError, ValueError: a bad argument (dtype, device, shape, ``layout``), or with
            ``check_positions`` a position outside ``[0, T)``.
    """
    batch, seqlen = _validate(q, k, cos, sin, position_ids, seqlen_offsets, layout,
                              check_positions)
    if not use_triton(q) or q.dtype == torch.float64:
        q_out, k_out = reference.apply_rope_reference(
            q, k, cos, sin, position_ids=position_ids, seqlen_offsets=seqlen_offsets,
            interleaved=interleaved, layout=layout)
        if inplace:
            q_out = q.copy_(q_out)
            k_out = None if k is None else k.copy_(k_out)
        return q_out, k_out

    if layout == "bhsd":
        q = q.transpose(1, 2)
        k = None if k is None else k.transpose(1, 2)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    if position_ids is not None:
        position_ids = position_ids.expand(batch, seqlen)
    offsets = seqlen_offsets.expand(batch) if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if offsets is not None else seqlen_offsets
    q_out, k_out = rope_ops.run_rope(q, k, cos, sin, position_ids, offsets, offset, interleaved,
                                     inplace)
    if layout == "bhsd":
        q_out = q_out.transpose(1, 2)
        k_out = None if k_out is None else k_out.transpose(1, 2)
    return q_out, k_out
