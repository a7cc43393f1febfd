"""ALiBi attention on packed variable-length input (``cu_seqlens``), forward and backward.

Each packed sequence must equal attending to it alone: the kernels are compared with
``alibi_attention_varlen_reference`` (the dense reference, one sequence at a time) in
float64 under flash-attn's error rule, with sequences that are empty, shorter and longer
than the 16-row interpreter tiles, and with Sq == Sk, Sq < Sk and Sq > Sk inside one pack.
On CUDA also: real lengths, torch.compile, and CUDA-graph replay (of dense calls too, which
share the capture rules: bounds given, autotuning done beforehand).
"""

import functools

import pytest
import torch

from conftest import (
    DEVICE,
    check_against_reference,
    check_compiled,
    fwd_bwd,
    padding_mask,
    poison,
    requires_cuda,
    set_interpreter_tile,
)
from posenc_triton import _backend, alibi_launch
from posenc_triton.alibi import alibi_attention, alibi_slopes
from posenc_triton.reference import alibi_attention_varlen_reference

# (Sq, Sk) per sequence: equal, across tile edges, decode-like, empty q, empty k, Sq > Sk
LENGTHS = [(37, 37), (5, 21), (1, 17), (0, 9), (6, 0), (33, 12), (16, 16)]


def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype,
                        device=DEVICE)


def _packed(lengths, hq, hk, d, dtype):
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k)`` for ``lengths = [(Sq, Sk), ...]``."""
    lq, lk = zip(*lengths) if lengths else ((), ())
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), hq, d, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(sum(lk), hk, d, dtype=dtype, device=DEVICE) for _ in range(2))
    return q, k, v, cu_q, cu_k


def _check(q, k, v, cu_q, cu_k, slopes=None, **kwargs):
    """Kernel vs the float64 reference (and the same-dtype one for fp16/bf16)."""
    originals = [t.clone() for t in (q, k, v)]
    fast = lambda *t: alibi_attention(*t, slopes, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      **kwargs)
    out, grads, grad_out = fwd_bwd(fast, [q, k, v])
    for t, orig in zip((q, k, v), originals):
        assert torch.equal(t, orig), "an input was modified"
    ref_kwargs = {key: kwargs[key] for key in ("is_causal", "scale") if key in kwargs}
    ref = lambda *t, upcast=True: alibi_attention_varlen_reference(
        *t, cu_q, cu_k, slopes, upcast=upcast, **ref_kwargs)
    assert out.shape == q.shape
    check_against_reference(ref, [q, k, v], out, grads, grad_out)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference(is_causal, dtype):
    torch.manual_seed(40)
    _check(*_packed(LENGTHS, 4, 2, 16, dtype), is_causal=is_causal)


@pytest.mark.parametrize("head_dim", [8, 80])
@pytest.mark.parametrize("hq,hk", [(3, 3), (6, 1)])
def test_heads_and_head_dims(hq, hk, head_dim):
    """Non-power-of-two heads, MQA, head dims below the tile and not a power of two."""
    torch.manual_seed(41)
    _check(*_packed([(19, 19), (7, 30), (20, 3)], hq, hk, head_dim, torch.float32))


def test_per_sequence_slopes_and_scale():
    torch.manual_seed(42)
    slopes = torch.rand(len(LENGTHS), 4, device=DEVICE)
    _check(*_packed(LENGTHS, 4, 2, 16, torch.float32), slopes, scale=0.3)
    _check(*_packed(LENGTHS, 4, 2, 16, torch.float32), slopes[:, ::2].contiguous().repeat(1, 2),
           is_causal=False)


def test_int64_strided_cu_seqlens_and_larger_bounds():
    """int64 ``cu_seqlens`` that are a strided view, and ``max_seqlen_*`` above the longest."""
    torch.manual_seed(43)
    q, k, v, cu_q, cu_k = _packed(LENGTHS, 2, 1, 16, torch.float32)
    cu_q = torch.stack([cu_q.long(), cu_q.long()], dim=1)[:, 0]
    assert not cu_q.is_contiguous()
    _check(q, k, v, cu_q, cu_k.long(), max_seqlen_q=70, max_seqlen_k=99)


def test_fused_qkv_views():
    """q, k, v as views of one packed projection ``[T, 3, H, D]``: no copy needed."""
    torch.manual_seed(44)
    lengths = [(21, 21), (9, 9), (34, 34)]
    qkv = torch.randn(64, 3, 2, 24, dtype=torch.bfloat16, device=DEVICE)
    _, _, _, cu_q, cu_k = _packed(lengths, 2, 2, 24, torch.bfloat16)
    _check(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_q, cu_k)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 64)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_tile_shapes(monkeypatch, is_causal, block_m, block_n):
    """Non-square tiles, as the GPU's autotuner picks them (interpreter only)."""
    set_interpreter_tile(monkeypatch, block_m, block_n)
    torch.manual_seed(52)
    _check(*_packed(LENGTHS, 2, 1, 16, torch.float32), is_causal=is_causal)


