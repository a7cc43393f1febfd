"""ALiBi attention backward: ``delta`` preprocess, then ``dk``/``dv`` and ``dq`` kernels.

Conventions (bias, stages, masks, packing, dropout, int64 offsets) are those of
:mod:`kernels.alibi_attention`, whose forward writes the ``LSE`` these kernels read. The
preprocess also writes the ``dkdv`` kernel's per-query score terms (``LSE_BIAS``: the LSE in
log2 units plus the bias within a short period), so that its loop adds no per-query work: a
score costs four fp32 instructions, the bias one of them. The slope
gradient (``HAS_SLOPE_GRAD``) comes from the ``dq`` kernel: ``dm_h = -sum dS * dist`` over each
program's rows, one fp32 partial per program in ``DSLOPE [B, Hq, slots]``, summed by the
launcher (deterministic: no atomics).
"""

import triton
import triton.language as tl

from .alibi_attention import (
    LOG2E,
    _at,
    _dot,
    _load_keep,
    _mma,
    _narrow,
    _sequence,
    _stages,
    _tma_rows,
)
from .alibi_skip import SKIP_NONE, _count_stages, _reach, _row_norms, _skip_bounds, _store_counts
from .dropout import _dropout_keep


@triton.jit
def alibi_bwd_preprocess_kernel(O, DO, DELTA, LSE, LSE_BIAS, SLOPES, CU_Q, CU_K, Q, KMAX, LIM,
                               sm_scale, skip_log2,
                               stride_ob, stride_oh, stride_om, stride_od,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               stride_qb, stride_qh, stride_qm, stride_qd,
                               stride_lb, stride_lh, stride_sb, stride_cs, stride_xb, group,
                               seqlen_q, seqlen_k,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BIAS_PERIOD: tl.constexpr,
                               IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                               SKIP: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: ``DELTA [B, Hq, Sq] = rowsum(O * DO)`` in fp32, and
    the query terms of the ``dkdv`` kernel's scores, ready to subtract (log2 units, ``i`` the
    query's position in its sequence): ``LSE_BIAS[0] = lse * log2(e) + slope * (i mod
    BIAS_PERIOD)`` and, symmetric only, ``LSE_BIAS[1] = lse * log2(e) - slope * (i mod
    BIAS_PERIOD)``, ``stride_cs`` apart (``+inf`` where ``lse`` is). The period keeps them small
    (``slope * BIAS_PERIOD`` at most) and exact where the weights matter: the ``dkdv`` kernel
    puts the rest of the distance, ``i - i mod BIAS_PERIOD``, in its per-key row term.

    ``SKIP``: ``LIM`` (int32, laid out as ``LSE_BIAS``) receives each row's negligible keys
    for both backward kernels, the bound from the exact ``lse`` and ``skip_log2`` (which the
    launcher lowers for the slope gradient), in packed key coordinates (``k0 +``): ``LIM[0]``,
    keys ``<=`` it (``pos - reach``, at least ``-1``), and symmetric ``LIM[1]``, keys ``>=``
    it (``pos + reach``, at most ``Sk``); a row that sees no key finds every key negligible.
    The ``dq`` kernel reads them per row, the ``dkdv`` kernel per key through
    :func:`posenc_triton.alibi_skip.dkdv_query_bounds`."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q0, k0, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return
    row0 = q0 + tl.cast(start_m, tl.int64)
    O += off_b * stride_ob + off_h * stride_oh + row0 * stride_om
    DO += off_b * stride_dob + off_h * stride_doh + row0 * stride_dom
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_r < seqlen_q - start_m
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask,
                other=0.0)
    do = tl.load(DO + offs_r[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_l = off_b * stride_lb + off_h * stride_lh + row0 + offs_r
    tl.store(DELTA + offs_l, delta, mask=m_mask)
    lse2 = tl.load(LSE + offs_l, mask=m_mask, other=0.0) * LOG2E
    slope = tl.load(SLOPES + off_b * stride_sb + off_h) * LOG2E
    term = slope * ((start_m + offs_r) % BIAS_PERIOD).to(tl.float32)
    tl.store(LSE_BIAS + offs_l, lse2 + term, mask=m_mask)
    if not IS_CAUSAL:
        tl.store(LSE_BIAS + stride_cs + offs_l, lse2 - term, mask=m_mask)
    if SKIP:
        Q += off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
        q = tl.load(Q + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask,
                    other=0.0)
        kmax = tl.load(KMAX + off_b * stride_xb + off_h // group)
        a_norm = (sm_scale * LOG2E) * _row_norms(q) * kmax
        reach = _reach(a_norm, lse2, slope, seqlen_k, skip_log2 - (0.0 if IS_CAUSAL else 1.0))
        pos = start_m + offs_r + (seqlen_k - seqlen_q)
        none = lse2 == float("inf")
        after = tl.where(none, seqlen_k - 1, tl.minimum(tl.maximum(pos - reach, -1), seqlen_k - 1))
        tl.store(LIM + offs_l, (k0 + after).to(tl.int32), mask=m_mask)
        if not IS_CAUSAL:
            before = tl.where(none, 0, tl.minimum(tl.maximum(pos + reach, 0), seqlen_k))
            tl.store(LIM + stride_cs + offs_l, (k0 + before).to(tl.int32), mask=m_mask)


@triton.jit
def _alibi_attn_bwd_dkdv_inner(dk, dv, Q, DO, LSEB, DELTA, Q_DESC, DO_DESC, tma_b, tma_h,
                               k, v, keep, offs_qT, offs_do,
                               stride_qm, stride_dom, stride_cs, pos_k, qk_scale, slope,
                               seqlen_q, shift, lo, hi, seed, bh, dropout_p,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BIAS_PERIOD: tl.constexpr,
                               IS_CAUSAL: tl.constexpr, MASK: tl.constexpr, SIGN: tl.constexpr,
                               HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                               USE_TMA: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulate one query head's query tiles ``[lo, hi)`` into ``dk``, ``dv [BLOCK_N,
    BLOCK_D]``: masked (``MASK``) or on the ``SIGN`` side of every key (+1: after).

    Works transposed (keys along rows). ``Q``, ``DO``, ``LSEB``, ``DELTA`` point at tile ``lo``
    and come back past ``hi``; ``LSEB`` is the preprocess's ``LSE_BIAS``. ``USE_TMA``: Q and
    dO tiles come from the descriptors instead (``_tma_rows``). ``pos_k``:
    the keys' positions (int32). Query rows past ``Sq`` load ``+inf`` there, so their
    probabilities are 0; key rows past ``Sk`` only touch their own rows, which are not
    stored. Padded keys (``keep`` false, with ``HAS_KEY_MASK``) get probability 0:
    ``dk = dv = 0``.
    """
    tl.static_assert(BIAS_PERIOD % BLOCK_M == 0)  # a tile's queries share i - i mod period
    offs_m = tl.arange(0, BLOCK_M)
    d_mask = tl.arange(0, BLOCK_D) < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        m_mask = offs_m < seqlen_q - start_m
        if USE_TMA:  # rows past Sq read 0
            qT = tl.trans(_tma_rows(Q_DESC, tma_b, tma_h, start_m, BLOCK_M, BLOCK_D, USE_TMA))
            do = _tma_rows(DO_DESC, tma_b, tma_h, start_m, BLOCK_M, BLOCK_D, USE_TMA)
        else:
            qT = tl.load(Q + offs_qT, mask=d_mask[:, None] & m_mask[None, :], other=0.0)
            do = tl.load(DO + offs_do, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if MASK and not IS_CAUSAL:
            c_after = tl.load(LSEB + offs_m, mask=m_mask, other=float("inf"))
            c_before = tl.load(LSEB + stride_cs + offs_m, mask=m_mask, other=float("inf"))
        elif SIGN < 0:
            c = tl.load(LSEB + stride_cs + offs_m, mask=m_mask, other=float("inf"))
        else:
            c = tl.load(LSEB + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_mask, other=0.0)
        qkT = _dot(k, qT, INPUT_PRECISION, INTERPRETER)
        # -- s - lse = qk * qk_scale - c + slope * (k - q'_0): the query's column term c
        # (preprocess) and the key's distance to q'_0, the aligned start of the tile's period,
        # whose product with the slope the second FMA forms exactly (no per-key instruction)
        k_rel = pos_k - (start_m + shift)
        dist = (pos_k - (start_m - start_m % BIAS_PERIOD + shift)).to(tl.float32)
        if MASK and not IS_CAUSAL:  # the band: the side of each score from positions
            r = slope * dist
            before = k_rel[:, None] <= offs_m[None, :]
            sT = qkT * qk_scale + tl.where(before, r[:, None] - c_after[None, :],
                                           -r[:, None] - c_before[None, :])
            pT = tl.math.exp2(sT)
        else:
            pT = tl.math.exp2(tl.fma(dist[:, None], SIGN * slope,
                                     tl.fma(qkT, qk_scale, -c[None, :])))
        if MASK and IS_CAUSAL:
            pT = tl.where(k_rel[:, None] <= offs_m[None, :], pT, 0.0)
        if HAS_KEY_MASK:
            pT = tl.where(keep[:, None], pT, 0.0)
        # -- dv += p^T do (dropout: the kept probabilities; dv is scaled once, at the end)
        if HAS_DROPOUT:
            keepT = _dropout_keep(seed, bh, (start_m + offs_m)[None, :], pos_k[:, None],
                                  dropout_p)
            dv = _mma(_narrow(tl.where(keepT, pT, 0.0), do.dtype, INTERPRETER), do, dv,
                      INPUT_PRECISION, INTERPRETER)
        else:
            dv = _mma(_narrow(pT, do.dtype, INTERPRETER), do, dv, INPUT_PRECISION, INTERPRETER)
        # -- dk += ds^T q, ds = p * (dp - delta)
        dpT = _dot(v, tl.trans(do), INPUT_PRECISION, INTERPRETER)
        if HAS_DROPOUT:  # dp of the kept probabilities (one FMA); delta = rowsum(o * do) is
            dsT = pT * tl.where(keepT, tl.fma(dpT, 1.0 / (1.0 - dropout_p), -delta[None, :]),
                                -delta[None, :])
        else:
            dsT = pT * (dpT - delta[None, :])
        dk = _mma(_narrow(dsT, qT.dtype, INTERPRETER), tl.trans(qT), dk, INPUT_PRECISION,
                  INTERPRETER)
        Q += BLOCK_M * stride_qm
        DO += BLOCK_M * stride_dom
        LSEB += BLOCK_M
        DELTA += BLOCK_M
    return dk, dv, Q, DO, LSEB, DELTA


@triton.jit
def alibi_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE_BIAS, DELTA, SLOPES, KPM, CU_Q, CU_K, SEED,
                         BOUNDS, COUNTS, Q_DESC, DO_DESC, sm_scale, dropout_p,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                         stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                         stride_lb, stride_lh, stride_sb, stride_mb, stride_mn, stride_cs,
                         stride_bs, stride_bb, stride_bh,
                         group, seqlen_q, seqlen_k, pos_offset,
                         SQ_BUCKET, SK_BUCKET,  # autotune key only
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_PERIOD: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                         IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         USE_TMA: tl.constexpr, SKIP: tl.constexpr, COUNT: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sk, BLOCK_N), Hk, B)``: ``DK``, ``DV [B, Hk, Sk, D]``; ``LSE_BIAS`` and
    ``stride_cs`` as the preprocess wrote them, with the same ``BIAS_PERIOD``.

    Each program sums over the ``group`` query heads that share its KV head in registers and
    stores once: GQA gradients without atomics, deterministic. ``USE_TMA`` (dense, no key
    mask): ``Q_DESC``/``DO_DESC`` describe Q and dO in memory order, blocks of ``BLOCK_M``
    rows. ``SKIP``: ``BOUNDS [1 or 2, B, Hq, keys]`` (strides ``stride_bs, stride_bb,
    stride_bh``; keys and rows in packed coordinates) give, per key, the query rows that
    find it negligible (:func:`posenc_triton.alibi_skip.dkdv_query_bounds`): rows from
    ``[0][last key]`` on and, symmetric, before ``[1][first key]`` are skipped. ``COUNT``:
    query tiles, over the group's heads, as the forward's.
    """
    start_n = tl.program_id(0) * BLOCK_N
    off_kvh = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q0, k0, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if start_n >= seqlen_k:
            return
    row0 = k0 + tl.cast(start_n, tl.int64)
    K += off_b * stride_kb + off_kvh * stride_kh + row0 * stride_kn
    V += off_b * stride_vb + off_kvh * stride_vh + row0 * stride_vn
    DK += off_b * stride_dkb + off_kvh * stride_dkh + row0 * stride_dkn
    DV += off_b * stride_dvb + off_kvh * stride_dvh + row0 * stride_dvn
    qk_scale = sm_scale * LOG2E

    offs_r = tl.arange(0, BLOCK_N)
    pos_k = start_n + offs_r
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (pos_k < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    if HAS_KEY_MASK:  # padded keys: never read, zero gradients
        keep = _load_keep(KPM + off_b * stride_mb, stride_mn, pos_k, seqlen_k)
        kv_mask = io_mask & keep[:, None]
    else:
        keep = pos_k < seqlen_k
        kv_mask = io_mask
    k = tl.load(K + offs_r[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                other=0.0)
    v = tl.load(V + offs_r[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                other=0.0)

    # query tiles before every key (symmetric only; causal: they see none), the band, then
    # the tiles after every key
    shift = seqlen_k - seqlen_q + pos_offset
    a, b, _ = _stages(start_n, BLOCK_M, BLOCK_N, shift, seqlen_q, BLOCK_M, IS_CAUSAL, True)
    end = seqlen_q
    if HAS_KEY_MASK:  # a block of padded keys only: skip the loops, store zeros
        end = tl.where(tl.max(keep.to(tl.int32), 0) > 0, seqlen_q, 0)
        a = tl.minimum(a, end)
        b = tl.minimum(b, end)
    if IS_CAUSAL:
        lo = a
    else:
        lo = 0
    offs_qT = offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd
    offs_do = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    done = 0
    dense = 0
    for g in range(group):
        off_h = off_kvh * group + g
        tma_b, tma_h = tl.program_id(2), tl.program_id(1) * group + g  # int32
        bh = off_b * (tl.num_programs(1) * group) + off_h
        slope = tl.load(SLOPES + off_b * stride_sb + off_h) * LOG2E
        lo_g, end_g = lo, end
        if SKIP:
            bounds = BOUNDS + off_b * stride_bb + off_h * stride_bh + k0
            last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
            r_end = (tl.load(bounds + last) - q0).to(tl.int32)
            end_g = tl.minimum(tl.maximum(tl.cdiv(r_end, BLOCK_M) * BLOCK_M, b), end)
            if not IS_CAUSAL:
                r_start = (tl.load(bounds + stride_bs + start_n) - q0).to(tl.int32)
                lo_g = tl.minimum(tl.maximum(r_start, 0) // BLOCK_M * BLOCK_M, a)
        if COUNT:
            band = tl.cdiv(b - a, BLOCK_M)
            done += (a - lo_g) // BLOCK_M + band + tl.cdiv(end_g - b, BLOCK_M)
            dense += (a - lo) // BLOCK_M + band + tl.cdiv(end - b, BLOCK_M)
        row_lo = q0 + tl.cast(lo_g, tl.int64)
        Qh = Q + off_b * stride_qb + off_h * stride_qh + row_lo * stride_qm
        DOh = DO + off_b * stride_dob + off_h * stride_doh + row_lo * stride_dom
        LSEh = LSE_BIAS + off_b * stride_lb + off_h * stride_lh + row_lo
        DELTAh = DELTA + off_b * stride_lb + off_h * stride_lh + row_lo
        # each stage under `if`: see the forward
        if not IS_CAUSAL:
            if lo_g < a:
                dk, dv, Qh, DOh, LSEh, DELTAh = _alibi_attn_bwd_dkdv_inner(
                    dk, dv, Qh, DOh, LSEh, DELTAh, Q_DESC, DO_DESC, tma_b, tma_h, k, v, keep,
                    offs_qT, offs_do, stride_qm, stride_dom, stride_cs, pos_k, qk_scale, slope,
                    seqlen_q, shift, lo_g, a, seed, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M,
                    BIAS_PERIOD, IS_CAUSAL, False, -1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA,
                    INPUT_PRECISION, INTERPRETER)
        if a < b:
            dk, dv, Qh, DOh, LSEh, DELTAh = _alibi_attn_bwd_dkdv_inner(
                dk, dv, Qh, DOh, LSEh, DELTAh, Q_DESC, DO_DESC, tma_b, tma_h, k, v, keep, offs_qT,
                offs_do, stride_qm, stride_dom, stride_cs, pos_k, qk_scale, slope, seqlen_q, shift,
                a, b, seed, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BIAS_PERIOD, IS_CAUSAL, True,
                1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
        if b < end_g:
            dk, dv, Qh, DOh, LSEh, DELTAh = _alibi_attn_bwd_dkdv_inner(
                dk, dv, Qh, DOh, LSEh, DELTAh, Q_DESC, DO_DESC, tma_b, tma_h, k, v, keep, offs_qT,
                offs_do, stride_qm, stride_dom, stride_cs, pos_k, qk_scale, slope, seqlen_q, shift,
                b, end_g, seed, bh, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, BIAS_PERIOD, IS_CAUSAL,
                False, 1, HAS_KEY_MASK, HAS_DROPOUT, USE_TMA, INPUT_PRECISION, INTERPRETER)
    if COUNT:
        _store_counts(COUNTS, done, dense)
    dk *= sm_scale
    if HAS_DROPOUT:
        dv *= 1.0 / (1.0 - dropout_p)
    tl.store(DK + offs_r[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _narrow(dk, DK.dtype.element_ty, INTERPRETER), mask=io_mask)
    tl.store(DV + offs_r[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             _narrow(dv, DV.dtype.element_ty, INTERPRETER), mask=io_mask)


@triton.jit
def _row_moments(x, colf, BLOCK_N: tl.constexpr):
    """``(sum_j x[:, j], sum_j x[:, j] * j)`` of ``x [BLOCK_M, BLOCK_N]``, ``colf = [0,
    BLOCK_N)`` in fp32: by column pairs ``(j, j + 1)``, ``a * j + b * (j + 1) = (a + b) * j + b``,
    so both sums cost two instructions per element (a pair's columns share a thread)."""
    a, b = x.reshape(x.shape[0], BLOCK_N // 2, 2).split()
    j, _ = colf.reshape(BLOCK_N // 2, 2).split()
    pair = a + b
    return tl.sum(pair, 1), tl.sum(tl.fma(pair, j[None, :], b), 1)


@triton.jit
def _alibi_attn_bwd_dq_inner(dq, p_dist_dp, p_dist, p_dp, K, V, KPM, K_DESC, V_DESC, tma_b,
                             tma_h, q, do, lse2, delta,
                             offs_kT, offs_vT, stride_kn, stride_vn, stride_mn,
                             pos_q, colf, qk_scale, slope, seqlen_k, lo, hi,
                             seed, bh, rows, dropout_p,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                             MASK: tl.constexpr, SIGN: tl.constexpr,
                             HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                             HAS_SLOPE_GRAD: tl.constexpr, USE_TMA: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``dq`` over the key tiles ``[lo, hi)``, as the forward's stages (same arguments, but
    ``colf = [0, BLOCK_N)`` in fp32: the column term ``slope * colf`` is fused into the score's
    second FMA, exact); ``lse2`` is the LSE in log2 units. ``HAS_SLOPE_GRAD`` adds the row
    sums ``[BLOCK_M]`` of ``p * dist * dp``, ``p * dist`` and ``p * dp`` (see
    :func:`alibi_bwd_dq_kernel`)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = tl.arange(0, BLOCK_D) < HEAD_DIM
    # With registers to spare (TMA loads hold no pointers; no dropout mask), the scores'
    # per-tile-invariant terms are held across the loop, z = SIGN * slope * j - lse: then the
    # bias costs no instruction per row, the tile's distance riding the second FMA's product.
    HOLD_Z: tl.constexpr = USE_TMA and not HAS_DROPOUT
    z = tl.fma(colf[None, :], SIGN * slope, -lse2[:, None]) if HOLD_Z else 0.0
    for start_n in range(lo, hi, BLOCK_N):
        if MASK:
            kv_mask = offs_n < seqlen_k - start_n
        else:
            kv_mask = offs_n < BLOCK_N
        if HAS_KEY_MASK:
            keep = tl.load(KPM + offs_n * stride_mn, mask=offs_n < seqlen_k - start_n, other=0)
            kv_mask = kv_mask & (keep != 0)
        if USE_TMA:  # rows past Sk read 0
            kT = tl.trans(_tma_rows(K_DESC, tma_b, tma_h, start_n, BLOCK_N, BLOCK_D, USE_TMA))
            vT = tl.trans(_tma_rows(V_DESC, tma_b, tma_h, start_n, BLOCK_N, BLOCK_D, USE_TMA))
        else:
            kT = tl.load(K + offs_kT, mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
            vT = tl.load(V + offs_vT, mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
        qk = _dot(q, kT, INPUT_PRECISION, INTERPRETER)
        i_rel = pos_q - start_n
        i_relf = i_rel.to(tl.float32)
        if MASK and not IS_CAUSAL:
            x = tl.fma(colf[None, :], slope, -(slope * i_relf)[:, None])  # slope * (j - i')
            s = qk * qk_scale + tl.where(offs_n[None, :] <= i_rel[:, None], x, -x)
            p = tl.math.exp2(s - lse2[:, None])
        elif HOLD_Z:  # qk * qk_scale + z, then - SIGN * slope * i_rel, the product exact
            p = tl.math.exp2(tl.fma(i_relf[:, None], -SIGN * slope, tl.fma(qk, qk_scale, z)))
        else:  # qk * qk_scale - row, then + SIGN * slope * j: one instruction per row
            row = tl.fma(i_relf, SIGN * slope, lse2)
            p = tl.math.exp2(tl.fma(colf[None, :], SIGN * slope,
                                    tl.fma(qk, qk_scale, -row[:, None])))
        # keys past Sk and padded keys too: their p could overflow, and inf * (k = 0) is NaN
        if MASK and IS_CAUSAL:
            p = tl.where(kv_mask[None, :] & (offs_n[None, :] <= i_rel[:, None]), p, 0.0)
        elif MASK or HAS_KEY_MASK:
            p = tl.where(kv_mask[None, :], p, 0.0)
        # -- dq += ds k, ds = p * (dp - delta)
        dp = _dot(do, vT, INPUT_PRECISION, INTERPRETER)
        if HAS_DROPOUT:  # dp of the kept probabilities; delta = rowsum(o * do) already is
            keep = _dropout_keep(seed, bh, rows[:, None], (start_n + offs_n)[None, :], dropout_p)
        if HAS_SLOPE_GRAD:  # p is 0 for hidden keys: they add nothing
            if HAS_DROPOUT:
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            pdp = p * dp
            ds = tl.fma(p, -delta[:, None], pdp)  # p * (dp - delta), pdp reused below
            if MASK and not IS_CAUSAL:  # the band: |i' - j| per score
                pd = p * tl.abs(i_relf[:, None] - colf[None, :])
                p_dist_dp += tl.sum(pd * dp, 1)
                p_dist += tl.sum(pd, 1)
                p_dp += tl.sum(pdp, 1)
            else:  # dist = SIGN * (i' - j): per tile, the row sums of pdp, pdp * j, p, p * j
                s_pdp, j_pdp = _row_moments(pdp, colf, BLOCK_N)
                s_p, j_p = _row_moments(p, colf, BLOCK_N)
                p_dist_dp += SIGN * (i_relf * s_pdp - j_pdp)
                p_dist += SIGN * (i_relf * s_p - j_p)
                p_dp += s_pdp
        elif HAS_DROPOUT:  # one FMA: dp / (1 - dropout_p) - delta; -delta where dropped
            ds = p * tl.where(keep, tl.fma(dp, 1.0 / (1.0 - dropout_p), -delta[:, None]),
                              -delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        dq = _mma(_narrow(ds, kT.dtype, INTERPRETER), tl.trans(kT), dq, INPUT_PRECISION,
                  INTERPRETER)
        K += BLOCK_N * stride_kn
        V += BLOCK_N * stride_vn
        KPM += BLOCK_N * stride_mn
    return dq, p_dist_dp, p_dist, p_dp, K, V, KPM


@triton.jit
def alibi_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SLOPES, KPM, CU_Q, CU_K, SEED, DSLOPE,
                       LIM, COUNTS, K_DESC, V_DESC, sm_scale, dropout_p,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                       stride_lb, stride_lh, stride_sb, stride_mb, stride_mn,
                       stride_dsb, stride_dsh, stride_cs,
                       group, seqlen_q, seqlen_k, pos_offset,
                       SQ_BUCKET, SK_BUCKET,  # autotune key only
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, HAS_SLOPE_GRAD: tl.constexpr,
                       PARTIAL_ROWS: tl.constexpr, USE_TMA: tl.constexpr, SKIP: tl.constexpr,
                       COUNT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: ``DQ [B, Hq, Sq, D]``, and with ``HAS_SLOPE_GRAD``
    this program's partial slope gradient ``DSLOPE[b, h, program_id(0)]``. ``USE_TMA`` (dense,
    no key mask): ``K_DESC``/``V_DESC`` as the forward's. ``PARTIAL_ROWS``: the keys are part
    of each row's (a context-parallel chunk pair), so the slope gradient's ``delta_i`` is
    ``DELTA``, the whole row's, not this call's ``rowsum(p * dp)``. ``SKIP``: the key tiles
    every row of the program finds negligible by the preprocess's ``LIM`` (the bound from
    the exact log-sum-exp, shared with the ``dkdv`` kernel) are skipped. ``COUNT`` as the
    forward's."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q0, k0, seqlen_q, seqlen_k = _sequence(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return
    off_kvh = off_h // group
    row0 = q0 + tl.cast(start_m, tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
    DO += off_b * stride_dob + off_h * stride_doh + row0 * stride_dom
    DQ += off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqm
    K += off_b * stride_kb + off_kvh * stride_kh + k0 * stride_kn
    V += off_b * stride_vb + off_kvh * stride_vh + k0 * stride_vn
    KPM += off_b * stride_mb
    LSE += off_b * stride_lb + off_h * stride_lh + q0
    DELTA += off_b * stride_lb + off_h * stride_lh + q0
    slope = tl.load(SLOPES + off_b * stride_sb + off_h) * LOG2E
    qk_scale = sm_scale * LOG2E

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen_q
    io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=io_mask,
                other=0.0)
    do = tl.load(DO + offs_r[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=io_mask, other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=m_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=m_mask, other=0.0)

    shift = seqlen_k - seqlen_q + pos_offset
    pos_q = offs_m + shift
    colf = offs_n.to(tl.float32)
    offs_kT = offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    offs_vT = offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_dist_dp = tl.zeros([BLOCK_M], tl.float32)
    p_dist = tl.zeros([BLOCK_M], tl.float32)
    p_dp = tl.zeros([BLOCK_M], tl.float32)
    seed, bh = 0, off_b * tl.num_programs(1) + off_h
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    tma_b, tma_h = tl.program_id(2), tl.program_id(1) // group  # TMA coordinates are int32
    a, b, c = _stages(start_m, BLOCK_M, BLOCK_N, shift, seqlen_k, BLOCK_N, IS_CAUSAL, False)
    lo, hi, top = 0, c, seqlen_k
    if SKIP:  # each row's negligible keys, from the preprocess (rows past Sq: none)
        lims = LIM + off_b * stride_lb + off_h * stride_lh + q0 + offs_m
        below = (tl.load(lims, mask=m_mask, other=SKIP_NONE) - k0).to(tl.int32)
        above = 0
        if not IS_CAUSAL:
            above = tl.load(lims + stride_cs, mask=m_mask, other=-SKIP_NONE)
            above = (above - k0).to(tl.int32)
        lo, hi, top = _skip_bounds(below, above, a, b, c, BLOCK_N, IS_CAUSAL)
    # the forward's stages, each under `if`
    if lo < a:
        dq, p_dist_dp, p_dist, p_dp, _, _, _ = _alibi_attn_bwd_dq_inner(
            dq, p_dist_dp, p_dist, p_dp, _at(K, lo, stride_kn), _at(V, lo, stride_vn),
            _at(KPM, lo, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, do, lse2, delta,
            offs_kT, offs_vT, stride_kn, stride_vn, stride_mn, pos_q, colf, qk_scale,
            slope, seqlen_k, lo, a, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D,
            BLOCK_N, IS_CAUSAL, False, 1, HAS_KEY_MASK, HAS_DROPOUT, HAS_SLOPE_GRAD,
            USE_TMA, INPUT_PRECISION, INTERPRETER)
    if a < b:
        dq, p_dist_dp, p_dist, p_dp, _, _, _ = _alibi_attn_bwd_dq_inner(
            dq, p_dist_dp, p_dist, p_dp, _at(K, a, stride_kn), _at(V, a, stride_vn),
            _at(KPM, a, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, do, lse2, delta,
            offs_kT, offs_vT, stride_kn, stride_vn, stride_mn, pos_q, colf, qk_scale,
            slope, seqlen_k, a, b, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D,
            BLOCK_N, IS_CAUSAL, True, 1, HAS_KEY_MASK, HAS_DROPOUT, HAS_SLOPE_GRAD,
            USE_TMA, INPUT_PRECISION, INTERPRETER)
    ragged = (c < seqlen_k) & (hi == c) & (top > c)  # symmetric: the ragged end runs
    if not IS_CAUSAL:
        if b < hi:
            dq, p_dist_dp, p_dist, p_dp, _, _, _ = _alibi_attn_bwd_dq_inner(
                dq, p_dist_dp, p_dist, p_dp, _at(K, b, stride_kn), _at(V, b, stride_vn),
                _at(KPM, b, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, do, lse2, delta,
                offs_kT, offs_vT, stride_kn, stride_vn, stride_mn, pos_q, colf, qk_scale,
                slope, seqlen_k, b, hi, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D,
                BLOCK_N, IS_CAUSAL, False, -1, HAS_KEY_MASK, HAS_DROPOUT, HAS_SLOPE_GRAD,
                USE_TMA, INPUT_PRECISION, INTERPRETER)
        if ragged:
            dq, p_dist_dp, p_dist, p_dp, _, _, _ = _alibi_attn_bwd_dq_inner(
                dq, p_dist_dp, p_dist, p_dp, _at(K, c, stride_kn), _at(V, c, stride_vn),
                _at(KPM, c, stride_mn), K_DESC, V_DESC, tma_b, tma_h, q, do, lse2, delta,
                offs_kT, offs_vT, stride_kn, stride_vn, stride_mn, pos_q, colf, qk_scale,
                slope, seqlen_k, c, seqlen_k, seed, bh, offs_m, dropout_p, HEAD_DIM, BLOCK_D,
                BLOCK_N, IS_CAUSAL, True, 1, HAS_KEY_MASK, HAS_DROPOUT, HAS_SLOPE_GRAD,
                USE_TMA, INPUT_PRECISION, INTERPRETER)
    if COUNT:
        _count_stages(COUNTS, lo, a, b, c, hi, ragged, seqlen_k, BLOCK_N, IS_CAUSAL)
    if HAS_SLOPE_GRAD:
        # The bias is -m * dist: dm = -sum_ij dS * dist with dS = p * (dp - delta_i), summed
        # per row as p_dist_dp - delta_i * p_dist. delta_i is rowsum(p * dp) = p_dp, formed
        # here in fp32: the DELTA of dq, dk (rowsum(o * do)) reads o rounded to fp16/bf16, an
        # error that dist, growing along the row, would not average out.
        row_delta = delta if PARTIAL_ROWS else p_dp
        tl.store(DSLOPE + off_b * stride_dsb + off_h * stride_dsh + tl.program_id(0),
                 tl.sum(row_delta * p_dist - p_dist_dp, 0))
    dq *= sm_scale
    tl.store(DQ + offs_r[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _narrow(dq, DQ.dtype.element_ty, INTERPRETER), mask=io_mask)
