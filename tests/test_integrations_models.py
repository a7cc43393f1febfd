"""``integrations.transformers.apply`` on every supported architecture, table-driven.

One tiny random-weight model per entry of ``ARCHITECTURES`` (built from a config, no
download; 2 layers, hidden 64, 12 tokens, fp32, eager attention), patched against unpatched:
logits with right padding, the gradients of a training step, greedy ``generate()`` with the
KV cache, a kernel launch inside every patched layer, ``unpatch``, ``torch.compile``.
"""

import pytest
import torch

from conftest import DEVICE, assert_grads_close, count_alibi_layer_calls, count_calls_of, model_step

transformers = pytest.importorskip("transformers")

from posenc_triton.integrations import _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
PARTIAL = {"partial_rotary_factor": 0.5}
MOE = {"num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 32}

# test id -> (model_type, config overrides). Every RoPE behaviour class and the three ALiBi
# models; ids name the class when one model type has several.
MODELS = {
    "llama": ("llama", {}),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0]}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", MOE),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 16, **MOE}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "granite": ("granite", {}),
    "starcoder2": ("starcoder2", {}),
    "phi": ("phi", PARTIAL),
    "phi3": ("phi3", PARTIAL),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5}),
    "stablelm": ("stablelm", PARTIAL),
    "persimmon": ("persimmon", PARTIAL),
    "nemotron": ("nemotron", PARTIAL),
    "falcon-rope": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "glm": ("glm", {"head_dim": 16, **PARTIAL}),
    "glm4": ("glm4", {"head_dim": 16, **PARTIAL}),
    "helium": ("helium", {"head_dim": 16}),
    "ernie4_5": ("ernie4_5", {"head_dim": 16}),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", {"layer_types": ["sliding_attention", "full_attention"],
                            "sliding_window": 8}),
    "gptj": ("gptj", {"rotary_dim": 8}),
    "codegen": ("codegen", {"rotary_dim": 8}),
    "deepseek_v3": ("deepseek_v3", {
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "num_key_value_heads": 4}),
    "gemma3n_text": ("gemma3n_text", {
        "head_dim": 16, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128,
        "laurel_rank": 8, "num_kv_shared_layers": 0, "altup_num_inputs": 2,
        "activation_sparsity_pattern": [0.0, 0.0],
        "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma4_text": ("gemma4_text", {  # its full-attention layer: proportional RoPE
        "head_dim": 16, "global_head_dim": 16, "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 128, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"]}),
    "llama4_text": ("llama4_text", {
        "head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 2,
        "num_experts_per_tok": 1, "attention_chunk_size": 64, "no_rope_layers": [1, 0]}),
    "bloom": ("bloom", {"num_attention_heads": 6, "hidden_size": 48}),
    "mpt": ("mpt", {"n_heads": 4, "d_model": 64, "n_layers": 2, "max_seq_len": 64,
                    "expansion_ratio": 2}),
    "falcon-alibi": ("falcon", {"alibi": True}),
}
DEEPSEEK_ROTATE_HALF = ("deepseek_v3", {**MODELS["deepseek_v3"][1], "rope_interleave": False})
# One per patch family for the slower checks (generate, compile).
# (BLOOM's generate: test_integrations_bloom.)
FAMILIES = ["llama", "glm4", "cohere", "gptj", "deepseek_v3", "gemma3n_text", "llama4_text",
            "mpt", "falcon-alibi"]
SEQLEN = 12


def make_model(name, attn_implementation="eager", spec=None):
    model_type, overrides = spec or MODELS[name]
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation)
    return model.to(DEVICE).float()


