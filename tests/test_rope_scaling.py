"""rope_frequencies against transformers' ROPE_INIT_FUNCTIONS; rope_cos_sin against float64."""

import copy
import math

import pytest
import torch

from posenc_triton.rope_scaling import SUPPORTED_ROPE_TYPES, rope_cos_sin, rope_frequencies

DIMS = [64, 128, 80]
BASES = [10000.0, 500000.0, 1e6]


def _hf(scaling, rotary_dim, base, max_pos, seq_len=None):
    """transformers' (inv_freq, attention_scaling) for a LlamaConfig carrying ``scaling``."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # `rope_scaling=` + `rope_theta=` is accepted by 4.x configs and converted by 5.x ones into
    # `rope_parameters`; deepcopy because transformers fills keys into the dict it is given.
    config = LlamaConfig(
        hidden_size=4 * rotary_dim, num_attention_heads=4, head_dim=rotary_dim,
        max_position_embeddings=max_pos, rope_theta=base,
        rope_scaling=copy.deepcopy(scaling) if scaling else None,
    )
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:  # 5.x: a model method
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


def _check(scaling, dim, base, max_pos, seq_len=None):
    want, want_scale = _hf(scaling, dim, base, max_pos, seq_len)
    got, got_scale = rope_frequencies(
        dim, base, copy.deepcopy(scaling), max_position_embeddings=max_pos, seq_len=seq_len
    )
    assert got.dtype == torch.float32 and got.shape == (dim // 2,)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)
    assert got_scale == pytest.approx(float(want_scale), rel=1e-12)
    return got, got_scale


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
def test_default_and_linear(dim, base):
    plain, scale = _check(None, dim, base, 4096)
    assert scale == 1.0
    _check({"rope_type": "default"}, dim, base, 4096)
    for factor in (2.0, 4, 0.5):
        _check({"rope_type": "linear", "factor": factor}, dim, base, 4096)
    # Legacy `type` key.
    got, _ = _check({"type": "linear", "factor": 8.0}, dim, base, 4096)
    torch.testing.assert_close(got, plain / 8.0)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
def test_dynamic(dim, base):
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    unscaled, _ = rope_frequencies(dim, base)
    for seq_len in (None, 100, 2048):  # at or below max_position_embeddings: unscaled
        got, _ = _check(scaling, dim, base, 2048, seq_len)
        torch.testing.assert_close(got, unscaled, rtol=1e-6, atol=0)
    for seq_len in (2049, 5000, 100_000):  # beyond: a larger base, lower frequencies
        got, _ = _check(scaling, dim, base, 2048, seq_len)
        assert (got[1:] < unscaled[1:]).all()
    _check({"type": "dynamic", "factor": 2}, dim, base, 4096, torch.tensor(9000))


YARN = [
    {"factor": 4.0, "original_max_position_embeddings": 4096},
    {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},  # gpt-oss style
    {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
     "original_max_position_embeddings": 4096},  # DeepSeek-V3 style
    {"factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
     "original_max_position_embeddings": 4096},
    {"factor": 8.0, "attention_factor": 1.5, "beta_fast": 16.0, "beta_slow": 2.0,
     "original_max_position_embeddings": 8192},
    {"factor": None, "original_max_position_embeddings": 4096},  # factor from the ratio
    {"factor": 4.0, "original_max_position_embeddings": 4},  # empty ramp: low == high
    {"factor": 4.0, "truncate": None, "original_max_position_embeddings": 2048},
]


@pytest.mark.parametrize("dim", [*DIMS, 16])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", range(len(YARN)))
def test_yarn(dim, base, case):
    _, scale = _check({"rope_type": "yarn", **YARN[case]}, dim, base, 32768)
    if case == 0:
        assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0)


LLAMA3 = [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2
    {"factor": 4, "low_freq_factor": 2, "high_freq_factor": 8,
     "original_max_position_embeddings": 2048},
]


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", range(len(LLAMA3)))
def test_llama3(dim, base, case):
    _check({"rope_type": "llama3", **LLAMA3[case]}, dim, base, 131072)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
def test_longrope(dim, base):
    g = torch.Generator().manual_seed(dim)
    short = (1 + torch.rand(dim // 2, generator=g, dtype=torch.float64)).tolist()
    long = (1 + 40 * torch.rand(dim // 2, generator=g, dtype=torch.float64)).tolist()
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": 4096}
    plain, _ = rope_frequencies(dim, base)
    for seq_len in (None, 10, 4096):  # short factors
        got, scale = _check(scaling, dim, base, 131072, seq_len)
        torch.testing.assert_close(got, plain / torch.tensor(short).float(), rtol=1e-5, atol=0)
        assert scale == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    for seq_len in (4097, 131072):  # long factors
        got, _ = _check(scaling, dim, base, 131072, seq_len)
        torch.testing.assert_close(got, plain / torch.tensor(long).float(), rtol=1e-5, atol=0)
    _check({**scaling, "factor": 16.0}, dim, base, 131072, 5000)
    _, scale = _check({**scaling, "attention_factor": 1.25}, dim, base, 131072)
    assert scale == 1.25


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("fraction, factor", [(0.25, None), (0.5, 8.0), (1.0, None),
                                              (0.0, 2.0), (0.3, None), (None, None)])
def test_proportional(dim, base, fraction, factor):
    # Gemma-4 / LFM-3: a full-width table, exponents over the head dim, the tail frequencies 0.
    scaling = {"rope_type": "proportional", "partial_rotary_factor": fraction, "factor": factor}
    scaling = {k: v for k, v in scaling.items() if v is not None}
    got, scale = _check(scaling, dim, base, 4096)
    angles = int((1.0 if fraction is None else fraction) * dim // 2)
    assert scale == 1.0 and (got[angles:] == 0).all() and (got[:angles] > 0).all()


def test_rope_parameters_dict_with_theta():
    """A 5.x `config.rope_parameters` dict (carrying rope_theta) is accepted when base matches."""
    params = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0,
              "partial_rotary_factor": 0.5}
    got, _ = rope_frequencies(64, 500000.0, params)
    torch.testing.assert_close(got, rope_frequencies(64, 500000.0)[0] / 2)
    with pytest.raises(ValueError, match="rope_theta"):
        rope_frequencies(64, 10000.0, params)


def test_device_and_supported():
    inv, _ = rope_frequencies(8, device="meta")
    assert inv.device.type == "meta" and inv.dtype == torch.float32
    assert set(SUPPORTED_ROPE_TYPES) == {"default", "linear", "dynamic", "yarn", "llama3",
                                         "longrope", "proportional"}


@pytest.mark.parametrize("dim", [64, 128])
def test_cos_sin_exact_at_large_positions(dim):
    inv_freq, _ = rope_frequencies(dim, 10000.0)
    positions = torch.tensor([0, 1, 999_999, 1_000_000, 1_234_567, 4_999_999, 9_999_999, 10**7])
    cos, sin = rope_cos_sin(positions, inv_freq)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (8, dim // 2)
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-7)
    # The test can tell: float32 angles are off by far more at these positions.
    naive = (positions.float()[:, None] * inv_freq[None, :]).cos().double()
    assert (naive - angles.cos()).abs().max() > 1e-2


def test_cos_sin_seq_len_and_scaling():
    inv_freq, scale = rope_frequencies(
        32, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    )
    assert scale > 1
    cos, sin = rope_cos_sin(100, inv_freq, scale)
    angles = torch.arange(100, dtype=torch.float64)[:, None] * inv_freq.double()
    torch.testing.assert_close(cos.double(), scale * angles.cos(), rtol=0, atol=2e-7)
    torch.testing.assert_close(sin.double(), scale * angles.sin(), rtol=0, atol=2e-7)
    c1, s1 = rope_cos_sin(torch.arange(100, dtype=torch.int32), inv_freq)
    torch.testing.assert_close(c1 * scale, cos)
    torch.testing.assert_close(s1 * scale, sin)
    assert rope_cos_sin(0, inv_freq)[0].shape == (0, 16)


LONG = [1.0] * 32
BAD_FREQ = [
    # (args, kwargs, error, match)
    ((63,), {}, ValueError, "rotary_dim"),
    ((0,), {}, ValueError, "rotary_dim"),
    ((-2,), {}, ValueError, "rotary_dim"),
    ((64.0,), {}, TypeError, "rotary_dim"),
    ((True,), {}, TypeError, "rotary_dim"),
    ((64, 0.0), {}, ValueError, "base"),
    ((64, -1.0), {}, ValueError, "base"),
    ((64, float("nan")), {}, ValueError, "base"),
    ((64, "1e4"), {}, TypeError, "base"),
    ((64, 1e4, [("rope_type", "linear")]), {}, TypeError, "scaling"),
    ((64, 1e4, {"rope_type": "ntk"}), {}, ValueError, "unknown rope_type.*llama3.*longrope"),
    ((64, 1e4, {"rope_type": "linear", "type": "dynamic", "factor": 2}), {}, ValueError,
     "rope_type"),
    ((64, 1e4, {"rope_type": "linear"}), {}, ValueError, "'factor'.*'linear'"),
    ((64, 1e4, {"rope_type": "linear", "factor": 0}), {}, ValueError, "factor"),
    ((64, 1e4, {"rope_type": "linear", "factor": "2"}), {}, TypeError, "factor"),
    ((64, 1e4, {"rope_type": "dynamic"}), {"max_position_embeddings": 64}, ValueError,
     "'factor'.*'dynamic'"),
    ((64, 1e4, {"rope_type": "dynamic", "factor": 0.5}), {"max_position_embeddings": 64},
     ValueError, "factor"),
    ((64, 1e4, {"rope_type": "dynamic", "factor": 2}), {}, ValueError, "max_position_embeddings"),
    ((2, 1e4, {"rope_type": "dynamic", "factor": 2}), {"max_position_embeddings": 64}, ValueError,
     "rotary_dim"),
    ((64, 1e4, {"rope_type": "yarn", "original_max_position_embeddings": 64}), {}, ValueError,
     "'factor'.*'yarn'"),
    ((64, 1e4, {"rope_type": "yarn", "factor": 4}), {}, ValueError,
     "'original_max_position_embeddings'.*'yarn'"),
    ((64, 1e4, {"rope_type": "yarn", "factor": 0.5}), {"max_position_embeddings": 64}, ValueError,
     "factor"),
    ((64, 1e4, {"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 2}),
     {"max_position_embeddings": 64}, ValueError, "beta_fast"),
    ((64, 1e4, {"rope_type": "yarn", "factor": 4, "attention_factor": 0.0}),
     {"max_position_embeddings": 64}, ValueError, "attention_factor"),
    ((64, 1e4, {"rope_type": "yarn", "factor": 4, "truncate": "no"}),
     {"max_position_embeddings": 64}, TypeError, "truncate"),
    ((64, 1e4, {"rope_type": "llama3", "factor": 8, "high_freq_factor": 4,
                "original_max_position_embeddings": 64}), {}, ValueError,
     "'low_freq_factor'.*'llama3'"),
    ((64, 1e4, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                "original_max_position_embeddings": 64}), {}, ValueError,
     "'high_freq_factor'.*'llama3'"),
    ((64, 1e4, {"rope_type": "llama3", "low_freq_factor": 1, "high_freq_factor": 4,
                "original_max_position_embeddings": 64}), {}, ValueError, "'factor'.*'llama3'"),
    ((64, 1e4, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                "high_freq_factor": 4}), {}, ValueError,
     "'original_max_position_embeddings'.*'llama3'"),
    ((64, 1e4, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                "original_max_position_embeddings": 64}), {}, ValueError, "high_freq_factor"),
    ((64, 1e4, {"rope_type": "llama3", "factor": 0.5, "low_freq_factor": 1,
                "high_freq_factor": 4, "original_max_position_embeddings": 64}), {}, ValueError,
     "factor"),
    ((64, 1e4, {"rope_type": "longrope", "long_factor": LONG,
                "original_max_position_embeddings": 64}), {"max_position_embeddings": 128},
     ValueError, "'short_factor'.*'longrope'"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG,
                "original_max_position_embeddings": 64}), {"max_position_embeddings": 128},
     ValueError, "'long_factor'.*'longrope'"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG, "long_factor": LONG,
                "factor": 2.0}), {}, ValueError, "'original_max_position_embeddings'.*'longrope'"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG, "long_factor": LONG,
                "original_max_position_embeddings": 64}), {}, ValueError, "'factor'.*'longrope'"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG[:-1], "long_factor": LONG,
                "factor": 2.0, "original_max_position_embeddings": 64}), {}, ValueError,
     "short_factor.*32"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG, "long_factor": [0.0] * 32,
                "factor": 2.0, "original_max_position_embeddings": 64}), {}, ValueError,
     "long_factor"),
    ((64, 1e4, {"rope_type": "longrope", "short_factor": LONG, "long_factor": ["a"] * 32,
                "factor": 2.0, "original_max_position_embeddings": 64}), {}, TypeError,
     "long_factor"),
    ((64, 1e4, {"rope_type": "proportional", "partial_rotary_factor": 1.5}), {}, ValueError,
     "partial_rotary_factor.*\\[0, 1\\]"),
    ((64, 1e4, {"rope_type": "proportional", "partial_rotary_factor": -0.1}), {}, ValueError,
     "partial_rotary_factor"),
    ((64, 1e4, {"rope_type": "proportional", "factor": 0}), {}, ValueError, "factor"),
    ((64,), {"max_position_embeddings": 0}, ValueError, "max_position_embeddings"),
    ((64,), {"max_position_embeddings": 4096.0}, TypeError, "max_position_embeddings"),
    ((64,), {"seq_len": -1}, ValueError, "seq_len"),
    ((64,), {"seq_len": 1.5}, TypeError, "seq_len"),
]


@pytest.mark.parametrize("args, kwargs, error, match", BAD_FREQ)
def test_rope_frequencies_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        rope_frequencies(*args, **kwargs)


def test_rope_cos_sin_errors():
    inv = rope_frequencies(16)[0]
    for bad, error in [(-1, ValueError), (2.5, TypeError), (True, TypeError),
                       (torch.arange(4.0), TypeError), (torch.zeros(2, 3, dtype=torch.long),
                                                        ValueError),
                       (torch.arange(4, device="meta"), ValueError)]:
        with pytest.raises(error, match="seq_len_or_positions"):
            rope_cos_sin(bad, inv)
    for bad, error in [([1.0, 0.5], TypeError), (torch.arange(8), TypeError),
                       (inv[None], ValueError)]:
        with pytest.raises(error, match="inv_freq"):
            rope_cos_sin(4, bad)
    for bad, error in [("1", TypeError), (float("nan"), ValueError), (0.0, ValueError)]:
        with pytest.raises(error, match="attention_scaling"):
            rope_cos_sin(4, inv, bad)
    inv_before = inv.clone()
    rope_cos_sin(torch.tensor([3, 1]), inv, 2.0)
    assert torch.equal(inv, inv_before)  # inputs are never modified
