"""apply_rope / RotaryEmbedding against the float64 reference, forward and backward."""

import pytest
import torch

import posenc_triton
from conftest import DEVICE, assert_close, poison, requires_cuda
from posenc_triton import reference
from posenc_triton import rope as rope_module
from posenc_triton.rope_ops import launch_rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tables(rotary_dim, length=128, base=10000.0, device=DEVICE):
    inv_freq, scaling = posenc_triton.rope_frequencies(rotary_dim, base, device=device)
    return posenc_triton.rope_cos_sin(length, inv_freq, scaling)


def make(shape, dtype, layout="bshd", requires_grad=True):
    """Random ``[B, S, H, D]`` given as ``shape``, returned in ``layout`` (a transposed view)."""
    t = torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout == "bhsd":
        t = t.transpose(1, 2).contiguous()
    return t.requires_grad_(requires_grad)


def check(q, k, cos, sin, grads=True, **kwargs):
    """Forward and backward of apply_rope against the float64 reference."""
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, **kwargs)
    q64 = q.detach().double().requires_grad_()
    k64 = None if k is None else k.detach().double().requires_grad_()
    q_ref, k_ref = reference.apply_rope_reference(q64, k64, cos, sin, **kwargs)
    assert q_out.shape == q.shape and q_out.dtype == q.dtype
    assert_close(q_out, q_ref)
    if k is None:
        assert k_out is None
    else:
        assert k_out.shape == k.shape
        assert_close(k_out, k_ref)
    if not grads:
        return q_out, k_out
    outs = [q_out] if k is None else [q_out, k_out]
    refs = [q_ref] if k is None else [q_ref, k_ref]
    ins = [q] if k is None else [q, k]
    ins64 = [q64] if k is None else [q64, k64]
    g = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, ins, g)
    want = torch.autograd.grad(refs, ins64, [x.double() for x in g])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, q.dtype)
    return q_out, k_out


