"""Every model type of the installed transformers whose attention calls the hub function
``rotary_pos_emb`` (a decorated ``apply_rotary_pos_emb``), discovered, shrunk and checked.

Each is built tiny from its own config class by one generic shrinker (on the meta device
first: a config the shrinker cannot make small is listed, with its size, not run), patched by
``apply()`` and compared with itself unpatched: fp32 logits with right padding (rel 1e-5),
the gradients of one training step (1e-4), a kernel launch in every call of every
layer that rotates. Models that take no token ids get random audio features, pixels or series.
``test_readme_states_the_count`` keeps the README's figure the one this run measures.
"""

import importlib
import inspect
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, assert_grads_close, count_calls_of

transformers = pytest.importorskip("transformers")
pytest.importorskip("kernels")

from transformers.models.auto import modeling_auto  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from posenc_triton.integrations import _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

SHRINK = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 64, "moe_intermediate_size": 32,
          "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
          "num_experts_per_tok": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
          # vision and audio towers
          "depth": 2, "num_heads": 4, "embed_dim": 64, "out_hidden_size": 64,
          "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2, "projector_hidden_size": 64}
MAX_PARAMS = 12_000_000
SEQLEN = 10


def _decorated_types() -> list[str]:
    found = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            config_class = CONFIG_MAPPING[model_type]
            module = importlib.import_module(
                config_class.__module__.replace(".configuration_", ".modeling_"))
        except Exception:  # an optional dependency missing: not this transformers' model here
            continue
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if getattr(type(fn), "kernel_layer_name", None) == "rotary_pos_emb":
            found.append(model_type)
    return found


TYPES = _decorated_types()


MLA = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 16, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
       "first_k_dense_replace": 1}
