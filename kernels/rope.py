"""Rotary position embedding: one kernel rotates q and k (forward, or backward as the conjugate).

A program owns a tile of ``BLOCK_S`` tokens x ``BLOCK_H`` heads of one batch row, of q or of
k; the cos/sin rows of its tokens are loaded once and reused across the heads of the tile.
Every tensor is addressed through its strides, so views (a fused QKV projection, ``bhsd``
transposes, expanded gradients) are read and written in place without a copy.
"""

import triton
import triton.language as tl


@triton.jit
def _rope_tile(
    x_ptr, o_ptr,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_ob, stride_os, stride_oh, stride_od,
    b, s, h, S, H, cos, sin,
    HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    """Rotate the ``[BLOCK_S, BLOCK_H, R]`` tile of ``x`` (tokens ``s``, heads ``h``) into ``o``."""
    r = tl.arange(0, BLOCK_R)
    row_mask = (s < S)[:, None, None] & (h < H)[None, :, None]
    mask = row_mask & (r < HALF)[None, None, :]
    x_row = x_ptr + b * stride_xb + s[:, None, None] * stride_xs + h[None, :, None] * stride_xh
    o_row = o_ptr + b * stride_ob + s[:, None, None] * stride_os + h[None, :, None] * stride_oh
    if INTERLEAVED:
        i1 = 2 * r
        i2 = 2 * r + 1
    else:
        i1 = r
        i2 = r + HALF
    i1 = i1.to(tl.int64)[None, None, :]
    i2 = i2.to(tl.int64)[None, None, :]
    x1 = tl.load(x_row + i1 * stride_xd, mask=mask).to(tl.float32)
    x2 = tl.load(x_row + i2 * stride_xd, mask=mask).to(tl.float32)
    c = cos[:, None, :]
    sn = sin[:, None, :]
    dtype = o_ptr.dtype.element_ty
    tl.store(o_row + i1 * stride_od, (x1 * c - x2 * sn).to(dtype), mask=mask)
    tl.store(o_row + i2 * stride_od, (x2 * c + x1 * sn).to(dtype), mask=mask)
    if COPY_TAIL:
        # Partial rotary, out of place: the pass-through columns x[R:] are copied as they are.
        t = ROT + tl.arange(0, BLOCK_T)
        tail_mask = row_mask & (t < D)[None, None, :]
        t = t.to(tl.int64)[None, None, :]
        tail = tl.load(x_row + t * stride_xd, mask=tail_mask)
        tl.store(o_row + t * stride_od, tail.to(dtype), mask=tail_mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, offsets_ptr,
    S, Hq, Hk, T, offset, n_s_blocks,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_ct, stride_st, stride_pb, stride_ps, stride_ob,
    HALF: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    """Grid ``(B * n_s_blocks, cdiv(Hq, BLOCK_H) + cdiv(Hk, BLOCK_H))``, ``n_s_blocks =
    cdiv(S, BLOCK_S)``: batch and sequence share axis 0, which has no 65535 limit.

    q/k ``[B, S, H, D]`` (any strides), cos/sin ``[T, R/2]``, positions ``[B, S]`` and
    per-batch ``offsets [B]`` (strides may be 0), or a scalar ``offset``. A position outside
    ``[0, T)`` reads NaN instead of memory it does not own, so it can never pass unnoticed.
    """
    pid = tl.program_id(0)
    b = (pid // n_s_blocks).to(tl.int64)
    pid_s = pid % n_s_blocks
    pid_h = tl.program_id(1)

    s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=s < S, other=0).to(tl.int64)
    else:
        pos = s
    if HAS_OFFSETS:
        pos += tl.load(offsets_ptr + b * stride_ob).to(tl.int64)
    else:
        pos += offset

    r = tl.arange(0, BLOCK_R)
    cs_mask = ((pos >= 0) & (pos < T))[:, None] & (r < HALF)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * stride_ct + r[None, :], mask=cs_mask,
                  other=float("nan")).to(tl.float32)
    sin = tl.load(sin_ptr + pos[:, None] * stride_st + r[None, :], mask=cs_mask,
                  other=float("nan")).to(tl.float32)
    if CONJUGATE:  # backward: rotate by -angle
        sin = -sin

    n_q_blocks = tl.cdiv(Hq, BLOCK_H)
    if pid_h < n_q_blocks:
        h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        _rope_tile(q_ptr, qo_ptr,
                   stride_qb, stride_qs, stride_qh, stride_qd,
                   stride_qob, stride_qos, stride_qoh, stride_qod,
                   b, s, h, S, Hq, cos, sin,
                   HALF, 2 * HALF, D, BLOCK_R, BLOCK_T, INTERLEAVED, COPY_TAIL)
    else:
        h = ((pid_h - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        _rope_tile(k_ptr, ko_ptr,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_kob, stride_kos, stride_koh, stride_kod,
                   b, s, h, S, Hk, cos, sin,
                   HALF, 2 * HALF, D, BLOCK_R, BLOCK_T, INTERLEAVED, COPY_TAIL)