def test_every_output_element_written(monkeypatch):
    allocate = alibi_launch.empty_bhsd
    monkeypatch.setattr(alibi_launch, "empty_bhsd", lambda *a: poison(allocate(*a)))
    torch.manual_seed(45)
    _check(*_packed(LENGTHS, 4, 2, 40, torch.float32), is_causal=False)


@pytest.mark.parametrize("is_causal", [True, False])
def test_equals_right_padded_batch(is_causal):
    """Packed sequences give the rows of the right-padded batch with a key padding mask."""
    torch.manual_seed(46)
    batch, seqlen = 3, 37
    mask = padding_mask("right", batch, seqlen)
    q, k, v = (torch.randn(batch, seqlen, 2, 16, device=DEVICE) for _ in range(3))
    dense = alibi_attention(q, k, v, is_causal=is_causal, layout="bshd", key_padding_mask=mask)
    cu = _cu(mask.sum(1).tolist())
    packed = alibi_attention(q[mask], k[mask], v[mask], is_causal=is_causal, cu_seqlens_q=cu,
                             cu_seqlens_k=cu)
    torch.testing.assert_close(packed, dense[mask], rtol=1e-5, atol=1e-5)


def test_equal_lengths_equal_dense_batch():
    torch.manual_seed(47)
    q, k, v = (torch.randn(3, 2, 29, 32, dtype=torch.float16, device=DEVICE) for _ in range(3))
    dense = alibi_attention(q, k, v)
    cu = _cu([29] * 3)
    packed = alibi_attention(*(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)),
                             cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=29, max_seqlen_k=29)
    torch.testing.assert_close(packed, dense.transpose(1, 2).flatten(0, 1), rtol=1e-3,
                               atol=1e-3)


def test_no_sequences():
    q, k, v, cu_q, cu_k = _packed([], 2, 2, 16, torch.float16)
    out = alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == (0, 2, 16)


def test_reference_path(monkeypatch):
    monkeypatch.setattr(_backend, "use_triton", lambda t: False)
    torch.manual_seed(48)
    q, k, v, cu_q, cu_k = _packed(LENGTHS, 2, 1, 8, torch.float32)
    out = alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, is_causal=False)
    want = alibi_attention_varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                            alibi_slopes(2, DEVICE), is_causal=False)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_traces():
    """Dynamo traces packed attention, forward and backward, without a graph break."""
    torch.manual_seed(49)
    q, k, v, cu_q, cu_k = _packed([(20, 20), (9, 17)], 2, 1, 16, torch.float32)

    def step(q, k, v):
        return alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20,
                               max_seqlen_k=20)

    check_compiled(step, [q, k, v], backend="aot_eager")


# ------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------


def _args():
    q, k, v, cu_q, cu_k = _packed([(4, 4), (3, 5)], 2, 1, 16, torch.float16)
    return {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}


@pytest.mark.parametrize("over,exc,match", [
    ({"q": torch.randn(1, 7, 2, 16, dtype=torch.float16)}, ValueError, "q must be 3-D"),
    ({"cu_seqlens_k": None}, ValueError, "given together"),
    ({"cu_seqlens_q": [0, 4, 7]}, TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ({"cu_seqlens_q": torch.tensor([0.0, 4.0, 7.0])}, ValueError, "cu_seqlens_q must be a 1-D int"),
    ({"cu_seqlens_k": torch.tensor([[0, 4, 9]], dtype=torch.int32)}, ValueError,
     "cu_seqlens_k must be a 1-D"),
    ({"cu_seqlens_k": torch.tensor([0, 9], dtype=torch.int32)}, ValueError,
     "cu_seqlens_k has 2 entries"),
    ({"cu_seqlens_q": torch.tensor([1, 4, 7], dtype=torch.int32)}, ValueError,
     "cu_seqlens_q must rise from 0 to 7"),
    ({"cu_seqlens_q": torch.tensor([0, 4, 6], dtype=torch.int32)}, ValueError,
     "cu_seqlens_q must rise from 0 to 7"),
    ({"cu_seqlens_k": torch.tensor([0, 10, 9], dtype=torch.int32)}, ValueError,
     "cu_seqlens_k must rise .* smallest step -1"),
    ({"max_seqlen_q": 3}, ValueError, "max_seqlen_q=3 is shorter than the longest"),
    ({"max_seqlen_k": -1}, TypeError, "max_seqlen_k must be a non-negative int"),
    ({"max_seqlen_k": (1 << 24) + 1}, ValueError, r"sequence lengths up to 16777216"),
    ({"max_seqlen_k": True}, TypeError, "max_seqlen_k must be a non-negative int"),
    ({"key_padding_mask": torch.ones(2, 9, dtype=torch.bool)}, ValueError,
     "key_padding_mask does not apply"),
    ({"slopes": torch.ones(3, 2)}, ValueError, r"slopes must have shape \[2\] or \[2, 2\]"),
    ({"v": torch.randn(9, 1, 16, dtype=torch.float32)}, TypeError, "v has dtype"),
    ({"k": torch.randn(8, 1, 16, dtype=torch.float16)}, ValueError, "k and v must have"),
])
def test_errors(over, exc, match):
    args = {**_args(), **over}
    with pytest.raises(exc, match=match):
        alibi_attention(**{key: val.to(DEVICE) if isinstance(val, torch.Tensor) else val
                           for key, val in args.items()})


def test_error_bounds_without_cu_seqlens():
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match="apply to packed input only"):
        alibi_attention(q, k, v, max_seqlen_q=4)


