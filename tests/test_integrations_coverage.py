"""Every model type of the installed transformers whose attention calls the hub function
``rotary_pos_emb`` (a decorated ``apply_rotary_pos_emb``), discovered, shrunk and checked.

Each is built tiny from its own config class by one generic shrinker (on the meta device
first: a config the shrinker cannot make small is listed, with its size, not run), patched by
``apply()`` and compared with itself unpatched: fp32 logits with right padding (rel 1e-5),
the gradients of one training step (1e-4), a kernel launch in every layer that rotates.
``test_readme_states_the_count`` keeps the README's figure the one this run measures.
"""

import importlib
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, count_calls_of

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
          "num_experts_per_tok": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MAX_PARAMS = 4_000_000
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


def _shrink(config):
    for key, value in SHRINK.items():
        if isinstance(getattr(config, key, None), int) and not isinstance(
                getattr(config, key), bool):
            setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list) and config.layer_types:
        # one layer of each kind (sliding and full attention: some rotate only in one)
        kinds = list(dict.fromkeys(config.layer_types))[:SHRINK["num_hidden_layers"]]
        config.layer_types = (kinds * SHRINK["num_hidden_layers"])[:SHRINK["num_hidden_layers"]]
    for sub in ("text_config", "decoder_config"):
        if getattr(config, sub, None) is not None:
            _shrink(getattr(config, sub))
    return config


def build(model_type):
    """``(model, None)`` tiny and fp32, or ``(None, why it cannot be checked here)``."""
    names = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    auto = (transformers.AutoModelForCausalLM if model_type in names
            else transformers.AutoModel if model_type in modeling_auto.MODEL_MAPPING_NAMES
            else None)
    if auto is None:
        return None, "a sub-configuration: no model class of its own"
    try:
        config = _shrink(CONFIG_MAPPING[model_type]())
        with torch.device("meta"):
            meta = auto.from_config(config)
        size = sum(p.numel() for p in meta.parameters())
        if size > MAX_PARAMS:
            return None, f"the generic shrinker leaves {size / 1e6:.0f}M parameters"
        torch.manual_seed(0)
        model = auto.from_config(config, attn_implementation="eager").to(DEVICE).float().eval()
    except Exception as e:
        return None, f"cannot be built from its config alone: {type(e).__name__}: {e}"[:200]
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, torch.nn.Embedding):
        return None, "takes no token ids (an audio/vision encoder needing a processor)"
    return model, None


def _inputs(model):
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 128), (2, SEQLEN), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, SEQLEN - 3:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    hidden.float().square().mean().backward()  # (eval: no dropout, gradients all the same)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return hidden.detach(), grads


def check(model_type, calls) -> str:
    """``"verified"``, or why the type is not checked (a failure raises)."""
    model, why = build(model_type)
    if model is None:
        return why
    ids, mask = _inputs(model)
    try:
        want, grads = _step(model, ids, mask)
    except Exception as e:
        return f"its unpatched forward needs more than token ids: {type(e).__name__}"[:200]
    try:
        hf.apply(model)
    except ValueError as e:
        if "calls no apply_rotary_pos_emb" in str(e) or "no layer calls" in str(e):
            return "its token model's attention calls another RoPE function"
        raise
    layers = hf.patched_layers(model)
    assert layers, model_type
    counts = dict.fromkeys(layers, 0)
    handles = []
    for path in layers:
        layer = model.get_submodule(path)
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, p=path: counts.__setitem__(p, counts[p] - len(calls))))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, p=path: counts.__setitem__(p, counts[p] + len(calls))))
    got, p_grads = _step(model, ids, mask)
    for h in handles:
        h.remove()
    hf.unpatch(model)
    assert all(n >= 1 for n in counts.values()), (model_type, counts)
    keep = mask.bool()
    err = ((got[keep] - want[keep]).abs().max() / want[keep].abs().max().clamp_min(1e-30))
    assert err.item() <= 1e-5, (model_type, err.item())
    assert p_grads.keys() == grads.keys()
    for n in grads:
        scale = grads[n].abs().max().item()
        torch.testing.assert_close(p_grads[n], grads[n], rtol=1e-4, atol=1e-4 * scale + 1e-12,
                                   msg=lambda m, n=n: f"{model_type} grad of {n}: {m}")
    return "verified"


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


def test_readme_states_the_count():
    """The README's coverage line is this run's count, for the transformers it names."""
    if len(RESULTS) < len(TYPES):
        pytest.skip("run with the whole module to count")
    verified = sorted(t for t, r in RESULTS.items() if r == "verified")
    line = re.search(r"(\d+) of the (\d+) model types .*?transformers ([0-9.]+)",
                     Path(__file__).resolve().parents[1].joinpath("README.md").read_text())
    listing = "\n".join(f"{t}: {r}" for t, r in sorted(RESULTS.items()) if r != "verified")
    assert line, (f"README.md states no hub-hook coverage line; measured {len(verified)} of "
                  f"{len(TYPES)}; not verified:\n{listing}")
    if line.group(3) != transformers.__version__:
        pytest.skip(f"the README counts transformers {line.group(3)}")
    assert (int(line.group(1)), int(line.group(2))) == (len(verified), len(TYPES)), (
        f"README: {line.group(0)}; measured {len(verified)} of {len(TYPES)}; not verified:\n"
        f"{listing}")
