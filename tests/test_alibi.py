"""ALiBi attention against the float64 reference, forward and backward.

On CPU the kernels run in Triton's interpreter (tiny shapes, 16 x 16 tiles, so the odd lengths
below cross block edges); on CUDA the same tests run, plus real shapes and torch.compile.
Error rule for fp16/bf16 (flash-attn's): ``max|kernel - ref64| <= 2 * max|ref_same_dtype -
ref64| + atol``; fp32 uses the tolerance table. ``key_padding_mask`` (True = keep) has its own
section: right, left and scattered padding, fully padded batch rows, strided masks.
"""

import functools
import math

import pytest
import torch

import posenc_triton
from conftest import (
    DEVICE,
    FP32_BWD_ATOL,
    assert_close,
    check_against_reference,
    check_compiled,
    check_error_rule,
    fwd_bwd,
    padding_mask,
    poison,
    requires_cuda,
    set_interpreter_tile,
)
from posenc_triton import _backend, alibi_decode, alibi_launch
from posenc_triton.alibi import alibi_attention, alibi_slopes
from posenc_triton.reference import alibi_attention_reference


def _randn(*shape, dtype, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def _make_qkv(b, hq, hk, sq, sk, d, dtype, layout="bhsd"):
    if layout == "bhsd":
        shapes = ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))
    else:
        shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d))
    return [_randn(*s, dtype=dtype) for s in shapes]


def _check(inputs, slopes=None, *, is_causal=True, scale=None, layout="bhsd",
           key_padding_mask=None):
    """Kernel vs float64 reference (and the same-dtype reference for fp16/bf16); with a
    ``key_padding_mask``, the gradients of padded keys must be exactly 0."""
    kwargs = {"is_causal": is_causal, "scale": scale, "layout": layout,
                  "key_padding_mask": key_padding_mask}
    originals = [t.clone() for t in inputs]
    out, grads, grad_out = fwd_bwd(lambda *t: alibi_attention(*t, slopes, **kwargs), inputs)
    for t, orig in zip(inputs, originals):
        assert torch.equal(t, orig), "an input was modified"

    check_against_reference(
        lambda *t, upcast=True: alibi_attention_reference(*t, slopes, upcast=upcast, **kwargs),
        inputs, out, grads, grad_out)
    if key_padding_mask is not None:
        for name, g in zip(("dk", "dv"), grads[1:]):
            padded = _bhsd(g, layout).transpose(1, 2)[~key_padding_mask]  # [n_padded, Hk, D]
            assert torch.equal(padded, torch.zeros_like(padded)), f"{name} of padded keys != 0"
    return out, grads


def _bhsd(t, layout):
    return t.transpose(1, 2) if layout == "bshd" else t


# ------------------------------------------------------------------------------------------
# Kernels against the reference
# ------------------------------------------------------------------------------------------

SEQLENS = [(37, 37), (19, 37), (37, 19)]  # Sq == Sk, Sq < Sk, Sq > Sk (empty causal rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference(is_causal, seqlen_q, seqlen_k, dtype):
    torch.manual_seed(0)
    inputs = _make_qkv(2, 4, 2, seqlen_q, seqlen_k, 32, dtype)  # GQA, group of 2
    out, (dq, _, _) = _check(inputs, is_causal=is_causal)
    if is_causal and seqlen_q > seqlen_k:
        empty = seqlen_q - seqlen_k  # query rows before the first key see nothing
        assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
        assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 50), (40, 3), (5, 1), (16, 48), (48, 16)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_extreme_lengths(is_causal, seqlen_q, seqlen_k):
    """Decode (Sq = 1), whole blocks of empty causal rows, exact block multiples."""
    torch.manual_seed(12)
    _check(_make_qkv(1, 2, 1, seqlen_q, seqlen_k, 16, torch.float32), is_causal=is_causal)


