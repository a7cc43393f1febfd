"""Trainable ALiBi slopes: the slope gradient of the fused backward against float64 autograd.

``dm_h = -sum_ij dS_ij * dist_ij`` comes from the ``dq`` kernel, one fp32 partial per program
summed by torch (no ``Sq x Sk`` tensor, no atomics). It is checked against the autograd of the
float64 reference under flash-attn's rule (the same-dtype reference's error, twice, plus the
dtype's atol scaled by the gradient's size: it sums ``Sq x Sk`` terms), with ``[Hq]`` and
``[B, Hq]`` slopes, GQA, odd lengths, key padding masks and packed input; ``dq, dk, dv`` are
checked alongside. Then the modules: ``ALiBiAttention(trainable_slopes=True)``.
"""

import functools

import pytest
import torch

import posenc_triton.alibi as alibi_module
from conftest import (
    DEVICE,
    FP32_BWD_ATOL,
    check_compiled,
    check_dslopes,
    check_error_rule,
    count_calls_of,
    fwd_bwd,
    padding_mask,
    set_interpreter_tile,
)
from posenc_triton import ALiBiAttention
from posenc_triton.alibi import alibi_attention, alibi_slopes
from posenc_triton.reference import (
    ALiBiAttentionReference,
    alibi_attention_reference,
    alibi_attention_varlen_reference,
)


def _qkv(b, hq, hk, sq, sk, d, dtype):
    return [torch.randn(*shape, dtype=dtype, device=DEVICE)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def _slopes(b, hq, per_batch):
    """Positive slopes of mixed sizes (fresh, not the default ones)."""
    slopes = alibi_slopes(hq, DEVICE) * (0.5 + torch.rand(b, hq, device=DEVICE))
    return slopes if per_batch else slopes[0]


def _check(fast, ref, inputs, slopes):
    """``fast(q, k, v, slopes)`` against ``ref(q, k, v, slopes, upcast=...)``: output, the
    q/k/v gradients and the slope gradient."""
    dtype = inputs[0].dtype
    out, grads, grad_out = fwd_bwd(fast, [*inputs, slopes])
    ref64, grads64, _ = fwd_bwd(ref, [t.double() for t in (*inputs, slopes)], grad_out.double())
    ref_same, grads_same = ref64, grads64
    if dtype != torch.float32:
        ref_same, grads_same, _ = fwd_bwd(functools.partial(ref, upcast=False),
                                          [*inputs, slopes], grad_out)
    check_error_rule("out", out, ref64, ref_same, dtype)
    for name, g, g64, gs in zip(("dq", "dk", "dv"), grads, grads64, grads_same):
        check_error_rule(name, g, g64, gs, dtype, atol=FP32_BWD_ATOL)
    check_dslopes(grads[3], grads64[3], grads_same[3], dtype)
    return grads[3]


def _check_dense(inputs, slopes, **kwargs):
    fast = lambda q, k, v, s: alibi_attention(q, k, v, s, **kwargs)
    ref = lambda q, k, v, s, upcast=True: alibi_attention_reference(q, k, v, s, upcast=upcast,
                                                                     **kwargs)
    return _check(fast, ref, inputs, slopes)


# Sq == Sk, Sq < Sk, Sq > Sk (causal rows with no key), each in one dtype
CASES = [(37, 37, torch.float32), (19, 37, torch.float16), (37, 19, torch.bfloat16)]


@pytest.mark.parametrize("seqlen_q,seqlen_k,dtype", CASES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference(is_causal, seqlen_q, seqlen_k, dtype):
    torch.manual_seed(0)
    _check_dense(_qkv(1, 6, 2, seqlen_q, seqlen_k, 40, dtype), _slopes(1, 6, False),
                 is_causal=is_causal)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("is_causal", [True, False])
def test_per_batch_slopes_mqa(is_causal, per_batch):
    torch.manual_seed(1)
    dslopes = _check_dense(_qkv(2, 3, 1, 21, 45, 16, torch.float32), _slopes(2, 3, per_batch),
                           is_causal=is_causal)
    assert dslopes.shape == ((2, 3) if per_batch else (3,))


@pytest.mark.parametrize("kind,dtype", [("right", torch.bfloat16), ("left", torch.float32),
                                        ("random", torch.float16)])
def test_key_padding(kind, dtype):
    """Padded keys and rows with no visible key (left padding, causal) add nothing."""
    torch.manual_seed(2)
    mask = padding_mask(kind, 4, 33)
    _check_dense(_qkv(4, 2, 1, 33, 33, 16, dtype), _slopes(4, 2, True), is_causal=True,
                 key_padding_mask=mask)


def test_bshd_and_scale():
    torch.manual_seed(3)
    inputs = [t.transpose(1, 2) for t in _qkv(2, 2, 2, 17, 29, 24, torch.float16)]
    _check_dense(inputs, _slopes(2, 2, False), is_causal=False, layout="bshd", scale=0.3)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
def test_tile_shapes(monkeypatch, block_m, block_n):
    set_interpreter_tile(monkeypatch, block_m, block_n)
    torch.manual_seed(4)
    _check_dense(_qkv(1, 2, 1, 45, 70, 16, torch.float32), _slopes(1, 2, False))


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("is_causal", [True, False])
def test_packed(is_causal, per_batch):
    """Packed sequences, empty ones included: ``[B, Hq]`` slopes get each sequence's sum."""
    torch.manual_seed(5)
    lengths = [(37, 37), (5, 21), (0, 9), (6, 0), (23, 12)]
    lq, lk = zip(*lengths)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=DEVICE) for n in (lq, lk))
    q = torch.randn(sum(lq), 2, 16, dtype=torch.float32, device=DEVICE)
    k, v = (torch.randn(sum(lk), 1, 16, dtype=torch.float32, device=DEVICE) for _ in range(2))
    fast = lambda q, k, v, s: alibi_attention(q, k, v, s, is_causal=is_causal,
                                              cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = lambda q, k, v, s, upcast=True: alibi_attention_varlen_reference(
        q, k, v, cu_q, cu_k, s, is_causal=is_causal, upcast=upcast)
    dslopes = _check(fast, ref, [q, k, v], _slopes(len(lengths), 2, per_batch))
    if per_batch:  # sequences with no query or no key contribute nothing
        assert torch.equal(dslopes[2:4], torch.zeros_like(dslopes[2:4]))


def test_slopes_only_and_deterministic(monkeypatch):
    """Slopes alone may require grad; two backward passes agree bit for bit; the fused path
    runs (never the ``S x S`` reference)."""
    calls = count_calls_of(monkeypatch, alibi_module, "alibi_attention_reference")
    torch.manual_seed(6)
    q, k, v = _qkv(2, 2, 1, 40, 40, 16, torch.float16)
    slopes = _slopes(2, 2, True).requires_grad_()
    grad_out = torch.randn_like(q)
    grads = [torch.autograd.grad(alibi_attention(q, k, v, slopes), slopes, grad_out)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    ref = torch.autograd.grad(alibi_attention_reference(
        q.double(), k.double(), v.double(), slopes.double()), slopes, grad_out.double())[0]
    same = torch.autograd.grad(alibi_attention_reference(q, k, v, slopes, upcast=False),
                               slopes, grad_out)[0]
    check_dslopes(grads[0], ref, same, torch.float16)
    assert not calls


def test_frozen_slopes_get_no_gradient():
    torch.manual_seed(7)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 9, 9, 16, torch.float32))
    slopes = _slopes(1, 2, False)
    alibi_attention(q, k, v, slopes).sum().backward()
    assert slopes.grad is None and q.grad is not None


