"""Where a call runs: the Triton kernels (CUDA, or the interpreter on CPU) or the reference.

Triton is imported lazily so the package imports on machines without it (macOS, Windows):
there CPU tensors run the pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return _HAS_TRITON


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` runs the Triton kernels rather than the reference."""
    if not triton_available():
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting()


def host_read_allowed(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may read device values on the host (a sync): not while
    ``torch.compile`` traces, nor during CUDA-graph capture."""
    return not (torch.compiler.is_compiling()
                or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def library_op(name: str, mutates_args):
    """Register a launcher as the ``torch.library`` op ``name``.

    On GPU a ``triton_op``: ``torch.compile`` traces into its body and sees the kernel
    through :func:`launcher`. Under the interpreter that trace would run the body on fake
    tensors, where an interpreted launch does nothing, and the compiled graph would keep only
    the empty outputs; there the op is an opaque ``custom_op`` whose body runs at call time
    (and, on fake tensors, is its own fake implementation).
    """
    if not interpreting():
        return torch.library.triton_op(name, mutates_args=mutates_args)

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op

    return register


def launcher(kernel):
    """``kernel`` as a launchable for a ``torch.library.triton_op`` body.

    ``wrap_triton`` makes the launch visible to ``torch.compile``; it refuses interpreted
    kernels, which the interpreter path launches directly. While ``torch.compile`` traces
    on CPU (fake tensors, shapes only) an interpreted launch has nothing to compute.
    """
    if not interpreting():
        return torch.library.wrap_triton(kernel)
    return _Interpreted(kernel)


class _Interpreted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                self.kernel[grid](*args, **kwargs)

        return launch


_WARNED: set = set()


def warn_once(message: str) -> None:
    """A ``UserWarning`` the first time ``message`` comes up in this process: a slow path
    should be visible, not repeated at every layer of every step."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


@contextlib.contextmanager
def quiet():
    """Warnings of this block neither shown nor remembered (a probe's slow path is not the
    user's: their first call still warns)."""
    seen = set(_WARNED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            _WARNED.intersection_update(seen)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU, as flash-attn does: tensors on ``cuda:1`` work while the current
    device is ``cuda:0`` (Triton launches on the current device)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def call_op(op, eager, *args):
    """``op(*args)`` while ``torch.compile`` traces, so the graph sees the ``torch.library`` op;
    ``eager(*args)`` otherwise: the op's dispatch costs host time that decode shapes feel."""
    if torch.compiler.is_compiling():
        return op(*args)
    return eager(*args)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
