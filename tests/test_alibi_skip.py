"""Certified tile skipping (``skip_tol``): exactness, the kernels' own tile counts, and a test
that the certificate is what keeps it exact.

Skipping is on by default, so every ALiBi test runs it; here the shapes and slopes are picked
so that the kernels do skip (each test asserts it from the counters), and the answers are
checked as everywhere (float64 reference, flash-attn's error rule). The adversarial inputs
are those a heuristic would get wrong: a far key that dominates its row, equal keys, zero
slopes beside steep ones, zero queries, rows that see no key.
"""

import functools
import math

import pytest
import torch

from conftest import (
    DEVICE,
    check_against_reference,
    check_dslopes,
    check_error_rule,
    fwd_bwd,
    padding_mask,
    set_interpreter_tile,
)
from posenc_triton import ALiBiAttention, alibi_attention, alibi_skip, alibi_slopes
from posenc_triton import alibi_tile_counts as tile_counts
from posenc_triton.reference import (
    alibi_attention_kvcache_reference,
    alibi_attention_reference,
    alibi_attention_varlen_reference,
)


def _qkv(b, hq, hk, sq, sk, d, dtype):
    return [torch.randn(*shape, device=DEVICE).to(dtype)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def _steep(hq):
    """Slopes steep enough that tiles far from the diagonal are negligible at a few hundred
    positions (the tests' lengths), mixed in size."""
    return torch.linspace(0.3, 1.0, hq, device=DEVICE)


def _skipped(counts, *kernels):
    for name in kernels:
        done, dense = counts[name]
        assert 0 < done < dense, f"{name}: {done} of {dense} tiles: nothing skipped"


def _check_fwd_bwd(inputs, slopes, is_causal, **kwargs):
    """Output, dq, dk, dv and the slope gradient of ``alibi_attention`` (skipping on) against
    the float64 and the same-dtype references."""
    dtype = inputs[0].dtype
    fast = functools.partial(alibi_attention, is_causal=is_causal, **kwargs)
    ref = functools.partial(alibi_attention_reference, is_causal=is_causal,
                            key_padding_mask=kwargs.get("key_padding_mask"))
    out, grads, grad_out = fwd_bwd(fast, [*inputs, slopes])
    grads64, grads_same = check_against_reference(ref, [*inputs, slopes], out, grads[:3],
                                                  grad_out)
    check_dslopes(grads[3], grads64[3], grads_same[3], dtype)


@pytest.mark.parametrize("dtype, is_causal, heads", [
    (torch.float16, True, (4, 2)), (torch.float16, False, (3, 3)),
    (torch.bfloat16, True, (3, 3)), (torch.bfloat16, False, (4, 2)),
    (torch.float32, True, (3, 3)), (torch.float32, False, (4, 2))])
def test_skipping_exact(dtype, is_causal, heads):
    torch.manual_seed(1)
    hq, hk = heads
    inputs = _qkv(1, hq, hk, 203, 203, 40, dtype)
    slopes = _steep(hq)
    _skipped(tile_counts(*inputs, slopes.requires_grad_(), is_causal=is_causal),
             "forward", "dq", "dkdv")
    _check_fwd_bwd(inputs, slopes.detach(), is_causal)


@pytest.mark.parametrize("kind, is_causal", [("random", True), ("right", False)])
def test_skipping_key_mask(kind, is_causal):
    torch.manual_seed(2)
    inputs = _qkv(3, 2, 2, 150, 190, 32, torch.float16)
    mask = padding_mask(kind, 3, 190)
    _skipped(tile_counts(*inputs, _steep(2), is_causal=is_causal, key_padding_mask=mask),
             "forward", "dq", "dkdv")
    _check_fwd_bwd(inputs, _steep(2), is_causal, key_padding_mask=mask)


@pytest.mark.parametrize("is_causal", [True, False])
def test_skipping_packed(is_causal):
    torch.manual_seed(3)
    lens_q, lens_k = [170, 9, 120], [170, 40, 200]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], device=DEVICE,
                               dtype=torch.int32) for n in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), 4, 32, device=DEVICE).to(torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 2, 32, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    slopes = _steep(4)
    packed = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": max(lens_q),
              "max_seqlen_k": max(lens_k)}
    _skipped(tile_counts(q, k, v, slopes, is_causal=is_causal, **packed), "forward", "dq", "dkdv")
    fast = functools.partial(alibi_attention, is_causal=is_causal, **packed)
    def ref(q, k, v, slopes, upcast=True):
        return alibi_attention_varlen_reference(q, k, v, cu_q, cu_k, slopes,
                                                is_causal=is_causal, upcast=upcast)

    out, grads, grad_out = fwd_bwd(fast, [q, k, v, slopes])
    grads64, grads_same = check_against_reference(ref, [q, k, v, slopes], out, grads[:3],
                                                  grad_out)
    check_dslopes(grads[3], grads64[3], grads_same[3], torch.bfloat16)