# (B, S, Hq, Hk, D, R): odd lengths, non-power-of-two heads and head dims, partial rotary, GQA.
SHAPES = [
    (2, 37, 5, 5, 80, 80),
    (1, 19, 4, 1, 96, 48),
    (2, 8, 3, 2, 64, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, layout, interleaved, dtype):
    b, s, hq, hk, d, r = shape
    cos, sin = tables(r)
    q = make((b, s, hq, d), dtype, layout)
    k = make((b, s, hk, d), dtype, layout)
    check(q, k, cos, sin, interleaved=interleaved, layout=layout)


@pytest.mark.parametrize("pos_shape", ["S", "1S", "BS"])
@pytest.mark.parametrize("offsets", ["int", "0-d", "tensor", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_positions_and_offsets(pos_shape, offsets, dtype):
    b, s, hq, hk, d = 3, 11, 4, 2, 64
    cos, sin = tables(d, length=64)
    size = {"S": (s,), "1S": (1, s), "BS": (b, s)}[pos_shape]
    position_ids = torch.randint(0, 40, size, device=DEVICE)
    seqlen_offsets = {
        "int": 7,
        "0-d": torch.tensor(9, device=DEVICE),
        "tensor": torch.tensor([0, 5, 23], device=DEVICE),
        "strided": torch.tensor([0, -1, 5, -1, 23, -1], device=DEVICE)[::2],  # a strided view
    }[offsets]
    q, k = make((b, s, hq, d), dtype), make((b, s, hk, d), dtype)
    check(q, k, cos, sin, position_ids=position_ids, seqlen_offsets=seqlen_offsets)


def test_offsets_without_position_ids_decode():
    # KV-cache decode: one token per sequence at a different position per batch row.
    b, hq, hk, d = 4, 6, 2, 64
    cos, sin = tables(d, length=64)
    q, k = make((b, 1, hq, d), torch.float16), make((b, 1, hk, d), torch.float16)
    check(q, k, cos, sin, seqlen_offsets=torch.tensor([0, 9, 31, 63], device=DEVICE))


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_strided_views_of_fused_qkv(layout):
    # q and k are slices of one projection: non-contiguous, never copied.
    b, s, hq, hk, d = 2, 13, 4, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hk, d, device=DEVICE, dtype=torch.bfloat16)
    if layout == "bhsd":
        qkv = qkv.transpose(1, 2)
        q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    else:
        q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    before = qkv.clone()
    cos, sin = tables(d)
    check(q.requires_grad_(), k.requires_grad_(), cos, sin, layout=layout)
    assert torch.equal(qkv, before), "inputs must not be modified"


def test_q_alone():
    cos, sin = tables(32)
    check(make((2, 9, 3, 32), torch.float32), None, cos, sin, interleaved=True)


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace(interleaved):
    b, s, hq, hk, d, r = 2, 10, 3, 1, 48, 32
    cos, sin = tables(r)
    q, k = make((b, s, hq, d), torch.float16, requires_grad=False), make(
        (b, s, hk, d), torch.float16, requires_grad=False)
    q_ref, k_ref = reference.apply_rope_reference(q.double(), k.double(), cos, sin,
                                                  interleaved=interleaved)
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, interleaved=interleaved,
                                            inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert_close(q, q_ref)
    assert_close(k, k_ref)


@pytest.mark.parametrize("shape", [(0, 4, 2, 32), (2, 0, 2, 32), (2, 4, 0, 32)], ids=str)
def test_empty_inputs(shape):
    cos, sin = tables(32, length=8)
    q = make(shape, torch.float16)
    offsets = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
    q_out, k_out = posenc_triton.apply_rope(q, q * 2, cos, sin, seqlen_offsets=offsets)
    assert q_out.shape == k_out.shape == q.shape
    (dq,) = torch.autograd.grad(q_out.sum() + k_out.sum(), q)
    assert dq.shape == q.shape


def test_inplace_backward():
    cos, sin = tables(32)
    x = make((2, 7, 3, 32), torch.float32)
    q, k = x * 1.0, x[:, :, :1] * 2.0  # non-leaf tensors may be rotated in place
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, inplace=True)
    (grad,) = torch.autograd.grad((q_out.sum() + k_out.square().sum()), x)
    x64 = x.detach().double().requires_grad_()
    q_ref, k_ref = reference.apply_rope_reference(x64 * 1.0, x64[:, :, :1] * 2.0, cos, sin)
    (want,) = torch.autograd.grad(q_ref.sum() + k_ref.square().sum(), x64)
    assert_close(grad, want)


@pytest.mark.parametrize("read", ["q", "k"])
def test_an_output_nothing_reads_gets_no_gradient(read):
    """As unfused: the input of an unread output (a last layer's query when only keys and
    values are cached) keeps ``grad is None``, not zeros an optimizer would decay; the other's
    gradient is the reference's."""
    cos, sin = tables(32)
    q, k = make((2, 7, 4, 32), torch.float32), make((2, 7, 2, 32), torch.float32)
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin)
    used, unused = (q, k) if read == "q" else (k, q)
    ((q_out if read == "q" else k_out).square().sum()).backward()
    assert unused.grad is None
    x64 = used.detach().double().requires_grad_()
    ref = reference.apply_rope_reference(x64, None, cos, sin)[0]
    (want,) = torch.autograd.grad(ref.square().sum(), x64)
    assert_close(used.grad, want)


def test_torch_compile_an_output_nothing_reads():
    torch._dynamo.reset()
    cos, sin = tables(32)
    q, k = make((2, 6, 3, 32), torch.float32), make((2, 6, 1, 32), torch.float32)

    def step(q, k):
        return posenc_triton.apply_rope(q, k, cos, sin)[1].square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k), (q, k), allow_unused=True)
    want = torch.autograd.grad(step(q, k), (q, k), allow_unused=True)
    assert want[0] is None
    torch.testing.assert_close(got[1], want[1])
    assert got[0] is None or not got[0].any()  # (AOTAutograd materialises zeros)


