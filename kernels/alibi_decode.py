"""ALiBi attention, split-KV (flash-decoding) forward for few query rows against many keys.

Same scores as :mod:`.alibi_attention` (bottom-right aligned ``i' = i + Sk - Sq``, causal
``- m_h (i' - j)`` with ``j > i'`` masked, or symmetric ``- m_h |i' - j|``; exp2 domain), in
two launches:

1. ``alibi_decode_split_kernel``, grid ``(m_blocks * num_splits, Hk, B)``: a program takes one KV
   head, keys ``[s * split_size, (s + 1) * split_size)`` and a tile of ``BLOCK_M`` rows of the
   ``group x Sq`` query rows that share the KV head (row ``r`` is query ``r // group`` of
   head ``kvh * group + r % group``), so each K/V tile is read once per GQA group and the
   query rows of a decode step fill the ``tl.dot``'s M dimension. It writes fp32 partials:
   the normalised output and its log2-sum-exp (``-inf`` when the split sees no key).
2. ``alibi_decode_merge_kernel``, grid ``(cdiv(rows, BLOCK_M), Hq, B)``: the splits' partials
   weighted by ``exp2(lse_s - max)``; writes ``O`` in the input dtype and ``LSE`` as a
   natural log, ``+inf`` for a row with no visible key (output 0), like the dense forward,
   so the dense backward runs from it unchanged.

Options as constexprs: ``HAS_KEY_MASK`` (``KPM [B, Sk]`` bytes, nonzero = keep),
``HAS_SEQLENS`` (``SEQLENS [B]``: batch ``b`` sees keys ``< SEQLENS[b]``, its queries aligned
to that length, flash-attn's ``cache_seqlens``), ``IS_VARLEN`` (packed ``cu_seqlens`` input;
batch strides 0, rows addressed by their packed index). Workspace rows are addressed like
the output rows: ``(b, h, row)`` with ``row`` the packed index when varlen.
"""

import triton
import triton.language as tl

from .alibi_attention import LOG2E, _dot, _narrow
from .alibi_skip import SKIP_NONE, _reach, _row_norms, _store_counts