def batch_inputs(padding="right"):
    """``(kwargs, keep)``: ids, mask, labels (-100 where the label or its predicting position
    is padding) and the bool [B, S] of real tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, BASE["vocab_size"], (2, SEQLEN), generator=gen)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, SEQLEN - 4:] = 0
    else:
        mask[0, :4] = 0
    scored = mask.clone()
    scored[:, 1:] *= mask[:, :-1]
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(scored == 0,
                                                                                   -100)}
    return {k: v.to(DEVICE) for k, v in kwargs.items()}, mask.bool().to(DEVICE)


@pytest.fixture(autouse=True)
def restore_transformers():
    yield
    # Every function patched so far, of every kind, whichever test failed.
    _rope_patch.restore_all()
    assert not _rope_patch._ORIGINALS


@pytest.fixture
def launches(monkeypatch):
    """One entry per kernel call made by the integration (RoPE or ALiBi)."""
    calls = count_calls_of(monkeypatch, _rope_dropins, "apply_rope")
    return count_alibi_layer_calls(monkeypatch, calls)


def launches_per_layer(model, calls, run):
    """``{patched layer path: kernel calls made inside its forward}`` while ``run()``."""
    counts, handles = {}, []
    for path in hf.patched_layers(model):
        layer = model.get_submodule(path)
        counts[path] = 0
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, p=path: counts.__setitem__(p, counts[p] - len(calls))))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, p=path: counts.__setitem__(p, counts[p] + len(calls))))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return counts, result


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def test_table_is_covered():
    # >= 20 architectures, >= 3 with ALiBi; every table entry has a model here.
    assert set(hf.ARCHITECTURES) == {spec[0] for spec in MODELS.values()}
    assert len(hf.ARCHITECTURES) >= 20 and hf.supported_model_types() == sorted(hf.ARCHITECTURES)
    kinds = {k for name in MODELS for k in hf._kinds(make_config_only(name))[1]}
    # (the hub function's kinds serve the decorated types beyond the table: test_coverage;
    # pairs and complex_bhsd only types outside it: test_probed and test_dropins)
    beyond = {*hf.HUB_KINDS, hf.KINDS["pairs"], hf.KINDS["complex_bhsd"]}
    assert kinds == {f"rope/{k}" for k, kind in hf.KINDS.items() if kind not in beyond} | {
        "alibi/bloom", "alibi/mpt", "alibi/falcon"}


class _Holder(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def make_config_only(name):
    model_type, overrides = MODELS[name]
    return _Holder(transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides}))


@pytest.mark.parametrize("name", [*MODELS, "deepseek_v3-rotate-half"])
def test_patched_matches_unpatched(name, launches):
    spec = DEEPSEEK_ROTATE_HALF if name == "deepseek_v3-rotate-half" else None
    model = make_model(name, spec=spec)
    inputs, keep = batch_inputs("right")
    logits, loss, grads = model_step(model, inputs)
    assert not launches
    assert hf.apply(model) is model
    assert hf.apply(model) is model  # twice: a no-op
    layers = hf.patched_layers(model)
    # NoPE layers (Llama-4, SmolLM3) and Cohere-2's global layers are no RoPE layers.
    expected = {"llama4_text": 1, "smollm3": 1, "cohere2": 1}.get(
        name, model.config.num_hidden_layers)
    assert len(layers) == expected, layers
    per_layer, (p_logits, p_loss, p_grads) = launches_per_layer(
        model, launches, lambda: model_step(model, inputs))
    assert all(n >= 1 for n in per_layer.values()), per_layer  # the kernel runs in each
    assert rel_err(p_logits[keep], logits[keep]) <= 1e-5
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(p_grads, grads)
    hf.unpatch(model)
    assert hf.patched_layers(model) == {}
    count = len(launches)
    with torch.no_grad():
        again = model(**inputs).logits
    assert len(launches) == count
    torch.testing.assert_close(again, logits, rtol=0, atol=0)  # transformers' code again


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_kv_cache_identical(name, launches):
    model = make_model(name).eval()
    inputs, _ = batch_inputs("left")
    del inputs["labels"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    want = model.generate(**inputs, **kwargs)
    hf.apply(model)
    got = model.generate(**inputs, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(launches) >= 3 * len(hf.patched_layers(model))  # prefill + 2 decode steps


@pytest.mark.parametrize("name", ["llama", "gptj", "mpt"])  # a drop-in and a fused class
def test_torch_compile_aot_eager(name, launches):
    torch._dynamo.reset()
    model = make_model(name).eval()
    inputs, keep = batch_inputs("right")
    del inputs["labels"]
    hf.apply(model, check_masks=False)
    with torch.no_grad():
        want = model(**inputs).logits
        got = torch.compile(model, backend="aot_eager")(**inputs).logits
    assert launches
    assert rel_err(got[keep], want[keep]) <= 1e-5


@pytest.mark.parametrize("name", ["falcon-alibi", "mpt"])  # BLOOM: test_integrations_bloom
def test_alibi_sdpa_and_left_padding(name, launches):
    # Falcon's SDPA path adds the folded alibi once (its eager path twice): both matched.
    impl = "sdpa" if name == "falcon-alibi" else "eager"
    model = make_model(name, attn_implementation=impl)
    inputs, keep = batch_inputs("left")
    logits, loss, _ = model_step(model, inputs)
    hf.apply(model)
    p_logits, p_loss, _ = model_step(model, inputs)
    assert len(launches) == model.config.num_hidden_layers
    assert rel_err(p_logits[keep], logits[keep]) <= 1e-5
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)


def test_unsupported_model_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported model types: .*bloom.*"
                                         r"llama.*mpt"):
        hf.apply(gpt2)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        hf.apply("meta-llama/Llama-3-8B")
    assert hf.patched_layers(gpt2) == {}


def test_probe_refuses_a_function_that_computes_otherwise(monkeypatch):
    # A model whose function shares the name but not the math is refused, nothing patched.
    from transformers.models.llama import modeling_llama

    def not_rope(q, k, cos, sin, unsqueeze_dim=1):
        return q * cos.unsqueeze(unsqueeze_dim), k
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", not_rope)
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"cannot patch rope/rotate_half into llama model "
                                         r"LlamaForCausalLM \(transformers [0-9.]+\): "
                                         r".*modeling_llama\.apply_rotary_pos_emb: it does not "
                                         r"compute"):
        hf.apply(model)
    assert modeling_llama.apply_rotary_pos_emb is not_rope and hf.patched_layers(model) == {}


def test_attention_implementations_not_covered_are_refused():
    # Falcon's drop-ins reproduce eager and SDPA: any other implementation is refused, and up
    # to transformers 5.24 FalconFlashAttention2 (which overrides the forward) too.
    from transformers.models.falcon import modeling_falcon

    model = make_model("falcon-alibi")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attention implementation 'flash_attention_2' is "
                                         r"not one the falcon drop-in reproduces"):
        hf.apply(model)
    assert hf.patched_layers(model) == {}
    if hasattr(modeling_falcon, "FalconFlashAttention2"):
        model = make_model("falcon-alibi")
        layer = model.transformer.h[0]
        layer.self_attention = modeling_falcon.FalconFlashAttention2(model.config, 0)
        with pytest.raises(ValueError, match=r"overrides FalconAttention\.forward"):
            hf.apply(model)
        assert hf.patched_layers(model) == {}


def test_gemma4_proportional_rope_frequencies():
    # Gemma-4's full-attention layers use rope type "proportional": rope_frequencies agrees.
    from posenc_triton import rope_frequencies

    model = make_model("gemma4_text")
    params = model.config.rope_parameters["full_attention"]
    assert params["rope_type"] == "proportional"
    want = model.model.rotary_emb.full_attention_original_inv_freq
    got, scale = rope_frequencies(16, params["rope_theta"], params)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == 1.0 and (got[2:] == 0).all()


@pytest.mark.parametrize("name", ["mpt", "falcon-alibi"])
def test_fused_alibi_layers_pickle_and_are_per_instance(name):
    import io

    model, other = make_model(name), make_model(name)
    hf.apply(model)
    assert len(hf.patched_layers(model)) == 2 and hf.patched_layers(other) == {}
    buf = io.BytesIO()  # the fused classes resolve by name: a patched model pickles whole
    torch.save(model, buf)
    buf.seek(0)
    assert hf.patched_layers(torch.load(buf, weights_only=False)) == hf.patched_layers(model)
    assert model.state_dict().keys() == other.state_dict().keys()


# ---- ALiBi attention dropout in training: the kernel's fused dropout_p --------------------

P = 0.5  # attention dropout
ALIBI = ["bloom", "mpt", "falcon-alibi"]


def alibi_dropout_model(name, attn_implementation="eager"):
    """The ALiBi model ``name`` with attention dropout ``P``. MPT's through its layers'
    ``attn_dropout_p``: transformers 5.25's MptAttentionConfig types ``attn_pdrop`` as int."""
    model_type, overrides = MODELS[name]
    if name != "mpt":
        overrides = {**overrides, "attention_dropout": P}
    model = make_model(name, attn_implementation, spec=(model_type, overrides))
    if name == "mpt":
        for block in model.transformer.blocks:
            block.attn.attn_dropout_p = P
    return model