@pytest.mark.parametrize("head_dim", [8, 16, 32, 64, 80, 96, 128])
def test_head_dims(head_dim):
    torch.manual_seed(1)
    _check(_make_qkv(1, 2, 2, 33, 33, head_dim, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_dim_256(dtype):
    torch.manual_seed(2)
    _check(_make_qkv(1, 2, 1, 20, 24, 256, dtype), is_causal=dtype == torch.float16)


@pytest.mark.parametrize("is_causal", [True, False])
def test_mqa(is_causal):
    torch.manual_seed(3)
    _check(_make_qkv(2, 4, 1, 23, 29, 16, torch.float16), is_causal=is_causal)


@pytest.mark.parametrize("per_batch", [False, True])
def test_custom_slopes_and_scale(per_batch):
    torch.manual_seed(4)
    shape = (2, 3) if per_batch else (3,)
    slopes = torch.rand(shape, device=DEVICE) * 0.5 + 0.01
    _check(_make_qkv(2, 3, 3, 21, 21, 16, torch.float32), slopes, is_causal=False, scale=0.3)
    _check(_make_qkv(2, 3, 3, 21, 21, 16, torch.bfloat16), slopes, scale=0.3)


def test_strided_slopes():
    torch.manual_seed(5)
    slopes = (torch.rand(2, 8, device=DEVICE) + 0.01)[:, ::2]  # not contiguous
    _check(_make_qkv(2, 4, 4, 17, 17, 16, torch.float32), slopes)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views(layout, dtype):
    """q, k, v sliced from one projection output: no copies, gradient into the fused tensor."""
    torch.manual_seed(6)
    b, s, h, d = 2, 27, 2, 24
    qkv = _randn(b, s, 3, h, d, dtype=dtype)

    def split(t):
        q, k, v = t.unbind(2)  # [B, S, H, D], non-contiguous
        return [x.transpose(1, 2) for x in (q, k, v)] if layout == "bhsd" else [q, k, v]

    out, (grad,), grad_out = fwd_bwd(
        lambda t: alibi_attention(*split(t), layout=layout), [qkv])
    if _backend.use_triton(out):  # the kernels allocate in the caller's layout
        assert out.is_contiguous()
    ref64, (grad64,), _ = fwd_bwd(
        lambda t: alibi_attention_reference(*split(t), layout=layout),
        [qkv.double()], grad_out.double())
    ref_same, (grad_same,), _ = fwd_bwd(
        lambda t: alibi_attention_reference(*split(t), layout=layout, upcast=False),
        [qkv], grad_out)
    check_error_rule("out", out, ref64, ref_same, dtype)
    check_error_rule("dqkv", grad, grad64, grad_same, dtype, atol=FP32_BWD_ATOL)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_outputs_contiguous_in_layout(layout):
    torch.manual_seed(7)
    inputs = _make_qkv(1, 2, 2, 18, 18, 16, torch.float16, layout)
    if not _backend.use_triton(inputs[0]):
        pytest.skip("a property of the kernels, not of the reference")
    out, grads, _ = fwd_bwd(lambda *t: alibi_attention(*t, layout=layout), inputs)
    for t in (out, *grads):
        assert t.is_contiguous()


def test_gqa_backward_deterministic():
    torch.manual_seed(8)
    inputs = _make_qkv(1, 4, 1, 19, 35, 16, torch.bfloat16)
    grad_out = torch.randn(1, 4, 19, 16, dtype=torch.bfloat16, device=DEVICE)
    first = fwd_bwd(alibi_attention, inputs, grad_out)[1]
    second = fwd_bwd(alibi_attention, inputs, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 2, 2, 8, 8), (1, 2, 2, 0, 8), (1, 2, 2, 8, 0),
                                   (1, 2, 2, 0, 0)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_empty(shape, is_causal):
    b, hq, hk, sq, sk = shape
    inputs = _make_qkv(b, hq, hk, sq, sk, 16, torch.float16)
    out, grads, _ = fwd_bwd(lambda *t: alibi_attention(*t, is_causal=is_causal), inputs)
    assert out.shape == (b, hq, sq, 16)
    assert torch.equal(out, torch.zeros_like(out))
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


def test_reference_path(monkeypatch):
    """Where Triton cannot run, CPU tensors get the reference (autograd included)."""
    monkeypatch.setattr(_backend, "use_triton", lambda t: False)
    torch.manual_seed(9)
    inputs = _make_qkv(1, 2, 1, 9, 11, 8, torch.float32, "bshd")
    out = alibi_attention(*inputs, layout="bshd")
    assert_close(out, alibi_attention_reference(*[t.double() for t in inputs], layout="bshd"))


def test_float64_runs_reference_on_cpu():
    torch.manual_seed(10)
    inputs = _make_qkv(1, 2, 2, 9, 9, 8, torch.float64)
    inputs = [t.cpu() for t in inputs]
    out = alibi_attention(*inputs)
    torch.testing.assert_close(out, alibi_attention_reference(*inputs))


# ------------------------------------------------------------------------------------------
# Key padding mask (True = keep): padded keys are hidden from every query
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("kind", ["right", "left", "random"])
def test_key_padding_matches_reference(kind, is_causal, dtype):
    """GQA, Sq < Sk; left padding with causal also leaves early query rows with no key."""
    torch.manual_seed(30)
    mask = padding_mask(kind, 3, 37)
    _check(_make_qkv(3, 2, 1, 26, 37, 16, dtype), is_causal=is_causal, key_padding_mask=mask)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(37, 37), (37, 19), (1, 37)])
