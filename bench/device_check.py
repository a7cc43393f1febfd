"""One prepared call that learns what a lent GPU can tell: ``posenc-bench --device-check``.

    posenc-bench --device-check [--budget SECONDS] [--out DIR]

A GPU is lent for minutes, so this runs, in this order, each case only if the time left of
``--budget`` (default 480 s, counted from the start) holds the case's estimate; a case that
does not fit is recorded as "skipped: budget":

1. timing, the headline shapes as ``posenc-bench`` times them (``bench_rope``, ``bench_alibi``,
   bf16): the device-to-device copy; RoPE (``bench_rope``'s first shape) fwd and fwd+bwd
   against eager, ``torch.compile`` and Liger / flash-attn when installed; ALiBi attention
   (``bench_alibi``'s first shape) fwd and fwd+bwd against FlexAttention, SDPA with a bias,
   the eager reference and bias-free SDPA; then the autotune winners.
2. correctness at real sizes, forward and backward through the public API against the
   float64 reference, with the project's rules (``tests/conftest.py``): flash-attn's 2x rule
   for fp16/bf16 attention, the tolerance table otherwise. RoPE: rotate-half and interleaved,
   partial rotary, ``position_ids``, ``seqlen_offsets``, fused-QKV views, decode S=1, and a q
   past 2^31 elements; ALiBi: fp16/bf16/fp32, causal and symmetric, GQA, key mask, packed
   ``cu_seqlens``, D 64/80/128/256, S up to 8192, Sq=1, ``[B, Hq]`` slopes.

After every case ``device_check.md`` and ``device_check.json`` in ``--out`` are rewritten
(device, versions, commit, every row so far): a run cut short keeps what it measured. Only
the timed shapes are autotuned; correctness cases take, per new autotune key, the first
config the kernel's own prune keeps. Compilations of our Triton kernels and
``torch.compile`` graphs are counted per case. Exit status 1 if one of ours failed or raised.

``--cpu-dry-run`` runs the same code on CPU (Triton's interpreter, tiny shapes, perf_counter
timer; the 2^31 case skipped) to prove it end to end; its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import pkgutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from . import bench_alibi, bench_rope, common, device_correctness

NAME = "device_check"
BUDGET_S = 480.0
BF16 = torch.bfloat16


def _now() -> float:  # the budget's clock (a test replaces it)
    return time.monotonic()


@dataclasses.dataclass
class Case:
    step: str  # "timing" or "correctness"
    name: str
    run: Callable[[], dict]  # figures of the row; "checks": [{"ok": bool, ...}] if any
    estimate_s: float  # guessed seconds on an H100/H200, compilations included


# ------------------------------------------------------------------------------------------
# Counting what gets compiled
# ------------------------------------------------------------------------------------------


def compiled_variants() -> dict:
    """``{kernel: binaries built so far}`` for the ``@triton.jit`` kernels of every module of
    ``posenc_triton.kernels`` (autotuning included; none under the interpreter), from each
    kernel's per-device cache."""
    from triton.runtime.jit import JITFunction

    from posenc_triton import kernels

    counts, seen = {}, set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction) and id(fn) not in seen:  # once if re-imported
                seen.add(id(fn))
                caches = getattr(fn, "device_caches", None) or {}
                counts[name] = sum(len(c[0]) for c in caches.values())
    return counts


