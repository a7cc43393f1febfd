"""ALiBi attention: FlashAttention-2 forward and backward with the linear bias fused in.

For query ``i``, key ``j`` and head ``h``, with ``i' = i + Sk - Sq`` (bottom-right aligned):
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

Batch and head offsets, and the row offset of every tile, are int64 (tensors past 2^31
elements); offsets inside a tile stay int32.
"""

import triton
import triton.language as tl

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
def _alibi_scores(qk, rel, qk_scale, slope, IS_CAUSAL: tl.constexpr):
    """Scores in the exp2 domain; ``rel = i' - j`` in fp32. Causal callers mask ``rel < 0``.

    Callers form ``rel`` as the difference of fp32 position vectors, converted once per row
    and per column: exact below 2^24, and no int-to-float conversion per score, which runs
    at an eighth of the FP32 rate on recent GPUs.
    """
    if IS_CAUSAL:
        dist = rel
    else:
        dist = tl.abs(rel)
    return qk * qk_scale - slope * dist.to(tl.float32)


@triton.jit
def _visible_keys(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr):
    """Keys ``[0, hi)`` that query rows ``start_m + [0, BLOCK_M)`` can see; blocks before
    ``full_hi`` need no mask (every row sees every key, all in bounds)."""
    if IS_CAUSAL:
        shift = seqlen_k - seqlen_q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), seqlen_k)
        full_hi = tl.minimum(tl.maximum(start_m + shift + 1, 0), seqlen_k)
    else:
        hi = seqlen_k
        full_hi = seqlen_k
    return full_hi // BLOCK_N * BLOCK_N, hi


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


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------