#: Per-type values the generic shrinker cannot guess (after it): attribute -> value.
OVERRIDES = {
    "dbrx": lambda c: (setattr(c, "d_model", 64), setattr(c, "n_heads", 4),
                       setattr(c, "n_layers", 2), setattr(c, "max_seq_len", 64),
                       setattr(c.attn_config, "kv_n_heads", 2),
                       setattr(c.attn_config, "rope_theta", 1e4),  # missing by default
                       setattr(c.attn_config, "clip_qkv", 8.0),  # None fails its clamp
                       setattr(c.ffn_config, "hidden_size", 64),
                       setattr(c.ffn_config, "ffn_hidden_size", 128),
                       setattr(c.ffn_config, "moe_num_experts", 4),
                       setattr(c.ffn_config, "moe_top_k", 2)),
    "cohere_compass_text": {"rope_parameters": {  # empty by default: no per-layer entries
        kind: {"rope_type": "default", "rope_theta": 1e4}
        for kind in ("full_attention", "sliding_attention")}},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32,
            "position_embedding_type": "rotary"},
    "hrm_text": {"num_layers_per_stack": 1, "H_cycles": 1, "L_cycles": 1, "L_bp_cycles": [1]},
    "mistral4": {"head_dim": 16},  # (nope + rope: its rotary width is a partial factor)
    "zamba2": {"use_mem_rope": True},
    "granitemoehybrid": {"layer_types": ["full_attention", "linear_attention"],
                         "position_embedding_type": "rope",
                         "mamba_n_heads": 8, "mamba_d_head": 16},
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},  # (its weight tying needs two)
    "esmc": {"num_key_value_heads": 4},  # (its q/k layer norms span all heads)
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 0, "n_output_layers": 1},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    **{key: {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,  # M-RoPE: D/2
                                 "mrope_section": [2, 3, 3]}}
       for key in ("qwen2_vl_text", "qwen2_5_vl_text", "paddleocr_vl_text", "qwen2_5_omni_text")},
    "hunyuan_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                            "mrope_section": [2, 2, 2, 2]}},  # none by default
    "unlimited_ocr_text": {"num_key_value_heads": 4},  # (its eager attention repeats no kv)
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},  # none by default
    **{key: {"encoder_hidden_size": 2, "quantization_dim": 128,  # (its channels double 5x)
             "num_key_value_heads": 4}  # (its eager attention repeats no kv)
       for key in ("xcodec2", "neucodec")},
    "mimi": {"upsample_groups": 64, "num_filters": 8},  # (a group per channel: hidden 64)
    "csm": {"text_vocab_size": 128, "num_codebooks": 4, "codebook_pad_token_id": 127},
    "csm_depth_decoder_model": {"num_codebooks": 4, "backbone_hidden_size": 64},
    "dia_decoder": {"cross_num_attention_heads": 4, "cross_head_dim": 16,
                    "cross_num_key_value_heads": 4, "cross_hidden_size": 64},
    **{key: {"d_model": 64, "encoder_ffn_dim": 128, "encoder_attention_heads": 4,  # Whisper-like
             "output_dim": 64, "downsample_hidden_size": 32}
       for key in ("qwen2_5_omni_audio_encoder", "qwen3_omni_moe_audio_encoder")},
    **{key: lambda c: setattr(c, "vision_start_token_id", 1000)  # read, never set (ids < 128)
       for key in ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker")},
    "granite4_vision": {"deepstack_layer_map": [[0, 0]], "downsample_rate": "1/2",
                        "spatial_target_layers": [0, 1, 0, 1]},
    **{key: {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,  # D/4, partial
                                 "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}}
       for key in ("glm4v_text", "glm4v_moe_text")},
}


def _attention_first(kind: str) -> bool:
    """Sort key: the layer kinds that attend (and so may rotate) before the others."""
    attends = kind == "hybrid" or ("attention" in kind and "linear" not in kind)
    return not attends


def _shrink(config, model_type=None):
    """A tiny copy of ``config``: rebuilt from its class with small sizes (so that what its
    constructor derives from them follows), then the type's own ``OVERRIDES``."""
    fields = vars(config)  # (a heterogeneous config's per-layer attributes raise on getattr)
    kwargs = {k: v for k, v in SHRINK.items()
              if k in fields and not isinstance(fields[k], (bool, float, list))}
    if fields.get("qk_rope_head_dim") is not None:  # multi-head latent attention
        kwargs.update({k: v for k, v in MLA.items() if fields.get(k) is not None},
                      head_dim=MLA["qk_rope_head_dim"],
                      num_key_value_heads=SHRINK["num_attention_heads"])
    types_ = fields.get("layer_types") or fields.get("layers_block_type")
    if isinstance(types_, list) and types_:
        # one layer of each kind, attention first (some rotate in only one kind)
        kinds = sorted(dict.fromkeys(types_), key=_attention_first)
        key = "layer_types" if fields.get("layer_types") else "layers_block_type"
        kwargs[key] = (kinds * 2)[:SHRINK["num_hidden_layers"]]
    override = OVERRIDES.get(model_type, {})
    if not callable(override):
        kwargs.update(override)
    for sub, value in fields.items():  # text, vision, audio, ... configs: all of them
        if isinstance(value, transformers.PreTrainedConfig):
            kwargs[sub] = _shrink(value, getattr(value, "model_type", None))
    try:
        config = type(config)(**kwargs)
    except Exception:  # a constructor that takes no full dict back: set the fields instead
        for key, value in kwargs.items():
            setattr(config, key, value)
    if callable(override):
        override(config)
    return config


def build(model_type, generating=False):
    """``(model, None)`` tiny and fp32, or ``(None, why it cannot be checked here)``; with
    ``generating``, the class with a language-model head (a VLM's conditional generation)."""
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = transformers.AutoModelForCausalLM
    elif generating and model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = transformers.AutoModelForImageTextToText
    elif not generating and model_type in modeling_auto.MODEL_MAPPING_NAMES:
        auto = transformers.AutoModel
    else:
        return None, ("no generating class" if generating
                      else "a sub-configuration: no model class of its own")
    try:
        config = _shrink(CONFIG_MAPPING[model_type](), model_type)
        with torch.device("meta"):
            meta = auto.from_config(config)
        size = sum(p.numel() for p in meta.parameters())
        if size > MAX_PARAMS:
            return None, f"the generic shrinker leaves {size / 1e6:.0f}M parameters"
        torch.manual_seed(0)
        model = auto.from_config(config, attn_implementation="eager").to(DEVICE).float().eval()
    except Exception as e:
        return None, f"cannot be built from its config alone: {type(e).__name__}: {e}"[:200]
    return model, None


def _config_value(model, *names):
    """The first of ``names`` set on the model's config or one of its sub-configurations."""
    configs = [model.config, *(v for v in vars(model.config).values()
                               if isinstance(v, transformers.PreTrainedConfig))]
    for name in names:
        for config in configs:
            if getattr(config, name, None):
                return getattr(config, name)
    raise LookupError(f"its config sets none of {names}")


def _padded_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3 * length // 4:] = 0  # right padding in the first row
    return mask


#: Per-type inputs the generic builder cannot guess: ``(model, gen, kwargs) -> kwargs``.
INPUTS = {
    # Dia: text ids into the encoder, audio codes [B, S, codebooks] into the decoder.
    "dia": lambda model, gen, kw: {
        "input_ids": torch.randint(3, 128, (2, SEQLEN), generator=gen),
        "attention_mask": _padded_mask(2, SEQLEN),
        "decoder_input_ids": torch.randint(
            3, 128, (2, SEQLEN, model.config.decoder_config.num_channels), generator=gen)},
    # CSM: a text prompt (its backbone embeds text and audio codes in one table of its own).
    "csm": lambda model, gen, kw: {
        "input_ids": torch.randint(3, 128, (2, SEQLEN), generator=gen),
        "attention_mask": _padded_mask(2, SEQLEN)},
    # The codecs: a waveform of SEQLEN code frames and its semantic features, frame by frame.
    **{key: lambda model, gen, kw: {
        "input_values": torch.randn(
            2, 1, math.prod(model.config.downsampling_ratios) * SEQLEN, generator=gen),
        "input_features": torch.randn(
            2, SEQLEN, model.config.semantic_model_config.feature_projection_input_dim,
            generator=gen)}
       for key in ("xcodec2", "neucodec")},
    # Voxtral realtime: one audio embedding per token (mel frames / conv stride 2 / 4).
    "voxtral_realtime": lambda model, gen, kw: dict(kw, input_features=torch.randn(
        2, model.config.audio_config.num_mel_bins,
        2 * model.config.downsample_factor * SEQLEN, generator=gen)),
}


def _inputs(model):
    """``(forward kwargs, mask of the output positions to compare or None)``: token ids with
    right padding, or for a model that takes none, random audio features, pixels or series."""
    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(1)
    kwargs, keep = {}, None
    special = INPUTS.get(model.config.model_type)
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if "input_ids" in params and isinstance(embeddings, torch.nn.Embedding):
        vocab = embeddings.num_embeddings
        ids = torch.randint(3, min(vocab, 128), (2, SEQLEN), generator=gen)
        keep = _padded_mask(2, SEQLEN)
        kwargs.update(input_ids=ids, attention_mask=keep)
        if "decoder_input_ids" in params:  # an encoder-decoder: the decoder reads the same ids
            kwargs.update(decoder_input_ids=ids, decoder_attention_mask=keep)
    elif special is not None:
        pass
    elif "input_features" in params:  # an audio encoder: log-mel frames
        bins = _config_value(model, "num_mel_bins", "feature_size", "input_feat_size")
        kwargs["input_features"] = torch.randn(2, 8 * SEQLEN, bins, generator=gen)
        if "attention_mask" in params:
            kwargs["attention_mask"] = _padded_mask(2, 8 * SEQLEN)
    elif "pixel_values" in params:  # a vision encoder: one image per row
        size = 2 * _config_value(model, "patch_size") * 4
        channels = _config_value(model, "num_channels")
        kwargs["pixel_values"] = torch.randn(2, channels, size, size, generator=gen)
        if "image_sizes" in params:
            kwargs["image_sizes"] = torch.tensor([[size, size]] * 2)
    elif "past_values" in params:  # a time-series model: context windows
        length = 4 * _config_value(model, "patch_length", "input_patch_len")
        kwargs["past_values"] = torch.randn(2, length, generator=gen)
    else:
        raise LookupError("takes no token ids, audio features, pixels or series")
    if special is not None:
        kwargs = special(model, gen, kwargs)
    return ({k: v.to(DEVICE) for k, v in kwargs.items()},
            None if keep is None else keep.to(DEVICE))


def _first_output(out):
    """The model's main output tensor: logits, else its (first) hidden states."""
    for name in ("logits", "last_hidden_state"):
        if torch.is_tensor(getattr(out, name, None)):
            return getattr(out, name)
    return next(v for v in (out.values() if hasattr(out, "values") else out)
                if torch.is_tensor(v) and v.is_floating_point())


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    hidden = _first_output(model(**inputs))
    hidden.float().square().mean().backward()  # (eval: no dropout, gradients all the same)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return hidden.detach(), grads


def check(model_type, calls) -> str:
    """``"verified"``, or why the type is not checked (a failure raises)."""
    model, why = build(model_type)
    if model is None:
        return why
    try:
        inputs, keep = _inputs(model)
        want, grads = _step(model, inputs)
    except Exception as e:
        return f"its forward needs inputs built for it: {type(e).__name__}: {e}"[:200]
    try:
        hf.apply(model)
    except ValueError as e:
        if "calls no apply_rotary_pos_emb" in str(e) or "no layer calls" in str(e):
            return "its token model's attention calls another RoPE function"
        if "cannot patch" in str(e) and not _rope_patch.rope_sites(model, _rope_patch.HUB_KINDS):
            return "its attention never rotates (NoPE: the decorated function is not called)"
        raise
    layers = hf.patched_layers(model)
    assert layers, model_type
    # Kernel launches in each call of each patched layer (a VLM's vision tower, say, is not
    # reached by token ids: it must launch in every call that happens, and something must run).
    launches: dict[str, list[int]] = {}
    handles = []
    for path in layers:
        layer = model.get_submodule(path)
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, p=path: launches.setdefault(p, []).append(-len(calls))))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, p=path: launches[p].append(launches[p].pop() + len(calls))))
    got, p_grads = _step(model, inputs)
    for h in handles:
        h.remove()
    hf.unpatch(model)
    assert launches and all(n >= 1 for ns in launches.values() for n in ns), (
        model_type, launches)
    if keep is not None and got.shape[:2] == keep.shape:
        got, want = got[keep.bool()], want[keep.bool()]
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err.item() <= 1e-5, (model_type, err.item())
    assert_grads_close(p_grads, grads, floor=1e-12, where=model_type)
    return "verified"