@pytest.mark.parametrize("is_causal", [True, False])
def test_skipping_decode(monkeypatch, is_causal):
    """Few rows against many keys: the split-KV kernel skips splits and tiles, and reads
    fewer K/V bytes (the key-norm pass counted); GQA packs a group's rows together."""
    from posenc_triton import alibi_decode

    monkeypatch.setattr(alibi_decode, "SPLIT_SIZE", 64)
    torch.manual_seed(4)
    inputs = _qkv(2, 4, 2, 3, 700, 32, torch.float16)
    slopes = _steep(4)
    counts = tile_counts(*inputs, slopes, is_causal=is_causal)
    _skipped(counts, "forward", "bytes")
    out = alibi_attention(*inputs, slopes, is_causal=is_causal)
    ref64 = alibi_attention_reference(*(t.double() for t in inputs), slopes,
                                      is_causal=is_causal)
    ref_same = alibi_attention_reference(*inputs, slopes, is_causal=is_causal)
    check_error_rule("out", out, ref64, ref_same, torch.float16)


def test_skipping_cache_seqlens(monkeypatch):
    from posenc_triton import alibi_decode

    monkeypatch.setattr(alibi_decode, "SPLIT_SIZE", 64)
    torch.manual_seed(5)
    q, k, v = _qkv(3, 4, 4, 2, 640, 32, torch.float32)
    seqlens = torch.tensor([640, 333, 2], device=DEVICE, dtype=torch.int32)
    k[1, :, 333:] = float("nan")  # past a sequence's length the cache holds anything
    slopes = _steep(4)
    counts = tile_counts(q, k, v, slopes, cache_seqlens=seqlens)
    _skipped(counts, "forward")  # (bytes: the key-norm pass reads the whole cache)
    out = alibi_attention(q, k, v, slopes, cache_seqlens=seqlens)
    ref = alibi_attention_kvcache_reference(*(t.double() for t in (q, k, v)), seqlens, slopes)
    check_error_rule("out", out, ref, ref, torch.float32)


# ------------------------------------------------------------------------------------------
# Adversarial inputs
# ------------------------------------------------------------------------------------------


def _dominant_far_key(sq):
    """Head 0's queries all point along one direction, and a key 1,000 positions before them
    points the same way with 50x the others' norm: its score beats its bias (its row's
    largest term by far). Head 1 (its own KV head) is ordinary, and skips. ``sq = 20`` runs
    the split-KV kernel, 80 the dense one."""
    torch.manual_seed(6)
    d, sk = 16, 1100
    q, k, v = _qkv(1, 2, 2, sq, sk, d, torch.float32)
    u = torch.nn.functional.normalize(torch.randn(d, device=DEVICE), dim=0)
    q[0, 0] = 4.0 * u
    far = sk - sq - 1000
    k[0, 0, far] = 50 * k[0, 0].norm(dim=-1).mean() * u
    v[0, 0, far] = 10.0
    slopes = torch.tensor([0.1, 0.5], device=DEVICE)
    return [q, k, v], slopes