def test_torch_compile_fullgraph_traces():
    torch.manual_seed(8)
    q, k, v = _qkv(2, 2, 1, 19, 23, 16, torch.float32)
    check_compiled(alibi_attention, [q, k, v, _slopes(2, 2, True)], backend="aot_eager")


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------


def test_module_slopes_are_a_float32_parameter():
    module = ALiBiAttention(64, 4, trainable_slopes=True)
    assert isinstance(module.slopes, torch.nn.Parameter)
    assert "slopes" in module.state_dict()
    assert torch.equal(module.slopes.detach(), alibi_slopes(4))
    module.slopes.grad = torch.ones(4)
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16, torch.nn.Module.double):
        slopes = module.slopes
        cast(module)
        assert module.slopes is slopes, "the optimizer's Parameter must survive the cast"
        assert module.slopes.dtype == torch.float32 and module.slopes.grad.dtype == torch.float32
        assert module.q_proj.weight.dtype != torch.float32
    frozen = ALiBiAttention(64, 4)
    assert not isinstance(frozen.slopes, torch.nn.Parameter) and "slopes" not in frozen.state_dict()
    with pytest.raises(TypeError, match="trainable_slopes"):
        ALiBiAttention(64, 4, trainable_slopes=1)
    with pytest.raises(TypeError, match="trainable_slopes"):
        ALiBiAttentionReference(64, 4, trainable_slopes="yes")


@pytest.mark.parametrize("is_causal", [True, False])
def test_module_matches_reference_module(is_causal):
    """State dicts move both ways; the slope gradient matches the float64 reference module's."""
    torch.manual_seed(9)
    module = ALiBiAttention(48, 3, num_kv_heads=1, trainable_slopes=True).to(DEVICE)
    reference = ALiBiAttentionReference(48, 3, num_kv_heads=1, trainable_slopes=True)
    reference.load_state_dict(module.state_dict())
    module.load_state_dict(reference.state_dict())
    reference = reference.to(DEVICE).double()
    x = torch.randn(2, 23, 48, device=DEVICE)
    mask = padding_mask("right", 2, 23)
    out = module(x, mask, is_causal)
    ref = reference(x.double(), mask, is_causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.slopes.grad.double(), reference.slopes.grad,
                               rtol=1e-5, atol=1e-5 * (1 + reference.slopes.grad.abs().max()))
    assert module.slopes.grad.abs().max() > 0


def test_module_learns_its_slopes():
    torch.manual_seed(10)
    module = ALiBiAttention(32, 4, trainable_slopes=True).to(DEVICE)
    before = module.slopes.detach().clone()
    optimizer = torch.optim.SGD([module.slopes], lr=0.1)
    module(torch.randn(2, 17, 32, device=DEVICE), is_causal=True).square().mean().backward()
    optimizer.step()
    assert not torch.equal(module.slopes.detach(), before)
