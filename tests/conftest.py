"""Shared test setup: where kernels run, the one tolerance table, and input helpers.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter; the
variable must be set before any kernel module is imported (``triton.jit`` reads it then).
"""

import functools
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

# Element-wise tolerances (rtol, atol) by dtype, for kernels compared with a float64 reference,
# and the fp32 attention backward's atol (it sums more products than the forward): one table,
# shared with the GPU's correctness check (posenc-bench --device-check).
from posenc_triton.bench.device_correctness import FP32_BWD_ATOL, TOLERANCES  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def assert_close(actual, expected, dtype=None):
    """``actual`` against a float64 ``expected`` with the tolerance of ``dtype``."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so an element a kernel fails to write fails the comparison."""
    return t.fill_(float("nan"))


def set_interpreter_tile(monkeypatch, block_m: int, block_n: int) -> None:
    """Run the attention kernels with a ``block_m x block_n`` tile (the GPU's autotuner picks
    non-square ones); skips the test where the kernels are not interpreted."""
    from posenc_triton import _backend, alibi_configs

    if not _backend.interpreting():
        pytest.skip("sets the interpreter's tile")
    monkeypatch.setitem(alibi_configs.INTERPRETER_META, "BLOCK_M", block_m)
    monkeypatch.setitem(alibi_configs.INTERPRETER_META, "BLOCK_N", block_n)


def count_alibi_layer_calls(monkeypatch, calls=None):
    """A list (``calls``, or a new one) that grows by one at every kernel call of a patched
    ALiBi layer of transformers (not the calls of ``apply()``'s probe on its own tiny model)."""
    from posenc_triton.integrations import _alibi_models

    calls, real = ([] if calls is None else calls), _alibi_models.alibi_attention

    def counting(*args, **kwargs):
        if getattr(_alibi_models.PROBE, "calls", None) is None:
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_alibi_models, "alibi_attention", counting)
    return calls


def count_calls_of(monkeypatch, module, name):
    """A list that grows by one at every call of ``module.name`` (which still runs)."""
    calls, real = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def model_step(model, inputs):
    """``(logits, loss, {name: grad})`` of one forward and backward of a transformers model."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def assert_grads_close(got, want, floor=1e-9, where=""):
    """Two ``{name: grad}`` of the same parameters agree: rtol 1e-4, atol 1e-4 of each
    gradient's largest entry (plus ``floor``)."""
    assert got.keys() == want.keys(), (where, got.keys() ^ want.keys())
    for n in want:
        scale = want[n].abs().max().item()
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4 * scale + floor,
                                   msg=lambda m, n=n: f"{where} grad of {n}: {m}")


def fwd_bwd(fn, inputs, grad_out=None):
    """``fn(*inputs)`` and the gradients of ``<out, grad_out>`` w.r.t. ``inputs``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads, grad_out


def check_compiled(step, inputs, rtol=None, atol=None, **compile_kwargs):
    """``torch.compile(step, fullgraph=True)`` (no graph break) gives eager ``step``'s output
    and gradients w.r.t. ``inputs``, within ``rtol``/``atol`` (default: dtype's). Dynamo's
    caches are reset first: the suite compiles the same public functions many times, and
    past its recompile limit a ``fullgraph`` compile raises instead of tracing."""
    torch._dynamo.reset()
    out, grads, grad_out = fwd_bwd(torch.compile(step, fullgraph=True, **compile_kwargs), inputs)
    want, want_grads, _ = fwd_bwd(step, inputs, grad_out)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def check_error_rule(name, actual, ref64, ref_same, dtype, atol=None):
    """flash-attn's rule for fp16/bf16: ``max|actual - ref64| <= 2 * max|ref_same - ref64|
    + atol``, ``ref_same`` being the same-dtype PyTorch reference; fp32 uses the table."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert not torch.isnan(actual).any(), f"{name} has NaN"
    if dtype == torch.float32:
        rtol, default_atol = TOLERANCES[dtype]
        torch.testing.assert_close(actual.double(), ref64, rtol=rtol,
                                   atol=atol or default_atol, msg=lambda m: f"{name}: {m}")
        return
    err = (actual.double() - ref64).abs().max().item()
    base = (ref_same.double() - ref64).abs().max().item()
    assert err <= 2 * base + TOLERANCES[dtype][1], (
        f"{name}: max error {err:.3g} > 2 x same-dtype reference error {base:.3g} + atol")


def check_against_reference(reference, inputs, out, grads, grad_out):
    """``out`` and the ``dq, dk, dv`` of ``grads`` (of ``<out, grad_out>`` w.r.t. ``inputs``)
    against ``reference(*inputs, upcast=...)`` run in float64 and, for fp16/bf16, in the inputs'
    dtype (``upcast=False``), by :func:`check_error_rule`. Returns the float64 and same-dtype
    references' gradients, for the checks a caller adds."""
    dtype = inputs[0].dtype
    ref64, grads64, _ = fwd_bwd(reference, [t.double() for t in inputs], grad_out.double())
    ref_same, grads_same = ref64, grads64
    if dtype != torch.float32:
        ref_same, grads_same, _ = fwd_bwd(functools.partial(reference, upcast=False), inputs,
                                          grad_out)
    check_error_rule("out", out, ref64, ref_same, dtype)
    for name, g, g64, gs in zip(("dq", "dk", "dv"), grads, grads64, grads_same):
        check_error_rule(name, g, g64, gs, dtype, atol=FP32_BWD_ATOL)
    return grads64, grads_same


def padding_mask(kind, batch, seqlen_k, device=DEVICE):
    """bool ``[B, Sk]``: ``"right"`` / ``"left"`` padding, a different length per batch row
    (the full length, one that ends inside a tile, a short one), or a ``"random"`` scatter."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seqlen_k)
        return (torch.rand(batch, seqlen_k, generator=gen) > 0.4).to(device)
    lengths = torch.tensor([seqlen_k, seqlen_k // 2 + 3, 5, 1][:batch])
    pos = torch.arange(seqlen_k)
    if kind == "left":
        pos = pos.flip(0)
    return (pos[None, :] < lengths[:, None]).to(device)


def check_dslopes(got, ref64, ref_same, dtype):
    """The slope gradient (float32 whatever ``dtype``) against float64 autograd."""
    assert got.dtype == torch.float32 and got.shape == ref64.shape
    assert not torch.isnan(got).any(), "dslopes has NaN"
    size = ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    if dtype == torch.float32:
        assert err <= TOLERANCES[torch.float32][0] * (1 + size), f"dslopes: error {err:.3g}"
        return
    base = (ref_same.double() - ref64).abs().max().item()
    bound = 2 * base + TOLERANCES[dtype][1] * (1 + size)
    assert err <= bound, f"dslopes: max error {err:.3g} > {bound:.3g} (same-dtype {base:.3g})"
