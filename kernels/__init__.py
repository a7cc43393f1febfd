"""Triton kernels (``@triton.jit`` only), shipped as ``posenc_triton.kernels``.

One file per kernel family.
"""

if __name__ != "posenc_triton.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m
    # pytest`` or a REPL there) and this folder came first. That name is Hugging Face's
    # package, which transformers imports; this folder is only ever posenc_triton.kernels.
    # Hand the name on to the next package of that name on the path (Python keeps what the
    # import left in sys.modules), or fail as if this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is "
            "posenc_triton.kernels, not a top-level package)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
