"""Shared benchmark helpers: CLI, timers, ceilings, optional peers, progress, and results.

On CUDA every kernel time is a ``triton.testing.do_bench`` median. Without CUDA (the
developers' ``--cpu-dry-run``) a ``perf_counter`` median stands in, so every code path still
runs. Results go to ``./posenc_bench_results/`` of the current directory unless ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Relative: resolved against the working directory when written (never inside site-packages).
RESULTS = Path("posenc_bench_results")


def parse_args(doc: str, runner: bool = False) -> argparse.Namespace:
    """``--out DIR``, ``--quick``, the hidden ``--cpu-dry-run`` and, for the runner, ``--e2e``.

    A benchmark script exits without CUDA unless dry-running; the runner falls back to the
    smoke test itself."""
    parser = argparse.ArgumentParser(
        prog="posenc-bench" if runner else None,
        description=doc.strip().splitlines()[0].replace("``", ""),
        epilog=("sub-commands: posenc-bench extrapolation [--quick | --large] ...: the "
                "length-extrapolation study, on CPU or GPU (posenc-bench extrapolation --help)"
                if runner else None))
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="output folder (default: ./posenc_bench_results)")
    parser.add_argument("--quick", action="store_true", help="a few representative shapes only")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    if runner:
        parser.add_argument("--e2e", action="store_true",
                            help="also run the end-to-end training-step benchmark (bench_e2e)")
        parser.add_argument("--device-check", action="store_true",
                            help="instead: headline timings, then a CUDA correctness subset, "
                                 "within --budget (device_check.md and .json)")
        parser.add_argument("--budget", type=float, default=480.0,
                            help="seconds --device-check may take (default 480)")
    args = parser.parse_args()
    if args.cpu_dry_run:
        use_interpreter()
    elif not HAS_CUDA and not runner:
        parser.exit(1, "No CUDA device found: this benchmark needs a GPU. `posenc-bench` "
                       "runs the CPU correctness smoke test instead.\n")
    return args


def run_script(doc: str, main) -> int:
    """A benchmark script's ``__main__``: parse the CLI, run ``main``, return the exit status."""
    args = parse_args(doc)
    return exit_status([main(args.out, args.quick, args.cpu_dry_run)])


def exit_status(reports: list) -> int:
    """1 if one of our rows (``report.ours``) failed its check or raised, else 0; says which."""
    failed = [r for report in reports for r in report.failures() if r["impl"] == report.ours]
    for row in failed:
        print(f"OURS FAILED: {row['case']} {row['mode']}: {row.get('note') or row.get('check')}")
    return 1 if failed else 0


def progress(iterable, desc: str):
    """``iterable`` behind a tqdm progress bar on a terminal's stderr; as is without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, unit="case", file=sys.stderr, disable=None, leave=False)


def use_interpreter() -> bool:
    """Route the package's CPU calls through Triton's interpreter (``TRITON_INTERPRET=1``).

    ``triton.jit`` reads the variable when a function is decorated, Triton's own library
    included. Run as ``posenc_triton.bench``, this code is imported after ``posenc_triton``,
    which has imported Triton already: then the process starts again with the variable set.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            restart()
    return True


def restart() -> None:
    """Replace this process by the same command (``python -m module`` or a script) run anew."""
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if main_spec is not None:  # python -m posenc_triton.bench[.bench_rope]
        command = ["-m", main_spec.name.removesuffix(".__main__")]
    else:  # the posenc-bench script, or a file
        command = [sys.argv[0]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *command, *sys.argv[1:]])


