"""The transformers integration: the fused apply_rotary_pos_emb and patching real (tiny) models.

Models are built from configs with random weights (no hub download). Every test leaves
transformers unpatched (autouse fixture), so other tests see the original functions.
"""

import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, assert_close, count_calls_of, model_step, requires_cuda

transformers = pytest.importorskip("transformers")

from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from posenc_triton.integrations import _hub, _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402
from posenc_triton.integrations._rope_dropins import fused_apply_rotary_pos_emb  # noqa: E402

HF_APPLY = modeling_llama.apply_rotary_pos_emb  # transformers' own function
ORIGINALS = {m: m.apply_rotary_pos_emb for m in (modeling_llama, modeling_mistral, modeling_qwen2)}


@pytest.fixture(autouse=True)
def unpatched():
    _rope_patch.restore_all()
    yield
    _rope_patch.restore_all()
    for mod, fn in ORIGINALS.items():
        assert mod.apply_rotary_pos_emb is fn


@pytest.fixture
def count_calls(monkeypatch):
    """Count the calls of posenc_triton's apply_rope made by the integration."""
    return count_calls_of(monkeypatch, _rope_dropins, "apply_rope")


# ---- fused_apply_rotary_pos_emb against transformers' apply_rotary_pos_emb ----------------


def hf_tables(batch, seqlen, rot, dtype=torch.float32, device=DEVICE):
    """cos/sin as transformers' rotary embeddings return them: [B, S, R], cat(freqs, freqs)."""
    freqs = torch.rand(batch, seqlen, rot // 2, device=device) * 20
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def qk(b, s, hq, hk, d, unsqueeze_dim, dtype=torch.float32):
    """q, k as transformers' attention makes them: transposes of the projection output."""
    q = torch.randn(b, s, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, s, hk, d, device=DEVICE, dtype=dtype)
    if unsqueeze_dim in (1, -3):
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q.requires_grad_(), k.requires_grad_()


def compare_with(fn, q, k, cos, sin, rtol, atol, **kwargs):
    got = fused_apply_rotary_pos_emb(q, k, cos, sin, **kwargs)
    want = fn(q, k, cos, sin, **kwargs)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    grads = [torch.randn_like(w) for w in want]
    got_g = torch.autograd.grad(got, (q, k), grads)
    want_g = torch.autograd.grad(want, (q, k), grads)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2, -3, -2])
