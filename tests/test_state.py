"""State is never poisoned: in-place autograd on views, caches filled under inference mode,
module casts, threads, devices other than the current one, and one-time slow-path warnings.
"""

import threading

import pytest
import torch

import posenc_triton
from conftest import DEVICE, HAS_CUDA, assert_close, fwd_bwd
from posenc_triton import _backend, alibi, reference
from posenc_triton.reference import RoPEAttentionReference

# ------------------------------------------------------------------------------------------
# apply_rope(inplace=True) under autograd, on views
# ------------------------------------------------------------------------------------------


def _tables(rotary_dim, length=64):
    inv_freq, scaling = posenc_triton.rope_frequencies(rotary_dim, device=DEVICE)
    return posenc_triton.rope_cos_sin(length, inv_freq, scaling)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_on_projection_views(layout, dtype):
    # q, k are .view()s of a projection's output (and bhsd transposes inside): the in-place
    # rotation must be recorded by autograd, the gradients those of the out-of-place one.
    b, s, hq, hk, d = 2, 9, 3, 1, 32
    cos, sin = _tables(24)
    torch.manual_seed(0)
    x = torch.randn(b, s, 16, device=DEVICE, dtype=dtype)
    w = torch.randn((hq + hk) * d, 16, device=DEVICE, dtype=dtype)

    def step(x, w, inplace):
        qk = torch.nn.functional.linear(x, w)
        q = qk[..., :hq * d].view(b, s, hq, d)  # a view of a view: never contiguous k
        k = qk[..., hq * d:].view(b, s, hk, d)
        if layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, layout=layout, inplace=inplace)
        if inplace:
            assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
        return torch.cat([q_out.flatten(), k_out.square().flatten()])

    out, grads, grad_out = fwd_bwd(lambda x, w: step(x, w, True), (x, w))
    want, want_grads, _ = fwd_bwd(lambda x, w: step(x, w, False), (x, w), grad_out)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inplace_on_leaf_is_refused_as_by_autograd():
    cos, sin = _tables(32)
    q = torch.randn(1, 4, 2, 32, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        posenc_triton.apply_rope(q, None, cos, sin, inplace=True)


# ------------------------------------------------------------------------------------------
# Caches filled under torch.inference_mode() serve training afterwards
# ------------------------------------------------------------------------------------------


def test_rotary_cache_grown_under_inference_mode_trains_later():
    rope = posenc_triton.RotaryEmbedding(32, max_seq_len=8).to(DEVICE)
    with torch.inference_mode():
        rope(torch.randn(1, 40, 2, 32, device=DEVICE))  # grows the cache past 8 rows
    assert not rope.cos_sin_cached.is_inference() and not rope.inv_freq.is_inference()
    q = torch.randn(1, 40, 2, 32, device=DEVICE, requires_grad=True)
    q_out, _ = rope(q)
    (dq,) = torch.autograd.grad(q_out.square().sum(), q)
    q64 = q.detach().double().requires_grad_()
    cos, sin = _tables(32, length=40)
    q_ref, _ = reference.apply_rope_reference(q64, None, cos, sin)
    (want,) = torch.autograd.grad(q_ref.square().sum(), q64)
    assert_close(dq, want)


def test_rope_attention_served_under_inference_mode_trains_later():
    layer = posenc_triton.RoPEAttention(32, 4, max_seq_len=4).to(DEVICE)
    with torch.inference_mode():  # serving longer sequences grows the cos/sin cache
        layer(torch.randn(2, 12, 32, device=DEVICE), is_causal=True)
    x = torch.randn(2, 12, 32, device=DEVICE, requires_grad=True)
    layer(x, is_causal=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_default_slopes_cached_under_inference_mode_train_later():
    alibi._cached_slopes.cache_clear()
    q, k, v = (torch.randn(1, 7, 9, 16, device=DEVICE) for _ in range(3))
    with torch.inference_mode():
        posenc_triton.alibi_attention(q, k, v)  # fills the cache for 7 heads
    leaves = [t.requires_grad_() for t in (q, k, v)]
    posenc_triton.alibi_attention(*leaves).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# ------------------------------------------------------------------------------------------
# Module casts keep the position tables float32; float64 activations run the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_rotary_tables_stay_float32_under_casts(cast):
    rope = posenc_triton.RotaryEmbedding(32, max_seq_len=64).to(DEVICE)
    before = rope.cos_sin_cached.clone()
    getattr(rope, cast)()
    assert rope.cos_sin_cached.dtype == rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.cos_sin_cached, before, rtol=0, atol=0)
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    q = torch.randn(1, 64, 2, 32, device=DEVICE, dtype=dtype)
    q_out, _ = rope(q)
    cos, sin = _tables(32)
    assert q_out.dtype == dtype
    assert_close(q_out, reference.apply_rope_reference(q.double(), None, cos, sin)[0],
                 None if dtype != torch.float64 else torch.float32)


def test_rope_attention_double_matches_reference_module():
    torch.manual_seed(0)
    layer = posenc_triton.RoPEAttention(32, 4, num_kv_heads=2).to(DEVICE).double()
    ref = RoPEAttentionReference(32, 4, num_kv_heads=2).to(DEVICE).double()
    ref.load_state_dict(layer.state_dict())
    assert layer.rotary.cos_sin_cached.dtype == torch.float32
    x = torch.randn(2, 10, 32, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(layer(x, is_causal=True), ref(x, is_causal=True))


def test_float64_apply_rope_runs_reference():
    cos, sin = _tables(16)
    q = torch.randn(2, 5, 3, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    q_out, _ = posenc_triton.apply_rope(q, None, cos, sin)
    assert q_out.dtype == torch.float64
    torch.testing.assert_close(q_out, reference.apply_rope_reference(q, None, cos, sin)[0])
    assert torch.autograd.gradcheck(
        lambda t: posenc_triton.apply_rope(t, None, cos, sin)[0], (q[:1, :2, :1],))


# ------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------


def test_rotary_cache_grown_from_threads(monkeypatch):
    # cos and sin live in one buffer: a thread never sees one grown without the other. The
    # reference path runs (Triton's interpreter is not thread-safe; a GPU launch is).
    monkeypatch.setattr("posenc_triton.rope.use_triton", lambda t: False)
    rope = posenc_triton.RotaryEmbedding(16, max_seq_len=2)
    errors = []

    def work(seqlen):
        try:
            for s in range(1, seqlen):
                q = torch.randn(1, s, 1, 16)
                q_out, _ = rope(q)
                cos, sin = _tables(16, length=s)
                assert_close(q_out, reference.apply_rope_reference(
                    q.double(), None, cos.cpu(), sin.cpu())[0])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(40 + 7 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------------------------------
# One-time warnings for silent slow paths
# ------------------------------------------------------------------------------------------


def test_reference_attention_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "use_triton", lambda t: False)
    monkeypatch.setattr(_backend, "_WARNED", set())
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with pytest.warns(UserWarning, match=r"cpu tensors run the PyTorch reference.*Sq x Sk"):
        posenc_triton.alibi_attention(q, k, v)
    with pytest.warns(UserWarning, match="float64 inputs run the PyTorch reference"):
        posenc_triton.alibi_attention(*(t.double() for t in (q, k, v)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posenc_triton.alibi_attention(q, k, v)  # said once: not again


# ------------------------------------------------------------------------------------------
# A tensor on a GPU other than the current one
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_inputs_gpu():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    cos, sin = _tables(64)
    cos, sin = cos.to(dev), sin.to(dev)
    q = torch.randn(2, 128, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q_out, _ = posenc_triton.apply_rope(q, None, cos, sin)
    assert_close(q_out, reference.apply_rope_reference(q.double(), None, cos, sin)[0])
    qa, ka, va = (torch.randn(1, 4, 256, 64, device=dev, dtype=torch.bfloat16,
                              requires_grad=True) for _ in range(3))
    out = posenc_triton.alibi_attention(qa, ka, va)
    out.sum().backward()
    want = reference.alibi_attention_reference(qa.double(), ka.double(), va.double(),
                                               posenc_triton.alibi_slopes(4, dev))
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    assert torch.cuda.current_device() == 0
