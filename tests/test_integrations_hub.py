"""transformers' own hub-kernel hook (``rotary_pos_emb``) pointed at our local ``kernels``
layer repository: ``kernel_mapping()``, ``kernel_config()`` and ``apply()``'s hub route."""

import inspect

import pytest
import torch

from conftest import DEVICE, assert_grads_close, count_calls_of, model_step

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

from posenc_triton.integrations import _hub, _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(transformers.models.llama.modeling_llama.apply_rotary_pos_emb,
                "kernel_layer_name"),
    reason="this transformers does not decorate apply_rotary_pos_emb for hub kernels")

BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "pad_token_id": 0}


def make(model_type="llama", **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager").to(DEVICE).float()


def inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {k: v.to(DEVICE) for k, v in
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)
             }.items()}


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    yield
    _rope_patch.restore_all()


@pytest.fixture
def launches(monkeypatch):
    return count_calls_of(monkeypatch, _rope_dropins, "apply_rope")


@pytest.fixture
def offline(monkeypatch):
    """Any download from the Hub fails the test."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub route must not download anything")
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, no_network)


def test_repository_loads_through_kernels():
    for name, cls in (("RotaryPosEmb", _hub.RotaryPosEmb),
                      ("RotaryPosEmbFP32", _hub.RotaryPosEmbFP32)):
        layer = kernels.LocalLayerRepository(repo_path=_hub.REPOSITORY, layer_name=name).load()
        assert layer is cls and layer.has_backward and layer.can_torch_compile
        assert list(inspect.signature(layer.forward).parameters) == [
            "self", "q", "k", "cos", "sin", "unsqueeze_dim"]


def test_kernel_mapping_covers_devices_and_modes():
    from kernels import Mode

    entry = hf.kernel_mapping()["rotary_pos_emb"]
    assert set(entry) == {"cuda", "cpu"}
    for modes in entry.values():
        assert set(modes) == {Mode.TRAINING, Mode.INFERENCE, Mode.TRAINING | Mode.TORCH_COMPILE,
                              Mode.INFERENCE | Mode.TORCH_COMPILE}
        assert {repo.layer_name for repo in modes.values()} == {"RotaryPosEmb"}


def test_kernelize_with_the_mapping(launches, offline):
    model, reference = make(), make()
    batch = inputs()
    logits, _, grads = model_step(reference, batch)
    with kernels.use_kernel_mapping(hf.kernel_mapping(), inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device=DEVICE)
    routes = hf.patched_layers(model)
    assert len(routes) == 2 and all(v == ["hub/rotary_pos_emb"] for v in routes.values())
    p_logits, _, p_grads = model_step(model, batch)
    assert len(launches) == 2  # one launch per layer (the backward is its autograd node)
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(p_grads[n], grads[n], rtol=1e-4, atol=1e-6)


def test_apply_takes_the_hub_route_per_model(launches, offline):
    from transformers.models.llama import modeling_llama

    before = modeling_llama.apply_rotary_pos_emb
    model, other = make(), make()
    batch = inputs()
    logits, loss, grads = model_step(model, batch)
    hf.apply(model)
    assert hf.patched_layers(model) == {f"model.layers.{i}.self_attn": ["hub/rotary_pos_emb"]
                                        for i in range(2)}
    # No global monkey patch: the module function is untouched, another model unpatched.
    assert modeling_llama.apply_rotary_pos_emb is before and not _rope_patch._ORIGINALS
    assert hf.patched_layers(other) == {}
    model_step(other, batch)
    assert not launches
    p_logits, p_loss, p_grads = model_step(model, batch)
    assert len(launches) == 2
    torch.testing.assert_close(p_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(p_grads[n], grads[n], rtol=1e-4, atol=1e-6)
    hf.apply(model)  # twice: a no-op
    assert len(hf.patched_layers(model)) == 2
    hf.unpatch(model)
    assert hf.patched_layers(model) == {} and model.kernel_config is None
    model_step(model, batch)
    assert len(launches) == 2


def test_from_pretrained_with_kernel_config(tmp_path, launches, offline):
    make().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, kernel_config=hf.kernel_config(), attn_implementation="eager").to(DEVICE)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", use_kernels=False).to(DEVICE)
    assert isinstance(model.kernel_config, transformers.KernelConfig)
    assert model.kernel_config.use_local_kernel
    batch = inputs()
    for mode in ("eval", "train", "eval"):  # transformers re-kernelizes at each switch
        getattr(model, mode)()
        getattr(reference, mode)()
        assert all(v == ["hub/rotary_pos_emb"] for v in hf.patched_layers(model).values())
        count = len(launches)
        with torch.no_grad():
            got, want = model(**batch).logits, reference(**batch).logits
        assert len(launches) == count + 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_config_refuses_an_undecorated_model(tmp_path):
    transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"registers no 'rotary_pos_emb' hub function"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                          kernel_config=hf.kernel_config())


def test_use_hub_kernels_0_takes_the_patch_table(monkeypatch, launches):
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    model = make()
    hf.apply(model)
    assert set(map(tuple, hf.patched_layers(model).values())) == {("rope/rotate_half",)}
    hf.unpatch(model)
    assert hf.patched_layers(model) == {} and not _rope_patch._ORIGINALS


def test_a_users_kernel_config_is_respected(tmp_path):
    model = make()
    mine = kernels.LocalLayerRepository(repo_path=tmp_path, layer_name="MyRotary")
    model.kernel_config = transformers.KernelConfig(
        kernel_mapping={"rotary_pos_emb": {"cpu": {kernels.Mode.INFERENCE: mine}}})
    with pytest.raises(ValueError, match=r"maps rotary_pos_emb to the user's own kernel"):
        hf.apply(model)
    assert hf.patched_layers(model) == {}
    with pytest.warns(UserWarning, match=r"left unpatched"):
        hf.apply(model, strict=False)
    assert hf.patched_layers(model) == {}


@pytest.mark.parametrize("layer", ["RotaryPosEmb", "RotaryPosEmbFP32"])
def test_our_own_kernel_config_is_not_the_users(layer, launches):
    """A model already mapped to one of our layers (as kernel_config() maps the layer its probe
    chose) takes the hub route again: ours, not the user's."""
    model = make()
    model.kernel_config = transformers.KernelConfig(kernel_mapping=hf.kernel_mapping(layer))
    hf.apply(model)
    routes = hf.patched_layers(model)
    assert routes and all(v == ["hub/rotary_pos_emb"] for v in routes.values()), routes
    hf.unpatch(model)


@pytest.mark.parametrize("model_type,overrides,layer", [
    ("gpt_oss", {"head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1,
                 "layer_types": ["full_attention", "full_attention"]}, "hub/rotary_pos_emb"),
    ("ministral", {"head_dim": 16}, "hub/rotary_pos_emb"),
    # its function is decorated, its attention class is not: the patch table, fp32 kind
    ("modernbert-decoder", {"global_rope_theta": 10000.0}, "rope/rotary_pos_emb_fp32"),
])
def test_types_outside_the_table(model_type, overrides, layer, launches):
    assert model_type not in hf.ARCHITECTURES
    model = make(model_type, **overrides)
    batch = inputs()
    logits, _, grads = model_step(model, batch)
    hf.apply(model)
    routes = hf.patched_layers(model)
    assert routes and all(v == [layer] for v in routes.values()), routes
    p_logits, _, p_grads = model_step(model, batch)
    assert len(launches) >= len(routes)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(p_logits[keep], logits[keep], rtol=1e-5, atol=1e-5)
    assert_grads_close(p_grads, grads)
