"""Attention dropout: the keep-mask of one tile, regenerated from a seed instead of stored.

Element ``(b, h, i, j)`` (batch, query head, query row, key column; rows and columns counted
within the sequence, packed input included) is kept when the first output of Philox-4x32
(10 rounds) with key ``seed`` and counter ``(j, i, b * Hq + h, 0)``, as a uniform float in
``[0, 1)`` (``tl.uint_to_uniform_float``, as ``tl.rand`` does), is at least ``dropout_p``.
The forward and both backward kernels draw the same mask from the same formula, and
:func:`dropout_mask_kernel` writes it out for tests.
"""

import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p):
    """Keep-mask (int1) of broadcastable ``rows`` (query rows) and ``cols`` (key columns),
    e.g. ``rows[:, None]`` and ``cols[None, :]``, or transposed; ``bh = b * Hq + h``."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, zero + cols.to(tl.uint32), zero + rows.to(tl.uint32),
                           zero + bh.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def dropout_mask_kernel(SEED, MASK, dropout_p, seqlen_q, seqlen_k,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(B * Hq, cdiv(Sq, BLOCK_M), cdiv(Sk, BLOCK_N))``: ``MASK [B, Hq, Sq, Sk]``
    (contiguous bytes) = the keep-mask the attention kernels draw."""
    off_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), off_bh, rows[:, None], cols[None, :], dropout_p)
    MASK += off_bh.to(tl.int64) * seqlen_q * seqlen_k
    tl.store(MASK + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :], keep.to(tl.uint8),
             mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])