def dynamo_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process (the peers')."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def autotuners() -> list:
    """The ALiBi kernels' Triton autotuners, whatever their configs (``alibi_configs`` builds them
    lazily; pointer loads, then the TMA set); an empty list, said, if that private API moved."""
    from triton.runtime.autotuner import Autotuner

    from posenc_triton import alibi_configs

    try:
        kernels = (*alibi_configs.dense_kernels(False), *alibi_configs.dense_kernels(False, True))
    except Exception as exc:  # a missing winner list must not end the run
        print(f"device check: no autotuners from alibi_configs.dense_kernels: {exc!r}")
        return []
    return [k for k in kernels if isinstance(k, Autotuner)]


def winners() -> dict:
    """``{kernel: {"best_config": last pick, "by_key": {autotune key: config},
    "last_timings_ms": {config: median ms}}}``, the timings of the last key tuned."""
    out = {}
    for tuner in autotuners():
        name = getattr(tuner, "base_fn", tuner.fn).__name__
        if any(getattr(c, "pre_hook", None) for c in tuner.configs):
            name += " (TMA)"
        best = getattr(tuner, "best_config", None)
        timings = getattr(tuner, "configs_timings", None) or {}
        out[name] = {"best_config": None if best is None else str(best),
                     "by_key": {str(key): str(cfg) for key, cfg in tuner.cache.items()},
                     "last_timings_ms": {str(cfg): t[0] if isinstance(t, (list, tuple)) else t
                                         for cfg, t in timings.items()}}
    return out


def winner_lines(found: dict) -> list:
    """Markdown bullets of :func:`winners`."""
    lines = []
    for kernel, tuned in found.items():
        lines.append(f"- `{kernel}`: last pick {tuned['best_config'] or 'none (never tuned)'}")
        lines += [f"  - key {key}: {cfg}" for key, cfg in tuned["by_key"].items()]
        lines += [f"  - {ms:.4f} ms: {cfg}" for cfg, ms in tuned["last_timings_ms"].items()]
    return lines or ["none"]


@contextlib.contextmanager
def one_config_per_key():
    """Autotuners take the first config their own prune keeps for a key not tuned yet, so
    correctness cases compile one variant each instead of benchmarking the whole list."""
    saved = [(t, t.early_config_prune) for t in autotuners() if hasattr(t, "early_config_prune")]
    for tuner, prune in saved:
        tuner.early_config_prune = lambda configs, nargs, _prune=prune, **kw: (
            _prune(configs, nargs, **kw) if _prune else configs)[:1]
    try:
        yield
    finally:
        for tuner, prune in saved:
            tuner.early_config_prune = prune


# ------------------------------------------------------------------------------------------
# Timing: the headline shapes, through the benchmarks' own cases and peers
# ------------------------------------------------------------------------------------------


def timing_cases(state: dict, dry: bool) -> list:
    """The copy, the RoPE and ALiBi headline shapes (fwd, fwd+bwd), the autotune winners;
    the benchmarks' reports go into ``state["reports"]``."""
    import posenc_triton
    from posenc_triton import reference

    modes = ("fwd", "fwd+bwd")
    rope = common.Report("rope", bench_rope.IMPLS, "gbps", "GB/s", BF16)
    alibi = common.Report("alibi", bench_alibi.IMPLS, "tflops", "TFLOP/s", BF16)
    state["reports"] = {"rope": rope, "alibi": alibi}
    # Tiny on CPU: the benchmarks' dry-run shapes cost too much interpreter time here.
    rope_case = (bench_rope.Case("q[1,16,2,16] k1", 1, 16, 2, 1, 16, table=16) if dry
                 else bench_rope.cases(quick=True, dry=False)[0])
    alibi_case = (bench_alibi.Case("B1 H2 S32 D16 causal", 1, 2, 2, 32, 32, 16) if dry
                  else bench_alibi.cases(quick=True, dry=False)[0])

    def copy():
        state["copy_gbps"] = common.copy_gbps(1 << 30 if common.HAS_CUDA else 1 << 20)
        return {"gbps": state["copy_gbps"]}

    def failed(report) -> dict:
        return {"failed": [f"{r['mode']} {r['impl']}" for r in report.failures()
                           if r["impl"] == report.ours]}

    def rope_run():
        bench_rope.run_case(rope, rope_case, bench_rope.peers(), posenc_triton, reference, modes)
        bench_rope.tables(rope, state.get("copy_gbps") or float("nan"))
        return failed(rope)

    def alibi_run():
        bench_alibi.run_case(alibi, alibi_case, posenc_triton, reference, modes)
        bench_alibi.tables(alibi)
        return failed(alibi)

    def autotune():
        state["winners"] = winners()
        print("\n".join(["autotune winners:", *winner_lines(state["winners"])]), flush=True)
        return {"kernels": len(state["winners"])}

    return [Case("timing", "device-to-device copy", copy, 5),
            Case("timing", f"rope {rope_case.name}", rope_run, 60),
            Case("timing", f"alibi {alibi_case.name}", alibi_run, 150),
            Case("timing", "autotune winners", autotune, 1)]


# ------------------------------------------------------------------------------------------
# The run: budget, rows, report
# ------------------------------------------------------------------------------------------


def commit() -> str:
    """``git rev-parse HEAD`` of this source (``+modified`` if the tree differs), or
    "unknown" (an installed wheel, no git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=20)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
        return head.stdout.strip() + ("+modified" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(budget: float, dry: bool) -> dict:
    env = {**common.environment(BF16), "commit": commit(), "budget_s": budget, "dry_run": dry,
           "dtype": "bfloat16 (timing); float16, bfloat16, float32 (correctness)"}
    if common.HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        env.update(sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    return env


def run_case(case: Case) -> dict:
    """Run ``case``; its row: status, seconds, what it compiled, figures or the error."""
    kernels, graphs, start = compiled_variants(), dynamo_graphs(), time.perf_counter()
    row = {}
    try:
        with one_config_per_key() if case.step == "correctness" else contextlib.nullcontext():
            row.update(case.run())
            common.sync()  # an asynchronous CUDA error belongs to this case, not the next
        failed = [c for c in row.get("checks", ()) if not c["ok"]] or row.get("failed")
        row.setdefault("status", "FAIL" if failed else "ok")
    except Exception as exc:  # one case must not end a lease's run
        import traceback

        first = (str(exc).strip().splitlines() or [""])[0][:160]
        row.update(status=f"error: {type(exc).__name__}: {first}",
                   traceback=traceback.format_exc())
    if common.HAS_CUDA:
        torch.cuda.empty_cache()
    after = compiled_variants()
    row["compiled"] = {k: n - kernels.get(k, 0) for k, n in after.items() if n > kernels.get(k, 0)}
    row["graphs"] = dynamo_graphs() - graphs
    row["seconds"] = time.perf_counter() - start
    return row


def main(out_dir: Path = common.RESULTS, budget: float = BUDGET_S, dry: bool = False) -> int:
    """Run every case that fits ``budget`` seconds, rewriting the report after each; returns
    the exit status (1 if one of ours failed or raised)."""
    start = _now()
    torch.manual_seed(0)
    state = {"env": environment(budget, dry), "rows": []}
    cases = timing_cases(state, dry) + [Case("correctness", *c) for c in
                                         device_correctness.correctness_cases(dry)]
    for case in cases:
        row = {"step": case.step, "case": case.name, "estimate_s": case.estimate_s}
        state["rows"].append(row)
        left = budget - (_now() - start)
        if case.estimate_s > left:
            row.update(status="skipped: budget",
                       note=f"{max(left, 0):.0f} s left, estimated {case.estimate_s:.0f} s")
        else:
            row["status"] = "running (a report that ends here was cut short)"
            write(out_dir, state, start)
            row.update(run_case(case))
        print(f"[{_now() - start:5.0f} s] {case.step:11s} {case.name:66s} {row['status']}",
              flush=True)
        write(out_dir, state, start)
    print("\n" + markdown(state, start), flush=True)
    print(f"wrote {out_dir.resolve()}/{NAME}.md, .json", flush=True)
    return 1 if any(failure(r["status"]) for r in state["rows"]) else 0


def failure(status: str) -> bool:
    """One of ours failed a check or raised (not: ok, skipped)."""
    return status != "ok" and not status.startswith(("skipped", "running"))


def summary(state: dict, start: float) -> dict:
    rows = state["rows"]
    kernels = {}
    for row in rows:
        for name, n in row.get("compiled", {}).items():
            kernels[name] = kernels.get(name, 0) + n
    return {"elapsed_s": round(_now() - start, 1), "cases": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "skipped": sum(r["status"].startswith("skipped") for r in rows),
            "failed": sum(failure(r["status"]) for r in rows),
            "triton_compilations": sum(kernels.values()), "by_kernel": kernels,
            "torch_compile_graphs": sum(r.get("graphs", 0) for r in rows)}


def write(out_dir: Path, state: dict, start: float) -> None:
    """``device_check.json`` and ``.md`` in ``out_dir``, everything so far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = state.get("reports", {})
    data = {"environment": state["env"], "summary": summary(state, start),
            "cases": state["rows"], "autotune": state.get("winners"),
            "timing": {name: report.rows for name, report in reports.items()}}
    (out_dir / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str))
    env = "\n".join(f"- {k}: {v}" for k, v in state["env"].items())
    (out_dir / f"{NAME}.md").write_text(f"# {NAME}\n\n{env}\n\n{markdown(state, start)}\n")