@pytest.mark.parametrize("cos_batch", ["1", "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_matches_transformers(unsqueeze_dim, cos_batch, dtype):
    b, s, hq, hk, d = 3, 12, 4, 2, 16
    q, k = qk(b, s, hq, hk, d, unsqueeze_dim, dtype)
    cos, sin = hf_tables(1 if cos_batch == "1" else b, s, d, dtype)
    # transformers rounds each product to bf16; we round once from fp32.
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    compare_with(HF_APPLY, q, k, cos, sin, *tol, unsqueeze_dim=unsqueeze_dim)


def test_fused_positional_unsqueeze_dim_and_position_ids():
    # Old signature (q, k, cos, sin, position_ids=None, unsqueeze_dim=1): position_ids is
    # ignored; new one (q, k, cos, sin, unsqueeze_dim=1) may get unsqueeze_dim positionally.
    q, k = qk(2, 5, 2, 1, 8, 2)
    cos, sin = hf_tables(2, 5, 8)
    want = HF_APPLY(q, k, cos, sin, unsqueeze_dim=2)
    for got in (fused_apply_rotary_pos_emb(q, k, cos, sin, 2),
                fused_apply_rotary_pos_emb(q, k, cos, sin, torch.arange(5), unsqueeze_dim=2)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_fused_partial_rotary_matches_phi3():
    # R < D: the first R dims rotate, the rest pass through (Phi-3, GLM, GPT-NeoX style).
    q, k = qk(2, 7, 4, 2, 16, 1)
    cos, sin = hf_tables(2, 7, 8)
    compare_with(modeling_phi3.apply_rotary_pos_emb, q, k, cos, sin, 1e-5, 1e-5)


def test_fused_calls_apply_rope_once_and_paths(count_calls):
    b, s = 3, 6
    cos, sin = hf_tables(b, s, 8)
    # A q/k whose [B, S] cannot merge into one sequence (a slice of a longer one): the
    # token-row position_ids path, with its cached arange.
    qfull = torch.randn(b, s + 3, 2, 8, device=DEVICE)
    q = qfull[:, :s].transpose(1, 2)
    k = torch.randn(b, s + 3, 1, 8, device=DEVICE)[:, 1:s + 1].transpose(1, 2)
    _rope_dropins._ROWS_CACHE.clear()
    compare_with_no_grad(q, k, cos, sin)
    assert (b, s, q.device) in _rope_dropins._ROWS_CACHE
    # cos/sin expanded over the batch (stride 0): one shared table.
    compare_with_no_grad(q, k, cos[:1].expand(b, -1, -1), sin[:1].expand(b, -1, -1))
    assert len(count_calls) == 2


def compare_with_no_grad(q, k, cos, sin, **kwargs):
    got = fused_apply_rotary_pos_emb(q, k, cos, sin, **kwargs)
    want = HF_APPLY(q, k, cos, sin, **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_dtype_promotion_and_cos_gradients():
    # transformers promotes bf16 q with fp32 cos to fp32; and gives cos/sin gradients.
    q, k = qk(2, 5, 2, 2, 8, 1, torch.bfloat16)
    cos, sin = hf_tables(1, 5, 8)
    got = fused_apply_rotary_pos_emb(q, k, cos, sin)
    want = HF_APPLY(q, k, cos, sin)
    assert got[0].dtype == want[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0])
    cos.requires_grad_(), sin.requires_grad_()
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    got = fused_apply_rotary_pos_emb(q32, k32, cos, sin)
    want = HF_APPLY(q32, k32, cos, sin)
    g_got = torch.autograd.grad(sum(t.sum() for t in got), (cos, sin))
    g_want = torch.autograd.grad(sum(t.sum() for t in want), (cos, sin))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case, match", [
    ("unsqueeze0", "unsqueeze_dim must be 1"),
    ("seqlen", "must be \\[1 or B=2, S=5, R\\]"),
    ("batch", "must be \\[1 or B=2, S=5, R\\]"),
    ("odd", "rotary width R=7"),
    ("wide", "rotary width R=10"),
    ("q3d", "q must be 4-D"),
    ("kshape", "k \\(2, 2, 4, 8\\) must match q"),
])
def test_fused_errors(case, match):
    q, k = qk(2, 5, 2, 2, 8, 1)
    rot = {"wide": 10}.get(case, 8)
    cos, sin = hf_tables({"batch": 3}.get(case, 1), 6 if case == "seqlen" else 5, rot)
    if case == "odd":
        cos, sin = cos[..., :7], sin[..., :7]
    kwargs = {"unsqueeze_dim": 0} if case == "unsqueeze0" else {}
    with pytest.raises(ValueError, match=match):
        fused_apply_rotary_pos_emb(q[0] if case == "q3d" else q,
                                      k[:, :, :4] if case == "kshape" else k, cos, sin, **kwargs)


def test_torch_compile_traces_fused():
    torch._dynamo.reset()
    b, s = 2, 6
    cos, sin = hf_tables(b, s, 16)
    q, k = qk(b, s, 3, 1, 16, 1)
    sliced = torch.randn(b, s + 2, 3, 16, device=DEVICE)[:, 2:].transpose(1, 2).requires_grad_()

    def step(q, k):
        q_out, k_out = fused_apply_rotary_pos_emb(q, k, cos, sin)
        return q_out.square().sum() + k_out.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for qq in (q, sliced):  # flattened path, then the token-row arange built in the graph
        got = torch.autograd.grad(compiled(qq, k), (qq, k))
        want = torch.autograd.grad(step(qq, k), (qq, k))
        for a, b_ in zip(got, want):
            torch.testing.assert_close(a, b_)


# ---- patching ---------------------------------------------------------------------------


def test_unsupported_model_raises():
    # GPT-2's learned absolute positions: nothing to fuse, refused with the supported list.
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"cannot patch GPT2LMHeadModel \(model_type='gpt2'\)"
                                         r"; supported model types: .*llama"):
        hf.apply(model)
    assert hf.patched_layers(model) == {}


def test_missing_transformers_names_extra(monkeypatch):
    model = make_model("llama")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'posenc-triton\[hf\]'"):
        hf.apply(model)


def test_import_does_not_import_transformers():
    code = ("import sys, posenc_triton.integrations, posenc_triton.integrations.transformers\n"
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- whole models: patched against unpatched, forward and backward -----------------------

COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "attn_implementation": "eager"}