def fixed_dropout(monkeypatch, masks=None):
    """``F.dropout`` (nn.Dropout's too) made deterministic: the identity, drawing nothing,
    except on attention probabilities ``[B, H, Sq, Sk]`` when ``masks`` is given, which keep
    ``masks.pop(0)`` and are scaled by ``1 / (1 - p)``: transformers' attention dropout with
    a chosen keep-mask, and no other dropout (MPT's and Falcon's residual ones share ``p``)."""
    def dropout(x, p=0.5, training=True, inplace=False):
        if masks is None or not training or p == 0 or x.dim() != 4:
            return x
        return x.masked_fill(~masks.pop(0), 0.0) / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)


def record_dropout_p(monkeypatch):
    """The ``dropout_p`` of every alibi_attention call of the patched layers."""
    from posenc_triton.integrations import _alibi_models

    seen, real = [], _alibi_models.alibi_attention
    monkeypatch.setattr(_alibi_models, "alibi_attention",
                        lambda *a, **kw: seen.append(kw.get("dropout_p")) or real(*a, **kw))
    return seen


def no_posenc_warning(run):
    """``run()``, asserting that it warns nothing of posenc_triton's (no fallback notice)."""
    import warnings

    from posenc_triton import _backend

    _backend._WARNED.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = run()
    assert not [w for w in seen if "posenc_triton" in str(w.message)], seen
    return result


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_training_dropout_runs_the_kernel_exactly(name, launches, monkeypatch):
    # Training with attention dropout runs the fused kernel (no fallback, no warning) and is
    # transformers' eager attention with the kernel's keep-mask: the masks a seeded step
    # draws (one Philox key per layer, from torch's generator) are materialised by the test
    # hook and handed to transformers' dropout; logits, loss and every gradient agree.
    from posenc_triton import alibi_ops

    model = alibi_dropout_model(name).train()
    inputs, keep = batch_inputs("right")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    torch.manual_seed(1234)
    seeds = [alibi_ops.draw_dropout_seed(DEVICE) for _ in range(layers)]
    masks = [alibi_ops.dropout_keep_mask(s, P, 2, heads, SEQLEN, SEQLEN) for s in seeds]
    assert all(0.3 < m.float().mean() < 0.7 for m in masks)
    left = list(masks)
    fixed_dropout(monkeypatch, left)
    logits, loss, grads = model_step(model, inputs)
    assert not left and not launches  # every layer's probabilities took its mask
    hf.apply(model)
    fixed_dropout(monkeypatch)
    dropout_ps = record_dropout_p(monkeypatch)
    torch.manual_seed(1234)
    p_logits, p_loss, p_grads = no_posenc_warning(lambda: model_step(model, inputs))
    assert len(launches) == layers and dropout_ps == [P] * layers
    assert rel_err(p_logits[keep], logits[keep]) <= 1e-5
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in p_grads.values())
    assert_grads_close(p_grads, grads)
    qkv = [g for n, g in p_grads.items() if "query_key_value" in n or "Wqkv" in n]
    assert len(qkv) >= layers and all(g.abs().sum() > 0 for g in qkv)


