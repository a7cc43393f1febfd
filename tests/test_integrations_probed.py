"""Model types outside ``ARCHITECTURES`` whose RoPE function is not transformers' hub function:
``apply()`` probes each function its layers call against our kinds and installs the one that
computes the same (the families of issue 21's list among them: DeepSeek-V2's complex
``freqs_cis`` on ``[B, H, S, D]``, OLMo-3, Qwen3-Next, ERNIE-4.5-MoE). Each is built tiny and
checked as in ``test_integrations_coverage``: logits with right padding, gradients, a kernel
launch in every rotating layer, greedy ``generate()`` with the KV cache, and the kind the probe
chose.
"""

import warnings

import pytest

from conftest import count_calls_of

transformers = pytest.importorskip("transformers")

from test_integrations_coverage import check, check_generate  # noqa: E402
from tiny_models import build  # noqa: E402

from posenc_triton.integrations import _rope_dropins, _rope_patch  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

# model type -> the kinds its probe must choose
PROBED = {
    "deepseek_v2": {"rope/complex_bhsd"},
    "glm4v": {"rope/pairs"},  # (its text attention; M-RoPE sections, partial rotary)
    "glm4v_moe": {"rope/rotate_half"},
    "olmo3": {"rope/rotate_half_fp32"},
    "qwen3_next": {"rope/rotate_half"},
    "ernie4_5_moe": {"rope/interleaved_fp32"},
    "glm4_moe": {"rope/rotate_half"},
    "flex_olmo": {"rope/rotate_half_fp32"},
    "minimax_m2": {"rope/rotate_half"},
}


@pytest.fixture(autouse=True)
def _restore():
    yield
    _rope_patch.restore_all()


@pytest.mark.parametrize("model_type", sorted(PROBED))
def test_probed_type(model_type, monkeypatch):
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    assert model_type not in hf.ARCHITECTURES
    calls = count_calls_of(monkeypatch, _rope_dropins, "apply_rope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(model_type, calls) == "verified"
        model, _ = build(model_type)
    hf.apply(model)
    kinds = {k for v in hf.patched_layers(model).values() for k in v}
    hf.unpatch(model)
    assert kinds == PROBED[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_generate(model_type, calls)


def test_a_function_no_kind_computes_is_refused(monkeypatch):
    """A RoPE function outside the table that none of our kinds computes: a ValueError that
    names it, nothing installed."""
    model, _ = build("olmo3")
    module = __import__("transformers.models.olmo3.modeling_olmo3", fromlist=["x"])
    monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1:
                        (q * cos.unsqueeze(unsqueeze_dim), k))
    with pytest.raises(ValueError, match=r"cannot patch .*model_type='olmo3'.*computes none of "
                                         r"the probed kinds.*modeling_olmo3\.apply_rotary_pos_emb"):
        hf.apply(model)
    assert hf.patched_layers(model) == {} and not _rope_patch._ORIGINALS