@triton.jit
def _alibi_attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                          pos_q, offs_n, offs_d, qk_scale, slope, seqlen_k, lo, hi,
                          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        row0 = tl.cast(start_n, tl.int64)
        if MASK:
            kv_mask = cols < seqlen_k
        else:
            kv_mask = offs_n < BLOCK_N
        if HAS_KEY_MASK:
            kv_mask = kv_mask & _load_keep(KPM, stride_mn, cols, seqlen_k)
        kT = tl.load(K + row0 * stride_kn + offs_n[None, :] * stride_kn
                     + offs_d[:, None] * stride_kd,
                     mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
        v = tl.load(V + row0 * stride_vn + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd,
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        rel = pos_q[:, None] - cols.to(tl.float32)[None, :]
        s = _alibi_scores(_dot(q, kT, INPUT_PRECISION, INTERPRETER), rel, qk_scale, slope,
                          IS_CAUSAL)
        if MASK or HAS_KEY_MASK:
            visible = kv_mask[None, :]
            if MASK and IS_CAUSAL:
                visible = visible & (rel >= 0)
            s = tl.where(visible, s, float("-inf"))
        # -- update m_i, l_i; a row that has seen no key yet keeps m = -inf: shift by 0 then
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator
        pv = _dot(_narrow(p, v.dtype, INTERPRETER), v, INPUT_PRECISION, INTERPRETER)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _alibi_attn_fwd(Q, K, V, O, LSE, SLOPES, KPM, CU_Q, CU_K, sm_scale,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_lb, stride_lh, stride_sb, stride_mb, stride_mn,
                    group, seqlen_q, seqlen_k,
                    SQ_BUCKET, SK_BUCKET,  # autotune key only
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``. Writes ``O [B, Hq, Sq, D]`` and ``LSE [B, Hq, Sq]``."""
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
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=io_mask,
                other=0.0)

    pos_q = (offs_m + (seqlen_k - seqlen_q)).to(tl.float32)  # i', the row's key position
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, hi = _visible_keys(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    # stage 1: key blocks every row sees in full (but for padding, with HAS_KEY_MASK);
    # stage 2: the diagonal band and the ragged end
    acc, l_i, m_i = _alibi_attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_kd,
                                          stride_vn, stride_vd, stride_mn, pos_q, offs_n,
                                          offs_d, qk_scale, slope, seqlen_k, 0, full_hi,
                                          HEAD_DIM, BLOCK_N, IS_CAUSAL, False, HAS_KEY_MASK,
                                          INPUT_PRECISION, INTERPRETER)
    acc, l_i, m_i = _alibi_attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_kd,
                                          stride_vn, stride_vd, stride_mn, pos_q, offs_n,
                                          offs_d, qk_scale, slope, seqlen_k, full_hi, hi,
                                          HEAD_DIM, BLOCK_N, IS_CAUSAL, True, HAS_KEY_MASK,
                                          INPUT_PRECISION, INTERPRETER)
    # a row with no visible key (causal, or all padded) has l = 0: output 0 and LSE +inf
    # (its gradients are then 0)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    tl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)
    tl.store(O + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od,
             _narrow(out, O.dtype.element_ty, INTERPRETER), mask=io_mask)


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------


@triton.jit
def _alibi_attn_bwd_preprocess(O, DO, DELTA,
                               stride_ob, stride_oh, stride_om, stride_od,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               num_heads, seqlen_q,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: ``DELTA [B, Hq, Sq] = rowsum(O * DO)`` in fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    row0 = tl.cast(start_m, tl.int64)
    O += off_b * stride_ob + off_h * stride_oh + row0 * stride_om
    DO += off_b * stride_dob + off_h * stride_doh + row0 * stride_dom
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (start_m + offs_r < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask,
                other=0.0)
    do = tl.load(DO + offs_r[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (off_b * num_heads + off_h) * seqlen_q + start_m + offs_r, delta,
             mask=start_m + offs_r < seqlen_q)


@triton.jit
def _alibi_attn_bwd_dkdv_inner(dk, dv, k, v, keep, Q, DO, LSE, DELTA,
                               stride_qm, stride_qd, stride_dom, stride_dod,
                               pos_k, offs_m, offs_d, qk_scale, slope, seqlen_q, seqlen_k, lo, hi,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                               IS_CAUSAL: tl.constexpr, MASK: tl.constexpr,
                               HAS_KEY_MASK: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulate one query head's contribution to ``dk``, ``dv [BLOCK_N, BLOCK_D]``.

    Works transposed (keys along rows). Query rows past ``Sq`` load ``lse = +inf``, so their
    probabilities are 0; key rows past ``Sk`` only touch their own rows, which are not stored.
    Padded keys (``keep`` false, with ``HAS_KEY_MASK``) get probability 0: ``dk = dv = 0``.
    """
    d_mask = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row0 = tl.cast(start_m, tl.int64)
        m_mask = rows < seqlen_q
        qT = tl.load(Q + row0 * stride_qm + offs_m[None, :] * stride_qm
                     + offs_d[:, None] * stride_qd,
                     mask=d_mask[:, None] & m_mask[None, :], other=0.0)
        do = tl.load(DO + row0 * stride_dom + offs_m[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod,
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + rows, mask=m_mask, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + rows, mask=m_mask, other=0.0)
        rel = (rows + (seqlen_k - seqlen_q)).to(tl.float32)[None, :] - pos_k[:, None]
        sT = _alibi_scores(_dot(k, qT, INPUT_PRECISION, INTERPRETER), rel, qk_scale, slope,
                           IS_CAUSAL)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASK:
            pT = tl.where(rel >= 0, pT, 0.0)
        if HAS_KEY_MASK:
            pT = tl.where(keep[:, None], pT, 0.0)
        # -- dv += p^T do
        dv += _dot(_narrow(pT, do.dtype, INTERPRETER), do, INPUT_PRECISION, INTERPRETER)
        # -- dk += ds^T q, ds = p * (dp - delta)
        dpT = _dot(v, tl.trans(do), INPUT_PRECISION, INTERPRETER)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_narrow(dsT, qT.dtype, INTERPRETER), tl.trans(qT), INPUT_PRECISION, INTERPRETER)
    return dk, dv


@triton.jit
def _alibi_attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SLOPES, KPM, CU_Q, CU_K, sm_scale,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                         stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                         stride_lb, stride_lh, stride_sb, stride_mb, stride_mn,
                         group, seqlen_q, seqlen_k,
                         SQ_BUCKET, SK_BUCKET,  # autotune key only
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sk, BLOCK_N), Hk, B)``: ``DK``, ``DV [B, Hk, Sk, D]``.

    Each program sums over the ``group`` query heads that share its KV head in registers and
    stores once: GQA gradients without atomics, deterministic.
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
    cols = start_n + offs_r
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (cols < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    if HAS_KEY_MASK:  # padded keys: never read, zero gradients
        keep = _load_keep(KPM + off_b * stride_mb, stride_mn, cols, seqlen_k)
        kv_mask = io_mask & keep[:, None]
    else:
        keep = cols < seqlen_k
        kv_mask = io_mask
    k = tl.load(K + offs_r[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                other=0.0)
    v = tl.load(V + offs_r[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                other=0.0)

    # Query blocks that can see this key block: [lo, hi). Before full_lo some rows still miss
    # some keys (the causal diagonal band), from full_lo on every row sees every key.
    if IS_CAUSAL:
        shift = seqlen_k - seqlen_q
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(full_lo, seqlen_q)
    else:
        lo = 0
        full_lo = 0
    end = seqlen_q
    if HAS_KEY_MASK:  # a block of padded keys only: skip the loops, store zeros
        end = tl.where(tl.max(keep.to(tl.int32), 0) > 0, seqlen_q, 0)
        lo = tl.minimum(lo, end)
        full_lo = tl.minimum(full_lo, end)

    pos_k = cols.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        off_h = off_kvh * group + g
        slope = tl.load(SLOPES + off_b * stride_sb + off_h) * LOG2E
        Qh = Q + off_b * stride_qb + off_h * stride_qh + q0 * stride_qm
        DOh = DO + off_b * stride_dob + off_h * stride_doh + q0 * stride_dom
        LSEh = LSE + off_b * stride_lb + off_h * stride_lh + q0
        DELTAh = DELTA + off_b * stride_lb + off_h * stride_lh + q0
        dk, dv = _alibi_attn_bwd_dkdv_inner(dk, dv, k, v, keep, Qh, DOh, LSEh, DELTAh,
                                            stride_qm, stride_qd, stride_dom, stride_dod,
                                            pos_k, offs_m, offs_d, qk_scale, slope,
                                            seqlen_q, seqlen_k, lo, full_lo,
                                            HEAD_DIM, BLOCK_M, IS_CAUSAL, True, HAS_KEY_MASK,
                                            INPUT_PRECISION, INTERPRETER)
        dk, dv = _alibi_attn_bwd_dkdv_inner(dk, dv, k, v, keep, Qh, DOh, LSEh, DELTAh,
                                            stride_qm, stride_qd, stride_dom, stride_dod,
                                            pos_k, offs_m, offs_d, qk_scale, slope,
                                            seqlen_q, seqlen_k, full_lo, end,
                                            HEAD_DIM, BLOCK_M, IS_CAUSAL, False, HAS_KEY_MASK,
                                            INPUT_PRECISION, INTERPRETER)
    dk *= sm_scale
    tl.store(DK + offs_r[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             _narrow(dk, DK.dtype.element_ty, INTERPRETER), mask=io_mask)
    tl.store(DV + offs_r[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             _narrow(dv, DV.dtype.element_ty, INTERPRETER), mask=io_mask)


@triton.jit
def _alibi_attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, KPM,
                             stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                             pos_q, offs_n, offs_d, qk_scale, slope, seqlen_k, lo, hi,
                             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                             IS_CAUSAL: tl.constexpr, MASK: tl.constexpr,
                             HAS_KEY_MASK: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        row0 = tl.cast(start_n, tl.int64)
        if MASK:
            kv_mask = cols < seqlen_k
        else:
            kv_mask = offs_n < BLOCK_N
        if HAS_KEY_MASK:
            kv_mask = kv_mask & _load_keep(KPM, stride_mn, cols, seqlen_k)
        kT = tl.load(K + row0 * stride_kn + offs_n[None, :] * stride_kn
                     + offs_d[:, None] * stride_kd,
                     mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
        vT = tl.load(V + row0 * stride_vn + offs_n[None, :] * stride_vn
                     + offs_d[:, None] * stride_vd,
                     mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
        rel = pos_q[:, None] - cols.to(tl.float32)[None, :]
        s = _alibi_scores(_dot(q, kT, INPUT_PRECISION, INTERPRETER), rel, qk_scale, slope,
                          IS_CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        if MASK or HAS_KEY_MASK:
            # keys past Sk and padded keys too: their p could overflow, and inf * (k = 0) is NaN
            visible = kv_mask[None, :]
            if MASK and IS_CAUSAL:
                visible = visible & (rel >= 0)
            p = tl.where(visible, p, 0.0)
        # -- dq += ds k, ds = p * (dp - delta)
        dp = _dot(do, vT, INPUT_PRECISION, INTERPRETER)
        ds = p * (dp - delta[:, None])
        dq += _dot(_narrow(ds, kT.dtype, INTERPRETER), tl.trans(kT), INPUT_PRECISION, INTERPRETER)
    return dq


@triton.jit
def _alibi_attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SLOPES, KPM, CU_Q, CU_K, sm_scale,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                       stride_lb, stride_lh, stride_sb, stride_mb, stride_mn,
                       group, seqlen_q, seqlen_k,
                       SQ_BUCKET, SK_BUCKET,  # autotune key only
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: ``DQ [B, Hq, Sq, D]``."""
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
    lse = tl.load(LSE + offs_m, mask=m_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=m_mask, other=0.0)

    pos_q = (offs_m + (seqlen_k - seqlen_q)).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, hi = _visible_keys(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _alibi_attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, KPM,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                                  pos_q, offs_n, offs_d, qk_scale, slope, seqlen_k,
                                  0, full_hi, HEAD_DIM, BLOCK_N, IS_CAUSAL, False, HAS_KEY_MASK,
                                  INPUT_PRECISION, INTERPRETER)
    dq = _alibi_attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, KPM,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                                  pos_q, offs_n, offs_d, qk_scale, slope, seqlen_k,
                                  full_hi, hi, HEAD_DIM, BLOCK_N, IS_CAUSAL, True, HAS_KEY_MASK,
                                  INPUT_PRECISION, INTERPRETER)
    dq *= sm_scale
    tl.store(DQ + offs_r[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             _narrow(dq, DQ.dtype.element_ty, INTERPRETER), mask=io_mask)
