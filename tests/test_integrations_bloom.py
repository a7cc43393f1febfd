"""The BLOOM integration: BloomAttention's attention through posenc_triton.alibi_attention.

Tiny random-weight BloomForCausalLM models from configs (no hub download), unpatched against
patched. Padded query rows are not compared: there our kernel outputs 0 where transformers'
eager softmax averages every value. Labels are -100 wherever the predicting position (the one
before) is padding, so the loss never reads a padded position's logits.
"""

import io
import warnings

import pytest
import torch

from conftest import DEVICE, count_alibi_layer_calls, model_step, requires_cuda

transformers = pytest.importorskip("transformers")

from transformers.models.bloom import modeling_bloom  # noqa: E402

from posenc_triton import alibi_attention, alibi_slopes  # noqa: E402
from posenc_triton.integrations import _alibi_checks, _alibi_models  # noqa: E402
from posenc_triton.integrations import transformers as hf  # noqa: E402

SEQLEN = 12


@pytest.fixture
def count_calls(monkeypatch):
    """Count the calls of alibi_attention made by the BLOOM integration."""
    return count_alibi_layer_calls(monkeypatch)


def make_model(heads=4, dtype=torch.float32, device=DEVICE, seed=0, **kw):
    cfg = {"vocab_size": 128, "hidden_size": 64 if heads != 6 else 48, "n_layer": 2,
           "n_head": heads, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    cfg.update(kw)
    torch.manual_seed(seed)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(**cfg))
    return model.to(device=device, dtype=dtype)


