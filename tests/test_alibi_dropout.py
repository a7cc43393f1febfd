"""Attention dropout inside the ALiBi kernels (``dropout_p``).

The keep-mask is never stored: the forward and both backward kernels draw it from a Philox
key. ``alibi_ops.dropout_keep_mask`` (the test hook, like flash-attn's ``return_attn_probs``)
materialises it for tiny shapes from the key that ``alibi_ops.draw_dropout_seed`` draws, so
re-seeding torch's generator before it yields the key a call used. Given that mask, forward
and backward equal the float64 reference with the same mask (flash-attn's error rule); the
keep rate and the ``1 / (1 - p)`` scaling hold statistically; ``p = 0`` is today's path.
"""

import functools

import pytest
import torch
from test_alibi_slopes_grad import check_dslopes

from conftest import (
    DEVICE,
    check_against_reference,
    fwd_bwd,
    padding_mask,
    requires_cuda,
)
from posenc_triton import ALiBiAttention, _backend, alibi_launch, alibi_ops
from posenc_triton.alibi import alibi_attention, alibi_slopes
from posenc_triton.reference import alibi_attention_reference, alibi_attention_varlen_reference

SEED = 1234


def _qkv(b, hq, hk, sq, sk, d, dtype):
    return [torch.randn(*shape, dtype=dtype, device=DEVICE)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def _keep_mask(p, batch, num_heads, seqlen_q, seqlen_k):
    """The mask of the call made right after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    seed = alibi_ops.draw_dropout_seed(DEVICE)
    return alibi_ops.dropout_keep_mask(seed, p, batch, num_heads, seqlen_q, seqlen_k)


def _check(fast, ref, inputs, mask, with_slopes=False):
    """``fast(*inputs)`` (run after seeding) against ``ref(*inputs, mask, upcast=...)``."""
    dtype = inputs[0].dtype

    def seeded(*t):
        torch.manual_seed(SEED)
        return fast(*t)

    out, grads, grad_out = fwd_bwd(seeded, inputs)
    grads64, grads_same = check_against_reference(functools.partial(ref, dropout_mask=mask),
                                                  inputs, out, grads, grad_out)
    if with_slopes:
        check_dslopes(grads[3], grads64[3], grads_same[3], dtype)
    return out


def _check_dense(inputs, p, slopes=None, **kwargs):
    q, k = inputs[0], inputs[1]
    layout = kwargs.get("layout", "bhsd")
    hd, sd = (1, 2) if layout == "bhsd" else (2, 1)
    mask = _keep_mask(p, q.shape[0], q.shape[hd], q.shape[sd], k.shape[sd])
    inputs = [*inputs, slopes] if slopes is not None else inputs
    fast = lambda q, k, v, s=None: alibi_attention(q, k, v, s, dropout_p=p, **kwargs)
    ref = lambda q, k, v, s=None, **r: alibi_attention_reference(q, k, v, s, dropout_p=p,
                                                                 **kwargs, **r)
    return _check(fast, ref, inputs, mask, slopes is not None), mask


@pytest.mark.parametrize("seqlen_q,seqlen_k,dtype", [(37, 37, torch.float32),
                                                     (19, 37, torch.float16),
                                                     (37, 19, torch.bfloat16)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference_given_the_mask(is_causal, seqlen_q, seqlen_k, dtype):
    torch.manual_seed(0)
    _, mask = _check_dense(_qkv(1, 3, 1, seqlen_q, seqlen_k, 40, dtype), 0.3,
                           is_causal=is_causal)
    assert 0 < mask.float().mean() < 1


@pytest.mark.parametrize("kind", ["left", "random"])
def test_key_padding_and_trainable_slopes(kind):
    torch.manual_seed(1)
    slopes = alibi_slopes(3, DEVICE) * (0.5 + torch.rand(2, 3, device=DEVICE))
    _check_dense(_qkv(2, 3, 1, 29, 29, 16, torch.float32), 0.25, slopes,
                 key_padding_mask=padding_mask(kind, 2, 29))


def test_bshd_gqa_fp16():
    torch.manual_seed(2)
    inputs = [t.transpose(1, 2) for t in _qkv(2, 2, 1, 21, 33, 24, torch.float16)]
    _check_dense(inputs, 0.5, is_causal=False, layout="bshd")


@pytest.mark.parametrize("per_batch", [False, True])
def test_packed(per_batch):
    """Packed input (empty sequences included): each sequence's mask is the top-left corner
    of its batch row of the hook's ``[B, Hq, max_Sq, max_Sk]``."""
    torch.manual_seed(3)
    lengths = [(37, 37), (5, 21), (0, 9), (6, 0), (23, 12)]
    lq, lk = zip(*lengths)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=DEVICE) for n in (lq, lk))
    q = torch.randn(sum(lq), 2, 16, device=DEVICE)
    k, v = (torch.randn(sum(lk), 1, 16, device=DEVICE) for _ in range(2))
    slopes = alibi_slopes(2, DEVICE) * (0.5 + torch.rand(len(lengths), 2, device=DEVICE))
    slopes = slopes if per_batch else slopes[0]
    mask = _keep_mask(0.4, len(lengths), 2, max(lq), max(lk))
    fast = lambda q, k, v, s: alibi_attention(q, k, v, s, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                              dropout_p=0.4)
    ref = lambda q, k, v, s, **r: alibi_attention_varlen_reference(q, k, v, cu_q, cu_k, s,
                                                                   dropout_p=0.4, **r)
    _check(fast, ref, [q, k, v, slopes], mask, with_slopes=True)


