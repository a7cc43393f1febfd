"""``python -m posenc_triton.bench``: the same as the ``posenc-bench`` command."""

from .run import cli

raise SystemExit(cli())