def batch_inputs(batch=2, seqlen=SEQLEN, vocab=128, device=DEVICE, padding=None):
    """``(kwargs, keep)``: model inputs and the bool [B, S] of unpadded positions."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
    if padding == "right":
        mask[0, seqlen * 2 // 3:] = 0
        mask[-1, seqlen - 1:] = 0
    elif padding == "left":
        mask[0, :seqlen // 3] = 0
        mask[-1, :1] = 0
    kwargs = {"input_ids": ids}
    if padding is not None:
        kwargs["attention_mask"] = mask
    # The label at t is scored with the logits at t - 1: -100 where either is padding.
    scored = mask.clone()
    scored[:, 1:] *= mask[:, :-1]
    kwargs["labels"] = ids.masked_fill(scored == 0, -100)
    return kwargs, mask.bool()


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- the math: BLOOM's key-position alibi == the kernel's distance bias -----------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128])
def test_bloom_slopes_are_alibi_slopes(heads):
    ours = alibi_slopes(heads)
    theirs = modeling_bloom._get_alibi_slopes(heads, torch.device("cpu"))
    if heads <= 8:  # exact powers of two
        assert torch.equal(ours, theirs)
    # BLOOM's fp32 pow of a rounded base drifts from the correctly rounded slopes by a few
    # ulps (up to 11 for 128 heads): the integration uses BLOOM's own.
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)
    assert torch.equal(_alibi_checks.model_slopes("bloom", heads, torch.device("cpu")), theirs)


def bloom_attention_math(q, k, v, mask2d, heads):
    """transformers' BLOOM attention: alibi from the 2-D mask (key positions only) + the
    4-D causal/padding mask, query i at key position i + Sk - Sq (the cache's past)."""
    b, _, sq, d = q.shape
    sk = k.shape[2]
    alibi = modeling_bloom.build_alibi_tensor(mask2d, heads, torch.float64).view(b, heads, 1, sk)
    i = torch.arange(sq).view(-1, 1) + (sk - sq)
    j = torch.arange(sk).view(1, -1)
    visible = (j <= i)[None, None] & mask2d.bool()[:, None, None, :]
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(
        ~visible, torch.finfo(torch.float64).min)
    scores = alibi + (q @ k.transpose(-1, -2)) / d ** 0.5 + bias
    return torch.softmax(scores, dim=-1) @ v, visible.any(-1, keepdim=True)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("seqlen_q", [SEQLEN, 5, 1], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("heads", [4, 6])
def test_key_position_alibi_equals_distance_bias(heads, seqlen_q, padding):
    # slope * pos(j) with pos = (cumsum(mask) - 1) * mask differs from -slope * (i' - j) on
    # the visible keys of a row by a per-row constant (the contiguous padding shifts both):
    # softmax is the same. Checked in float64 against alibi_attention's float32 kernel.
    b, sk, d = 3, SEQLEN, 16
    _, keep = batch_inputs(batch=b, seqlen=sk, padding=padding, device="cpu")
    q = torch.randn(b, heads, seqlen_q, d, dtype=torch.float64)
    k = torch.randn(b, heads, sk, d, dtype=torch.float64)
    v = torch.randn(b, heads, sk, d, dtype=torch.float64)
    want, has_key = bloom_attention_math(q, k, v, keep.long(), heads)
    slopes = modeling_bloom._get_alibi_slopes(heads, torch.device("cpu"))
    got = alibi_attention(*(t.float().to(DEVICE) for t in (q, k, v)), slopes.to(DEVICE),
                          is_causal=True, key_padding_mask=keep.to(DEVICE)).cpu()
    assert has_key.any()
    torch.testing.assert_close(got.double() * has_key, want * has_key, rtol=1e-5, atol=1e-5)
    assert (got * ~has_key == 0).all()  # rows with no visible key: 0


# ---- whole models: unpatched vs patched ---------------------------------------------------


@pytest.mark.parametrize("heads, padding", [(4, None), (4, "left"), (6, "right"), (6, "left")])
def test_model_matches_unpatched_fp32(heads, padding, count_calls):
    model = make_model(heads)
    inputs, keep = batch_inputs(padding=padding)
    logits, loss, grads = model_step(model, inputs)
    assert not count_calls
    assert len(hf.patched_layers(hf.apply(model))) == 2
    p_logits, p_loss, p_grads = model_step(model, inputs)
    assert len(count_calls) == 2  # one launch per layer; backward runs through autograd
    torch.testing.assert_close(p_logits[keep], logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-5)
    assert p_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def test_model_kv_cache_chunks_match_full_forward(count_calls):
    # Prefill 7 tokens into a DynamicCache, then a chunk of 5: q shorter than k, bottom-right.
    model = make_model(6).eval()
    inputs, keep = batch_inputs(padding="left")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        hf.apply(model)
        first = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        second = model(input_ids=ids[:, 7:], attention_mask=mask,
                       past_key_values=first.past_key_values, use_cache=True)
    assert len(count_calls) == 4
    got = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_model_generate_with_kv_cache_matches(count_calls):
    model = make_model(4).eval()
    inputs, _ = batch_inputs(padding="left")
    del inputs["labels"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    want = model.generate(**inputs, **kwargs)
    assert hf.apply(model) is model
    got = model.generate(**inputs, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(count_calls) == 3 * 2  # prefill + 2 one-token decode steps, 2 layers


def test_model_bf16_error_within_2x_of_transformers(count_calls):
    # bf16 model against the same weights in fp32: the kernel (exact fp32 bias, fp32
    # accumulation) must be about as close to fp32 as transformers' bf16 attention is.
    inputs, keep = batch_inputs(padding="left")
    ref = make_model(4)(**inputs).logits.detach()
    model = make_model(4, dtype=torch.bfloat16)
    logits, _, grads = model_step(model, inputs)
    hf.apply(model)
    p_logits, _, p_grads = model_step(model, inputs)
    assert len(count_calls) == 2
    assert p_logits.dtype == torch.bfloat16
    assert max_err(p_logits[keep], ref[keep]) <= 2 * max_err(logits[keep], ref[keep]) + 1e-2
    for name in grads:
        g, pg = grads[name].float(), p_grads[name].float()
        assert (pg - g).norm() <= 5e-2 * g.norm() + 1e-6, name


# ---- patching: scope, idempotence, unpatch, fallbacks ------------------------------------


def test_patch_is_per_instance_idempotent_and_unpatches(count_calls):
    model, other = make_model(4), make_model(4)
    inputs, _ = batch_inputs(padding="right")
    assert len(hf.patched_layers(hf.apply(model))) == 2
    assert len(hf.patched_layers(hf.apply(model))) == 2  # idempotent: not wrapped twice
    attn = model.transformer.h[0].self_attention
    assert isinstance(attn, modeling_bloom.BloomAttention)
    assert type(attn).__mro__.count(modeling_bloom.BloomAttention) == 1
    assert len(hf.patched_layers(model)) == 2
    assert len(hf.patched_layers(other)) == 0
    assert model.state_dict().keys() == other.state_dict().keys()
    buf = io.BytesIO()  # a patched model pickles whole and comes back patched
    torch.save(model, buf)
    buf.seek(0)
    assert len(hf.patched_layers(torch.load(buf, weights_only=False))) == 2
    other(**inputs)
    assert not count_calls  # other instances of the class are untouched
    model(**inputs)
    assert len(count_calls) == 2
    assert hf.unpatch(model) is model and hf.patched_layers(model) == {}
    hf.unpatch(model)  # a second time: nothing to undo
    assert type(attn) is modeling_bloom.BloomAttention
    assert not hasattr(attn, _alibi_models.FLAG)
    model(**inputs)
    assert len(count_calls) == 2


def test_apply_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        hf.apply("bigscience/bloom-560m")


def test_fallback_output_attentions_not_dropout(count_calls, monkeypatch):
    model = make_model(4).eval()
    inputs, _ = batch_inputs(padding="left")
    want = model(**inputs, output_attentions=True)
    hf.apply(model)
    got = model(**inputs, output_attentions=True)  # probabilities requested: original forward
    assert not count_calls
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Attention dropout in training is the kernel's fused dropout_p (exactness against
    # transformers given the mask: test_integrations_models), with no fallback or warning.
    drop = make_model(4, attention_dropout=0.5)
    hf.apply(drop)
    monkeypatch.setattr("posenc_triton._backend._WARNED", set())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*posenc_triton")
        torch.manual_seed(0)
        train = drop.train()(**inputs)
        assert len(count_calls) == 2
        train.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in drop.parameters())
        drop.eval()(**inputs)  # no dropout in eval: the kernel with dropout_p=0
        assert len(count_calls) == 4
        drop.train()(**inputs, output_attentions=True)  # still transformers' own forward
        assert len(count_calls) == 4


def test_fallback_mask_with_holes_and_static_cache(count_calls):
    # A 2-D mask with a hole gives BLOOM compressed positions, not a per-row shift: the
    # check sends the layer to transformers' forward. A static cache's prefill (unfilled
    # slots after the keys) too; its one-token decode steps run the kernel.
    model = make_model(4).eval()
    inputs, _ = batch_inputs(padding="left")
    del inputs["labels"]
    holes = inputs["attention_mask"].clone()
    holes[1, 5] = 0
    with torch.no_grad():
        want = model(input_ids=inputs["input_ids"], attention_mask=holes).logits
        hf.apply(model)
        got = model(input_ids=inputs["input_ids"], attention_mask=holes).logits
    assert not count_calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0,
              "cache_implementation": "static"}
    hf.unpatch(model)
    want = model.generate(**inputs, **kwargs)
    hf.apply(model)
    got = model.generate(**inputs, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(count_calls) == 2 * 2  # the 2 decode steps, not the prefill


def test_check_masks_false_trusts_the_mask(count_calls):
    model = make_model(6)
    inputs, keep = batch_inputs(padding="left")
    logits = model(**inputs).logits.detach()
    hf.apply(model, check_masks=False)
    got = model(**inputs).logits.detach()
    assert len(count_calls) == 2
    torch.testing.assert_close(got[keep], logits[keep], rtol=1e-5, atol=1e-5)


# ---- GPU: a bigger model in bf16 ---------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("padding", [None, "left"])
def test_cuda_bigger_model_bf16(padding, count_calls):
    big = {"vocab_size": 1024, "hidden_size": 1024, "n_layer": 4, "n_head": 16}
    inputs, keep = batch_inputs(batch=4, seqlen=256, vocab=1024, device="cuda", padding=padding)
    with torch.no_grad():
        ref = make_model(device="cuda", **big)(**inputs).logits
    model = make_model(device="cuda", dtype=torch.bfloat16, **big)
    logits, loss, grads = model_step(model, inputs)
    hf.apply(model)
    p_logits, p_loss, p_grads = model_step(model, inputs)
    assert len(count_calls) == 4
    assert max_err(p_logits[keep], ref[keep]) <= 2 * max_err(logits[keep], ref[keep]) + 1e-2
    torch.testing.assert_close(p_loss, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        g, pg = grads[name].float(), p_grads[name].float()
        assert (pg - g).norm() <= 5e-2 * g.norm() + 1e-6, name


# ---- inference mode, caches (issue 8) ----------------------------------------------------


def test_inference_mode_then_training(count_calls):
    # Served under inference_mode (the mask check reads no version counter; inference tensors
    # have none), then fine-tuned in the same process: nothing cached while serving (slopes,
    # verdicts) may hand an inference tensor to the backward.
    _alibi_checks._SLOPES.clear()
    model = make_model(6)
    inputs, keep = batch_inputs(padding="left")
    with torch.no_grad():
        want = model(**inputs).logits
    _, loss, grads = model_step(model, inputs)
    hf.apply(model)
    with torch.inference_mode():
        got = model(**inputs).logits
    assert len(count_calls) == 2
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert not any(t.is_inference() for t in _alibi_checks._SLOPES.values())
    _, p_loss, p_grads = model_step(model, inputs)
    torch.testing.assert_close(p_loss, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(p_grads[name], grads[name], rtol=1e-5, atol=1e-5)


def test_check_masks_false_under_inference_mode_then_training(count_calls):
    # Without the mask check the slopes cache is the only state: filled under inference
    # mode, it must still serve a training step.
    _alibi_checks._SLOPES.clear()
    model = make_model(4)
    inputs, _ = batch_inputs(padding="right")
    hf.apply(model, check_masks=False)
    with torch.inference_mode():
        model(**inputs)
    _, loss, _ = model_step(model, inputs)
    assert torch.isfinite(loss) and len(count_calls) == 4


def test_verdicts_do_not_outlive_the_forward():
    # The per-forward verdict is keyed weakly by the alibi tensor of that forward, per thread:
    # no module-level slot keeps a mask (or anything of the user's) alive afterwards.
    import gc
    import threading

    model = make_model(4).eval()
    inputs, _ = batch_inputs(padding="right")
    hf.apply(model)
    with torch.no_grad():
        model(**inputs)
    gc.collect()
    assert len(_alibi_checks._verdicts()) == 0
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_alibi_checks._verdicts()))
    thread.start()
    thread.join()
    assert seen[0] is not _alibi_checks._verdicts()  # one table per thread


def test_apply_passes_skip_tol(monkeypatch):
    """``apply(model, skip_tol=...)`` reaches the kernel (tile skipping; default 2**-24), and a
    repeated call updates it; a bad value is a ValueError before anything is patched."""
    seen, real = [], _alibi_models.alibi_attention
    monkeypatch.setattr(_alibi_models, "alibi_attention",
                        lambda *a, **kw: seen.append(kw["skip_tol"]) or real(*a, **kw))
    model = make_model(4)
    inputs, _ = batch_inputs()
    with pytest.raises(ValueError, match="skip_tol"):
        hf.apply(model, skip_tol=-1.0)
    assert hf.patched_layers(model) == {}
    hf.apply(model)(**inputs)
    hf.apply(model, skip_tol=0.0)(**inputs)
    assert seen == [2.0 ** -24] * 2 + [0.0] * 2
    hf.unpatch(model)
    assert not hasattr(model.transformer.h[0].self_attention, _alibi_models.SKIP_TOL)
