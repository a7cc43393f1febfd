"""``posenc-bench --device-check``: the one prepared call for a lent GPU, proven on CPU.

The full dry run goes through the command line (tiny shapes, Triton's interpreter); the
budget, the report written around every case, the compilation counter and the one-config
autotuning are tested in process, where they are cheap.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA
from posenc_triton.bench import device_check

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="the CPU dry run; a GPU runs the real check")


def _report(out):
    data = json.loads((out / "device_check.json").read_text())
    return data, (out / "device_check.md").read_text()


@cpu_only
def test_cpu_dry_run_end_to_end(tmp_path):
    """Every case runs and passes; the report holds the environment, the timing tables, the
    autotune section and the counts."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "posenc_triton.bench", "--device-check", "--cpu-dry-run",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data, md = _report(tmp_path)
    rows = data["cases"]
    assert [r["step"] for r in rows].index("correctness") > 0, "timing comes first"
    statuses = {r["case"]: r["status"] for r in rows}
    assert statuses.pop("rope bf16 q[130,4096,32,128] past 2^31 elements") == "skipped: dry run"
    assert set(statuses.values()) == {"ok"}, statuses
    correctness = [r for r in rows if r["step"] == "correctness" and r["status"] == "ok"]
    assert len(correctness) >= 15
    for row in correctness:
        assert row["checks"] and all(c["ok"] for c in row["checks"]), row
        assert len(row["checks"]) >= (1 if " fwd " in row["case"] else 3), row  # and grads
    assert {"rope", "alibi"} <= data["timing"].keys()
    ours = [r for r in data["timing"]["alibi"] if r["impl"] == "ours"]
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(r["check"] == "ok" and r["ms"] > 0 for r in ours)
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__
    assert env["commit"] and env["dry_run"] is True
    summary = data["summary"]
    assert summary["failed"] == 0 and summary["skipped"] == 1
    assert summary["triton_compilations"] == 0  # the interpreter compiles nothing
    assert summary["torch_compile_graphs"] > 0  # the torch.compile peer
    for title in ("## Cases", "Bandwidth (GB/s", "Throughput (TFLOP/s)", "### Autotune winners",
                  "Triton compilations of our kernels"):
        assert title in md, title


def test_report_written_around_every_case(tmp_path, monkeypatch):
    """The budget runs out after the first case: the rest is "skipped: budget", and the
    report was rewritten before and after the case that ran and after every skipped one."""
    clock = [0.0]
    real_run_case = device_check.run_case

    def run_case(case):
        row = real_run_case(case)
        clock[0] = 1000.0  # that case took the whole budget
        return row

    snapshots = []
    real_write = device_check.write

    def write(out_dir, state, start):
        real_write(out_dir, state, start)
        snapshots.append([r["status"] for r in _report(out_dir)[0]["cases"]])

    monkeypatch.setattr(device_check, "_now", lambda: clock[0])
    monkeypatch.setattr(device_check, "run_case", run_case)
    monkeypatch.setattr(device_check, "write", write)
    assert device_check.main(tmp_path, budget=100.0, dry=True) == 0
    data, md = _report(tmp_path)
    rows = data["cases"]
    assert rows[0]["case"] == "device-to-device copy" and rows[0]["status"] == "ok"
    assert all(r["status"] == "skipped: budget" for r in rows[1:]) and len(rows) > 10
    assert len(snapshots[0]) == 1 and snapshots[0][0].startswith("running")
    assert snapshots[1] == ["ok"]
    assert snapshots[2:] == [["ok"] + ["skipped: budget"] * n for n in range(1, len(rows))]
    assert "skipped: budget" in md


def test_tiny_budget_skips_what_does_not_fit(tmp_path, monkeypatch):
    """With 3.5 s, only the case estimated under it runs (reading the autotune winners); the
    report says why the others did not."""
    monkeypatch.setattr(device_check, "commit", lambda: "test")  # no git in the budget
    assert device_check.main(tmp_path, budget=3.5, dry=True) == 0
    rows = _report(tmp_path)[0]["cases"]
    ran = [r["case"] for r in rows if r["status"] == "ok"]
    assert ran == ["autotune winners"]
    assert all(r["status"] == "skipped: budget" and "left" in r["note"]
               for r in rows if r["case"] not in ran)


def test_an_error_is_a_row_not_the_end(tmp_path):
    def broken():
        raise RuntimeError("illegal memory access\nmore")

    row = device_check.run_case(device_check.Case("correctness", "broken", broken, 1))
    assert row["status"] == "error: RuntimeError: illegal memory access"
    assert "Traceback" in row["traceback"]
    assert device_check.failure(row["status"])
    assert not device_check.failure("skipped: budget") and not device_check.failure("ok")