def test_expanded_gradient():
    # .sum() hands backward a stride-0 gradient: the kernel must read it through its strides.
    cos, sin = tables(64)
    q = make((2, 5, 3, 64), torch.float32)
    q_out, _ = posenc_triton.apply_rope(q, None, cos, sin)
    (dq,) = torch.autograd.grad(q_out.sum(), q)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.apply_rope_reference(q64, None, cos, sin)[0].sum(), q64)
    assert_close(dq, want)


def test_launcher_writes_every_element():
    # Poisoned outputs: any element the kernel leaves unwritten (tail included) stays NaN.
    b, s, hq, hk, d, r = 2, 9, 3, 2, 80, 48
    cos, sin = tables(r)
    q, k = make((b, s, hq, d), torch.float32, requires_grad=False), make(
        (b, s, hk, d), torch.float32, requires_grad=False)
    q_out, k_out = poison(torch.empty_like(q)), poison(torch.empty_like(k))
    launch_rope(q_out, k_out, q, k, cos, sin, None, None, 0, False, False)
    q_ref, k_ref = reference.apply_rope_reference(q.double(), k.double(), cos, sin)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


def test_position_past_table_reads_nan_in_kernel():
    # Where validation cannot sync (compile, graph capture) the kernel must not read past
    # the table: such positions give NaN, never another row's value.
    cos, sin = tables(32, length=16)
    q = make((1, 4, 2, 32), torch.float32, requires_grad=False)
    q_out = torch.zeros_like(q)
    pos = torch.tensor([[0, 15, 16, 1000]], device=DEVICE)
    launch_rope(q_out, None, q, None, cos, sin, pos, None, 0, False, False)
    assert torch.isfinite(q_out[:, :2]).all()
    assert torch.isnan(q_out[:, 2:]).all()


def test_unchecked_positions(monkeypatch):
    """``check_positions=False`` reads no tensor position (no sync): in range it rotates as
    usual, past the table it gives NaN rows; the reference path still checks."""
    cos, sin = tables(32, length=16)
    q, k = make((2, 3, 2, 32), torch.float32), make((2, 3, 1, 32), torch.float32)
    pos = torch.tensor([[0, 7, 15], [3, 4, 5]], device=DEVICE)
    monkeypatch.setattr(torch, "aminmax", None)  # any read of the positions fails
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, position_ids=pos,
                                            check_positions=False)
    q_ref, k_ref = reference.apply_rope_reference(q.double(), k.double(), cos, sin,
                                                  position_ids=pos)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    monkeypatch.undo()
    offsets = torch.tensor([0, 14], device=DEVICE)  # batch row 1 reaches position 16
    q_out, _ = posenc_triton.apply_rope(q, k, cos, sin, seqlen_offsets=offsets,
                                        check_positions=False)
    assert torch.isfinite(q_out[0]).all()
    assert torch.isnan(q_out[1, 2]).all() and torch.isfinite(q_out[1, :2]).all()
    monkeypatch.setattr(rope_module, "use_triton", lambda t: False)
    with pytest.raises(ValueError, match="outside the cos/sin table"):
        posenc_triton.apply_rope(q, k, cos, sin, seqlen_offsets=offsets, check_positions=False)
    with pytest.raises(TypeError, match="check_positions must be a bool"):
        posenc_triton.apply_rope(q, k, cos, sin, check_positions=1)


def test_rotary_embedding_negative_positions():
    rope = posenc_triton.RotaryEmbedding(32, max_seq_len=16).to(DEVICE)
    q = make((2, 3, 2, 32), torch.float32)
    with pytest.raises(ValueError, match="must be >= 0, got -2"):
        rope(q, offset=torch.tensor([0, -2], device=DEVICE))


def test_rotary_embedding_compiles_with_tensor_positions():
    """No host read of tensor positions under torch.compile: one graph, same result."""
    rope = posenc_triton.RotaryEmbedding(32, max_seq_len=16).to(DEVICE)
    q, k = make((2, 3, 2, 32), torch.float32), make((2, 3, 1, 32), torch.float32)
    offsets = torch.tensor([0, 9], device=DEVICE)
    compiled = torch.compile(rope, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, offset=offsets), rope(q, k, offset=offsets)):
        torch.testing.assert_close(got, want)


