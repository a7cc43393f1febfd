"""Shared test setup: where kernels run, the one tolerance table, and input helpers.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter; the
variable must be set before any kernel module is imported (``triton.jit`` reads it then).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

# Element-wise tolerances (rtol, atol) by dtype, for kernels compared with a float64 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def assert_close(actual, expected, dtype=None):
    """``actual`` against a float64 ``expected`` with the tolerance of ``dtype``."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so an element a kernel fails to write fails the comparison."""
    return t.fill_(float("nan"))


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
