"""``apply()`` on a transformers that changed under it: a clear ValueError at apply time (model
type, transformers version, what differed), the model exactly as it was, or with
``strict=False`` that kind skipped with one warning; never a crash mid-forward."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integrations_models import batch_inputs, make_model  # noqa: E402

from posenc_triton.integrations import _alibi_patch, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

VERSION = transformers.__version__.replace(".", r"\.")


@pytest.fixture(autouse=True)
def fresh_probes():
    # A monkeypatched transformers must be probed anew, and its verdict not kept after.
    _alibi_patch._PROBED.clear()
    _rope_patch._PROBED.clear()
    yield
    _alibi_patch._PROBED.clear()
    _rope_patch._PROBED.clear()
    _rope_patch.restore_all()


def snapshot(model):
    inputs, _ = batch_inputs("right")
    with torch.no_grad():
        logits = model(**inputs).logits
    return ([type(m) for m in model.modules()], [sorted(vars(m)) for m in model.modules()],
            logits)


def assert_untouched(model, before):
    types, attrs, logits = snapshot(model)
    assert hf.patched_layers(model) == {}
    assert types == before[0] and attrs == before[1]
    torch.testing.assert_close(logits, before[2], rtol=0, atol=0)  # bit for bit


def falcon_forward_with_new_argument(monkeypatch):
    from transformers.models.falcon import modeling_falcon

    cls = modeling_falcon.FalconAttention
    theirs = cls.forward

    def forward(self, *args, position_bias=None, **kwargs):
        return theirs(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)


def test_alibi_changed_signature_refused_at_apply(monkeypatch):
    falcon_forward_with_new_argument(monkeypatch)
    model = make_model("falcon-alibi")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"cannot patch alibi/falcon into falcon model "
                                         rf"FalconForCausalLM \(transformers {VERSION}\): "
                                         r"FalconAttention\.forward\(.*position_bias.*\) has "
                                         r"none of the signatures"):
        hf.apply(model)
    assert_untouched(model, before)
    hf.unpatch(model)
    assert_untouched(model, before)


def test_alibi_changed_convention_refused_at_apply(monkeypatch):
    # A BLOOM whose bias no longer holds its documented slopes (here: the heads' slopes in
    # reverse): the drop-in's check refuses the bias in the probe, so apply() refuses too.
    from transformers.models.bloom import modeling_bloom

    theirs = modeling_bloom.build_alibi_tensor

    def reversed_heads(attention_mask, num_heads, dtype):
        alibi = theirs(attention_mask, num_heads, dtype)
        batch = attention_mask.shape[0]
        return alibi.view(batch, num_heads, 1, -1).flip(1).reshape(batch * num_heads, 1, -1)

    monkeypatch.setattr(modeling_bloom, "build_alibi_tensor", reversed_heads)
    model = make_model("bloom")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"cannot patch alibi/bloom into bloom model "
                                         rf"BloomForCausalLM \(transformers {VERSION}\): .*ran "
                                         r"the kernel in 0 of 2 layer calls"):
        hf.apply(model)
    assert_untouched(model, before)


def test_alibi_changed_output_refused_at_apply(monkeypatch):
    # A Falcon whose eager attention weighs the mask otherwise than the drop-in assumes: the
    # kernel runs, the probe compares the hidden states and refuses.
    from transformers.models.falcon import modeling_falcon

    if not hasattr(modeling_falcon, "eager_attention_forward"):
        pytest.skip("transformers >= 5.25's Falcon (attention through an interface)")
    theirs = modeling_falcon.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, **kwargs):
        return theirs(module, query, key, value, 2 * attention_mask, scaling, **kwargs)

    monkeypatch.setattr(modeling_falcon, "eager_attention_forward", eager)
    model = make_model("falcon-alibi")
    with pytest.raises(ValueError, match=rf"\(transformers {VERSION}\): the drop-in for .* "
                                         r"computes something else \(prefill relative error"):
        hf.apply(model)
    assert hf.patched_layers(model) == {}


def test_rope_changed_signature_refused_at_apply(monkeypatch):
    from transformers.models.llama import modeling_llama

    theirs = modeling_llama.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, scale, unsqueeze_dim=1):
        return theirs(q, k, cos, sin, unsqueeze_dim)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    model = make_model("llama")  # (its attention would need to pass the new argument)
    with pytest.raises(ValueError, match=rf"cannot patch rope/rotate_half into llama model "
                                         rf"LlamaForCausalLM \(transformers {VERSION}\): .*"
                                         r"it raised TypeError"):
        hf.apply(model)
    assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert hf.patched_layers(model) == {} and not _rope_patch._ORIGINALS


def test_strict_false_skips_the_kind_with_one_warning(monkeypatch):
    falcon_forward_with_new_argument(monkeypatch)
    model = make_model("falcon-alibi")
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"cannot patch alibi/falcon .*left unpatched") as seen:
        assert hf.apply(model, strict=False) is model
    assert len(seen) == 1
    assert_untouched(model, before)
    with pytest.raises(TypeError, match="strict must be a bool"):
        hf.apply(model, strict="no")


def test_strict_false_patches_what_still_fits():
    model = make_model("mpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.apply(model, strict=False)
    assert len(hf.patched_layers(model)) == 2


def test_probe_leaves_the_random_state_alone():
    model = make_model("falcon-alibi")
    _alibi_patch._PROBED.clear()
    state = torch.random.get_rng_state()
    hf.apply(model)
    assert torch.equal(torch.random.get_rng_state(), state)
