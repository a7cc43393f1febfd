"""ALiBi attention: FlashAttention-2 forward with the linear bias fused in, and the helpers
it shares with the backward (:mod:`kernels.alibi_attention_bwd`).

For query ``i``, key ``j`` and head ``h``, with ``i' = i + Sk - Sq + pos_offset`` (aligned
bottom-right, then ``pos_offset`` further: context parallelism's global positions, else 0):
``score = scale * q_i.k_j - m_h * (i' - j)`` (causal, keys ``j > i'`` masked) or
``- m_h * |i' - j|`` (symmetric). Scores live in the exp2 domain (``log2(e)`` folded into
``scale`` and the slope) so the softmax uses ``exp2``. LSE is stored as a natural log, ``+inf``
for a query row that sees no key, so that ``exp2(s - lse)`` is exactly 0 there.

An optional key padding mask ``KPM [B, Sk]`` (any strides, bytes, nonzero = keep), switched
on by the ``HAS_KEY_MASK`` constexpr, hides padded keys from every query in both loop stages;
their K/V rows are never read (loaded as 0), so padding may hold anything, and their ``dk``,
``dv`` rows are exactly 0. Without it the kernels compile to the unmasked code.

Packed variable-length input (``IS_VARLEN``, flash-attn's ``cu_seqlens`` convention): batch
``b`` is the tokens ``CU_Q[b] : CU_Q[b+1]`` of the packed queries and ``CU_K[b] : CU_K[b+1]``
of the keys, each sequence aligned bottom-right on its own; ``seqlen_q``/``seqlen_k`` are then
the longest lengths (the grid), and the batch strides are 0. ``LSE``/``DELTA`` are addressed
by ``stride_lb``, ``stride_lh`` plus the query row (its packed index when varlen).

Attention dropout (``HAS_DROPOUT``): the forward drops probabilities after the row sums
(the softmax normalises over every key) and scales the output by ``1 / (1 - dropout_p)``;
both backward kernels regenerate the keep-mask from the seed (``kernels/dropout.py``). Off,
the kernels compile to the plain code.

Certified tile skipping (``SKIP``, :mod:`kernels.alibi_skip`): the key tiles a bound proves
negligible are cut from the stages' loop bounds; ``COUNT`` stores each program's tile counts.

Batch and head offsets, and the row offset of every tile, are int64 (tensors past 2^31
elements); offsets inside a tile stay int32.
"""

import triton
import triton.language as tl

from .alibi_skip import SKIP_NONE, _count_stages, _reach, _row_norms, _skip_bounds
from .dropout import _dropout_keep

