"""Rotary position embedding: launcher, ``torch.library`` op, autograd, public API and module.

Layers, top-down: ``rope_forward`` (launch the kernel into given outputs) →
``posenc_triton::rope_`` (the same, visible to ``torch.compile``) → ``RopeFunction``
(autograd: backward is the conjugate rotation through the same kernel) → ``apply_rope``
(validation, dispatch) → ``RotaryEmbedding`` (frequencies and a growing cos/sin cache).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from posenc_triton import reference
from posenc_triton._backend import (
    cdiv,
    host_read_allowed,
    launcher,
    library_op,
    next_power_of_2,
    use_triton,
)
from posenc_triton.rope_scaling import rope_cos_sin, rope_frequencies

__all__ = ["RotaryEmbedding", "apply_rope", "rope_cos_sin", "rope_forward", "rope_frequencies"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("bshd", "bhsd")


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def _tile(seqlen: int, heads: int, half: int):
    """Tile sizes: about 2K rotated pairs (8 KiB of bf16) per program, heads first."""
    block_r = next_power_of_2(half)
    block_h = min(next_power_of_2(max(heads, 1)), 8)
    block_s = max(1, min(next_power_of_2(seqlen), 2048 // (block_h * block_r)))
    return block_s, block_h, block_r


def rope_forward(
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
    from posenc_triton.kernels.rope import _rope_kernel

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
    block_s, block_h, block_r = _tile(seqlen, max(hq, hk), half)
    copy_tail = 2 * half < dim and not inplace
    has_pos = position_ids is not None
    pos = position_ids if has_pos else cos  # unused pointer when has_pos is False
    pos_strides = position_ids.stride() if has_pos else (0, 0)
    has_offsets = seqlen_offsets is not None
    offsets = seqlen_offsets if has_offsets else cos
    n_s_blocks = cdiv(seqlen, block_s)
    grid = (batch * n_s_blocks, cdiv(hq, block_h) + cdiv(hk, block_h))
    kernel = launcher(_rope_kernel) if wrap else _rope_kernel
    kernel[grid](
        q, k, q_out, k_out, cos, sin, pos, offsets,
        seqlen, hq, hk, cos.shape[0], offset, n_s_blocks,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        cos.stride(0), sin.stride(0), *pos_strides, offsets.stride(0) if has_offsets else 0,
        HALF=half, D=dim,
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_T=next_power_of_2(max(dim - 2 * half, 1)),
        HAS_POS=has_pos, HAS_OFFSETS=has_offsets,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail,
        num_warps=4,
    )


@library_op("posenc_triton::rope_", mutates_args={"q_out", "k_out"})
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
    rope_forward(q_out, k_out, q, k, cos, sin, position_ids, seqlen_offsets, offset,
                 interleaved, conjugate, wrap=True)


def _rope(*args) -> None:
    # Eager calls launch directly: the op's dispatch costs host time that decode shapes feel.
    if torch.compiler.is_compiling():
        torch.ops.posenc_triton.rope_(*args)
    else:
        rope_forward(*args)


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


class RopeFunction(torch.autograd.Function):
    """Rotation of ``q``, ``k`` ``[B, S, H, D]``; backward rotates the gradients by ``-angle``."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, seqlen_offsets, offset, interleaved, inplace):
        if inplace:
            _rope(q, k, None, None, cos, sin, position_ids, seqlen_offsets, offset,
                  interleaved, False)
            ctx.mark_dirty(*(t for t in (q, k) if t is not None))
            q_out, k_out = q, k
        else:
            q_out = torch.empty_like(q)
            k_out = None if k is None else torch.empty_like(k)
            _rope(q_out, k_out, q, k, cos, sin, position_ids, seqlen_offsets, offset,
                  interleaved, False)
        ctx.save_for_backward(cos, sin, position_ids, seqlen_offsets)
        ctx.offset, ctx.interleaved, ctx.has_k = offset, interleaved, k is not None
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, position_ids, seqlen_offsets = ctx.saved_tensors
        dq = torch.empty_like(grad_q)
        dk = torch.empty_like(grad_k) if ctx.has_k else None
        _rope(dq, dk, grad_q, grad_k if ctx.has_k else None, cos, sin, position_ids,
              seqlen_offsets, ctx.offset, ctx.interleaved, True)
        return dq, dk, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _check_tensor(name, t, dtypes, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


_INT_DTYPES = (torch.int32, torch.int64)


def _validate(q, k, cos, sin, position_ids, seqlen_offsets, layout, check_positions=True):
    """Check every argument of :func:`apply_rope`; return ``(batch, seqlen)``."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    _check_tensor("q", q, _FLOAT_DTYPES, 4)
    batch, seqlen = (q.shape[0], q.shape[1]) if layout == "bshd" else (q.shape[0], q.shape[2])
    dim = q.shape[3]
    if k is not None:
        _check_tensor("k", k, _FLOAT_DTYPES, 4)
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
        _check_tensor(name, t, _FLOAT_DTYPES, 2)
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    rot = 2 * cos.shape[1]
    if rot == 0 or rot > dim:
        raise ValueError(
            f"cos/sin [T, R/2] give rotary width R = {rot}; expected 0 < R <= head dim {dim}")
    if position_ids is not None:
        _check_tensor("position_ids", position_ids, _INT_DTYPES)
        if position_ids.device != q.device:
            raise ValueError(f"position_ids must be on q's device {q.device}, "
                             f"got {position_ids.device}")
        if tuple(position_ids.shape) not in ((seqlen,), (1, seqlen), (batch, seqlen)):
            raise ValueError(f"position_ids must be [S]={[seqlen]}, [1, S] or "
                             f"[B, S]={[batch, seqlen]}, got {list(position_ids.shape)}")
    if isinstance(seqlen_offsets, torch.Tensor):
        _check_tensor("seqlen_offsets", seqlen_offsets, _INT_DTYPES)
        if seqlen_offsets.device != q.device:
            raise ValueError(f"seqlen_offsets must be on q's device {q.device}, "
                             f"got {seqlen_offsets.device}")
        if tuple(seqlen_offsets.shape) not in ((), (batch,)):
            raise ValueError(f"seqlen_offsets must be an int, a 0-d or a [B]={[batch]} tensor, "
                             f"got shape {list(seqlen_offsets.shape)}")
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"seqlen_offsets must be an int or an integer tensor, "
                        f"got {type(seqlen_offsets).__name__}")
    if not isinstance(check_positions, bool):
        raise TypeError(f"check_positions must be a bool, got {type(check_positions).__name__}")
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
        q: ``[B, S, Hq, D]`` (``layout="bshd"``) or ``[B, Hq, S, D]`` (``"bhsd"``); any strides.
        k: the same with ``Hk`` heads, or None to rotate ``q`` alone (``k_out`` is then None).
        cos, sin: ``[T, R/2]`` tables from :func:`rope_cos_sin`; ``R <= D`` is the rotary
            width, ``q[..., R:]`` passes through.
        position_ids: integer ``[S]``, ``[1, S]`` or ``[B, S]``: the table row of each token.
        seqlen_offsets: int, or integer 0-d or ``[B]`` tensor, added to every position
            (KV-cache decode).
        interleaved: rotate pairs ``(x[2i], x[2i+1])`` (GPT-J) instead of halves (NeoX/Llama).
        inplace: write into ``q`` and ``k`` instead of new tensors.
        check_positions: raise ``ValueError`` for a position outside the table. For tensor
            positions this reads their min and max, a device sync; ``False`` skips it (decode
            loops, positions known to fit), and then a position past the table gives NaN in
            its rows, never a read of memory outside the table (as under ``torch.compile``
            and CUDA-graph capture, which skip the sync anyway).
    """
    batch, seqlen = _validate(q, k, cos, sin, position_ids, seqlen_offsets, layout,
                              check_positions)
    if not use_triton(q):
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
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        q_out, k_out = RopeFunction.apply(q, k, cos, sin, position_ids, offsets, offset,
                                          interleaved, inplace)
    else:  # the thin path: no autograd node
        if inplace:
            q_out, k_out = q, k
            _rope(q, k, None, None, cos, sin, position_ids, offsets, offset, interleaved, False)
        else:
            q_out = torch.empty_like(q)
            k_out = None if k is None else torch.empty_like(k)
            _rope(q_out, k_out, q, k, cos, sin, position_ids, offsets, offset, interleaved,
                  False)
    if layout == "bhsd":
        q_out = q_out.transpose(1, 2)
        k_out = None if k_out is None else k_out.transpose(1, 2)
    return q_out, k_out


class RotaryEmbedding(torch.nn.Module):
    """RoPE for attention heads: owns the frequencies and a cos/sin cache that grows on demand.

    ``forward(q, k=None, position_ids=None, offset=0)`` returns ``(q_out, k_out)`` like
    :func:`apply_rope` (``layout`` picks ``"bshd"`` or ``"bhsd"``). With ``dynamic`` or
    ``longrope`` scaling the frequencies depend on the sequence length: they are rebuilt for
    the longest sequence seen so far, as Hugging Face's dynamic update does when it grows.
    Tensor positions are read on the host to size the cache (one sync); under
    ``torch.compile`` and CUDA-graph capture they are not, and the cache built so far (at
    least ``max_seq_len`` rows) must hold them: a position past it gives NaN rows.
    """

    def __init__(self, head_dim: int, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 max_seq_len: int = 4096, scaling: Optional[dict] = None,
                 interleaved: bool = False, layout: str = "bshd", device=None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(rotary_dim, int) or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be an int <= head_dim={head_dim}, "
                             f"got {rotary_dim!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, base
        self.max_seq_len, self.scaling = max_seq_len, scaling
        self.interleaved, self.layout = interleaved, layout
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        self._length_dependent = rope_type in ("dynamic", "longrope")
        self._build(max_seq_len, device)

    def _build(self, seq_len: int, device) -> None:
        """Frequencies for sequences of ``seq_len`` tokens, cos/sin for a power of two >= it."""
        inv_freq, attention_scaling = rope_frequencies(
            self.rotary_dim, self.base, self.scaling, device=device,
            max_position_embeddings=self.max_seq_len, seq_len=seq_len)
        cos, sin = rope_cos_sin(next_power_of_2(seq_len), inv_freq, attention_scaling)
        self._freq_seq_len = seq_len
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(self, q, k=None, position_ids=None, offset: Union[int, torch.Tensor] = 0):
        seqlen = q.shape[1] if self.layout == "bshd" else q.shape[2]
        lowest = 0
        if position_ids is None and not isinstance(offset, torch.Tensor):
            needed = seqlen + offset
        elif not host_read_allowed(q):
            needed = 0  # no host read here: the cache must already hold the positions
        else:  # one host sync for both bounds, as in Hugging Face's dynamic RoPE
            pos = reference.rope_positions(q.shape[0], seqlen, position_ids, offset, q.device)
            lowest, highest = torch.stack(torch.aminmax(pos)).tolist() if pos.numel() else (0, -1)
            needed = highest + 1
        if lowest < 0:
            raise ValueError(f"positions (position_ids + offset) must be >= 0, got {lowest}")
        if needed > self.cos_cached.shape[0] or (
                self._length_dependent and needed > self._freq_seq_len):
            self._build(needed, self.cos_cached.device)
        # The table now holds every position: apply_rope need not read them again.
        return apply_rope(q, k, self.cos_cached, self.sin_cached, position_ids=position_ids,
                          seqlen_offsets=offset, interleaved=self.interleaved,
                          layout=self.layout, check_positions=False)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}, layout={self.layout!r}")
