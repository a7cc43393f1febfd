"""Triton kernels (``@triton.jit`` only), shipped as ``posenc_triton.kernels``.

One file per kernel family.
"""

if __name__ != "posenc_triton.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m
    # pytest`` or a REPL there) and this folder came first. That name is Hugging Face's
    # package, which transformers imports; this folder is only ever posenc_triton.kernels.
    # Hand the name on to the next package of that name on the path (Python keeps what the
    # import left in sys.modules) or, with none, become an empty namespace package: what Python
    # makes of a folder without modules, which transformers reads as "not installed".
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