LOG2E = tl.constexpr(1.4426950408889634)  # compiled kernels reject plain float globals


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``a @ b`` accumulated in fp32. The interpreter's bf16 dot multiplies raw bits: upcast."""
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _narrow(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 ``x`` to ``dtype``, rounding to nearest even (the interpreter truncates to bf16)."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``acc + a @ b`` in fp32, accumulated in place by the tensor cores (no second tile)."""
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


# Unmasked tiles lie on one side of the diagonal: ``sign = +1`` where every key precedes every
# query (``j <= i'``), -1 where every key follows (symmetric ALiBi only); the bias is then
# ``sign * slope * (j - i')``. It is split into a column term relative to the tile's start,
# small and loop-invariant, folded into the score FMA (``qk * qk_scale + col``), and a row term
# ``sign * slope * (tile start - i')`` that only moves the row's max or log-sum-exp: one fp32
# instruction per score over bias-free attention (and one per row and tile, the row term
# entering and leaving the max's frame), and the operands that decide the weights
# stay small however long the sequence. Masked tiles (the diagonal band, ragged ends) compute
# the distance per score. Pointers advance per tile: a 64-bit offset formed inside the loop
# sits between a wgmma and its wait, and ptxas then serialises every wgmma (warning C7515).


@triton.jit
def _stages(start, size_q, size_k, shift, seqlen, BLOCK: tl.constexpr,
            IS_CAUSAL: tl.constexpr, OVER_QUERIES: tl.constexpr):
    """Tile boundaries ``(a, b, c)`` of a loop over ``[0, seqlen)`` in steps of ``BLOCK``;
    ``shift = Sk - Sq + pos_offset`` (any sign, any size).

    Over keys, for the queries ``start + [0, size_q)`` (forward, dq): keys ``[0, a)`` precede
    every query (sign +1), ``[a, b)`` is the diagonal band and, causal, the last key (masked),
    ``[b, c)`` follow every query (sign -1, symmetric only), ``[c, seqlen)`` is the ragged end
    (masked). Over queries (``OVER_QUERIES``, dkdv), for the keys ``start + [0, size_k)``:
    queries ``[0, a)`` precede every key (sign -1, symmetric; causal: they see none),
    ``[a, b)`` is the band (masked), ``[b, seqlen)`` follow every key (sign +1); ``c = seqlen``.
    """
    if OVER_QUERIES:
        b = tl.minimum(tl.cdiv(tl.maximum(start + size_k - 1 - shift, 0), BLOCK) * BLOCK, seqlen)
        if IS_CAUSAL:
            a = tl.maximum(start - shift, 0) // BLOCK * BLOCK
        else:
            a = tl.maximum(start - shift + 1, 0) // BLOCK * BLOCK
        a = tl.minimum(a, b)
        c = seqlen
    else:
        a = tl.minimum(tl.maximum(start + shift + 1, 0), seqlen) // BLOCK * BLOCK
        if IS_CAUSAL:
            b = tl.minimum(tl.maximum(start + size_q + shift, 0), seqlen)
            c = b
        else:
            b = tl.minimum(tl.cdiv(tl.maximum(start + size_q + shift, 0), BLOCK) * BLOCK, seqlen)
            c = tl.maximum(seqlen // BLOCK * BLOCK, b)
    return a, b, c


@triton.jit
def _by_lane(x, BLOCK_N: tl.constexpr):
    """``x [BLOCK_M, BLOCK_N]`` as ``[BLOCK_M, BLOCK_N / 8, 4, 2]``: a tensor-core tile's row is
    held by a quad of lanes, lane ``t`` (axis 2) holding the columns ``8k + 2t + {0, 1}``."""
    tl.static_assert(BLOCK_N % 8 == 0)
    return x.reshape(x.shape[0], BLOCK_N // 8, 4, 2)


@triton.jit
def _quad_sums(x, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, 4]`` partial row sums of ``x [BLOCK_M, BLOCK_N]``, one per lane of the quad
    (:func:`_by_lane`), so no lane exchange; the lanes are summed once, after the loop (as
    flash-attn does)."""
    return tl.sum(tl.sum(_by_lane(x, BLOCK_N), 3), 1)


@triton.jit
def _quad_max(x, BLOCK_N: tl.constexpr):
    """Row max of ``x [BLOCK_M, BLOCK_N]`` through :func:`_by_lane`'s view: the row terms then
    share the partial sums' layout (from ``tl.max(x, 1)``, Triton moves the sums between
    lanes every tile to meet them)."""
    return tl.max(tl.max(tl.max(_by_lane(x, BLOCK_N), 3), 1), 1)


@triton.jit
def _tma_rows(desc, b, h, row, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
              USE_TMA: tl.constexpr):
    """Rows ``row + [0, BLOCK)`` of sequence ``(b, h)`` as ``[BLOCK, BLOCK_D]`` from a tensor
    descriptor in memory order: ``[B, H, S, D]`` (``USE_TMA == 1``) or ``[B, S, H, D]`` (2).
    Rows past ``S`` and columns past ``D`` read 0."""
    if USE_TMA == 2:
        return desc.load([b, row, h, 0]).reshape(BLOCK, BLOCK_D)
    return desc.load([b, h, row, 0]).reshape(BLOCK, BLOCK_D)


@triton.jit
def _load_keep(KPM, stride_mn, cols, seqlen_k):
    """Key padding mask for key positions ``cols`` (int1); keys past ``Sk`` read as padded."""
    keep = tl.load(KPM + cols.to(tl.int64) * stride_mn, mask=cols < seqlen_k, other=0)
    return keep != 0


@triton.jit
def _sequence(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """``(q0, k0, seqlen_q, seqlen_k)``: first packed row and lengths of batch ``off_b``."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + off_b).to(tl.int64)
        k0 = tl.load(CU_K + off_b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + off_b + 1) - q0).to(tl.int32)
        seqlen_k = (tl.load(CU_K + off_b + 1) - k0).to(tl.int32)
    else:
        q0 = 0
        k0 = 0
    return q0, k0, seqlen_q, seqlen_k


@triton.jit
def _at(P, row, stride):
    """``P`` moved to ``row``, the offset in int64."""
    return P + tl.cast(row, tl.int64) * stride


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------


@triton.jit
def _alibi_attn_fwd_inner(acc, l_i, m_i, K, V, KPM, K_DESC, V_DESC, tma_b, tma_h, q, offs_kT,
                          offs_v, stride_kn, stride_vn, stride_mn,
                          pos_q, col, qk_scale, slope, seqlen_k, lo, hi,
                          seed, bh, rows, dropout_p,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, MASK: tl.constexpr, SIGN: tl.constexpr,
                          HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          USE_TMA: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Online softmax over the key tiles ``[lo, hi)``, masked (``MASK``) or on the ``SIGN``
    side of every query row. ``K``, ``V``, ``KPM`` point at tile ``lo`` and come back past
    ``hi``; ``offs_*`` (int32) address a tile from there. ``USE_TMA``: K and V tiles come
    from the descriptors instead (:func:`_tma_rows`); rows past ``Sk`` read 0.
    ``pos_q``: the rows' ``i'`` (int32), ``col = slope * [0, BLOCK_N)``. With ``HAS_DROPOUT``,
    the keep-mask of ``(bh, rows, keys)`` under ``seed`` drops probabilities from the output
    (not from the row sums)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = tl.arange(0, BLOCK_D) < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        if MASK:
            kv_mask = offs_n < seqlen_k - start_n
        else:
            kv_mask = offs_n < BLOCK_N
        if HAS_KEY_MASK:  # padded keys are never read
            keep = tl.load(KPM + offs_n * stride_mn, mask=offs_n < seqlen_k - start_n, other=0)
            kv_mask = kv_mask & (keep != 0)
        if USE_TMA:
            kT = tl.trans(_tma_rows(K_DESC, tma_b, tma_h, start_n, BLOCK_N, BLOCK_D, USE_TMA))
            v = _tma_rows(V_DESC, tma_b, tma_h, start_n, BLOCK_N, BLOCK_D, USE_TMA)
        else:
            kT = tl.load(K + offs_kT, mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
            v = tl.load(V + offs_v, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        qk = _dot(q, kT, INPUT_PRECISION, INTERPRETER)
        # -- scores s = qk * qk_scale + bias - row: the row term moves m only
        i_rel = pos_q - start_n  # i' relative to the tile
        if MASK and not IS_CAUSAL:  # the band: |i' - j| per score, the side from positions
            x = col[None, :] - (slope * i_rel.to(tl.float32))[:, None]  # slope * (j - i')
            s = qk * qk_scale + tl.where(offs_n[None, :] <= i_rel[:, None], x, -x)
            row = tl.zeros_like(m_i)
        else:
            s = qk * qk_scale + (SIGN * col)[None, :]
            row = (SIGN * slope) * i_rel.to(tl.float32)
        if MASK and IS_CAUSAL:
            visible = kv_mask[None, :] & (offs_n[None, :] <= i_rel[:, None])
            s = tl.where(visible, s, float("-inf"))
        elif MASK or HAS_KEY_MASK:
            s = tl.where(kv_mask[None, :], s, float("-inf"))
        # -- update m_i, l_i and the output accumulator; a row that has seen no key yet
        # keeps m = -inf, and is then shifted by 0
        m_new = tl.maximum(m_i, _quad_max(s, BLOCK_N) - row)
        if MASK or HAS_KEY_MASK:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(s - (m_safe + row)[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha[:, None] + _quad_sums(p, BLOCK_N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], (start_n + offs_n)[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = _mma(_narrow(p, v.dtype, INTERPRETER), v, acc * alpha[:, None], INPUT_PRECISION,
                   INTERPRETER)
        m_i = m_new
        K += BLOCK_N * stride_kn
        V += BLOCK_N * stride_vn
        KPM += BLOCK_N * stride_mn
    return acc, l_i, m_i, K, V, KPM


@triton.jit
def alibi_fwd_kernel(Q, K, V, O, LSE, SLOPES, KPM, CU_Q, CU_K, SEED, KMAX, COUNTS,
                    K_DESC, V_DESC, sm_scale, dropout_p, skip_log2,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_lb, stride_lh, stride_sb, stride_mb, stride_mn, stride_xb,
                    group, seqlen_q, seqlen_k, pos_offset,
                    SQ_BUCKET, SK_BUCKET,  # autotune key only
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, SKIP: tl.constexpr,
                    COUNT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``. Writes ``O [B, Hq, Sq, D]`` and ``LSE [B, Hq, Sq]``.

    ``USE_TMA`` (dense, no key mask; 1 or 2, see :func:`_tma_rows`): ``K_DESC``/``V_DESC`` are
    tensor descriptors of K and V in memory order, blocks of ``BLOCK_N`` rows: TMA loads.
    ``SKIP``: certified tile skipping (:func:`_reach`) against ``KMAX [B, Hk]`` (batch stride
    ``stride_xb``), the skipped mass of a row at most ``2^skip_log2`` of its largest term per
    side; the band and the tile before it run first, their running max the bound ``M_i``.
    ``COUNT``: the program stores ``(tiles computed, tiles of the dense kernel)`` as int32 at
    ``COUNTS + 2 * (program's linear index)``.
    """
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q0, k0, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:  # a block past the end of a shorter sequence
            return
    off_kvh = off_h // group
    row0 = q0 + tl.cast(start_m, tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
    O += off_b * stride_ob + off_h * stride_oh + row0 * stride_om
    K += off_b * stride_kb + off_kvh * stride_kh + k0 * stride_kn
    V += off_b * stride_vb + off_kvh * stride_vh + k0 * stride_vn
    KPM += off_b * stride_mb
    LSE += off_b * stride_lb + off_h * stride_lh + q0
    slope = tl.load(SLOPES + off_b * stride_sb + off_h) * LOG2E
    qk_scale = sm_scale * LOG2E

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=io_mask,
                other=0.0)
    a_norm = 0.0
    if SKIP:  # here, before the accumulator lives: q in fp32 takes as many registers
        a_norm = qk_scale * _row_norms(q) * tl.load(KMAX + off_b * stride_xb + off_kvh)

    shift = seqlen_k - seqlen_q + pos_offset
    pos_q = offs_m + shift  # i', the row's key position
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 4], tl.float32)  # the row sums, by lane (_quad_sums)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a, b, c = _stages(start_m, BLOCK_M, BLOCK_N, shift, seqlen_k, BLOCK_N, IS_CAUSAL, False)
    offs_n = tl.arange(0, BLOCK_N)
    offs_kT = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    offs_v = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    col = slope * offs_n.to(tl.float32)
    seed, bh = 0, off_b * tl.num_programs(1) + off_h  # dropout: the Philox key and counter
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    tma_b, tma_h = tl.program_id(2), tl.program_id(1) // group  # TMA coordinates are int32
    # The diagonal band (causal: and the end) first, then keys before every row, then,
    # symmetric only, keys after every row and the ragged end. A stage runs under `if` only
    # when it has a tile: a loop that may run zero times leaves ptxas a path where the
    # accumulator is written by moves while a wgmma is in flight, and it serialises every
    # wgmma (C7515). Each stage's pointers are formed before its loop.
    if SKIP:  # the tile before the band too: it holds the first row's own key when a > 0
        a = tl.maximum(a - BLOCK_N, 0)
    if a < b:
        acc, l_i, m_i, _, _, _ = _alibi_attn_fwd_inner(
            acc, l_i, m_i, _at(K, a, stride_kn), _at(V, a, stride_vn),
            _at(KPM, a, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, offs_kT, offs_v,
            stride_kn, stride_vn, stride_mn, pos_q, col, qk_scale, slope, seqlen_k, a,
            b, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True,
            1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
    lo, hi, top = 0, c, seqlen_k
    if SKIP:  # the rows' running max bounds their largest term from below
        ok = offs_m < seqlen_q
        if IS_CAUSAL:
            ok = ok & (pos_q >= 0)  # rows that see no key
        reach = _reach(a_norm, m_i, slope, seqlen_k, skip_log2 - (0.0 if IS_CAUSAL else 1.0))
        lo, hi, top = _skip_bounds(tl.where(ok, pos_q - reach, SKIP_NONE),
                                   tl.where(ok, pos_q + reach, -SKIP_NONE), a, b, c, BLOCK_N,
                                   IS_CAUSAL)
    if lo < a:
        acc, l_i, m_i, _, _, _ = _alibi_attn_fwd_inner(
            acc, l_i, m_i, _at(K, lo, stride_kn), _at(V, lo, stride_vn),
            _at(KPM, lo, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, offs_kT, offs_v,
            stride_kn, stride_vn, stride_mn, pos_q, col, qk_scale, slope, seqlen_k, lo,
            a, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False,
            1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
    ragged = (c < seqlen_k) & (hi == c) & (top > c)  # symmetric: the ragged end runs
    if not IS_CAUSAL:
        if b < hi:
            acc, l_i, m_i, _, _, _ = _alibi_attn_fwd_inner(
                acc, l_i, m_i, _at(K, b, stride_kn), _at(V, b, stride_vn),
                _at(KPM, b, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, offs_kT, offs_v,
                stride_kn, stride_vn, stride_mn, pos_q, col, qk_scale, slope, seqlen_k, b,
                hi, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False,
                -1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
        if ragged:
            acc, l_i, m_i, _, _, _ = _alibi_attn_fwd_inner(
                acc, l_i, m_i, _at(K, c, stride_kn), _at(V, c, stride_vn),
                _at(KPM, c, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, offs_kT, offs_v,
                stride_kn, stride_vn, stride_mn, pos_q, col, qk_scale, slope, seqlen_k, c,
                seqlen_k, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True,
                1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
    if COUNT:
        _count_stages(COUNTS, lo, a, b, c, hi, ragged, seqlen_k, BLOCK_N, IS_CAUSAL)
    # a row with no visible key (causal, or all padded) has l = 0: output 0 and LSE +inf
    # (its gradients are then 0)
    l_i = tl.sum(l_i, 1)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)
    tl.store(O + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od,
             _narrow(out, O.dtype.element_ty, INTERPRETER), mask=io_mask)
