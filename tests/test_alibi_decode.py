"""ALiBi attention's split-KV (decode) path and ``cache_seqlens``, against the float64 reference.

The dispatcher sends few query rows against long keys to the split kernel; on the
interpreter's tiny shapes the fixture ``split`` lowers its key threshold and sets the split
size so that several splits (and empty ones) run, and counts that the path was taken. The
backward is the dense one, run from the split path's log-sum-exp. Error rule for fp16/bf16
(flash-attn's): ``max|kernel - ref64| <= 2 * max|ref_same_dtype - ref64| + atol``.
"""

import pytest
import torch

from conftest import (
    DEVICE,
    HAS_CUDA,
    assert_close,
    check_against_reference,
    check_error_rule,
    count_calls_of,
    fwd_bwd,
    padding_mask,
    poison,
    requires_cuda,
)
from posenc_triton import alibi_decode, alibi_launch, alibi_ops
from posenc_triton.alibi import alibi_attention, alibi_slopes
from posenc_triton.reference import (
    alibi_attention_kvcache_reference,
    alibi_attention_reference,
    alibi_attention_varlen_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Hq, Hk, Sq, Sk, D), dtype: MHA, GQA 4, GQA 3 (non-power-of-two), MQA with 48 packed rows
SHAPES = [((2, 4, 4, 1, 77, 40), torch.float32), ((1, 8, 2, 3, 50, 32), torch.bfloat16),
          ((2, 6, 2, 5, 61, 80), torch.float16), ((1, 3, 1, 16, 129, 16), torch.bfloat16)]


def _make_qkv(b, hq, hk, sq, sk, d, dtype, layout="bhsd"):
    if layout == "bhsd":
        shapes = ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))
    else:
        shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d))
    return [torch.randn(*s, dtype=dtype, device=DEVICE) for s in shapes]


@pytest.fixture
def split(monkeypatch):
    """``split(size)``: every call of few query rows runs split-KV, ``size`` keys a split;
    returns the list that counts the split path's calls."""
    calls = count_calls_of(monkeypatch, alibi_decode, "launch_alibi_decode")

    def configure(size=16):
        monkeypatch.setattr(alibi_decode, "MIN_SEQLEN_K", 0)
        monkeypatch.setattr(alibi_decode, "SPLIT_SIZE", size)
        return calls

    return configure


def _check(inputs, slopes=None, *, fast=alibi_attention, reference=alibi_attention_reference,
           **kwargs):
    """``fast`` vs the float64 ``reference`` (and the same-dtype one for fp16/bf16), forward
    and backward (``fast`` and ``reference`` take ``(q, k, v, slopes, **kwargs)``)."""
    originals = [t.clone() for t in inputs]
    out, grads, grad_out = fwd_bwd(lambda *t: fast(*t, slopes, **kwargs), inputs)
    for t, orig in zip(inputs, originals):
        assert torch.equal(t, orig), "an input was modified"
    check_against_reference(
        lambda *t, upcast=True: reference(*t, slopes, upcast=upcast, **kwargs),
        inputs, out, grads, grad_out)
    return out, grads


# ------------------------------------------------------------------------------------------
# The split path, through alibi_attention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype", SHAPES,
                         ids=["B{}Hq{}Hk{}Sq{}Sk{}D{}".format(*s) for s, _ in SHAPES])
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference(split, is_causal, shape, dtype):
    calls = split(16)
    torch.manual_seed(1)
    _check(_make_qkv(*shape, dtype), is_causal=is_causal)
    assert calls, "the split path did not run"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(split, dtype):
    """Every dtype on one GQA shape (bf16 catches the interpreter's bf16 dot)."""
    calls = split(32)
    torch.manual_seed(18)
    _check(_make_qkv(2, 6, 2, 2, 70, 24, dtype))
    assert calls