@pytest.mark.parametrize("sq", [20, 80])
def test_dominant_far_key_is_computed(sq):
    inputs, slopes = _dominant_far_key(sq)
    done, dense = tile_counts(*inputs, slopes)["forward"]
    assert done < dense  # head 1 skips
    out = alibi_attention(*inputs, slopes)
    ref = alibi_attention_reference(*(t.double() for t in inputs), slopes)
    assert (ref[0, 0] - 10.0).abs().max() < 1e-3  # the far key's value is the output
    check_error_rule("out", out, ref, ref, torch.float32)


@pytest.mark.parametrize("sq", [20, 80])
def test_loosened_bound_fails(monkeypatch, sq):
    """The certificate is what keeps skipping exact: without the key-norm term (a bound that
    assumes no score exceeds 0), the far key is skipped and head 0 is wrong."""
    inputs, slopes = _dominant_far_key(sq)
    ref = alibi_attention_reference(*(t.double() for t in inputs), slopes)
    monkeypatch.setattr(alibi_skip, "key_norm_max",
                        lambda k, *a, **kw: torch.zeros(k.shape[:2], device=k.device))
    out = alibi_attention(*inputs, slopes)
    assert (out[0, 0].double() - ref[0, 0]).abs().max() > 1.0
    exact = alibi_attention(*inputs, slopes, skip_tol=0.0)
    assert (exact.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("is_causal", [True, False])
def test_adversarial_inputs(is_causal):
    """Equal keys, slopes of 0 and a negative one beside slopes of 1, queries of zero norm, a
    batch row whose keys are all padded (its rows see none): all exact, forward and
    backward."""
    torch.manual_seed(7)
    q, k, v = _qkv(2, 4, 4, 180, 180, 24, torch.float16)
    k[:, 1] = k[:, 1, :1]  # every key of head 1 equal
    q[:, 2, ::3] = 0.0  # every third query of head 2 zero
    slopes = torch.tensor([1.0, 0.0, 1.0, -0.02], device=DEVICE)
    mask = torch.ones(2, 180, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    _skipped(tile_counts(q, k, v, slopes, is_causal=is_causal), "forward", "dq", "dkdv")
    _check_fwd_bwd([q, k, v], slopes, is_causal, key_padding_mask=mask)


def test_zero_slopes_compute_everything():
    torch.manual_seed(8)
    inputs = _qkv(1, 2, 2, 190, 190, 16, torch.float16)
    counts = tile_counts(*inputs, torch.zeros(2, device=DEVICE))
    assert all(done == dense for done, dense in counts.values()), counts
    counts = tile_counts(*inputs, _steep(2), skip_tol=0.0)
    assert all(done == dense for done, dense in counts.values()), counts


# ------------------------------------------------------------------------------------------
# Work: the shape, counted by the kernels (GPU-sized tiles)
# ------------------------------------------------------------------------------------------


def test_tile_fractions_standard_slopes(monkeypatch):
    """B1 H8 S2048 D64 causal, standard slopes, N(0, 1): each kernel computes at most 0.70 of
    the dense tiles (64 x 64 tiles, as a GPU runs; measured 0.60, 0.60, 0.60); all-zero slopes
    compute all of them."""
    set_interpreter_tile(monkeypatch, 64, 64)
    torch.manual_seed(9)
    inputs = _qkv(1, 8, 8, 2048, 2048, 64, torch.float16)
    counts = tile_counts(*inputs, alibi_slopes(8, DEVICE))
    for name, (done, dense) in counts.items():
        assert done <= 0.70 * dense, f"{name}: {done / dense:.3f} of the dense tiles"
    # zero slopes: every tile (one head: the count is per head)
    zero = tile_counts(*(t[:, :1] for t in inputs), torch.zeros(1, device=DEVICE))
    assert all(done == dense for done, dense in zero.values()), zero


# ------------------------------------------------------------------------------------------
# The argument and its paths
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), -1.0])
def test_bad_skip_tol(bad):
    inputs = _qkv(1, 2, 2, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="skip_tol"):
        alibi_attention(*inputs, skip_tol=bad)
    with pytest.raises(ValueError, match="skip_tol"):
        ALiBiAttention(32, 2, skip_tol=bad)