def check_generate(model_type, calls):
    """Greedy ``generate()`` with the KV cache and left padding gives the unpatched model's
    tokens, with a launch in every patched layer at the prefill and at each decode step."""
    model, why = build(model_type, generating=True)
    assert model is not None, (model_type, why)
    gen = torch.Generator().manual_seed(2)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(vocab, 128), (2, SEQLEN), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 3, "do_sample": False,
              "pad_token_id": 0}
    want = model.generate(**kwargs)
    hf.apply(model)
    before = len(calls)
    got = model.generate(**kwargs)
    launches, layers = len(calls) - before, len(hf.patched_layers(model))
    hf.unpatch(model)
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{model_type}: {m}")
    assert launches >= 3 * layers, (model_type, launches, layers)  # prefill + 2 decode steps


RESULTS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    _rope_patch.restore_all()


@pytest.mark.parametrize("model_type", TYPES)
def test_decorated_type(model_type, monkeypatch):
    calls = count_calls_of(monkeypatch, _rope_dropins, "apply_rope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RESULTS[model_type] = check(model_type, calls)


#: Issue 21's families that transformers' hub hook reaches (the probed ones are in
#: test_integrations_probed): the table rows' generate() check too.
GENERATING = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "exaone4", "seed_oss",
              "doge"]