@pytest.mark.parametrize("size", [16, 48, 1024])
def test_split_sizes_equal_dense(split, size):
    """Any number of splits (several, uneven, one) gives the dense path's out and lse."""
    torch.manual_seed(2)
    q, k, v = _make_qkv(2, 6, 2, 4, 83, 32, torch.float32)
    slopes = alibi_slopes(6, DEVICE)
    args = (slopes, None, None, None, 0, 0, True, 0.2, "bhsd")
    dense_out, dense_lse = alibi_ops.launch_alibi_fwd(q, k, v, *args)
    calls = split(size)
    out, lse = alibi_ops.launch_alibi_fwd(q, k, v, *args)
    assert calls
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_layouts_and_fused_qkv_views(split, layout):
    """Strided views of one fused QKV projection, both layouts, GQA, no copies needed."""
    calls = split(32)
    torch.manual_seed(3)
    b, sq, sk, hq, hk, d = 2, 3, 70, 6, 2, 24
    kv = torch.randn(b, sk, 2 * hk, d, device=DEVICE, dtype=torch.float16)
    q = torch.randn(b, sq, hq, d, device=DEVICE, dtype=torch.float16)
    k, v = kv[:, :, :hk], kv[:, :, hk:]
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, _ = _check([q, k, v], layout=layout)
    assert out.shape == q.shape
    assert calls


@pytest.mark.parametrize("per_batch", [False, True])
def test_custom_slopes_and_scale(split, per_batch):
    calls = split(16)
    torch.manual_seed(4)
    inputs = _make_qkv(3, 6, 3, 2, 45, 16, torch.float32)
    slopes = torch.rand((3, 6) if per_batch else (6,), device=DEVICE)
    _check(inputs, slopes, scale=0.37)
    assert calls


@pytest.mark.parametrize("kind,is_causal", [("right", True), ("left", False), ("random", True),
                                             ("random", False)])
def test_key_padding_mask(split, kind, is_causal):
    """Padded keys hidden; the last batch row keeps one key only (ends inside a split)."""
    calls = split(16)
    torch.manual_seed(5)
    inputs = _make_qkv(4, 4, 2, 2, 53, 16, torch.bfloat16)
    mask = padding_mask(kind, 4, 53)
    _, (_, dk, dv) = _check(inputs, is_causal=is_causal, key_padding_mask=mask)
    for g in (dk, dv):
        padded = g.transpose(1, 2)[~mask]
        assert torch.equal(padded, torch.zeros_like(padded))
    assert calls


def test_key_padding_fully_padded_row(split):
    """A batch row with every key padded outputs 0 and passes no gradient."""
    calls = split(16)
    torch.manual_seed(6)
    inputs = _make_qkv(2, 4, 4, 1, 40, 16, torch.float16)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, grads = _check(inputs, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)
    assert calls