@pytest.mark.parametrize("bad", [True, "0", None])
def test_skip_tol_type(bad):
    inputs = _qkv(1, 2, 2, 8, 8, 16, torch.float16)
    with pytest.raises(TypeError, match="skip_tol"):
        alibi_attention(*inputs, skip_tol=bad)


def test_module_passes_skip_tol(monkeypatch):
    from posenc_triton import nn

    seen = []
    real = nn.alibi_attention
    monkeypatch.setattr(nn, "alibi_attention",
                        lambda *a, **kw: seen.append(kw["skip_tol"]) or real(*a, **kw))
    x = torch.randn(1, 5, 32, device=DEVICE)
    ALiBiAttention(32, 2, skip_tol=0.0).to(DEVICE)(x)
    ALiBiAttention(32, 2).to(DEVICE)(x)
    assert seen == [0.0, alibi_skip.DEFAULT_SKIP_TOL]


def test_skip_tol_reach_is_tail_bound():
    """The kernels' reach rule, written out: the geometric tail of ``2^(A - M - m d)`` from
    the reach on is at most ``2^skip_log2``."""
    a_minus_m, m, tol = 7.0, 0.01, 2.0 ** -24
    log2_tol = alibi_skip.skip_log2(tol)
    tail = min(math.log2(4096), -math.log2(1 - 2 ** -m))
    reach = math.ceil((a_minus_m + tail - log2_tol) / m)
    mass = sum(2 ** (a_minus_m - m * d) for d in range(reach, reach + 4096))
    assert mass <= 2 ** log2_tol <= tol / 2


def test_fraction_replica_matches_the_kernel(monkeypatch):
    """bench/skip_fractions.py predicts the long-context fractions with a PyTorch replica of
    the forward's rule: it must give the kernel's own count where the interpreter runs it."""
    from posenc_triton.bench import skip_fractions

    set_interpreter_tile(monkeypatch, 32, 16)
    torch.manual_seed(10)
    q, k, v = _qkv(1, 4, 4, 640, 640, 32, torch.float16)
    slopes = alibi_slopes(4, DEVICE)
    got = tile_counts(q, k, v, slopes)["forward"]
    assert got[0] < got[1]
    assert skip_fractions.forward_tiles(q[0], k[0], slopes, 32, 16) == got


@pytest.mark.parametrize("is_causal", [False])
def test_skipping_bshd_views_and_dropout(is_causal):
    """q, k, v as strided ``bshd`` views of one fused projection, GQA, attention dropout: the
    skipped tiles are left out of the forward's sums and of both backward kernels' masks
    alike (the reference gets the kernels' keep-mask)."""
    from posenc_triton import alibi_ops

    torch.manual_seed(11)
    b, s, hq, hk, d, p = 2, 170, 4, 2, 32, 0.2
    fused = torch.randn(b, s, hq + 2 * hk, d + 8, device=DEVICE).to(torch.float16)
    q, k, v = fused[..., :d].split([hq, hk, hk], dim=2)  # [B, S, H, D] views, strided
    slopes = _steep(hq)
    _skipped(tile_counts(q, k, v, slopes, is_causal=is_causal, layout="bshd", dropout_p=p),
             "forward", "dq", "dkdv")
    torch.manual_seed(12)
    mask = alibi_ops.dropout_keep_mask(alibi_ops.draw_dropout_seed(DEVICE), p, b, hq, s, s)

    def fast(q, k, v, slopes):
        torch.manual_seed(12)
        return alibi_attention(q, k, v, slopes, is_causal=is_causal, layout="bshd",
                               dropout_p=p)

    ref = functools.partial(alibi_attention_reference, is_causal=is_causal, layout="bshd",
                            dropout_p=p, dropout_mask=mask)
    out, grads, grad_out = fwd_bwd(fast, [q, k, v, slopes])
    grads64, grads_same = check_against_reference(ref, [q, k, v, slopes], out, grads[:3],
                                                  grad_out)
    check_dslopes(grads[3], grads64[3], grads_same[3], torch.float16)
