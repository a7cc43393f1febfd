"""The TMA paths (sm_90 and later): the tiles each kernel loops over (K/V in the forward and
dq, Q/dO in dkdv) through tensor descriptors.

On CPU the interpreter runs the descriptor loads when ``alibi_tma.tma_capable`` is patched
true; the path must agree with the pointer path there to an output rounding (the same
arithmetic on the same tiles, rows past ``Sk`` read as 0 either way; the interpreter's fp32
products may round differently for a transposed operand) and meet the float64 reference's
error rule. On a GPU (sm_90 or later) the autotuner may pick other tiles for the two paths:
both then meet the reference's rule. Inputs a
descriptor cannot address (strides that are not 16-byte multiples), key padding masks and
packed input take the pointer path.
"""

import pytest
import torch
from test_alibi import LONG_SPAN_SLOPES, _check, _make_qkv

from conftest import DEVICE, fwd_bwd
from posenc_triton import alibi_decode, alibi_ops, alibi_tma
from posenc_triton.alibi import alibi_attention


@pytest.fixture
def tma(monkeypatch):
    """Descriptor path on; returns, per ``tma_descriptors`` call, whether it gave descriptors."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    taken = []
    real = alibi_tma.tma_descriptors

    def spy(*args):
        descs = real(*args)
        taken.append(descs[0] > 0)
        return descs

    monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: True)
    monkeypatch.setattr(alibi_tma, "tma_descriptors", spy)
    return taken


def _forward(inputs, **kwargs):
    with torch.no_grad():
        return alibi_attention(*inputs, **kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 3, 37, 37, 64), (1, 4, 2, 20, 45, 80),
                                   (2, 2, 1, 50, 19, 32), (1, 2, 2, 1, 33, 96)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_tma_matches_pointer_path(tma, monkeypatch, shape, is_causal, layout):
    inputs = _make_qkv(*shape, torch.bfloat16, layout)
    if DEVICE == "cuda":
        _check(inputs, is_causal=is_causal, layout=layout)
        monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: False)
        _check(inputs, is_causal=is_causal, layout=layout)
        assert tma == [True, False]
        return
    with_tma = _forward(inputs, is_causal=is_causal, layout=layout)
    assert tma == [True]
    monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: False)
    pointers = _forward(inputs, is_causal=is_causal, layout=layout)
    torch.testing.assert_close(with_tma, pointers, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("is_causal", [True, False])
def test_tma_against_reference(tma, dtype, is_causal):
    _check(_make_qkv(2, 4, 2, 29, 41, 80, dtype), is_causal=is_causal)
    assert tma == ([] if dtype == torch.float32 else [True] * 3)  # fp32: pointer loads


def test_tma_dropout_matches_pointer_path(tma, monkeypatch):
    inputs = _make_qkv(1, 2, 2, 24, 40, 64, torch.float16)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(alibi_ops, "draw_dropout_seed", lambda device: seed)
    with_tma = _forward(inputs, dropout_p=0.3)
    monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: False)
    pointers = _forward(inputs, dropout_p=0.3)
    assert tma == [True, False]
    torch.testing.assert_close(with_tma, pointers, atol=2e-2, rtol=0)  # the same kept keys


def test_unaligned_strides_take_pointers(tma):
    q, k, v = _make_qkv(1, 2, 2, 20, 20, 40, torch.bfloat16)
    wide = torch.randn(1, 2, 20, 41, dtype=torch.bfloat16, device=DEVICE)
    k = wide[..., :40]  # rows 82 bytes apart: no descriptor can address them
    _check([q, k, v])
    assert not tma[0]


def test_key_mask_and_packed_take_pointers(tma):
    q, k, v = _make_qkv(2, 2, 2, 20, 20, 64, torch.bfloat16)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False
    _check([q, k, v], key_padding_mask=mask)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # [20, H, D]
    _forward(packed, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13)
    assert not any(tma)


@pytest.mark.parametrize("shape", [(2, 3, 3, 37, 37, 64), (1, 4, 2, 20, 45, 80),
                                   (2, 2, 1, 50, 19, 32)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_tma_backward(tma, monkeypatch, shape, is_causal):
    """Forward, dq (K/V descriptors) and dkdv (Q/dO descriptors) against the reference, and
    against the pointer path."""
    inputs = _make_qkv(*shape, torch.bfloat16, "bshd")
    out, _ = _check(inputs, is_causal=is_causal, layout="bshd")
    assert tma == [True, True, True]
    grad_out = torch.randn_like(out)
    run = lambda *t: alibi_attention(*t, is_causal=is_causal, layout="bshd")
    with_tma = fwd_bwd(run, inputs, grad_out)[1]
    monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: False)
    if DEVICE == "cuda":  # the autotuner may pick other tiles: the reference's rule
        _check(inputs, is_causal=is_causal, layout="bshd")
        return
    pointers = fwd_bwd(run, inputs, grad_out)[1]
    assert tma == [True] * 6 + [False] * 3
    for a, b in zip(with_tma, pointers):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


@pytest.mark.parametrize("layout, mode", [("bhsd", 1), ("bshd", 2)])
def test_descriptors_in_memory_order(monkeypatch, layout, mode):
    """A tensor map describes a row-major layout: ``bshd`` input is addressed as ``[B, S, H,
    D]``; strides that are not row-major (an expanded gradient), or two tensors laid out
    differently, take pointers."""
    _, k, v = _make_qkv(2, 4, 2, 24, 24, 64, torch.bfloat16, layout)
    k, v = (t.transpose(1, 2) if layout == "bshd" else t for t in (k, v))  # as bhsd views
    got = alibi_tma.tma_view(k)
    assert got is not None and got[0] == mode
    assert all(a >= b * n for a, b, n in zip(got[2], got[2][1:], got[1].shape[1:]))
    expanded = torch.zeros(1, 1, 24, 64, dtype=torch.bfloat16, device=DEVICE).expand(2, 2, -1, -1)
    assert alibi_tma.tma_view(expanded) is None
    other = v.contiguous() if layout == "bshd" else v.transpose(1, 2).contiguous().transpose(1, 2)
    monkeypatch.setattr(alibi_tma, "tma_capable", lambda t: True)
    assert alibi_tma.tma_descriptors(k, v, 64, 16)[0] == mode
    assert alibi_tma.tma_descriptors(k, other, 64, 16) == (0, None, None)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(4, 0), (0, 4)])
def test_tma_empty_sequences(tma, seqlen_q, seqlen_k):
    """No key (every row empty: output 0) or no query: no descriptor of an empty tensor."""
    q, k, v = _make_qkv(1, 2, 2, seqlen_q, seqlen_k, 64, torch.bfloat16)
    out, grads, _ = fwd_bwd(lambda *t: alibi_attention(*t, is_causal=False), [q, k, v])
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("is_causal", [True, False])
def test_tma_long_key_span(tma, monkeypatch, is_causal):
    """The descriptor path's own score arithmetic (dq holds the per-tile-invariant terms)
    over hundreds of key tiles, in fp32 at its tolerance: the interpreter runs fp32 through
    descriptors, which a GPU launch never does."""
    if DEVICE == "cuda":
        pytest.skip("fp32 takes pointer loads on a GPU")
    monkeypatch.setattr(alibi_decode, "use_split", lambda *args: False)  # the dense forward
    monkeypatch.setattr(alibi_tma, "tma_eligible",
                        lambda q, wrap, varlen, mask: not (wrap or varlen or mask is not None))
    torch.manual_seed(43)
    inputs = _make_qkv(1, 4, 2, 7, 2000, 16, torch.float32)
    _check(inputs, torch.tensor(LONG_SPAN_SLOPES, device=DEVICE), is_causal=is_causal)
    assert tma == [True] * 3
