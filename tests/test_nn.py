"""RoPEAttention / ALiBiAttention against their reference modules, forward and backward.

Every fast module shares its weights with a float64 reference module (``load_state_dict``);
the output, ``dx`` and the gradient of every parameter are compared with the error rule of
``test_alibi`` (fp32: the tolerance table; bf16: at most 2x the error of the same-dtype
reference module, flash-attn's rule). On CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch

import posenc_triton
from conftest import (
    DEVICE,
    FP32_BWD_ATOL,
    check_compiled,
    check_error_rule,
    padding_mask,
    requires_cuda,
)
from posenc_triton import nn as pnn
from posenc_triton.reference import ALiBiAttentionReference, RoPEAttentionReference

MODULES = {
    "rope": (pnn.RoPEAttention, RoPEAttentionReference),
    "alibi": (pnn.ALiBiAttention, ALiBiAttentionReference),
}
KINDS = list(MODULES)
DTYPES = [torch.float32, torch.bfloat16]


def _build(kind, dtype, seed=0, **kwargs):
    """``(fast in dtype, reference float64, reference in dtype)`` with one set of weights."""
    fast_cls, ref_cls = MODULES[kind]
    torch.manual_seed(seed)
    fast = fast_cls(**kwargs).to(DEVICE, dtype)
    refs = []
    for ref_dtype in (torch.float64, dtype):
        ref = ref_cls(**kwargs).to(DEVICE, ref_dtype)
        ref.load_state_dict(fast.state_dict())  # the fast module's (rounded) weights
        refs.append(ref)
    return fast, *refs


def _run(module, x, grad_out, **forward):
    """``module(x)`` and the gradients of ``<out, grad_out>``: ``{"x": dx, name: dparam}``."""
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x, **forward)
    out.backward(grad_out.to(out.dtype))
    grads = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return out.detach(), grads


def _check_modules(kind, dtype, *, batch=3, seqlen=13, attention_mask=None, is_causal=False,
                   forward=None, **kwargs):
    """Fast module vs the float64 reference module: output, dx, every parameter gradient."""
    fast, ref64, ref_same = _build(kind, dtype, **kwargs)
    x = torch.randn(batch, seqlen, kwargs["d_model"], device=DEVICE, dtype=dtype)
    grad_out = torch.randn(batch, seqlen, kwargs["d_model"], device=DEVICE, dtype=dtype)
    forward = dict(attention_mask=attention_mask, is_causal=is_causal, **(forward or {}))
    out, grads = _run(fast, x, grad_out, **forward)
    out64, grads64 = _run(ref64, x.double(), grad_out.double(), **forward)
    out_same, grads_same = out64, grads64
    if dtype != torch.float32:
        out_same, grads_same = _run(ref_same, x, grad_out, **forward)
    assert out.shape == x.shape
    check_error_rule("out", out, out64, out_same, dtype)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert grads[name] is not None, f"no gradient for {name}"
        check_error_rule(f"grad {name}", grads[name], grads64[name], grads_same[name], dtype,
                          atol=FP32_BWD_ATOL)
    return out, grads


def _empty_rows(attention_mask, is_causal):
    """bool ``[B, S]``: queries that see no key (their attention output must be 0)."""
    seen = attention_mask.cumsum(-1) > 0 if is_causal else attention_mask.any(-1, keepdim=True)
    return ~seen.expand_as(attention_mask)


# ------------------------------------------------------------------------------------------
# Fast module against the reference module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", [None, "right", "left"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, is_causal, mask, dtype):
    """GQA (4 query heads, 2 k/v heads); left padding with causal leaves rows with no key."""
    attention_mask = None if mask is None else padding_mask(mask, 3, 13)
    out, _ = _check_modules(kind, dtype, attention_mask=attention_mask, is_causal=is_causal,
                            d_model=64, num_heads=4, num_kv_heads=2)
    if attention_mask is not None:  # no bias: a row with no visible key outputs exactly 0
        empty = _empty_rows(attention_mask, is_causal)
        assert (mask == "left" and is_causal) == bool(empty.any())
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fully_padded_row(kind, is_causal):
    """A sequence with every token padded gives 0 (o_proj of 0), no NaN, finite gradients."""
    mask = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, grads = _check_modules(kind, torch.float32, batch=2, attention_mask=mask,
                                is_causal=is_causal, d_model=64, num_heads=4, num_kv_heads=1)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("num_kv_heads", [6, 3, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_odd_sizes(kind, num_kv_heads):
    """S = 13, d_model 96, 6 heads of 16 (MHA, GQA, MQA), biases, random padding, causal."""
    _check_modules(kind, torch.float32, attention_mask=padding_mask("random", 3, 13),
                   is_causal=True, d_model=96, num_heads=6, num_kv_heads=num_kv_heads,
                   bias=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_options(dtype):
    """Partial interleaved rotary, linear scaling, positions that follow left padding."""
    mask = padding_mask("left", 3, 13)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    _check_modules("rope", dtype, attention_mask=mask, is_causal=True,
                   forward={"position_ids": position_ids}, d_model=96, num_heads=6,
                   num_kv_heads=2, rotary_dim=8, interleaved=True, base=500.0,
                   scaling={"rope_type": "linear", "factor": 2.0})


def test_rope_cache_grows():
    """A sequence longer than max_seq_len: the cos/sin cache grows, results still match."""
    _check_modules("rope", torch.float32, batch=1, seqlen=21, is_causal=True, d_model=32,
                   num_heads=2, max_seq_len=8)


# ------------------------------------------------------------------------------------------
# Dropout, state dict, dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind, with_mask):
    """A layer traces into one graph, forward and backward, and gives the eager result."""
    torch.manual_seed(7)
    module = MODULES[kind][0](64, 4, num_kv_heads=2).to(DEVICE)
    mask = padding_mask("right", 2, 19) if with_mask else None
    check_compiled(lambda x: module(x, attention_mask=mask, is_causal=True),
                   [torch.randn(2, 19, 64, device=DEVICE)], backend="aot_eager")


@pytest.mark.parametrize("kind", KINDS)
def test_dropout(kind):
    """Eval mode: deterministic and equal to dropout=0. Training: different, finite."""
    fast_cls, ref_cls = MODULES[kind]
    torch.manual_seed(40)
    module = fast_cls(64, 4, dropout=0.5, num_kv_heads=2).to(DEVICE)
    plain = fast_cls(64, 4, dropout=0.0, num_kv_heads=2).to(DEVICE)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 13, 64, device=DEVICE)
    mask = padding_mask("right", 2, 13)
    module.eval()
    first, second = module(x, mask, True), module(x, mask, True)
    assert torch.equal(first, second)
    assert torch.equal(first, plain(x, mask, True))

    module.train()
    xg = x.detach().requires_grad_()
    train_out = module(xg, mask, True)
    assert torch.isfinite(train_out).all()
    assert not torch.allclose(train_out, first, rtol=1e-3, atol=1e-3)
    train_out.sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())

    ref = ref_cls(64, 4, dropout=0.5, num_kv_heads=2).to(DEVICE)  # the reference drops too
    ref.load_state_dict(module.state_dict())
    assert torch.allclose(ref.eval()(x, mask, True), first, rtol=1e-4, atol=1e-5)
    ref_train = ref.train()(x, mask, True)
    assert torch.isfinite(ref_train).all() and not torch.allclose(ref_train, first,
                                                                 rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_and_tables(kind):
    """Same parameter names as the reference; position tables are float32 non-persistent
    buffers that follow the module's device but not its dtype."""
    fast_cls, ref_cls = MODULES[kind]
    fast, ref = fast_cls(64, 4, num_kv_heads=2, bias=True), ref_cls(64, 4, num_kv_heads=2,
                                                                     bias=True)
    assert list(fast.state_dict()) == list(ref.state_dict()) == [
        f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")]
    assert fast.k_proj.weight.shape == (32, 64) and fast.o_proj.weight.shape == (64, 64)
    fast = fast.to(torch.bfloat16)
    buffers = dict(fast.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert fast.q_proj.weight.dtype == torch.bfloat16
    if kind == "alibi":
        torch.testing.assert_close(fast.slopes, posenc_triton.alibi_slopes(4), rtol=0, atol=0)


def test_exports():
    assert posenc_triton.RoPEAttention is pnn.RoPEAttention
    assert posenc_triton.ALiBiAttention is pnn.ALiBiAttention
    assert {"RoPEAttention", "ALiBiAttention"} <= set(posenc_triton.__all__)


# ------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 64, "num_heads": 5}, "d_model=64 must be divisible by num_heads=5"),
    ({"d_model": 64, "num_heads": 4, "num_kv_heads": 3}, "num_heads=4 must be a multiple of "
                                                    "num_kv_heads=3"),
    ({"d_model": 0, "num_heads": 4}, "d_model must be a positive int"),
    ({"d_model": 64, "num_heads": 0}, "num_heads must be a positive int"),
    ({"d_model": 64, "num_heads": 4, "num_kv_heads": 0}, "num_kv_heads must be a positive int"),
    ({"d_model": 64, "num_heads": 4, "dropout": 1.0}, "dropout"),
    ({"d_model": 64, "num_heads": 4, "dropout": -0.1}, "dropout"),
    ({"d_model": 64, "num_heads": 4, "max_seq_len": 0}, "max_seq_len"),
])
def test_constructor_errors(kind, kwargs, match):
    for cls in MODULES[kind]:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_constructor_errors_specific():
    with pytest.raises(ValueError, match="rotary_dim"):
        pnn.RoPEAttention(64, 4, rotary_dim=18)
    with pytest.raises(ValueError, match="rotary_dim"):
        pnn.RoPEAttention(64, 4, rotary_dim=7)
    with pytest.raises(ValueError, match=r"head_dim.*256"):
        pnn.ALiBiAttention(1024, 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("x_shape,kwargs,exc,match", [
    ((2, 13), {}, ValueError, r"x must be \[B, S, d_model=64\]"),
    ((2, 13, 32), {}, ValueError, r"x must be \[B, S, d_model=64\]"),
    ((2, 13, 64), {"attention_mask": torch.ones(2, 13)}, TypeError,
     "attention_mask must be a bool"),
    ((2, 13, 64), {"attention_mask": torch.ones(2, 12, dtype=torch.bool)}, ValueError,
     r"attention_mask must have shape \[B, S\] = \[2, 13\]"),
    ((2, 13, 64), {"attention_mask": [True] * 13}, TypeError, "attention_mask must be a torch"),
    ((2, 13, 64), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
])
def test_forward_errors(kind, x_shape, kwargs, exc, match):
    for cls in MODULES[kind]:
        with pytest.raises(exc, match=match):
            cls(64, 4)(torch.randn(x_shape), **kwargs)


def test_forward_error_integer_x():
    with pytest.raises(TypeError, match="x must be a floating"):
        pnn.ALiBiAttention(64, 4)(torch.ones(2, 13, 64, dtype=torch.int64))


# ------------------------------------------------------------------------------------------
# GPU only: real shapes in bf16
# ------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("mask", [None, "right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_bf16(kind, mask):
    attention_mask = None if mask is None else padding_mask(mask, 4, 1024)
    _check_modules(kind, torch.bfloat16, batch=4, seqlen=1024, attention_mask=attention_mask,
                   is_causal=True, d_model=1024, num_heads=16, num_kv_heads=4, bias=True)