def markdown(state: dict, start: float) -> str:
    """The cases, the timing tables, the autotune winners and the correctness checks."""
    s = summary(state, start)
    lines = [f"## Cases: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped "
             f"({s['elapsed_s']:.0f} s of {state['env']['budget_s']:.0f} s)", "",
             f"Triton compilations of our kernels: {s['triton_compilations']} "
             f"{s['by_kernel'] or ''}; torch.compile graphs (peers): "
             f"{s['torch_compile_graphs']}.", "",
             "| step | case | status | s | est. s | compiled | detail |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in state["rows"]:
        detail = r.get("note") or ", ".join(r.get("failed") or []) or "; ".join(
            f"{c['tensor']} {c['err']:.2e}" + ("" if c["ok"] else " FAIL")
            for c in r.get("checks", ()))
        status, detail = (text.replace("|", "\\|") for text in (r["status"], detail))
        lines.append(f"| {r['step']} | {r['case']} | {status} | {r.get('seconds', 0):.1f} | "
                     f"{r['estimate_s']:.0f} | {sum(r.get('compiled', {}).values())} | "
                     f"{detail} |")
    for report in state.get("reports", {}).values():
        lines += [f"\n{table}" for table in report.tables]
    if state.get("winners") is not None:
        lines += ["", "### Autotune winners", ""]
        lines += winner_lines(state["winners"])
    return "\n".join(lines)


def cli(args) -> int:
    """``posenc-bench --device-check``: ``args`` from ``common.parse_args``."""
    if not (common.HAS_CUDA or args.cpu_dry_run):
        print("No CUDA device found: --device-check needs a GPU (--cpu-dry-run runs it on the "
              "CPU with tiny shapes).")
        return 1
    return main(args.out, args.budget, args.cpu_dry_run)
