"""The yardstick of :mod:`posenc_triton.bench.audit`: FlashAttention-2 loops without a bias.

Written after the main loops of Triton's fused-attention tutorial
(``python/tutorials/06-fused-attention.py``, Triton authors, MIT licence): pointers advance per
tile, the softmax scale (with ``log2 e``) multiplies the scores inside the max/subtract FMA in
the forward, and the backward receives ``k`` pre-scaled and a log2-domain LSE, so its loops
spend no instruction on the scale. Only the loops matter here: no masks, no ragged ends
(lengths are multiples of the tiles), one head per program row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tutorial_fwd(Q, K, V, Out, M, sm_scale, stride_h, stride_m, seqlen,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * stride_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])
    k_ptrs = K + base + offs_n[None, :] * stride_m + offs_d[:, None]
    v_ptrs = V + base + offs_n[:, None] * stride_m + offs_d[None, :]
    qk_scale = sm_scale * 1.44269504
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for _ in range(0, seqlen, BLOCK_N):
        qk = tl.dot(q, tl.load(k_ptrs))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_m
        v_ptrs += BLOCK_N * stride_m
    tl.store(M + tl.program_id(1) * seqlen + offs_m, m_i + tl.math.log2(l_i))
    tl.store(Out + base + offs_m[:, None] * stride_m + offs_d[None, :],
             (acc / l_i[:, None]).to(Out.dtype.element_ty))


@triton.jit
def _tutorial_dkdv(Q, K, V, DO, DK, DV, M, DELTA, stride_h, stride_m, seqlen,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``K`` arrives multiplied by ``sm_scale * log2 e``; ``M`` is the LSE in log2 units."""
    start_n = tl.program_id(0) * BLOCK_N
    base = tl.program_id(1).to(tl.int64) * stride_h
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + base + offs_n[:, None] * stride_m + offs_d[None, :])
    v = tl.load(V + base + offs_n[:, None] * stride_m + offs_d[None, :])
    qT_ptrs = Q + base + offs_m[None, :] * stride_m + offs_d[:, None]
    do_ptrs = DO + base + offs_m[:, None] * stride_m + offs_d[None, :]
    M += tl.program_id(1) * seqlen
    DELTA += tl.program_id(1) * seqlen
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        qT = tl.load(qT_ptrs)
        m = tl.load(M + start_m + offs_m)
        pT = tl.math.exp2(tl.dot(k, qT) - m[None, :])
        do = tl.load(do_ptrs)
        dv += tl.dot(pT.to(do.dtype), do)
        delta = tl.load(DELTA + start_m + offs_m)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
        qT_ptrs += BLOCK_M * stride_m
        do_ptrs += BLOCK_M * stride_m
    tl.store(DK + base + offs_n[:, None] * stride_m + offs_d[None, :], dk.to(DK.dtype.element_ty))
    tl.store(DV + base + offs_n[:, None] * stride_m + offs_d[None, :], dv.to(DV.dtype.element_ty))


@triton.jit
def _tutorial_dq(Q, K, V, DO, DQ, M, DELTA, stride_h, stride_m, seqlen,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``K`` arrives multiplied by ``sm_scale * log2 e``; ``M`` is the LSE in log2 units."""
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * stride_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])
    do = tl.load(DO + base + offs_m[:, None] * stride_m + offs_d[None, :])
    m = tl.load(M + tl.program_id(1) * seqlen + offs_m)
    delta = tl.load(DELTA + tl.program_id(1) * seqlen + offs_m)
    kT_ptrs = K + base + offs_n[None, :] * stride_m + offs_d[:, None]
    vT_ptrs = V + base + offs_n[None, :] * stride_m + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for _ in range(0, seqlen, BLOCK_N):
        kT = tl.load(kT_ptrs)
        p = tl.math.exp2(tl.dot(q, kT) - m[:, None])
        ds = p * (tl.dot(do, tl.load(vT_ptrs)) - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
        kT_ptrs += BLOCK_N * stride_m
        vT_ptrs += BLOCK_N * stride_m
    tl.store(DQ + base + offs_m[:, None] * stride_m + offs_d[None, :], dq.to(DQ.dtype.element_ty))


def launches(case):
    """:class:`audit.Launch`es of one tutorial kernel at the tiles of the matching ALiBi list."""
    from posenc_triton import alibi_configs
    from posenc_triton.bench.audit import BATCH, HEADS, SEQLEN, Launch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    t = torch.empty(BATCH * HEADS, SEQLEN, case.head_dim, dtype=dtype, device="meta")
    lse = torch.empty(BATCH * HEADS, SEQLEN, dtype=torch.float32, device="meta")
    ints = (t.stride(0), t.stride(1), SEQLEN)
    meta = {"HEAD_DIM": case.head_dim}
    kernels = {"tutorial-fwd": (_tutorial_fwd, (t, t, t, t, lse, 0.5, *ints),
                                [*alibi_configs.FWD_CONFIGS, (128, 32, 4, 3)]),
               "tutorial-dkdv": (_tutorial_dkdv, (t, t, t, t, t, t, lse, lse, *ints),
                                 alibi_configs.DKDV_CONFIGS),
               "tutorial-dq": (_tutorial_dq, (t, t, t, t, t, lse, lse, *ints),
                               alibi_configs.DQ_CONFIGS)}
    fn, args, configs = kernels[case.kernel]
    return [Launch(case.kernel, fn, [alibi_configs.config(*c) for c in configs], args, meta)]