def test_counts_compilations(monkeypatch):
    """``compiled_variants`` reads each kernel's per-device cache; ``run_case`` reports what a
    case added. (A stand-in cache: nothing compiles under the interpreter.)"""
    from triton.runtime.jit import JITFunction

    from posenc_triton.kernels import rope

    def _kernel(x):
        pass

    fake = JITFunction(_kernel)
    fake.device_caches = {0: ({"a": 1}, {}, None, None, None)}
    monkeypatch.setattr(rope, "_fake_kernel", fake, raising=False)
    assert device_check.compiled_variants()["_fake_kernel"] == 1

    def compiles():
        fake.device_caches[0][0].update(b=2, c=3)
        return {}

    row = device_check.run_case(device_check.Case("correctness", "compiles", compiles, 1))
    assert row["compiled"] == {"_fake_kernel": 2} and row["status"] == "ok"


@triton.jit
def _store_block(out_ptr, n, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, 1), tl.full([1], BLOCK, tl.int32))


def test_one_config_per_key(monkeypatch):
    """Inside ``one_config_per_key`` an autotuner runs the first config its own prune keeps,
    without benchmarking the others; outside, its prune is back."""
    def prune(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]

    tuner = triton.autotune([triton.Config({"BLOCK": b}) for b in (64, 32, 16)], key=["n"],
                            prune_configs_by={"early_config_prune": prune})(_store_block)
    monkeypatch.setattr(device_check, "autotuners", lambda: [tuner])
    out = torch.zeros(1, dtype=torch.int32, device="cuda" if HAS_CUDA else "cpu")
    with device_check.one_config_per_key():
        tuner[(1,)](out, 40)
    assert out.item() == 32
    assert [str(c) for c in tuner.cache.values()] == [str(tuner.configs[1])]
    assert tuner.early_config_prune is prune


def test_winners_read_any_autotuner(monkeypatch):
    tuner = triton.autotune([triton.Config({"BLOCK": 16})], key=["n"])(_store_block)
    monkeypatch.setattr(device_check, "autotuners", lambda: [tuner])
    assert device_check.winners() == {"_store_block": {"best_config": None, "by_key": {},
                                                       "last_timings_ms": {}}}
    tuner.cache[(7,)] = tuner.best_config = tuner.configs[0]
    tuner.configs_timings = {tuner.configs[0]: [0.25, 0.2, 0.3]}
    found = device_check.winners()["_store_block"]
    assert "BLOCK: 16" in found["best_config"] and list(found["by_key"]) == ["(7,)"]
    assert list(found["last_timings_ms"].values()) == [0.25]
    lines = device_check.winner_lines({"k": found})
    assert any("BLOCK: 16" in line for line in lines) and any("0.2500 ms" in x for x in lines)


@cpu_only
def test_needs_a_gpu_without_dry_run(tmp_path, capsys):
    args = type("Args", (), {"cpu_dry_run": False, "out": tmp_path, "budget": 1.0})()
    assert device_check.cli(args) == 1
    assert "needs a GPU" in capsys.readouterr().out
    assert not (tmp_path / "device_check.json").exists()


def test_checks_catch_a_wrong_kernel(monkeypatch):
    """The correctness cases fail when the public functions are off by a little or leave NaN."""
    import posenc_triton
    from posenc_triton.bench import device_correctness

    checks = {name: run for name, run, _ in device_correctness.correctness_cases(dry=True)}
    rope = checks["rope bf16 rotate-half bshd GQA q[4,4096,32,128] k8"]
    alibi = checks["alibi bf16 causal GQA B1 Hq16 Hk4 S4096 D128"]
    assert all(c["ok"] for c in rope()["checks"] + alibi()["checks"])

    real_rope, real_alibi = posenc_triton.apply_rope, posenc_triton.alibi_attention
    monkeypatch.setattr(posenc_triton, "apply_rope",
                        lambda *a, **kw: [t * 1.03 for t in real_rope(*a, **kw)])
    assert [c["ok"] for c in rope()["checks"]] == [False] * 4

    def first_row_unwritten(*args, **kwargs):
        out = real_alibi(*args, **kwargs)
        return torch.cat([out[..., :1, :] * float("nan"), out[..., 1:, :]], dim=-2)

    monkeypatch.setattr(posenc_triton, "alibi_attention", first_row_unwritten)
    assert not any(c["ok"] for c in alibi()["checks"])
