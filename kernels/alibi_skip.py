"""Certified tile skipping: the device side of the rule the ALiBi kernels share.

(:mod:`posenc_triton.alibi_skip` is the host side: ``KMAX``, the backward's bounds, the
counters' buffers.)
"""

import triton
import triton.language as tl

# Certified tile skipping (``SKIP``): every score of row ``i`` at distance ``d`` obeys
# ``s <= A_i - m * d`` (log2 units) with ``A_i = scale * |q_i| * max_j |k_j|`` (Cauchy-Schwarz;
# ``KMAX``, the key-norm maximum of the sequence's KV head). Against a lower bound ``M_i`` of
# the row's largest term, the keys at distance ``>= R`` weigh at most
# ``2^(A_i - M_i - m R) * min(n, 1 / (1 - 2^-m))`` (``n`` keys; the geometric tail) of it: at
# most ``2^skip_log2`` from ``R = ceil((A_i - M_i + log2 tail - skip_log2) / m)`` on, for
# ``m > 0`` (no key is negligible otherwise). Since the bound falls with the distance, one
# reach per row, computed once, cuts a stage's loop bounds: the test costs per program, not
# per tile or score, and the loops stay pipelined.
SKIP_NONE = tl.constexpr(1073741824)  # 2^30: a reach no key is beyond


@triton.jit
def _reach(a_norm, m, slope, seqlen_k, skip_log2):
    """int32 ``R`` per row (``[0, 2^30]``, see above): keys at distance ``>= R`` from the
    row's position weigh at most ``2^skip_log2`` of its largest term, all together, if
    ``m`` (log2 units) bounds that term from below; ``a_norm`` is ``A_i``. A row without a
    bound (``m = -inf``), a slope that is not positive and non-finite inputs give ``2^30``."""
    n = seqlen_k.to(tl.float32)
    gap = tl.maximum(1.0 - tl.math.exp2(-slope), 1e-30)  # (slopes <= 0 are dropped below)
    tail = tl.minimum(tl.log2(tl.maximum(n, 1.0)), -tl.log2(gap))
    r = (a_norm - m + tail - skip_log2) / tl.maximum(slope, 1e-30)
    r = tl.where(r < 1073741824.0, tl.ceil(r), 1073741824.0)  # NaN: 2^30
    r = tl.where(slope > 0, r, 1073741824.0)
    return tl.maximum(r, 0.0).to(tl.int32)


@triton.jit
def _row_norms(x):
    """``|x_i|`` in fp32 of the rows of a tile."""
    xf = x.to(tl.float32)
    return tl.sqrt(tl.sum(xf * xf, 1))


@triton.jit
def _skip_bounds(below, above, a, b, c, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """``(lo, hi, top)``: of the stages :func:`_stages` gives, the key tiles ``[0, lo)`` and
    ``[hi, c)`` are negligible for every row, and so are the ragged end's keys when ``top <=
    c``, where each row finds the keys ``<= below`` and ``>= above`` negligible (int32 per
    row; ``2^30`` and ``-2^30`` for a row that does not constrain). ``lo`` and ``hi`` stay
    in their stages (``lo <= a``, ``b <= hi <= c``)."""
    lo = tl.minimum(tl.maximum(tl.min(below, 0) + 1, 0) // BLOCK_N * BLOCK_N, a)
    if IS_CAUSAL:
        hi = c
        top = c
    else:
        top = tl.max(above, 0)
        hi = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(top, 0), BLOCK_N) * BLOCK_N, b), c)
    return lo, hi, top


@triton.jit
def _store_counts(COUNTS, done, dense):
    """``(done, dense)`` as int32 at ``COUNTS + 2 * (the program's linear index)``."""
    pid = (tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) \
        * tl.num_programs(0) + tl.program_id(0)
    tl.store(COUNTS + 2 * pid, done.to(tl.int32))
    tl.store(COUNTS + 2 * pid + 1, dense.to(tl.int32))


@triton.jit
def _count_stages(COUNTS, lo, a, b, c, hi, ragged, seqlen_k, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr):
    """Store the key tiles a program of the forward or ``dq`` ran (``[lo, a)``, the band
    ``[a, b)``, symmetric: ``[b, hi)`` and the ragged end if ``ragged``) and the dense
    kernel's (:func:`_stages`' ``a, b, c`` with nothing skipped)."""
    band = tl.cdiv(b - a, BLOCK_N)
    end = tl.cdiv(seqlen_k - c, BLOCK_N)
    done = (a - lo) // BLOCK_N + band
    dense = a // BLOCK_N + band
    if not IS_CAUSAL:
        done += (hi - b) // BLOCK_N + ragged.to(tl.int32) * end
        dense += (c - b) // BLOCK_N + end
    _store_counts(COUNTS, done, dense)