@triton.jit
def _decode_sequence(CU_Q, CU_K, SEQLENS, off_b, seqlen_q, seqlen_k,
                     HAS_SEQLENS: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(q0, k0, seqlen_q, seqlen_k)`` of batch ``off_b``: its first packed rows and lengths."""
    q0 = 0
    k0 = 0
    if IS_VARLEN:
        q0 = tl.load(CU_Q + off_b).to(tl.int64)
        k0 = tl.load(CU_K + off_b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + off_b + 1) - q0).to(tl.int32)
        seqlen_k = (tl.load(CU_K + off_b + 1) - k0).to(tl.int32)
    if HAS_SEQLENS:
        seqlen_k = tl.load(SEQLENS + off_b).to(tl.int32)
    return q0, k0, seqlen_q, seqlen_k


@triton.jit
def alibi_decode_split_kernel(Q, K, V, OP, LP, SLOPES, KPM, CU_Q, CU_K, SEQLENS, KMAX, COUNTS,
                        sm_scale, skip_log2,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ops, stride_opb, stride_oph, stride_opm,
                        stride_lps, stride_lpb, stride_lph,
                        stride_sb, stride_mb, stride_mn, stride_xb,
                        group, seqlen_q, seqlen_k, num_splits, split_size,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        HAS_KEY_MASK: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                        IS_VARLEN: tl.constexpr, SKIP: tl.constexpr, COUNT: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Partials ``OP [splits, B, Hq, Sq, D]`` and ``LP [splits, B, Hq, Sq]`` (fp32, log2).

    ``SKIP``: certified skipping as the dense forward's (``_reach``, ``KMAX [B, Hk]``), each
    row's lower bound the score of its own key (distance 0; none if that key is hidden): the
    split's keys out of every row's reach are never read, a split left with none is written
    empty. ``COUNT``: ``(K/V tiles read, tiles without skipping)`` per program."""
    split = tl.program_id(0) % num_splits
    start_r = (tl.program_id(0) // num_splits) * BLOCK_M
    off_kvh = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q0, k0, seqlen_q, seqlen_k = _decode_sequence(CU_Q, CU_K, SEQLENS, off_b, seqlen_q,
                                                  seqlen_k, HAS_SEQLENS, IS_VARLEN)
    num_rows = seqlen_q * group
    if start_r >= num_rows:  # a tile past the end of a shorter packed sequence
        return

    offs_r = start_r + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < num_rows
    d_mask = offs_d < HEAD_DIM
    # row r: query i = r // group of head kvh * group + r % group
    off_i = offs_r // group
    off_h = off_kvh * group + (offs_r % group)
    rows = q0 + off_i.to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h[:, None] * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    slope = tl.load(SLOPES + off_b * stride_sb + off_h, mask=r_mask, other=0.0) * LOG2E
    qk_scale = sm_scale * LOG2E
    pos_q = (off_i + (seqlen_k - seqlen_q)).to(tl.float32)  # i', the row's key position

    K += off_b * stride_kb + off_kvh * stride_kh + k0 * stride_kn
    V += off_b * stride_vb + off_kvh * stride_vh + k0 * stride_vn
    KPM += off_b * stride_mb
    lo = split * split_size
    hi = tl.minimum(lo + split_size, seqlen_k)
    if IS_CAUSAL:  # keys past the tile's last query position are masked for every row
        last_i = (tl.minimum(start_r + BLOCK_M, num_rows) - 1) // group
        hi = tl.minimum(hi, last_i + (seqlen_k - seqlen_q) + 1)

    dense = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    if SKIP:
        diag = off_i + (seqlen_k - seqlen_q)  # the row's own key
        ok = r_mask
        if IS_CAUSAL:
            ok = ok & (diag >= 0)  # rows that see no key
        seen = r_mask & (diag >= 0) & (diag < seqlen_k)
        if HAS_KEY_MASK:
            seen = seen & (tl.load(KPM + diag.to(tl.int64) * stride_mn, mask=seen, other=0) != 0)
        k_own = tl.load(K + diag.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=seen[:, None] & d_mask[None, :], other=0.0)
        own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), 1) * qk_scale
        a_norm = qk_scale * _row_norms(q) * tl.load(KMAX + off_b * stride_xb + off_kvh)
        reach = _reach(a_norm, tl.where(seen, own, float("-inf")), slope, seqlen_k,
                       skip_log2 - (0.0 if IS_CAUSAL else 1.0))
        low = tl.min(tl.where(ok, diag - reach, SKIP_NONE), 0) + 1  # keys below: negligible
        lo += tl.maximum(low - lo, 0) // BLOCK_N * BLOCK_N
        if not IS_CAUSAL:  # keys from top on: negligible
            hi = tl.minimum(hi, tl.max(tl.where(ok, diag + reach, -SKIP_NONE), 0))
    if COUNT:
        _store_counts(COUNTS, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), dense)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        row0 = tl.cast(start_n, tl.int64)
        kv_mask = cols < hi
        if HAS_KEY_MASK:
            keep = tl.load(KPM + cols.to(tl.int64) * stride_mn, mask=kv_mask, other=0)
            kv_mask = kv_mask & (keep != 0)
        kT = tl.load(K + row0 * stride_kn + offs_n[None, :] * stride_kn
                     + offs_d[:, None] * stride_kd,
                     mask=d_mask[:, None] & kv_mask[None, :], other=0.0)
        v = tl.load(V + row0 * stride_vn + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd,
                    mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        rel = pos_q[:, None] - cols.to(tl.float32)[None, :]
        if IS_CAUSAL:
            dist = rel
        else:
            dist = tl.abs(rel)
        s = _dot(q, kT, INPUT_PRECISION, INTERPRETER) * qk_scale - slope[:, None] * dist
        visible = kv_mask[None, :]
        if IS_CAUSAL:
            visible = visible & (rel >= 0)
        s = tl.where(visible, s, float("-inf"))
        # -- update m_i, l_i; a row that has seen no key yet keeps m = -inf: shift by 0 then
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _dot(_narrow(p, v.dtype, INTERPRETER), v, INPUT_PRECISION, INTERPRETER)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # every (split, row) is written, an empty split as (0, -inf): the merge weighs it 0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    OP += split * stride_ops + off_b * stride_opb
    LP += split * stride_lps + off_b * stride_lpb
    tl.store(LP + off_h * stride_lph + rows, lse, mask=r_mask)
    tl.store(OP + off_h[:, None] * stride_oph + rows[:, None] * stride_opm + offs_d[None, :],
             acc / l_safe[:, None], mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def alibi_decode_merge_kernel(OP, LP, O, LSE,
                        stride_ops, stride_opb, stride_oph, stride_opm,
                        stride_lps, stride_lpb, stride_lph,
                        stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh,
                        seqlen_q, num_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        INTERPRETER: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: ``O [B, Hq, Sq, D]``, ``LSE [B, Hq, Sq]``."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen_q
    io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    OP += off_b * stride_opb + off_h * stride_oph
    LP += off_b * stride_lpb + off_h * stride_lph
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(num_splits):
        lse = tl.load(LP + split * stride_lps + offs_m, mask=m_mask, other=float("-inf"))
        o = tl.load(OP + split * stride_ops + offs_m[:, None] * stride_opm + offs_d[None, :],
                    mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=m_mask)
    out = acc / l_safe[:, None]
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, _narrow(out, O.dtype.element_ty, INTERPRETER),
             mask=io_mask)