@pytest.mark.parametrize("model_type", GENERATING)
def test_decorated_type_generates(model_type, monkeypatch):
    if model_type not in TYPES:
        pytest.skip(f"transformers {transformers.__version__} does not decorate {model_type}")
    calls = count_calls_of(monkeypatch, _rope_dropins, "apply_rope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_generate(model_type, calls)


def family(model_type: str) -> str:
    """The modeling module (``models/<family>/``) that defines ``model_type``."""
    return CONFIG_MAPPING[model_type].__module__.split(".")[-2]


def _decorates_itself(family_name: str) -> bool:
    """Whether ``models/<family>/modeling_<family>.py`` decorates an attention with
    ``@use_kernelized_func(apply_rotary_pos_emb)`` (not only copies a decorated function)."""
    path = Path(transformers.__file__).parent / "models" / family_name
    path = path / f"modeling_{family_name}.py"
    return path.is_file() and "@use_kernelized_func(apply_rotary_pos_emb)" in path.read_text()


def test_readme_states_the_count():
    """The README's coverage line is this run's count, for the transformers it names."""
    if len(RESULTS) < len(TYPES):
        pytest.skip("run with the whole module to count")
    verified = sorted(t for t, r in RESULTS.items() if r == "verified")
    families = {family(t) for t in TYPES}
    verified_families = {family(t) for t in verified}
    own = {f for f in families if _decorates_itself(f)}
    measured = (len(verified_families), len(families), len(verified), len(TYPES),
                len(own & verified_families), len(own))
    line = re.search(r"(\d+) of the (\d+) model families \((\d+) of the (\d+) model\s+types\)"
                     r"\s+verified on transformers ([0-9]+(?:\.[0-9]+)*),\s+(\d+) of the (\d+)"
                     r"\s+families that decorate",
                     Path(__file__).resolve().parents[1].joinpath("README.md").read_text())
    listing = "\n".join(f"{t}: {r}" for t, r in sorted(RESULTS.items()) if r != "verified")
    said = (f"measured {measured[0]} of {measured[1]} families, {measured[2]} of {measured[3]} "
            f"types, {measured[4]} of the {measured[5]} families decorating it themselves")
    assert line, f"README.md states no hub-hook coverage line; {said}; not verified:\n{listing}"
    if line.group(5) != transformers.__version__:
        pytest.skip(f"the README counts transformers {line.group(5)}")
    stated = tuple(int(g) for g in line.groups()[:4] + line.groups()[5:])
    assert stated == measured, f"README: {line.group(0)}; {said}; not verified:\n{listing}"
