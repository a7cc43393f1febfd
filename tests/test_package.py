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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_kernels_folder_never_shadows_hugging_face(tmp_path):
    # From the repository root (where `python -m pytest` puts it on sys.path) and from tests/,
    # `import kernels` is Hugging Face's package, and transformers' hub kernels import beside ours.
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.version("kernels")
        importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs transformers and Hugging Face's kernels")
    code = (
        "import sys, os; sys.path.insert(0, os.getcwd());"
        "import posenc_triton, kernels;"
        "from transformers.integrations.hub_kernels import kernelize;"
        "import posenc_triton.kernels.rope;"
        "print(kernels.__file__)")
    for cwd in (ROOT, os.path.join(ROOT, "tests")):
        result = run_elsewhere(cwd, code)
        assert result.returncode == 0, result.stderr
        assert not result.stdout.strip().startswith(os.path.join(ROOT, "kernels")), result.stdout


def test_repository_kernels_folder_is_not_a_package_of_its_own():
    # Without Hugging Face's package on the path, `import kernels` from the root gives an empty
    # namespace package (no file, no submodules: transformers reads it as "not installed"),
    # never posenc_triton's kernels.
    code = (
        "import sys, os\n"
        "sys.path[:] = [os.getcwd()] + [p for p in sys.path if 'packages' not in p]\n"
        "import importlib.util, kernels\n"
        "print(getattr(kernels, '__file__', None), list(kernels.__path__),"
        " importlib.util.find_spec('kernels.rope'))")
    result = run_elsewhere(ROOT, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "[]", "None"], result.stdout


def test_command_help_names_itself_and_every_sub_command(tmp_path):
    for argv in (["-m", "posenc_triton.bench", "--help"],
                 ["-c", "import sys; sys.argv[0] = 'x'; from posenc_triton.bench.run import cli;"
                        " sys.argv[1:] = ['--help']; cli()"]):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: posenc-bench "), result.stdout
        assert "__main__" not in result.stdout
        assert "posenc-bench extrapolation" in result.stdout


def test_environment_says_cuda_is_only_the_build_without_a_gpu():
    import torch

    from posenc_triton.bench import common

    env = common.environment(torch.float32)
    if not torch.cuda.is_available():
        assert env["gpu"].startswith("none") and env["cuda"].startswith("none")