def test_torch_compile_dynamic_batch_with_batched_positions():
    # [B, S] positions and [B] offsets against a symbolic batch (see test_alibi's twin).
    torch._dynamo.reset()
    cos, sin = tables(32)
    q = make((2, 5, 3, 32), torch.float32, requires_grad=False)
    pos = torch.randint(0, 60, (2, 5), device=DEVICE)
    offsets = torch.tensor([0, 3], device=DEVICE)
    torch._dynamo.maybe_mark_dynamic(q, 0)

    def rotate(q):
        return posenc_triton.apply_rope(q, None, cos, sin, position_ids=pos,
                                        seqlen_offsets=offsets)[0]

    compiled = torch.compile(rotate, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), rotate(q))


def test_rotary_embedding_module():
    d, r = 64, 32
    rope = posenc_triton.RotaryEmbedding(d, rotary_dim=r, max_seq_len=16).to(DEVICE)
    q, k = make((2, 12, 4, d), torch.float32), make((2, 12, 2, d), torch.float32)
    cos, sin = tables(r, length=64)
    q_out, k_out = rope(q, k, offset=20)  # past max_seq_len: the cache grows
    assert rope.cos_cached.shape[0] >= 32
    q_ref, k_ref = reference.apply_rope_reference(q.double(), k.double(), cos, sin,
                                                  seqlen_offsets=20)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    pos = torch.tensor([3, 99], device=DEVICE).repeat_interleave(6).view(2, 6)
    q_out, _ = rope(q[:, :6], None, position_ids=pos)
    cos, sin = tables(r, length=128)
    q_ref, _ = reference.apply_rope_reference(q[:, :6].double(), None, cos, sin, position_ids=pos)
    assert_close(q_out, q_ref)


def test_rotary_embedding_dynamic_scaling_follows_length():
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    rope = posenc_triton.RotaryEmbedding(32, max_seq_len=16, scaling=scaling).to(DEVICE)
    q = make((1, 40, 2, 32), torch.float32, requires_grad=False)
    q_out, _ = rope(q)
    inv_freq, _ = posenc_triton.rope_frequencies(32, scaling=scaling, device=DEVICE,
                                                 max_position_embeddings=16, seq_len=40)
    assert not torch.equal(inv_freq, posenc_triton.rope_frequencies(32, device=DEVICE)[0])
    cos, sin = posenc_triton.rope_cos_sin(40, inv_freq)
    assert_close(q_out, reference.apply_rope_reference(q.double(), None, cos, sin)[0])


def test_matches_transformers_rotation():
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    b, s, h, d = 2, 10, 4, 64
    cos, sin = tables(d, length=s)
    q, k = (torch.randn(b, h, s, d, device=DEVICE) for _ in range(2))
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, layout="bhsd")
    torch.testing.assert_close(q_out, q_hf)
    torch.testing.assert_close(k_out, k_hf)


ERRORS = [
    ({"q": torch.randn(2, 3, 4)}, ValueError, "q must be 4-D"),
    ({"q": torch.ones(1, 2, 2, 8, dtype=torch.int32)}, TypeError, "q must have dtype"),
    ({"k": torch.randn(1, 2, 2, 8, dtype=torch.float16)}, TypeError, "k must have q's dtype"),
    ({"k": torch.randn(1, 3, 2, 8)}, ValueError, "k .* must match q"),
    ({"k": torch.randn(1, 2, 2, 6)}, ValueError, "k .* must match q"),
    ({"cos": torch.randn(16, 6), "sin": torch.randn(16, 6)}, ValueError, "rotary width R = 12"),
    ({"sin": torch.randn(16, 2)}, ValueError, "cos .* and sin .* must have one shape"),
    ({"cos": torch.ones(16, 4, dtype=torch.int64)}, TypeError, "cos must have dtype"),
    ({"position_ids": torch.zeros(2, dtype=torch.float32)}, TypeError, "position_ids"),
    ({"position_ids": torch.zeros(3, dtype=torch.int64)}, ValueError, "position_ids must be"),
    ({"position_ids": torch.tensor([0, 16])}, ValueError, "outside the cos/sin table"),
    ({"position_ids": torch.tensor([-1, 0])}, ValueError, "outside the cos/sin table"),
    ({"seqlen_offsets": 15}, ValueError, "outside the cos/sin table"),
    ({"seqlen_offsets": torch.tensor([1, 2])}, ValueError, r"seqlen_offsets must be .*\[B\]"),
    ({"seqlen_offsets": 1.5}, TypeError, "seqlen_offsets must be an int"),
    ({"layout": "sbhd"}, ValueError, "layout must be one of"),
]


