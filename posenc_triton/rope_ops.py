"""Rotary position embedding: the launcher, its ``torch.library`` op and autograd.

Layers, top-down, as in :mod:`posenc_triton.alibi_ops`: ``launch_rope`` (launch the kernel
into given outputs) → ``posenc_triton::rope_`` (the same, visible to ``torch.compile``) →
:func:`call_rope` (the op under ``torch.compile``, the launcher otherwise) → ``RopeFunction``
(autograd: backward is the conjugate rotation through the same kernel) → :func:`run_rope`.
Arguments arrive checked by :func:`posenc_triton.rope.apply_rope`.
"""

from __future__ import annotations

from typing import Optional

import torch

from posenc_triton import _backend

# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def _rope_blocks(seqlen: int, heads: int, half: int):
    """Tile sizes: about 2K rotated pairs (8 KiB of bf16) per program, heads first."""
    block_r = _backend.next_power_of_2(half)
    block_h = min(_backend.next_power_of_2(max(heads, 1)), 8)
    block_s = max(1, min(_backend.next_power_of_2(seqlen), 2048 // (block_h * block_r)))
    return block_s, block_h, block_r


def launch_rope(
    q_out: torch.Tensor,
    k_out: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    seqlen_offsets: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    conjugate: bool,
    wrap: bool = False,
) -> None:
    """Write the rotation of ``q``/``k`` ``[B, S, H, D]`` into ``q_out``/``k_out``, one launch.

    ``q=None`` (``k=None``) rotates ``q_out`` (``k_out``) in place. ``position_ids`` is
    ``[B, S]`` (stride 0 allowed), ``seqlen_offsets`` ``[B]`` or None (then ``offset``).
    ``wrap`` launches through :func:`launcher` (``wrap_triton``) so ``torch.compile`` sees the
    kernel.
    """
    from posenc_triton.kernels.rope import rope_kernel

    inplace = q is None
    q = q_out if inplace else q
    k = k_out if k is None else k
    batch, seqlen, hq, dim = q.shape
    hk = 0 if k is None else k.shape[2]
    half = cos.shape[1]
    if batch == 0 or seqlen == 0 or q.numel() + (0 if k is None else k.numel()) == 0:
        return
    if k is None:  # no k heads are launched; any valid pointer and strides will do
        k = k_out = q
    block_s, block_h, block_r = _rope_blocks(seqlen, max(hq, hk), half)
    copy_tail = 2 * half < dim and not inplace
    has_pos = position_ids is not None
    pos = position_ids if has_pos else cos  # unused pointer when has_pos is False
    pos_strides = position_ids.stride() if has_pos else (0, 0)
    has_offsets = seqlen_offsets is not None
    offsets = seqlen_offsets if has_offsets else cos
    n_s_blocks = _backend.cdiv(seqlen, block_s)
    grid = (batch * n_s_blocks, _backend.cdiv(hq, block_h) + _backend.cdiv(hk, block_h))
    kernel = _backend.launcher(rope_kernel) if wrap else rope_kernel
    with _backend.device_guard(q):
        kernel[grid](
            q, k, q_out, k_out, cos, sin, pos, offsets,
            seqlen, hq, hk, cos.shape[0], offset, n_s_blocks,
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
            cos.stride(0), sin.stride(0), *pos_strides, offsets.stride(0) if has_offsets else 0,
            HALF=half, D=dim,
            BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_R=block_r,
            BLOCK_T=_backend.next_power_of_2(max(dim - 2 * half, 1)),
            HAS_POS=has_pos, HAS_OFFSETS=has_offsets,
            INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail,
            num_warps=4,
        )


@_backend.library_op("posenc_triton::rope_", mutates_args={"q_out", "k_out"})
def _rope_op(
    q_out: torch.Tensor,
    k_out: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    seqlen_offsets: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    launch_rope(q_out, k_out, q, k, cos, sin, position_ids, seqlen_offsets, offset,
                interleaved, conjugate, wrap=True)


def call_rope(*args) -> None:
    """:func:`launch_rope` through the op (under ``torch.compile``) or directly."""
    _backend.call_op(torch.ops.posenc_triton.rope_, launch_rope, *args)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


class RopeFunction(torch.autograd.Function):
    """Rotation of ``q``, ``k`` ``[B, S, H, D]``; backward rotates the gradients by ``-angle``."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, seqlen_offsets, offset, interleaved):
        q_out = torch.empty_like(q)
        k_out = None if k is None else torch.empty_like(k)
        call_rope(q_out, k_out, q, k, cos, sin, position_ids, seqlen_offsets, offset,
                  interleaved, False)
        ctx.save_for_backward(cos, sin, position_ids, seqlen_offsets)
        ctx.offset, ctx.interleaved = offset, interleaved
        # An output nothing reads (a last layer's query when only keys and values are cached)
        # gets no gradient, as unfused: its input's stays None, not zeros an optimizer would
        # apply weight decay and momentum to.
        ctx.set_materialize_grads(False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, position_ids, seqlen_offsets = ctx.saved_tensors
        # The kernel's first slot is required: a lone k gradient is rotated in it.
        first, second = (grad_q, grad_k) if grad_q is not None else (grad_k, None)
        d_first = d_second = None
        if first is not None:
            d_first = torch.empty_like(first)
            d_second = None if second is None else torch.empty_like(second)
            call_rope(d_first, d_second, first, second, cos, sin, position_ids,
                      seqlen_offsets, ctx.offset, ctx.interleaved, True)
        dq, dk = (d_first, d_second) if grad_q is not None else (None, d_first)
        return dq, dk, None, None, None, None, None, None


def run_rope(q, k, cos, sin, position_ids, seqlen_offsets, offset, interleaved, inplace):
    """``(q_out, k_out)`` for checked ``[B, S, H, D]`` inputs, with autograd where needed.

    In place under autograd is an out-of-place rotation copied into ``q`` and ``k``:
    autograd's ``copy_`` records the write into a view (a projection's ``.view()``, the
    ``bhsd`` transpose), which an ``autograd.Function`` marking two views dirty cannot.
    """
    args = (cos, sin, position_ids, seqlen_offsets, offset, interleaved)
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        q_out, k_out = RopeFunction.apply(q, k, *args)
        if inplace:
            q_out = q.copy_(q_out)
            k_out = None if k is None else k.copy_(k_out)
        return q_out, k_out
    if inplace:  # the thin path: no autograd node, no allocation
        call_rope(q, k, None, None, *args, False)
        return q, k
    q_out = torch.empty_like(q)
    k_out = None if k is None else torch.empty_like(k)
    call_rope(q_out, k_out, q, k, *args, False)
    return q_out, k_out