def test_keep_rate_and_scaling():
    """Keep rate 1 - p (within 5 sigma), independent across heads and rows; outputs of
    ``v = 1`` average 1 (the 1 / (1 - p) scaling), with near-uniform probabilities."""
    p, b, h, s = 0.4, 1, 4, 64
    mask = _keep_mask(p, 2, h, s, s).float()
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1])
    torch.manual_seed(4)
    q, k, _ = _qkv(b, h, h, s, s, 16, torch.float32)
    out = alibi_attention(q * 0.1, k, torch.ones_like(k), torch.full((h,), 1e-3, device=DEVICE),
                          is_causal=False, dropout_p=p)
    values = out[..., 0]  # each row: sum_j P_ij Z_ij / (1 - p), mean 1, variance p/(1-p)/s
    sigma = (p / ((1 - p) * s) / values.numel()) ** 0.5
    assert abs(values.mean().item() - 1) < 6 * sigma
    assert values.std() > 0.5 * (p / ((1 - p) * s)) ** 0.5, "rows should drop different keys"


def test_seeded_runs_repeat_and_calls_differ():
    torch.manual_seed(5)
    inputs = _qkv(1, 2, 1, 20, 20, 16, torch.float32)
    torch.manual_seed(6)
    first, second = (alibi_attention(*inputs, dropout_p=0.5) for _ in range(2))
    torch.manual_seed(6)
    again = alibi_attention(*inputs, dropout_p=0.5)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_p_zero_is_the_plain_path():
    """``dropout_p=0`` draws no random number and gives the default call's output exactly."""
    torch.manual_seed(7)
    inputs = _qkv(1, 2, 2, 19, 19, 16, torch.float16)
    state = torch.get_rng_state()
    out = alibi_attention(*inputs, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, alibi_attention(*inputs))
    assert alibi_launch.common_meta(inputs[0], True, False, False, 0.0)["HAS_DROPOUT"] is False


@pytest.mark.filterwarnings("ignore:alibi_attention. cpu tensors run the PyTorch reference")
def test_reference_path_uses_reference_dropout(monkeypatch):
    """Where the kernels do not run (CPU without the interpreter), the reference drops."""
    monkeypatch.setattr(_backend, "use_triton", lambda t: False)
    torch.manual_seed(8)
    inputs = [t.cpu() for t in _qkv(1, 2, 1, 9, 11, 8, torch.float32)]
    torch.manual_seed(9)
    out = alibi_attention(*inputs, dropout_p=0.5)
    torch.manual_seed(9)
    torch.testing.assert_close(out, alibi_attention_reference(*inputs, dropout_p=0.5))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), "0.1", True, None])