@pytest.mark.parametrize("kind", ["right", "random"])
def test_key_padding_lengths(kind, seqlen_q, seqlen_k):
    """Sq == Sk, Sq > Sk (causal empty rows plus padding), decode."""
    torch.manual_seed(31)
    _check(_make_qkv(3, 2, 1, seqlen_q, seqlen_k, 16, torch.float32),
           key_padding_mask=padding_mask(kind, 3, seqlen_k))


@pytest.mark.parametrize("is_causal", [True, False])
def test_key_padding_fully_padded_row(is_causal):
    """A batch row with every key padded outputs exactly 0 and passes exactly 0 gradient."""
    torch.manual_seed(32)
    inputs = _make_qkv(2, 2, 1, 21, 21, 16, torch.float16)
    mask = torch.ones(2, 21, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, grads = _check(inputs, is_causal=is_causal, key_padding_mask=mask)
    for t in (out, *grads):
        assert not torch.isnan(t).any()
        assert torch.equal(t[1], torch.zeros_like(t[1]))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_key_padding_strided_mask(layout):
    """A mask that is a non-contiguous view (every other column; a transpose) is read in place."""
    torch.manual_seed(33)
    inputs = _make_qkv(3, 2, 1, 17, 25, 16, torch.bfloat16, layout)
    wide = padding_mask("random", 3, 50)
    _check(inputs, layout=layout, key_padding_mask=wide[:, ::2])
    tall = padding_mask("right", 3, 25).t().contiguous().t()  # strides (1, 3)
    _check(inputs, layout=layout, key_padding_mask=tall)


def test_key_padding_never_reads_padded_keys():
    """Padded K/V rows holding inf/NaN change nothing: the kernels never load them."""
    torch.manual_seed(34)
    q, k, v = _make_qkv(3, 2, 1, 20, 33, 16, torch.float16)
    if not _backend.use_triton(q):
        pytest.skip("a property of the kernels; the reference multiplies 0 by the padding")
    mask = padding_mask("random", 3, 33)
    pad = ~mask[:, None, :, None]
    clean = [k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)]
    dirty = [k.masked_fill(pad, float("inf")), v.masked_fill(pad, float("nan"))]
    fn = lambda *t: alibi_attention(*t, key_padding_mask=mask)
    out, grads, grad_out = fwd_bwd(fn, [q, *clean])
    out_dirty, grads_dirty, _ = fwd_bwd(fn, [q, *dirty], grad_out)
    assert torch.equal(out, out_dirty)
    for g, gd in zip(grads, grads_dirty):
        assert torch.equal(g, gd)


def test_key_padding_all_true_is_no_mask():
    torch.manual_seed(35)
    inputs = _make_qkv(2, 2, 1, 19, 23, 16, torch.float32)
    mask = torch.ones(2, 23, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(alibi_attention(*inputs, key_padding_mask=mask),
                               alibi_attention(*inputs), rtol=0, atol=0)


def test_key_padding_reference_path(monkeypatch):
    monkeypatch.setattr(_backend, "use_triton", lambda t: False)
    torch.manual_seed(36)
    inputs = _make_qkv(2, 2, 1, 9, 11, 8, torch.float32, "bshd")
    mask = padding_mask("left", 2, 11)
    out = alibi_attention(*inputs, layout="bshd", key_padding_mask=mask)
    assert_close(out, alibi_attention_reference(*[t.double() for t in inputs], layout="bshd",
                                                key_padding_mask=mask))


# ------------------------------------------------------------------------------------------
# Slopes
# ------------------------------------------------------------------------------------------


def _paper_slopes(n):
    """Press et al. for powers of two; BLOOM's ``build_alibi_tensor`` rule otherwise."""
    closest = 2 ** math.floor(math.log2(n))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, n - closest)
        slopes += [extra_base ** p for p in range(1, 1 + 2 * remaining, 2)]
    return slopes


