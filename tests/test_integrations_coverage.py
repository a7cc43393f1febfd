"""Every model type of the installed transformers whose attention calls the hub function
``rotary_pos_emb`` (a decorated ``apply_rotary_pos_emb``), discovered, shrunk and checked.

Each is built tiny from its own config class by one generic shrinker (on the meta device
first: a config the shrinker cannot make small is listed, with its size, not run), patched by
``apply()`` and compared with itself unpatched: fp32 logits with right padding (rel 1e-5),
the gradients of one training step (1e-4), a kernel launch in every call of every
layer that rotates (the models and their inputs: ``tiny_models``).
``test_readme_states_the_count`` keeps the README's figure the one this run measures.
"""

import importlib
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, assert_grads_close, count_calls_of

transformers = pytest.importorskip("transformers")
pytest.importorskip("kernels")

from tiny_models import SEQLEN, build, inputs, step  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from posenc_triton.integrations import _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402


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


def check(model_type, calls) -> str:
    """``"verified"``, or why the type is not checked (a failure raises)."""
    model, why = build(model_type)
    if model is None:
        return why
    try:
        kwargs, keep = inputs(model)
        want, grads = step(model, kwargs)
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
    got, p_grads = step(model, kwargs)
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
