"""The one place that imports Hugging Face transformers (an optional extra of posenc-triton)."""

from __future__ import annotations

import importlib
import types

_EXTRA = "pip install 'posenc-triton[hf]'"


def require_transformers() -> types.ModuleType:
    """``transformers``, or an ImportError naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "posenc_triton.integrations.transformers needs Hugging Face transformers, an "
            f"optional extra of posenc-triton: {_EXTRA}") from e
    return transformers


def modeling(name: str) -> types.ModuleType:
    """A transformers modeling module by dotted name (``transformers.models.x.modeling_x``)."""
    require_transformers()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"cannot import modeling module {name!r}: {e}") from e
