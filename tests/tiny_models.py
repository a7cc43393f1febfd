"""Tiny random transformers models built from a config class alone, and inputs for them.

One generic shrinker (:func:`build`): the config is rebuilt from its class with small sizes, so
that what its constructor derives follows, every sub-configuration (text, vision, audio) too,
then the type's own ``OVERRIDES``. :func:`inputs` feeds token ids with right padding, or
random audio features, pixels, series or codec waveforms to a model that takes none, and
``INPUTS`` what a type needs beyond that. Used by ``test_integrations_coverage`` and
``test_integrations_probed``.
"""

import inspect
import math

import torch
import transformers
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from conftest import DEVICE

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
    "pi05": lambda c: (setattr(c, "chunk_size", 4),  # (four action tokens)
                       setattr(c.vlm_config, "image_token_id", 127),  # inside the tiny vocab
                       setattr(c.vlm_config, "projection_dim", 64),  # the text width
                       setattr(c.vlm_config.vision_config, "projection_dim", 64),
                       setattr(c.vlm_config.vision_config, "image_size", 32)),  # 4 patches
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
    auto_lm = transformers.AutoModelForCausalLM
    mappings = [(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto_lm)]
    mappings.append((modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                     transformers.AutoModelForImageTextToText) if generating
                    else (modeling_auto.MODEL_MAPPING_NAMES, transformers.AutoModel))
    names, auto = next(((m, a) for m, a in mappings if model_type in m), (None, None))
    if auto is None:
        return None, ("no generating class" if generating
                      else "a sub-configuration: no model class of its own")
    try:
        config = _shrink(CONFIG_MAPPING[model_type](), model_type)
        make = auto.from_config
        if type(config) not in auto._model_mapping:  # a config class of two model types: the
            make = getattr(transformers, names[model_type])._from_config  # auto one refuses it
        with torch.device("meta"):
            meta = make(config)
        size = sum(p.numel() for p in meta.parameters())
        if size > MAX_PARAMS:
            return None, f"the generic shrinker leaves {size / 1e6:.0f}M parameters"
        torch.manual_seed(0)
        model = make(config, attn_implementation="eager").to(DEVICE).float().eval()
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
    # Evolla: a protein sequence (its SaProt encoder rotates too) beside the text.
    "evolla": lambda model, gen, kw: dict(
        kw, protein_input_ids=torch.randint(3, 128, (2, SEQLEN), generator=gen),
        protein_attention_mask=torch.ones(2, SEQLEN, dtype=torch.long)),
    # PI-0.5: a camera image's 4 patch tokens and a prompt into the VLM; 4 action tokens and a
    # flow-matching time embedding into its action expert.
    "pi05": lambda model, gen, kw: {
        "input_ids": torch.cat((torch.full((2, 4), 127),
                                torch.randint(3, 127, (2, SEQLEN - 4), generator=gen)), 1),
        "attention_mask": torch.ones(2, SEQLEN, dtype=torch.long),
        "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=gen),
        "pixel_attention_mask": torch.ones(2, 1, dtype=torch.bool),
        "action_embeds": torch.randn(2, 4, model.config.dit_config.hidden_size, generator=gen),
        "timestep_embeds": torch.randn(2, model.config.dit_config.hidden_size, generator=gen)},
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


def inputs(model):
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
        pass  # (a type of INPUTS: its builder makes everything it takes)
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


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    hidden = _first_output(model(**inputs))
    hidden.float().square().mean().backward()  # (eval: no dropout, gradients all the same)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return hidden.detach(), grads