@pytest.mark.parametrize("override,exc,match", ERRORS, ids=[e[2] for e in ERRORS])
def test_errors(override, exc, match):
    args = {"q": torch.randn(1, 2, 2, 8), "k": torch.randn(1, 2, 1, 8),
            "cos": torch.randn(16, 4), "sin": torch.randn(16, 4)}
    args.update(override)
    q, k, cos, sin = (args.pop(n) for n in ("q", "k", "cos", "sin"))
    with pytest.raises(exc, match=match):
        posenc_triton.apply_rope(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                                 **{n: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                    for n, v in args.items()})


@requires_cuda
def test_mixed_devices():
    cos, sin = tables(8, device="cpu")
    q = torch.randn(1, 2, 2, 8, device="cuda")
    with pytest.raises(ValueError, match="cos must be on q's device"):
        posenc_triton.apply_rope(q, None, cos, sin)


def test_torch_compile_traces_whole_graph():
    # Dynamo must trace validation, autograd and the op without a graph break. (Under the
    # interpreter only the "eager" backend can run the graph; CUDA also runs Inductor below.)
    torch._dynamo.reset()
    cos, sin = tables(32)
    q, k = make((2, 6, 3, 32), torch.float32), make((2, 6, 1, 32), torch.float32)
    pos = torch.randint(0, 100, (2, 6), device=DEVICE)

    def step(q, k):
        q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, position_ids=pos)
        return q_out.square().sum() + k_out.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(step(q, k), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- GPU: real shapes, torch.compile, CUDA graphs ---------------------------------------


@requires_cuda
@pytest.mark.parametrize("hk", [8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_real_shape(hk, dtype):
    cos, sin = tables(128, length=4096)
    q, k = make((8, 4096, 32, 128), dtype), make((8, 4096, hk, 128), dtype)
    check(q, k, cos, sin)


@requires_cuda
def test_cuda_batch_past_grid_limit():
    # Batch shares grid axis 0 with the sequence blocks: B > 65535 must launch.
    cos, sin = tables(64, length=8)
    q = make((70000, 1, 1, 64), torch.bfloat16, requires_grad=False)
    offsets = torch.randint(0, 8, (70000,), device=DEVICE)
    check(q, None, cos, sin, grads=False, seqlen_offsets=offsets)


@requires_cuda
def test_cuda_torch_compile_fullgraph():
    cos, sin = tables(64, length=256)
    q, k = make((2, 100, 6, 96), torch.bfloat16), make((2, 100, 2, 96), torch.bfloat16)
    pos = torch.randint(0, 200, (2, 100), device=DEVICE)

    def step(q, k):
        q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, position_ids=pos)
        return (q_out.float().square().sum() + k_out.float().sum())

    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(step(q, k), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@requires_cuda
def test_cuda_graph_capture():
    cos, sin = tables(128, length=64)
    q, k = make((4, 1, 32, 128), torch.bfloat16, requires_grad=False), make(
        (4, 1, 8, 128), torch.bfloat16, requires_grad=False)
    offsets = torch.tensor([1, 5, 9, 60], device=DEVICE)
    posenc_triton.apply_rope(q, k, cos, sin, seqlen_offsets=offsets)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = posenc_triton.apply_rope(q, k, cos, sin, seqlen_offsets=offsets)
    graph.replay()
    torch.cuda.synchronize()
    q_ref, k_ref = reference.apply_rope_reference(q.double(), k.double(), cos, sin,
                                                  seqlen_offsets=offsets)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