def make_model(kind, device=DEVICE, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    kw = {**COMMON, **overrides}
    if kind == "llama":
        config = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "llama3-scaling":
        kw.setdefault("rope_parameters", {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif kind == "linear-scaling":
        kw.setdefault("rope_parameters", {"rope_type": "linear", "rope_theta": 500.0,
                                          "factor": 4.0})
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None,
                                                                          **kw))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        raise ValueError(kind)
    return model.to(device=device, dtype=dtype)


def batch_inputs(batch=2, seqlen=12, vocab=128, device=DEVICE, left_pad=False):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    kwargs = {"input_ids": ids, "labels": ids.clone()}
    if left_pad:
        mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
        mask[0, :4] = 0
        mask[-1, :1] = 0
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    return kwargs


def check_model(model, inputs, count_calls, rtol=1e-5, atol=1e-5):
    logits, loss, grads = model_step(model, inputs)
    assert not count_calls
    hf.apply(model)
    layers = hf.patched_layers(model).values()
    # transformers' hub hook where it is decorated and usable, else the patch table.
    hooked = hasattr(modeling_llama.apply_rotary_pos_emb, "kernel_layer_name")
    route = "hub/rotary_pos_emb" if hooked and not _hub.unavailable() else "rope/rotate_half"
    assert list(layers) == [[route]] * model.config.num_hidden_layers
    p_logits, p_loss, p_grads = model_step(model, inputs)
    # The patch is live: one fused launch per layer (the backward runs through autograd).
    assert len(count_calls) == model.config.num_hidden_layers
    torch.testing.assert_close(p_logits, logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(p_loss, loss, rtol=rtol, atol=atol)
    assert p_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    assert hf.patched_layers(hf.unpatch(model)) == {}


@pytest.mark.parametrize("kind", ["llama3-scaling", "linear-scaling"])  # plain: models test
def test_model_matches_unpatched_fp32(kind, count_calls):
    check_model(make_model(kind), batch_inputs(), count_calls)


def test_model_left_padding_position_ids(count_calls):
    # position_ids [B, S] give per-sequence cos/sin: the one-row-per-token table path.
    check_model(make_model("llama"), batch_inputs(batch=3, left_pad=True), count_calls)


def test_model_sdpa(count_calls):
    model = make_model("llama", attn_implementation="sdpa")
    inputs = batch_inputs(left_pad=True)
    logits = model(**inputs).logits
    assert hf.apply(model) is model
    torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
    assert len(count_calls) == 2


def test_model_generate_with_kv_cache_matches(count_calls):
    model = make_model("qwen2").eval()
    inputs = batch_inputs(left_pad=True)
    del inputs["labels"], inputs["position_ids"]  # generate derives them from the mask
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    want = model.generate(**inputs, **kwargs)
    hf.apply(model)
    got = model.generate(**inputs, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(count_calls) == 4 * model.config.num_hidden_layers  # prefill + 3 decode steps


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_model_bf16_at_least_as_accurate(count_calls):
    # bf16 model against the same weights in fp32: the fused rotation (fp32 math, one
    # rounding) must be about as close to fp32 as transformers' bf16 arithmetic is.
    model32 = make_model("mistral")
    inputs = batch_inputs(left_pad=True)
    ref = model32(**inputs).logits
    model = make_model("mistral", dtype=torch.bfloat16)
    logits, _, grads = model_step(model, inputs)
    hf.apply(model)
    p_logits, _, p_grads = model_step(model, inputs)
    assert len(count_calls) == 2
    assert p_logits.dtype == torch.bfloat16
    torch.testing.assert_close(p_logits, logits, rtol=5e-2, atol=5e-2)
    assert max_err(p_logits, ref) <= 1.5 * max_err(logits, ref) + 1e-2
    for name in grads:
        g, pg = grads[name].float(), p_grads[name].float()
        assert (pg - g).norm() <= 5e-2 * g.norm() + 1e-6, name


# ---- GPU: a bigger model in bf16 ---------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_bigger_model_bf16(kind, count_calls):
    big = {"vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1024,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "attn_implementation": "sdpa"}
    model32 = make_model(kind, device="cuda", **big)
    inputs = batch_inputs(batch=4, seqlen=256, vocab=1024, device="cuda", left_pad=True)
    with torch.no_grad():
        ref = model32(**inputs).logits
    model = make_model(kind, device="cuda", dtype=torch.bfloat16, **big)
    logits, loss, grads = model_step(model, inputs)
    hf.apply(model)
    p_logits, p_loss, p_grads = model_step(model, inputs)
    assert len(count_calls) == 4
    assert max_err(p_logits, ref) <= 1.5 * max_err(logits, ref) + 1e-2
    torch.testing.assert_close(p_loss, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        g, pg = grads[name].float(), p_grads[name].float()
        assert (pg - g).norm() <= 5e-2 * g.norm() + 1e-6, name


@requires_cuda
def test_cuda_fp32_model_matches():
    model = make_model("llama", device="cuda")
    inputs = batch_inputs(device="cuda", left_pad=True)
    logits, _, grads = model_step(model, inputs)
    hf.apply(model)
    p_logits, _, p_grads = model_step(model, inputs)
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("sliced", [False, True], ids=["flattened", "token-rows"])
def test_cuda_graph_capture_fused(sliced):
    # Decode-like call captured in a CUDA graph: no host sync, no cached tensor from the
    # graph's pool (the token-row arange of the sliced case is built during capture).
    b, s, d = 4, 3, 128
    cos, sin = hf_tables(b, s, d, torch.bfloat16, device="cuda")
    q = torch.randn(b, s + 2, 32, d, device="cuda", dtype=torch.bfloat16)
    q = (q[:, 2:] if sliced else q[:, :s].contiguous()).transpose(1, 2)
    k = torch.randn(b, s, 8, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    _rope_dropins._ROWS_CACHE.clear()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compile) outside the capture
        fused_apply_rotary_pos_emb(q, k, cos, sin)
    torch.cuda.current_stream().wait_stream(stream)
    _rope_dropins._ROWS_CACHE.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = fused_apply_rotary_pos_emb(q, k, cos, sin)
    assert not _rope_dropins._ROWS_CACHE
    graph.replay()
    torch.cuda.synchronize()
    want = HF_APPLY(q.double(), k.double(), cos.double(), sin.double())
    assert_close(q_out, want[0], torch.bfloat16)
    assert_close(k_out, want[1], torch.bfloat16)
