"""Each RoPE drop-in against the transformers function it replaces, forward and backward.

transformers' own functions are the reference (Liger-Kernel's rule): fp32 to 1e-5, bf16 with
transformers' dtype rule exactly (its promotion, or q's dtype where it computes in fp32 and
casts back) and values within bf16 rounding (it rounds each product, we round once).
"""

import importlib

import pytest
import torch

from conftest import DEVICE, count_calls_of

pytest.importorskip("transformers")

from posenc_triton.integrations import _rope_dropins, _rope_patch
from posenc_triton.integrations._rope_patch import KINDS, probe

# kind -> (transformers model whose function it replaces, partial width accepted there)
CASES = {
    "rotate_half": ("gpt_neox", True),
    "rotate_half_fp32": ("olmo2", False),
    "interleaved": ("glm4", True),
    "interleaved_fp32": ("ernie4_5", False),
    "cohere": ("cohere", False),
    "pairs": ("glm4v", True),
    "single": ("gemma3n", False),
    "gptj": ("gptj", False),
    "deinterleave": ("deepseek_v3", False),
    "complex": ("llama4", False),
    "complex_bhsd": ("deepseek_v2", False),
}
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def original(kind):
    model = CASES[kind.name][0]
    mod = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    return _rope_patch.original(mod, kind.function)  # transformers' own, even if patched