@pytest.mark.parametrize("name, impl", [(n, "eager") for n in ALIBI] + [
    ("falcon-alibi", "sdpa")])
def test_alibi_training_dropout_is_seeded_and_off_in_eval(name, impl, launches, monkeypatch):
    # A seeded step repeats; another seed drops other probabilities; eval drops nothing (the
    # kernel with dropout_p=0 gives the dropout-free model's output). Falcon's SDPA path too.
    model = alibi_dropout_model(name, impl)
    inputs, keep = batch_inputs("right")
    del inputs["labels"]
    with torch.no_grad():
        want = model.eval()(**inputs).logits
    hf.apply(model)
    fixed_dropout(monkeypatch)  # only the attention dropout is random
    dropout_ps = record_dropout_p(monkeypatch)
    layers = model.config.num_hidden_layers

    def logits(seed, train=True):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.train(train)(**inputs).logits

    first, again, other = no_posenc_warning(lambda: (logits(1), logits(1), logits(2)))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert rel_err(first[keep], want[keep]) > 1e-3  # the dropout does change the output
    assert dropout_ps == [P] * (3 * layers)
    evaluated = logits(3, train=False)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(after, torch.get_rng_state())  # eval draws no random number
    assert dropout_ps[3 * layers:] == [0.0] * layers and len(launches) == 4 * layers
    assert rel_err(evaluated[keep], want[keep]) <= 1e-5
