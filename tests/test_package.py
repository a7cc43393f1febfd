"""The installed package: importable from anywhere, kernels shipped inside it, nothing shadowed."""

import os
import subprocess
import sys


def run_elsewhere(tmp_path, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_from_outside_the_repo(tmp_path):
    result = run_elsewhere(tmp_path, (
        "import posenc_triton, posenc_triton.kernels as k;"
        "print(posenc_triton.__version__, k.__name__)"))
    assert result.returncode == 0, result.stderr
    assert "posenc_triton.kernels" in result.stdout


def test_top_level_kernels_is_not_ours(tmp_path):
    # Hugging Face's `kernels` package must stay importable: we install no top-level `kernels`.
    import posenc_triton.kernels

    ours = os.path.dirname(posenc_triton.kernels.__file__)
    result = run_elsewhere(tmp_path, (
        "import importlib.util as u; s = u.find_spec('kernels');"
        "print('none' if s is None else s.origin)"))
    assert result.returncode == 0, result.stderr
    assert ours not in result.stdout