@pytest.mark.parametrize("is_causal", [True, False])
def test_packed_with_empty_sequences(split, is_causal):
    """Packed decode rows: an empty query sequence, an empty key sequence (its rows output
    0), different lengths per sequence, per-sequence slopes; forward and backward."""
    calls = split(16)
    torch.manual_seed(7)
    lengths = [(1, 40), (0, 9), (3, 0), (2, 61), (4, 33)]
    lq, lk = zip(*lengths)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=DEVICE) for n in (lq, lk))
    q = torch.randn(sum(lq), 6, 16, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(sum(lk), 2, 16, device=DEVICE, dtype=torch.float16) for _ in range(2))
    slopes = torch.rand(len(lengths), 6, device=DEVICE)
    fast = lambda *t, **kw: alibi_attention(*t, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    ref = lambda *t, **kw: alibi_attention_varlen_reference(*t[:3], cu_q, cu_k, t[3], **kw)
    out, _ = _check([q, k, v], slopes, fast=fast, reference=ref, is_causal=is_causal)
    empty = out[cu_q[2]:cu_q[3]]
    assert torch.equal(empty, torch.zeros_like(empty))
    assert calls


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_every_output_element_written(monkeypatch, split, layout):
    """out, lse and the partials start as NaN: an element left unwritten fails the check."""
    calls = split(16)
    allocate, workspace = alibi_launch.empty_bhsd, alibi_decode._empty_f32
    monkeypatch.setattr(alibi_launch, "empty_bhsd", lambda *a: poison(allocate(*a)))
    monkeypatch.setattr(alibi_decode, "_empty_f32", lambda *a: poison(workspace(*a)))
    torch.manual_seed(8)
    # causal rows that see a few keys only, so late splits are empty for every row
    _check(_make_qkv(2, 6, 2, 3, 41, 40, torch.float32, layout), layout=layout)
    assert calls


# ------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------


def _meta(*shape):
    return torch.empty(shape, device="meta")


@pytest.mark.parametrize("q_shape,k_shape,layout,want", [
    ((1, 32, 1, 128), (1, 8, 4096, 128), "bhsd", True),      # GQA decode
    ((64, 32, 16, 128), (64, 8, 32768, 128), "bhsd", True),  # GQA chunk, large batch
    ((1, 1, 32, 128), (1, 4096, 32, 128), "bshd", True),     # MHA decode, small grid
    ((64, 32, 1, 128), (64, 32, 4096, 128), "bhsd", False),  # MHA, dense grid fills the GPU
    ((1, 32, 65, 128), (1, 8, 4096, 128), "bhsd", False),    # too many query rows
    ((1, 32, 1, 128), (1, 8, 511, 128), "bhsd", False),      # too few keys
    ((1, 32, 64, 128), (1, 8, 511 + 1, 128), "bhsd", True),  # 8 keys per query row
    ((1, 32, 64, 128), (1, 8, 511, 128), "bhsd", False),
])
def test_use_split_rule(q_shape, k_shape, layout, want):
    assert alibi_decode.use_split(_meta(*q_shape), _meta(*k_shape), layout, None, 0, 0) is want


def test_use_split_rule_packed():
    q, k = _meta(40, 32, 128), _meta(40000, 8, 128)
    cu = torch.zeros(6, dtype=torch.int32)
    assert alibi_decode.use_split(q, k, "bshd", cu, 8, 20000)
    assert not alibi_decode.use_split(q, k, "bshd", cu, 80, 20000)


def test_dispatch_at_the_real_threshold(monkeypatch):
    """Untouched thresholds: a decode step of 520 keys takes the split path and its
    heuristic splits (several); a 127-key one stays dense."""
    calls = count_calls_of(monkeypatch, alibi_decode, "launch_alibi_decode")
    splits = []
    real = alibi_decode._splits
    monkeypatch.setattr(alibi_decode, "_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    torch.manual_seed(9)
    _check(_make_qkv(1, 2, 1, 1, 520, 16, torch.float32))
    assert len(calls) == 1 and splits[0][0] > 1
    _check(_make_qkv(1, 2, 1, 1, 127, 16, torch.float32))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------
# cache_seqlens: per-batch valid key lengths
# ------------------------------------------------------------------------------------------


def _check_cache(inputs, cache_seqlens, slopes=None, **kwargs):
    """Forward against the float64 kvcache reference (and the same-dtype one)."""
    dtype = inputs[0].dtype
    originals = [t.clone() for t in inputs]
    out = alibi_attention(*inputs, slopes, cache_seqlens=cache_seqlens, **kwargs)
    for t, orig in zip(inputs, originals):
        assert torch.equal(t, orig), "an input was modified"
    ref64 = alibi_attention_kvcache_reference(*(t.double() for t in inputs), cache_seqlens,
                                              slopes, **kwargs)
    ref_same = ref64
    if dtype != torch.float32:
        ref_same = alibi_attention_kvcache_reference(*inputs, cache_seqlens, slopes,
                                                     upcast=False, **kwargs)
    check_error_rule("out", out, ref64, ref_same, dtype)
    return out


@pytest.mark.parametrize("seqlen_q,dtype", [(1, torch.float32), (4, torch.float16),
                                             (4, torch.bfloat16), (1, torch.bfloat16)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_cache_seqlens(split, is_causal, seqlen_q, dtype):
    """Lengths 0, full, inside a tile, shorter than Sq (causal rows with no key output 0)."""
    split(32)
    torch.manual_seed(10)
    inputs = _make_qkv(5, 6, 2, seqlen_q, 57, 40, dtype)
    lengths = torch.tensor([57, 0, 23, 2, 40], dtype=torch.int32, device=DEVICE)
    out = _check_cache(inputs, lengths, is_causal=is_causal)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cache_seqlens_with_mask_and_slopes(split, layout):
    """With a key padding mask, per-batch slopes, int64 lengths, a custom scale."""
    split(16)
    torch.manual_seed(11)
    inputs = _make_qkv(3, 3, 1, 2, 50, 16, torch.bfloat16, layout)
    lengths = torch.tensor([50, 31, 9], dtype=torch.int64, device=DEVICE)
    slopes = torch.rand(3, 3, device=DEVICE)
    _check_cache(inputs, lengths, slopes, key_padding_mask=padding_mask("random", 3, 50),
                 scale=0.3, layout=layout)


def test_cache_seqlens_is_a_shorter_cache(split):
    """cache_seqlens[b] = n equals a call on the first n keys; key_padding_mask of the same
    keys does not (its queries stay aligned to the padded length: they see their future)."""
    split(16)
    torch.manual_seed(12)
    q, k, v = _make_qkv(2, 4, 2, 3, 40, 16, torch.float32)
    lengths = torch.tensor([40, 26], dtype=torch.int32, device=DEVICE)
    out = alibi_attention(q, k, v, cache_seqlens=lengths)
    alone = alibi_attention(q[1:], k[1:, :, :26], v[1:, :, :26])
    assert_close(out[1], alone[0].double())
    masked = alibi_attention(q, k, v,
                             key_padding_mask=torch.arange(40, device=DEVICE) < lengths[:, None])
    assert_close(masked[0], out[0].double())  # the full row: the same
    assert (masked[1] - out[1]).abs().max() > 1e-2


def test_cache_seqlens_every_element_written(monkeypatch, split):
    split(16)
    allocate, workspace = alibi_launch.empty_bhsd, alibi_decode._empty_f32
    monkeypatch.setattr(alibi_launch, "empty_bhsd", lambda *a: poison(allocate(*a)))
    monkeypatch.setattr(alibi_decode, "_empty_f32", lambda *a: poison(workspace(*a)))
    torch.manual_seed(13)
    inputs = _make_qkv(3, 4, 4, 2, 45, 24, torch.float16)
    _check_cache(inputs, torch.tensor([45, 0, 17], dtype=torch.int32, device=DEVICE))


def test_cache_seqlens_reference_path(monkeypatch):
    """Without Triton (or CPU without the interpreter) the kvcache reference runs."""
    monkeypatch.setattr("posenc_triton._backend.use_triton", lambda t: False)
    torch.manual_seed(14)
    q, k, v = _make_qkv(2, 2, 1, 2, 20, 8, torch.float32)
    lengths = torch.tensor([20, 7], dtype=torch.int32, device=DEVICE)
    out = alibi_attention(q, k, v, cache_seqlens=lengths)
    torch.testing.assert_close(out, alibi_attention_kvcache_reference(q, k, v, lengths))


def test_cache_seqlens_torch_compile_traces(split):
    """Dynamo traces the cache path (the op ``posenc_triton::alibi_decode_fwd``) with no
    graph break; the value check is skipped while tracing."""
    split(16)
    torch.manual_seed(15)
    q, k, v = _make_qkv(2, 4, 2, 1, 33, 16, torch.float32)
    lengths = torch.tensor([33, 12], dtype=torch.int32, device=DEVICE)
    step = lambda *t: alibi_attention(*t, cache_seqlens=lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v))


def test_split_path_torch_compile_traces(split):
    """The split path inside the dense op, forward and backward, under torch.compile."""
    calls = split(16)
    torch.manual_seed(16)
    inputs = _make_qkv(1, 4, 2, 2, 40, 16, torch.float32)
    compiled = torch.compile(alibi_attention, fullgraph=True, backend="aot_eager")
    out, grads, grad_out = fwd_bwd(compiled, inputs)
    want, want_grads, _ = fwd_bwd(alibi_attention, inputs, grad_out)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got, expected)
    assert calls


_ERRORS = [
    ({"cache_seqlens": [3, 3]}, TypeError, "cache_seqlens must be a torch.Tensor"),
    ({"cache_seqlens": torch.tensor([3.0, 3.0])}, ValueError, "int32/int64 tensor"),
    ({"cache_seqlens": torch.tensor([3], dtype=torch.int32)}, ValueError, r"\[B\] = \[2\]"),
    ({"cache_seqlens": torch.tensor([3, 9], dtype=torch.int32)}, ValueError, r"in 0\.\.8"),
    ({"cache_seqlens": torch.tensor([-1, 3], dtype=torch.int32)}, ValueError, r"in 0\.\.8"),
]


@pytest.mark.parametrize("kwargs,exc,match", _ERRORS)
def test_cache_seqlens_errors(kwargs, exc, match):
    q, k, v = _make_qkv(2, 2, 2, 1, 8, 16, torch.float16)
    kwargs = {key: val.to(DEVICE) if isinstance(val, torch.Tensor) else val
              for key, val in kwargs.items()}
    with pytest.raises(exc, match=match):
        alibi_attention(q, k, v, **kwargs)


def test_cache_seqlens_refuses_gradients_and_packed_input():
    q, k, v = _make_qkv(2, 2, 2, 1, 8, 16, torch.float16)
    lengths = torch.tensor([8, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="forward only"):
        alibi_attention(q.requires_grad_(), k, v, cache_seqlens=lengths)
    with torch.no_grad():  # no gradient asked for: runs
        alibi_attention(q, k, v, cache_seqlens=lengths)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="does not apply to packed input"):
        alibi_attention(q[:, :, 0].detach(), k[:, :, 0], v[:, :, 0], cu_seqlens_q=cu,
                        cu_seqlens_k=cu, cache_seqlens=lengths)


def test_cache_seqlens_error_rows_past_int32():
    q = torch.empty(1, 128, 1 << 24, 1, device="meta", dtype=torch.float16)
    k = torch.empty(1, 1, 8, 1, device="meta", dtype=torch.float16)
    lengths = torch.empty(1, device="meta", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"heads x query length must be below 2\^31"):
        alibi_attention(q, k, k, cache_seqlens=lengths)


@pytest.mark.skipif(not HAS_CUDA, reason="needs two devices to differ")
def test_cache_seqlens_error_device():
    q, k, v = _make_qkv(2, 2, 2, 1, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="cache_seqlens is on cpu"):
        alibi_attention(q, k, v, cache_seqlens=torch.tensor([8, 3], dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# GPU: real decode shapes through the heuristic (no forced split size)
# ------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("batch,seqlen_q,seqlen_k", [(1, 1, 4096), (4, 16, 3000), (2, 7, 777)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_shapes(monkeypatch, batch, seqlen_q, seqlen_k, dtype):
    calls = count_calls_of(monkeypatch, alibi_decode, "launch_alibi_decode")
    torch.manual_seed(17)
    _check(_make_qkv(batch, 32, 8, seqlen_q, seqlen_k, 128, dtype))
    assert calls
    lengths = torch.randint(0, seqlen_k + 1, (batch,), device=DEVICE, dtype=torch.int32)
    _check_cache(_make_qkv(batch, 32, 8, seqlen_q, seqlen_k, 128, dtype), lengths)


def test_kvcache_entry_point_is_alibi_attention_with_cache_seqlens():
    from posenc_triton import alibi_attention_with_kvcache

    torch.manual_seed(8)
    q = torch.randn(2, 2, 4, 48, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 40, 1, 48, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([40, 17], device=DEVICE)
    for causal in (True, False):
        want = alibi_attention(q, k, v, is_causal=causal, layout="bshd", cache_seqlens=lengths)
        got = alibi_attention_with_kvcache(q, k, v, lengths, is_causal=causal, layout="bshd")
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="cache_seqlens must be an integer tensor"):
        alibi_attention_with_kvcache(q, k, v, None, layout="bshd")