def tables(kind, batch, seqlen, rot, dtype):
    """cos/sin (or freqs_cis) laid out as the model's rotary embedding returns them."""
    freqs = torch.rand(batch, seqlen, rot // 2, device=DEVICE, dtype=torch.float64) * 20
    if kind.call in ("complex", "complex_bhsd"):
        return (torch.polar(torch.ones_like(freqs), freqs).to(torch.complex64),)
    if kind.call == "gptj":
        return freqs.sin().to(dtype), freqs.cos().to(dtype)
    emb = (torch.cat((freqs, freqs), -1) if kind.table == "halves"
           else freqs.repeat_interleave(2, -1))
    return emb.cos().to(dtype), emb.sin().to(dtype)


def call_args(kind, b, s, hq, hk, d, rot, dtype, cos_batch, ud):
    """``(args, kwargs, inputs requiring grad)`` for one call of the kind's signature."""
    def x(h, width=d):
        t = torch.randn(b, s, h, width, device=DEVICE, dtype=dtype)
        return (t.transpose(1, 2) if ud == 1 else t).requires_grad_()
    tab = tables(kind, cos_batch, s, rot, torch.float32 if dtype == torch.float32 else dtype)
    if kind.call in ("complex", "complex_bhsd"):
        q, k = x(hq), x(hk)
        return (q, k, *tab), {}, (q, k)
    if kind.call == "gptj":
        q = x(hq, rot)
        return (q, *tab), {}, (q,)
    if kind.call == "single":
        q = x(hq)
        return (q, *tab), {"unsqueeze_dim": ud}, (q,)
    width = rot if kind.call == "deinterleave" else d
    q, k = x(hq, width), x(hk, width)
    return (q, k, *tab), {"unsqueeze_dim": ud}, (q, k)


def as_tuple(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cos_batch", ["1", "B"])
@pytest.mark.parametrize("width", ["full", "partial"])
@pytest.mark.parametrize("name", list(CASES))
def test_dropin_matches_transformers(name, width, cos_batch, dtype, monkeypatch):
    kind = KINDS[name]
    partial_ok = CASES[name][1]
    if width == "partial" and not partial_ok:
        pytest.skip("transformers' function takes the full width only")
    calls = count_calls_of(monkeypatch, _rope_dropins, "apply_rope")
    b, s, hq, hk, d = 3, 7, 3, 1, 40  # odd length, GQA, a head dim that is no power of two
    rot = d if width == "full" else 24
    ud = 2 if kind.call in ("gptj", "complex") else 1
    args, kwargs, leaves = call_args(kind, b, s, hq, hk, d, rot, dtype,
                                     1 if cos_batch == "1" else b, ud)
    got = as_tuple(kind.dropin(*args, **kwargs))
    want = as_tuple(original(kind)(*args, **kwargs))
    assert len(calls) == 1  # one launch for q and k
    rtol, atol = TOL[dtype]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    grads = [torch.randn_like(w) for w in want]
    got_g = torch.autograd.grad(got, leaves, grads)
    want_g = torch.autograd.grad(want, leaves, grads)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["rotate_half", "rotate_half_fp32", "cohere", "gptj"])
def test_dropin_dtype_rule_with_fp32_tables(name):
    # bf16 q with fp32 cos/sin: promotion to fp32 (Llama, GPT-J) or q's dtype (OLMo, Cohere).
    kind = KINDS[name]
    ud = 2 if kind.call == "gptj" else 1
    args, kwargs, _ = call_args(kind, 2, 5, 2, 2, 16, 16, torch.bfloat16, 1, ud)
    args = tuple(a.float() if i >= len(args) - 2 else a for i, a in enumerate(args))
    got = as_tuple(kind.dropin(*args, **kwargs))
    want = as_tuple(original(kind)(*args, **kwargs))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_probe_accepts_the_original_and_refuses_the_others(name):
    kind = KINDS[name]
    assert probe(kind, original(kind)) is None
    for other in CASES:
        other_kind = KINDS[other]
        if other_kind.call == kind.call and other != name:
            # Another layout or pairing, or only another dtype rule (fp32-and-cast against
            # promotion): the probe sees each.
            assert probe(kind, original(other_kind)) is not None, (name, other)


def test_dropin_errors():
    q = torch.randn(2, 2, 5, 8, device=DEVICE)
    cos = torch.randn(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"exactly the rope width R = cos\.shape\[-1\] = 4"):
        _rope_dropins.fused_apply_rotary_pos_emb_interleave(q, q, cos[..., :4], cos[..., :4])
    with pytest.raises(ValueError, match=r"R = 2 \* cos\.shape\[-1\] = 6"):
        _rope_dropins.fused_apply_rotary_pos_emb_gptj(q.transpose(1, 2), cos[..., :3],
                                                      cos[..., :3])
    with pytest.raises(TypeError, match="freqs_cis must be a complex tensor"):
        _rope_dropins.fused_apply_rotary_emb_complex(q, q, cos)
    with pytest.raises(ValueError, match="rotary width R=7"):
        _rope_dropins.fused_apply_rotary_pos_emb_cohere(q, q, cos[..., :7], cos[..., :7])
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        _rope_dropins.fused_apply_rotary_pos_emb_single("x", cos, cos)


@pytest.mark.parametrize("unsqueeze_dim", [0, 1, -3, -2])
def test_unbatched_tables_match_pixtral(unsqueeze_dim):
    """Pixtral rotates by ``cos/sin [S, D]``: ``unsqueeze(0)`` broadcasts them over q/k
    ``[B, H, S, D]``, ``unsqueeze(1)`` over ``[B, S, H, D]``; the drop-in reads them the same."""
    from transformers.models.pixtral import modeling_pixtral

    pixtral = _rope_patch.original(modeling_pixtral, "apply_rotary_pos_emb")
    gen = torch.Generator().manual_seed(3)
    bhsd = unsqueeze_dim in (0, -3)
    shape = (2, 3, 7, 16) if bhsd else (2, 7, 3, 16)
    q, k = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
    angles = torch.randn(7, 8, generator=gen).to(DEVICE)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    want = pixtral(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    got = _rope_dropins.fused_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"unbatched cos/sin \[S, R\] need unsqueeze_dim 0"):
        _rope_dropins.fused_rotary_pos_emb(q, k, cos, sin, 2)


def test_token_rows_cache_filled_under_inference_mode_serves_training():
    # q/k that cannot merge [B, S] (a slice of a longer sequence) take the cached token-row
    # positions; filled while serving, the cache must hold no inference tensor.
    _rope_dropins._ROWS_CACHE.clear()
    cos, sin = tables(KINDS["rotate_half"], 3, 6, 8, torch.float32)
    q = torch.randn(3, 9, 2, 8, device=DEVICE)[:, 2:8].transpose(1, 2)
    with torch.inference_mode():
        _rope_dropins.fused_apply_rotary_pos_emb(q, q, cos, sin)
    assert _rope_dropins._ROWS_CACHE
    assert not any(t.is_inference() for t in _rope_dropins._ROWS_CACHE.values())
    base = torch.randn(3, 9, 2, 8, device=DEVICE, requires_grad=True)
    q_out, _ = _rope_dropins.fused_apply_rotary_pos_emb(base[:, 2:8].transpose(1, 2), None,
                                                        cos, sin)  # the cached rows again
    q_out.square().sum().backward()
    assert torch.isfinite(base.grad).all() and base.grad[:, 2:8].abs().sum() > 0