def environment(dtype: torch.dtype) -> dict:
    """What every number depends on: device, versions, dtype, timer, date."""
    def version(name):
        try:
            return importlib.import_module(name).__version__
        except Exception:  # absent, or broken without a GPU: recorded, not fatal
            return None

    cpu = f"none (CPU {platform.machine()}, dry run: numbers mean nothing)"
    return {
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else cpu,
        # Off a GPU, torch.version.cuda is only what the wheel was built for.
        "cuda": torch.version.cuda if HAS_CUDA else
        (f"none found (torch built for CUDA {torch.version.cuda})" if torch.version.cuda
         else "none (a CPU build of torch)"),
        "torch": torch.__version__, "triton": version("triton"),
        "python": platform.python_version(), "posenc_triton": version("posenc_triton"),
        "liger_kernel": version("liger_kernel"), "flash_attn": version("flash_attn"),
        "dtype": str(dtype).replace("torch.", ""),
        "timer": "triton.testing.do_bench median" if HAS_CUDA else "time.perf_counter median",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def time_ms(fn) -> float:
    """Median milliseconds per call of ``fn``, warm-up (compilation, autotuning) included."""
    if HAS_CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    return median_ms(fn)


def median_ms(fn, warmup: int = 1, reps: int = 5) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls, each call timed
    alone between device synchronisations (for calls long enough that a sync costs nothing:
    a training step; ``time_ms`` for kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def host_us(fn, calls: int = 200 if HAS_CUDA else 5) -> float:
    """Host microseconds per call: ``calls`` calls back to back with no sync, then one sync.

    At decode shapes the GPU finishes before the host issues the next launch, so this
    (validation, allocation, dispatch, launch) is the time a decode step feels.
    """
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / calls * 1e6


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, (bytes read + bytes written) / time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return gbps(2 * nbytes, time_ms(lambda: dst.copy_(src)))


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def peak_gib(fn):
    """Peak GiB allocated during one call of ``fn`` (inputs included); None without CUDA."""
    if not HAS_CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def max_rel_error(actual, expected) -> float:
    """Largest ``|actual - expected|`` over tensor pairs, relative to the largest ``|expected|``.

    NaN or a missing tensor gives ``inf``, so an unwritten output fails every tolerance.
    """
    worst = 0.0
    for a, e in zip(actual, expected):
        if a is None or a.shape != e.shape:
            return float("inf")
        e = e.double()
        err = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst


def optional(*paths):
    """The first importable ``"module:attr.attr"`` of ``paths``, or None (peers are optional)."""
    for path in paths:
        module, attrs = path.split(":")
        try:
            obj = importlib.import_module(module)
            for attr in attrs.split("."):
                obj = getattr(obj, attr)
            return obj
        except Exception:  # absent, or installed without a usable build (e.g. no CUDA ext)
            continue
    return None


def ratio(by_impl: dict, num: str, den: str, key: str = "ms") -> str:
    """``by_impl[num][key] / by_impl[den][key]`` as text, "-" where either is missing."""
    a, b = ((by_impl.get(i) or {}).get(key) for i in (num, den))
    return f"{a / b:.2f}" if a and b else "-"


def attempt(fn, *args):
    """``(fn(*args), None)``, or ``(None, note)`` when it raises: one failing variant (OOM, a
    compile error) must not end a lease's run; the note goes into the table instead."""
    try:
        return fn(*args), None
    except Exception as exc:
        if HAS_CUDA:
            torch.cuda.empty_cache()
        first = (str(exc).strip().splitlines() or [""])[0][:100]
        return None, f"error: {type(exc).__name__}: {first}"


def write_json(out_dir: Path, name: str, env: dict, rows: list) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


def write_markdown(out_dir: Path, name: str, env: dict, tables: list) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{lines}\n\n" + "\n\n".join(tables) + "\n")


class Report:
    """Rows of one run in long form (``case``, ``mode``, ``impl``, figures, ``check``, ``note``),
    shown as wide markdown tables and saved as markdown, JSON and a PNG plot."""

    def __init__(self, name: str, impls: list, metric: str, unit: str, dtype: torch.dtype):
        self.name, self.impls, self.metric, self.unit = name, impls, metric, unit
        self.env = environment(dtype)
        self.rows, self.tables = [], []
        self.ceiling = None  # (label, value) drawn as a line on the plot
        self.ours = "ours"  # the column whose failure fails the run

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def measure(self, row: dict, fn, *args) -> None:
        """``fn(row, *args)`` fills ``row``; an exception becomes its note. Prints the row."""
        _, note = attempt(fn, row, *args)
        if note:
            row["note"] = note
        print(f"  {row['case']:34s} {row['mode']:8s} {row['impl']:15s} "
              f"{row.get('ms', float('nan')):10.4f} ms  {row.get('check', note)}", flush=True)

    def groups(self) -> dict:
        """``{(case, mode): {impl: row}}`` in insertion order."""
        out = {}
        for row in self.rows:
            out.setdefault((row["case"], row["mode"]), {})[row["impl"]] = row
        return out

    def table(self, title: str, key: str, fmt: str = "{:.1f}", extra=(), where=None) -> str:
        """A markdown table of ``row[key]``, one line per (case, mode) passing ``where``, one
        column per implementation, then ``extra`` columns ``(header, fn(rows_by_impl))``."""
        def cell(row):
            if row is None:
                return "-"
            if row.get(key) is None:  # the full note is in the JSON
                note = row.get("note") or "-"
                return note if len(note) <= 48 else note[:47] + "…"
            return fmt.format(row[key]) + (" FAIL" if row.get("check") == "FAIL" else "")

        header = ["case", "mode", *self.impls, *(h for h, _ in extra)]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for (case, mode), by_impl in self.groups().items():
            if where is None or where(case, mode):
                cells = [case, mode, *(cell(by_impl.get(i)) for i in self.impls)]
                cells += [fn(by_impl) for _, fn in extra]
                lines.append("| " + " | ".join(cells) + " |")
        text = f"### {title}\n\n" + "\n".join(lines)
        self.tables.append(text)
        print("\n" + text, flush=True)
        return text

    def failures(self) -> list:
        """Rows whose check failed or that raised: what a run must not hide."""
        return [r for r in self.rows if r.get("check") == "FAIL" or
                str(r.get("note", "")).startswith("error")]

    def save_rows(self, out_dir: Path) -> None:
        """The JSON alone; called after every case so a run cut short keeps its rows."""
        write_json(out_dir, self.name, self.env, self.rows)

    def write(self, out_dir: Path) -> None:
        self.save_rows(out_dir)
        write_markdown(out_dir, self.name, self.env, self.tables)
        plotted = self._plot(out_dir / f"{self.name}.png")
        print(f"\nwrote {out_dir.resolve()}/{self.name}.md, .json" + (", .png" if plotted else
              " (no plot: matplotlib is not installed)"), flush=True)

    def _plot(self, path: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        groups = [(k, v) for k, v in self.groups().items()
                  if any(r.get(self.metric) for r in v.values())]
        width = 0.8 / len(self.impls)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups)), 5.0))
        for n, impl in enumerate(self.impls):
            values = [(rows.get(impl) or {}).get(self.metric) or 0.0 for _, rows in groups]
            ax.bar([i + n * width for i in range(len(groups))], values, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{m}" for (c, m), _ in groups], rotation=30, ha="right",
                           fontsize=7)
        if self.ceiling:
            ax.axhline(self.ceiling[1], color="black", linestyle="--", linewidth=1,
                       label=self.ceiling[0])
        ax.set_ylabel(self.unit)
        ax.set_title(f"{self.name} ({self.env['dtype']}, {self.env['gpu']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True