def test_errors(p):
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        alibi_attention(q, q, q, dropout_p=p)


def test_error_cache_seqlens():
    """The KV-cache path is inference only: no dropout, no slope gradient."""
    q = torch.randn(2, 2, 1, 8, device=DEVICE)
    k = torch.randn(2, 2, 5, 8, device=DEVICE)
    lengths = torch.tensor([3, 5], device=DEVICE)
    with pytest.raises(ValueError, match="cache_seqlens is for inference"):
        alibi_attention(q, k, k, cache_seqlens=lengths, dropout_p=0.1)
    slopes = alibi_slopes(2, DEVICE).requires_grad_()
    with pytest.raises(ValueError, match="cache_seqlens is for inference"):
        alibi_attention(q, k, k, slopes, cache_seqlens=lengths)


def test_module_dropout_runs_the_kernel(monkeypatch):
    """Training with dropout calls alibi_attention's dropout (no reference fallback); eval
    mode drops nothing."""
    import posenc_triton.nn as nn_module

    torch.manual_seed(10)
    module = ALiBiAttention(32, 2, dropout=0.3).to(DEVICE)
    x = torch.randn(2, 17, 32, device=DEVICE)
    mask = padding_mask("right", 2, 17)
    calls = []
    real = nn_module.alibi_attention
    monkeypatch.setattr(nn_module, "alibi_attention",
                        lambda *a, **kw: calls.append(kw["dropout_p"]) or real(*a, **kw))
    torch.manual_seed(11)
    out = module.train()(x, mask, True)
    q, k, v = module._project(x)
    torch.manual_seed(11)
    want = module.o_proj(real(q, k, v, module.slopes, is_causal=True, layout="bshd",
                              key_padding_mask=mask, dropout_p=0.3).reshape(2, 17, 32))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not torch.equal(out, module.eval()(x, mask, True))
    assert calls == [0.3, 0.0]


@pytest.mark.parametrize("packed", [False, True])
def test_torch_compile_fullgraph_traces(packed):
    """Dynamo traces the seed draw and both ops; the seeded compiled call equals eager."""
    torch.manual_seed(12)
    q, k, v = _qkv(1, 2, 1, 19, 23, 16, torch.float32)
    kwargs = {"dropout_p": 0.3}
    if packed:
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
        kwargs.update(cu_seqlens_q=torch.tensor([0, 19], dtype=torch.int32, device=DEVICE),
                      cu_seqlens_k=torch.tensor([0, 23], dtype=torch.int32, device=DEVICE),
                      max_seqlen_q=19, max_seqlen_k=23)

    step = functools.partial(alibi_attention, **kwargs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(SEED)
    out, grads, grad_out = fwd_bwd(compiled, [q, k, v])
    torch.manual_seed(SEED)
    want, want_grads, _ = fwd_bwd(step, [q, k, v], grad_out)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got, expected)


@requires_cuda
def test_gpu_cuda_graph_capture(monkeypatch):
    """Forward and backward with dropout replay from a CUDA graph: each replay draws a new
    key (the captured seed tensor holds it) and equals the reference given its mask."""
    seeds = []
    draw = alibi_ops.draw_dropout_seed
    monkeypatch.setattr(alibi_ops, "draw_dropout_seed", lambda d: seeds.append(draw(d)) or
                        seeds[-1])
    torch.manual_seed(13)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 256, 256, 64, torch.bfloat16))
    grad_out = torch.randn_like(q)

    def step():
        out = alibi_attention(q, k, v, dropout_p=0.2)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(captured[0].clone())
        mask = alibi_ops.dropout_keep_mask(seeds[-1], 0.2, 2, 4, 256, 256)
        ref = alibi_attention_reference(q.double(), k.double(), v.double(), dropout_p=0.2,
                                        dropout_mask=mask)
        torch.testing.assert_close(outs[-1].double(), ref, rtol=2e-2, atol=2e-2)
    assert not torch.equal(outs[0], outs[1])