@pytest.mark.parametrize("n", range(1, 129))
def test_slopes_formula(n):
    slopes = alibi_slopes(n)
    assert slopes.dtype == torch.float32 and slopes.shape == (n,)
    # float32 powers as BLOOM computes them: within a few ulps of the exact values
    expected = torch.tensor(_paper_slopes(n), dtype=torch.float64)
    torch.testing.assert_close(slopes.double(), expected, rtol=2e-6, atol=0)
    if n & (n - 1) == 0:  # closed form 2^(-8 i / n)
        closed = torch.tensor([2.0 ** (-8.0 * i / n) for i in range(1, n + 1)],
                              dtype=torch.float64)
        torch.testing.assert_close(slopes.double(), closed, rtol=2e-6, atol=0)
    assert posenc_triton.alibi_slopes is alibi_slopes


@pytest.mark.parametrize("n", [1, 3, 6, 8, 12, 40, 64, 96, 112, 128])
def test_slopes_identical_to_bloom(n):
    pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)  # [n, 1, 2]: slope * [0, 1]
    assert torch.equal(alibi_slopes(n), alibi[:, 0, 1])


def test_default_slopes_match_explicit():
    torch.manual_seed(11)
    inputs = _make_qkv(1, 6, 3, 13, 13, 16, torch.float32)
    torch.testing.assert_close(alibi_attention(*inputs),
                               alibi_attention(*inputs, alibi_slopes(6, DEVICE)),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Argument errors: the right exception, naming the argument, before any kernel
# ------------------------------------------------------------------------------------------


def _qkv(device="cpu"):
    return {"q": _randn(1, 4, 8, 16, dtype=torch.float16, device=device),
                "k": _randn(1, 2, 8, 16, dtype=torch.float16, device=device),
                "v": _randn(1, 2, 8, 16, dtype=torch.float16, device=device)}


@pytest.mark.parametrize("over,kwargs,exc,match", [
    ({"q": _randn(4, 8, 16, dtype=torch.float16, device="cpu")}, {}, ValueError, "q must be 4-D"),
    ({"k": [1, 2]}, {}, TypeError, "k must be a torch.Tensor"),
    ({"v": _randn(1, 2, 8, 16, dtype=torch.float32, device="cpu")}, {}, TypeError,
     "v has dtype"),
    ({"q": torch.ones(1, 4, 8, 16, dtype=torch.int32)}, {}, TypeError, "q must be float16"),
    ({"k": _randn(2, 2, 8, 16, dtype=torch.float16, device="cpu"),
          "v": _randn(2, 2, 8, 16, dtype=torch.float16, device="cpu")}, {}, ValueError,
     "k has batch"),
    ({"v": _randn(1, 2, 9, 16, dtype=torch.float16, device="cpu")}, {}, ValueError,
     "k and v must have the same shape"),
    ({"k": _randn(1, 2, 8, 8, dtype=torch.float16, device="cpu"),
          "v": _randn(1, 2, 8, 8, dtype=torch.float16, device="cpu")}, {}, ValueError, "head dim"),
    ({"q": _randn(1, 4, 8, 320, dtype=torch.float16, device="cpu"),
          "k": _randn(1, 2, 8, 320, dtype=torch.float16, device="cpu"),
          "v": _randn(1, 2, 8, 320, dtype=torch.float16, device="cpu")}, {}, ValueError,
     "head dim.*256"),
    ({"k": _randn(1, 3, 8, 16, dtype=torch.float16, device="cpu"),
          "v": _randn(1, 3, 8, 16, dtype=torch.float16, device="cpu")}, {}, ValueError,
     "multiple of"),
    ({}, {"layout": "sbhd"}, ValueError, "layout"),
    ({}, {"slopes": torch.ones(4, dtype=torch.float64)}, TypeError, "slopes must be float32"),
    ({}, {"slopes": torch.ones(2)}, ValueError, r"slopes must have shape \[4\]"),
    ({}, {"slopes": torch.ones(3, 4)}, ValueError, "slopes must have shape"),
    ({}, {"scale": float("nan")}, TypeError, "scale"),
    ({}, {"scale": "0.1"}, TypeError, "scale"),
    ({}, {"is_causal": None}, TypeError, "is_causal"),
    ({}, {"key_padding_mask": [True] * 8}, TypeError, "key_padding_mask must be a torch.Tensor"),
    ({}, {"key_padding_mask": torch.ones(1, 8)}, TypeError, "key_padding_mask must be a bool"),
    ({}, {"key_padding_mask": torch.ones(1, 8, dtype=torch.uint8)}, TypeError,
     "key_padding_mask must be a bool"),
    ({}, {"key_padding_mask": torch.ones(1, 9, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \[1, 8\]"),
    ({}, {"key_padding_mask": torch.ones(8, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \[1, 8\]"),
    ({}, {"key_padding_mask": torch.ones(1, 4, 8, dtype=torch.bool)}, ValueError,
     "key_padding_mask must have shape"),
])
def test_errors(over, kwargs, exc, match):
    args = {**_qkv(), **over}
    with pytest.raises(exc, match=match):
        alibi_attention(args["q"], args["k"], args["v"], **kwargs)


def test_error_sequence_past_2_24():
    """Positions are fp32 in the kernels: longer sequences are refused, not rounded."""
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16, device=DEVICE)
    k = q.expand(1, 1, (1 << 24) + 1, 16)
    with pytest.raises(ValueError, match=r"sequence lengths up to 16777216 \(2\^24\)"):
        alibi_attention(q, k, k)


def test_slopes_errors():
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


@requires_cuda
def test_errors_devices():
    args = _qkv(DEVICE)
    with pytest.raises(ValueError, match="k is on"):
        alibi_attention(args["q"], args["k"].cpu(), args["v"])
    with pytest.raises(ValueError, match="slopes is on"):
        alibi_attention(**args, slopes=torch.ones(4))
    with pytest.raises(ValueError, match="key_padding_mask is on"):
        alibi_attention(**args, key_padding_mask=torch.ones(1, 8, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
# GPU only: real shapes, torch.compile, 64-bit offsets
# ------------------------------------------------------------------------------------------


def _reference_by_head(q, k, v, slopes, is_causal):
    """fp32 reference one query head at a time (the full bias would not fit at S = 8192)."""
    group = q.shape[1] // k.shape[1]
    outs = [alibi_attention_reference(q[:, h:h + 1], k[:, h // group:h // group + 1],
                                      v[:, h // group:h // group + 1], slopes[h:h + 1],
                                      is_causal=is_causal)
            for h in range(q.shape[1])]
    return torch.cat(outs, dim=1)


@requires_cuda
@pytest.mark.parametrize("seqlen", [1024, 4096, 8192])
@pytest.mark.parametrize("is_causal", [True, False])
def test_gpu_forward_long(seqlen, is_causal):
    torch.manual_seed(20)
    q, k, v = _make_qkv(2, 8, 2, seqlen, seqlen, 128, torch.bfloat16)
    slopes = alibi_slopes(8, DEVICE)
    out = alibi_attention(q, k, v, is_causal=is_causal)
    ref = _reference_by_head(q.float(), k.float(), v.float(), slopes, is_causal)
    ref_same = _reference_by_head(q, k, v, slopes, is_causal)
    err = (out.float() - ref).abs().max().item()
    base = (ref_same.float() - ref).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1024, 1024), (1000, 2047), (777, 300)])
def test_gpu_forward_backward(seqlen_q, seqlen_k, dtype, head_dim):
    torch.manual_seed(21)
    _check(_make_qkv(2, 8, 2, seqlen_q, seqlen_k, head_dim, dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("kind", ["right", "left", "random"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1024, 1024), (1000, 2047)])
def test_gpu_key_padding(seqlen_q, seqlen_k, kind, is_causal, dtype):
    torch.manual_seed(24)
    mask = padding_mask(kind, 4, seqlen_k)
    _check(_make_qkv(4, 8, 2, seqlen_q, seqlen_k, 128, dtype), is_causal=is_causal,
           key_padding_mask=mask)


@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_compile_fullgraph_traces(with_mask):
    """Dynamo traces forward and backward without a graph break (any device; the kernels
    run eagerly behind the traced graph)."""
    torch.manual_seed(38)
    q, k, v = _make_qkv(2, 4, 2, 19, 23, 16, torch.float32)
    kwargs = {"key_padding_mask": padding_mask("random", 2, 23)} if with_mask else {}
    check_compiled(functools.partial(alibi_attention, **kwargs), [q, k, v], backend="aot_eager")


def test_torch_compile_dynamic_batch_with_batched_slopes():
    # A symbolic batch against the static [B, Hq] slopes: a tuple's `in` compares symbolic
    # sizes by identity under Dynamo and refused this matching shape.
    torch._dynamo.reset()
    q, k, v = _make_qkv(2, 2, 2, 19, 23, 16, torch.float32)
    slopes = alibi_slopes(2, DEVICE).expand(2, 2).contiguous()
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    compiled = torch.compile(alibi_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, slopes), alibi_attention(q, k, v, slopes))


@requires_cuda
@pytest.mark.parametrize("with_mask", [False, True])
def test_gpu_torch_compile_fullgraph(with_mask):
    torch.manual_seed(22)
    q, k, v = _make_qkv(2, 8, 2, 512, 512, 64, torch.bfloat16)
    kwargs = {"key_padding_mask": padding_mask("right", 2, 512)} if with_mask else {}
    # Inductor may autotune to another tile than eager did: equal up to summation order.
    check_compiled(functools.partial(alibi_attention, **kwargs), [q, k, v], rtol=2e-2,
                   atol=2e-2)


@requires_cuda
def test_gpu_past_2_31_elements():
    """q has > 2^31 elements: the last batch must be addressed with 64-bit offsets."""
    torch.manual_seed(23)
    b, h, s, d = 520, 16, 1024, 256
    q, k, v = _make_qkv(b, h, h, s, s, d, torch.bfloat16)
    assert q.numel() > 2 ** 31
    out = alibi_attention(q, k, v)
    ref = alibi_attention_reference(q[-1:], k[-1:], v[-1:])
    torch.testing.assert_close(out[-1:].float(), ref.float(), rtol=2e-2, atol=2e-2)



def test_error_batch_past_grid_limit():
    q = torch.randn(65536, 1, 1, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"batch .* at most 65535"):
        alibi_attention(q, q, q)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(45, 45), (21, 70), (70, 21)])
def test_tile_shapes(monkeypatch, seqlen_q, seqlen_k, block_m, block_n):
    """The GPU's autotuned tiles are not square: causal block skipping with BLOCK_M != BLOCK_N
    (interpreter only; on CUDA the autotuner picks the tiles), with and without padding."""
    set_interpreter_tile(monkeypatch, block_m, block_n)
    torch.manual_seed(37)
    inputs = _make_qkv(2, 2, 1, seqlen_q, seqlen_k, 16, torch.float32)
    _check(inputs)
    _check(inputs, key_padding_mask=padding_mask("random", 2, seqlen_k))


# steep (only the nearest keys count) to flat (every key counts, the bias still visible)
LONG_SPAN_SLOPES = [0.5, 2.0 ** -7, 1e-5, 0.0]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("is_causal", [True, False])
def test_long_key_span(monkeypatch, is_causal, split):
    """A few queries over thousands of keys, hundreds of tiles: the bias's per-tile frames
    (row terms, the running max, the period of the backward's query terms) must not drift.
    fp32 against float64 at the fp32 tolerance; the forward dense or split-KV."""
    monkeypatch.setattr(alibi_decode, "use_split", lambda *args: split)
    torch.manual_seed(41)
    inputs = _make_qkv(1, 4, 2, 7, 2000, 16, torch.float32)
    _check(inputs, torch.tensor(LONG_SPAN_SLOPES, device=DEVICE), is_causal=is_causal)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_every_output_element_written(monkeypatch, layout):
    # out, dq, dk and dv start as NaN: an element a kernel leaves unwritten fails the check.
    allocate = alibi_launch.empty_bhsd
    monkeypatch.setattr(alibi_launch, "empty_bhsd", lambda *a: poison(allocate(*a)))
    torch.manual_seed(31)
    _check(_make_qkv(2, 4, 2, 37, 19, 40, torch.float32, layout), layout=layout)
