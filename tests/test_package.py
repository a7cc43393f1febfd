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


# ------------------------------------------------------------------------------------------
# The tree: imports run one way, and no module reaches into another's private names
# ------------------------------------------------------------------------------------------

import ast  # noqa: E402
import pathlib  # noqa: E402

PACKAGES = {"posenc_triton": pathlib.Path(ROOT, "posenc_triton"),
            "posenc_triton.kernels": pathlib.Path(ROOT, "kernels")}


def _modules() -> dict:
    """``{dotted name: (path, ast tree)}`` of every module of ``posenc_triton/`` and
    ``kernels/`` (as ``posenc_triton.kernels``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            if parts[-1] == "__init__":
                name = name.rsplit(".", 1)[0]
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def _imports(name: str, path: pathlib.Path, tree: ast.AST, modules: dict):
    """``(target module, imported name or None, node)`` for every import in ``tree``, at
    module level or inside functions; a ``from package import module`` targets the module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    yield sub, None, node
                elif base in modules:
                    yield base, alias.name, node


def test_no_import_cycles():
    modules = _modules()
    graph = {name: sorted({target for target, _, _ in _imports(name, *modules[name], modules)
                           if target != name}) for name in modules}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in graph[name]:
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _private_uses(name, path, tree, modules):
    """``"module:line name"`` for each underscore name of another of our modules that
    ``name`` imports or reads as an attribute of an imported module."""
    aliases = {}  # local name -> our module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, imported, _ in _imports(name, path, ast.Module([node], []), modules):
                if imported is not None and imported.startswith("_") and target != name:
                    yield f"{name}:{node.lineno} from {target} import {imported}"
            for alias in node.names:
                full = (alias.name if isinstance(node, ast.Import) else
                        next((t for t, i, _ in _imports(name, path, ast.Module([node], []),
                                                          modules) if i is None
                              and t.endswith("." + alias.name)), None))
                if full in modules and (alias.asname or isinstance(node, ast.ImportFrom)):
                    aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__") and aliases[node.value.id] != name
                and f"{aliases[node.value.id]}.{node.attr}" not in modules):
            yield f"{name}:{node.lineno} {aliases[node.value.id]}.{node.attr}"


def test_no_module_reaches_into_another_modules_private_names():
    # Private modules (_checks, _backend) are fine to import; their private names are not.
    # Inside kernels/, the @triton.jit device helpers are shared between the kernel files.
    modules = _modules()
    found = [use for name in modules if not name.startswith("posenc_triton.kernels")
             for use in _private_uses(name, *modules[name], modules)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_modules_stay_readable():
    long = {name: n for name, (path, _) in _modules().items()
            if not name.startswith("posenc_triton.kernels")
            and (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"
