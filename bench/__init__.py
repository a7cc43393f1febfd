"""posenc_triton's benchmarks, shipped as ``posenc_triton.bench`` (source in ``bench/``).

``posenc-bench`` (or ``python -m posenc_triton.bench``) runs them; each script also runs
alone, e.g. ``python -m posenc_triton.bench.bench_rope``. See ``run.py``.
"""