@requires_cuda
def test_error_cu_seqlens_device():
    args = _args()
    with pytest.raises(ValueError, match="cu_seqlens_k is on cpu"):
        alibi_attention(**{**args, "cu_seqlens_k": args["cu_seqlens_k"].cpu()})


# ------------------------------------------------------------------------------------------
# GPU only: real lengths, torch.compile
# ------------------------------------------------------------------------------------------


def _random_lengths(n, longest, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, longest + 1, (n,), generator=gen).tolist()


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [True, False])
def test_gpu_matches_reference(is_causal, dtype, head_dim):
    torch.manual_seed(50)
    lq = _random_lengths(8, 2048, 50)
    lk = [max(1, n + d) for n, d in zip(lq, (0, 100, -50, 0, 513, -7, 0, 1))]
    _check(*_packed(list(zip(lq, lk)), 8, 2, head_dim, dtype), is_causal=is_causal)


@requires_cuda
def test_gpu_torch_compile_fullgraph():
    torch.manual_seed(51)
    lengths = _random_lengths(6, 1000, 51)
    q, k, v, cu_q, cu_k = _packed(list(zip(lengths, lengths)), 8, 2, 64, torch.bfloat16)
    step = functools.partial(alibi_attention, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    check_compiled(step, [q, k, v], rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_cuda_graph_capture(packed):
    """Forward and backward replay from a CUDA graph with new inputs (dense and packed)."""
    torch.manual_seed(53)
    if packed:
        q, k, v, cu_q, cu_k = _packed([(300, 300), (77, 500), (1, 64)], 8, 2, 64,
                                      torch.bfloat16)
        kwargs = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": 300,
                  "max_seqlen_k": 500}
    else:
        q = torch.randn(2, 8, 300, 64, dtype=torch.bfloat16, device=DEVICE)
        k, v = (torch.randn(2, 2, 500, 64, dtype=torch.bfloat16, device=DEVICE)
                for _ in range(2))
        kwargs = {}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def step():
        out = alibi_attention(*leaves, **kwargs)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))

    side = torch.cuda.Stream()  # warm up (autotune, compile) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for leaf in leaves:
            leaf.copy_(torch.randn_like(leaf))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)



def test_varlen_entry_point_is_alibi_attention_with_cu_seqlens():
    # flash-attn's names and argument order, delegating to the one implementation
    from posenc_triton import alibi_attention_varlen

    torch.manual_seed(7)
    lens_q, lens_k = [3, 1, 6], [5, 1, 9]
    q = torch.randn(sum(lens_q), 6, 40, device=DEVICE)
    k, v = (torch.randn(sum(lens_k), 3, 40, device=DEVICE) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=DEVICE) for n in (lens_q, lens_k))
    slopes = torch.rand(3, 6, device=DEVICE)
    for causal in (True, False):
        want = alibi_attention(q, k, v, slopes, is_causal=causal, cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=9)
        got = alibi_attention_varlen(q, k, v, cu_q, cu_k, 6, 9, slopes, is_causal=causal)
        assert torch.equal(got, want)
        torch.testing.assert_close(
            alibi_attention_varlen(q, k, v, cu_q, cu_k, None, None, slopes, is_causal=causal),
            want)
    with pytest.raises(TypeError, match="cu_seqlens_k must be an integer tensor"):
        alibi_attention_varlen(q, k, v, cu_q, None, 6, 9)
