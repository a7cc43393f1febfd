"""Length extrapolation: what each position encoding does past its training length.

``posenc-bench extrapolation [--quick | --large] [--out DIR] [--<setting> VALUE ...]`` (also
``python -m posenc_triton.bench.bench_extrapolation``). Trains small byte-level, decoder-only
language models that differ only in their position encoding, on the same bytes with the same
optimizer and token budget, then measures bits per byte on held-out text at 1x, 2x, 4x and 8x
the training length.

* Trained encodings: ``nope`` (none), ``sinusoidal`` (:class:`SinusoidalPositionalEncoding`
  added to the embeddings), ``learned`` (a table of ``train_len`` absolute positions; every
  position past it uses the last row), ``rope`` (:class:`RoPEAttention`) and ``alibi``
  (:class:`ALiBiAttention`). NoPE, sinusoidal and learned attend with plain causal SDPA.
* RoPE is also evaluated with Hugging Face scaling dicts at ``s = eval_len / train_len``
  (no fine-tuning): ``linear`` (PI, factor ``s``), ``yarn`` (factor ``s``, original length
  ``train_len``), ``dynamic`` (factor ``s``, as a user sets it: base grows by
  ``(s^2 - s + 1)^(d/(d-2))`` at ``eval_len``) and ``ntk`` (``dynamic`` with factor 1: base
  grows by ``s^(d/(d-2))``, the NTK-aware rule).
* Data: the top-level ``*.py`` files of the running Python's standard library, as bytes (on
  every machine, no download). A file is held out when ``crc32(file name) % 10 == 0``: fixed
  by name, whatever the platform. Training windows are drawn at random from the other files;
  evaluation reads the first ``eval_tokens`` held-out bytes, cut into windows of each
  evaluation length, so every length scores the same bytes.
* Reported: bits per byte over whole windows (the usual perplexity-vs-length curve) and over
  the positions at or past ``train_len`` only, mean and sample std over seeds; a markdown
  table, a PNG plot and JSON (versions, settings, per-seed numbers, training curves) in
  ``--out`` as ``extrapolation.{md,png,json}``.

Presets: the default fits a 2-core CPU in about 15 minutes; ``--quick`` (CI) under a minute;
``--large`` (train 512, evaluate to 4096) is for a GPU. On CPU the layers run their PyTorch
reference path, never Triton's interpreter (far too slow to train with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import common
from .extrapolation_lm import ENCODINGS, ByteLM, rope_scaling, stdlib_split

NAME = "extrapolation"
# What is evaluated: (label, trained encoding, RoPE scaling rule or None).
VARIANTS = (
    ("nope", "nope", None),
    ("sinusoidal", "sinusoidal", None),
    ("learned", "learned", None),
    ("rope", "rope", None),
    ("rope+linear (PI)", "rope", "linear"),
    ("rope+ntk", "rope", "ntk"),
    ("rope+dynamic", "rope", "dynamic"),
    ("rope+yarn", "rope", "yarn"),
    ("alibi", "alibi", None),
)


@dataclasses.dataclass
class Settings:
    train_len: int = 128
    factors: tuple = (1, 2, 4, 8)  # evaluation lengths, as multiples of train_len
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    batch: int = 16
    steps: int = 300
    lr: float = 5e-3
    seeds: int = 2
    eval_tokens: int = 16384  # held-out bytes scored at every length
    dtype: str = "float32"  # bfloat16: autocast (the GPU's default)
    threads: int = 0  # torch's CPU threads; 0: torch's default


PRESETS = {
    "quick": {"train_len": 32, "d_model": 32, "layers": 1, "heads": 2, "batch": 8, "steps": 40,
              "lr": 1e-2, "seeds": 1, "eval_tokens": 2048},
    "default": {},
    "large": {"train_len": 512, "d_model": 384, "layers": 6, "heads": 6, "batch": 32,
              "steps": 3000, "lr": 1e-3, "seeds": 2, "eval_tokens": 262144,
              "dtype": "bfloat16"},
}


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------


def _model(encoding: str, s: Settings, scaling: Optional[dict] = None) -> ByteLM:
    return ByteLM(encoding, s.train_len, s.d_model, s.layers, s.heads, scaling)


def _autocast(device: torch.device, s: Settings):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.dtype == "bfloat16")


def train(encoding: str, s: Settings, seed: int, data: torch.Tensor, device: torch.device):
    """``(model, losses)``: ``s.steps`` AdamW steps on random ``train_len`` windows of
    ``data``; the seed fixes the initialisation and the windows (the same for every
    encoding)."""
    torch.manual_seed(seed)
    model = _model(encoding, s).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    warmup = max(1, s.steps // 20)  # then cosine decay to a tenth

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, s.steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    windows = torch.Generator().manual_seed(seed)
    span = torch.arange(s.train_len + 1)
    losses = []
    model.train()
    for _ in range(s.steps):
        starts = torch.randint(0, data.numel() - s.train_len - 1, (s.batch, 1), generator=windows)
        chunk = data[starts + span].to(device, torch.long)
        with _autocast(device, s):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item() / math.log(2))
    return model, losses


@torch.no_grad()
def evaluate(model: ByteLM, held: torch.Tensor, length: int, s: Settings,
             device: torch.device):
    """``(bits per byte over whole windows, over positions >= train_len or None)`` on the
    first ``s.eval_tokens`` held-out bytes cut into windows of ``length``."""
    count = s.eval_tokens // length
    tokens = held[: count * length + 1].to(device, torch.long)
    inputs, targets = tokens[:-1].view(count, length), tokens[1:].view(count, length)
    per_batch = max(1, 8192 // length)
    nll = torch.zeros(length, dtype=torch.float64, device=device)  # summed per position
    model.eval()
    for i in range(0, count, per_batch):
        with _autocast(device, s):
            logits = model(inputs[i:i + per_batch])
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets[i:i + per_batch],
                               reduction="none")
        nll += loss.double().sum(0)
    bits = nll / (count * math.log(2))
    beyond = bits[s.train_len:].mean().item() if length > s.train_len else None
    return bits.mean().item(), beyond


def evaluated_model(trained: ByteLM, rule: Optional[str], factor: float, s: Settings,
                    device: torch.device) -> ByteLM:
    """``trained`` itself, or for a RoPE scaling rule a copy of it with that scaling (the
    cos/sin tables are buffers outside the state dict: the weights load unchanged)."""
    if rule is None:
        return trained
    model = _model("rope", s, rope_scaling(rule, factor, s.train_len)).to(device)
    model.load_state_dict(trained.state_dict())
    return model


def run(s: Settings, out_dir: Path, device: Optional[torch.device] = None,
        resume: bool = False) -> dict:
    """The whole study; writes ``extrapolation.{md,json,png}`` to ``out_dir`` and returns
    ``{"env": ..., "training": [rows], "rows": [rows], "tables": [markdown]}``.

    The JSON is saved after every trained model, so a run cut short keeps its models;
    ``resume`` continues the one in ``out_dir`` (same settings and data), skipping them."""
    device = torch.device(device or common.DEVICE)
    start = time.perf_counter()
    train_data, held, data_info = stdlib_split()
    lengths = [s.train_len * f for f in s.factors]
    needed = max(lengths)
    if s.eval_tokens < needed or held.numel() <= s.eval_tokens:
        raise ValueError(f"eval_tokens must be in [{needed}, {held.numel()}) (the longest "
                         f"evaluation window, the held-out bytes), got {s.eval_tokens}")
    env = {**common.environment(torch.float32),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"none (CPU {platform.machine()}, {torch.get_num_threads()} threads)",
           "dtype": s.dtype, "timer": "wall clock (time.perf_counter)", "wall_s": 0.0,
           "settings": dataclasses.asdict(s), "data": data_info}
    training, rows, earlier_s = _previous(out_dir, env) if resume else ([], [], 0.0)
    done = {(t["seed"], t["encoding"]) for t in training}
    jobs = [(seed, enc) for seed in range(s.seeds) for enc in ENCODINGS
            if (seed, enc) not in done]
    for seed, enc in common.progress(jobs, NAME):
        t0 = time.perf_counter()
        model, losses = train(enc, s, seed, train_data, device)
        seconds = time.perf_counter() - t0
        tail = max(1, len(losses) // 10)
        training.append({
            "kind": "training", "encoding": enc, "seed": seed, "seconds": seconds,
            "params": sum(p.numel() for p in model.parameters()),
            "loss_start": statistics.fmean(losses[:tail]),
            "loss_end": statistics.fmean(losses[-tail:]), "curve": losses[::max(1, tail // 4)]})
        for label, trained_enc, rule in VARIANTS:
            if trained_enc != enc:
                continue
            for factor, length in zip(s.factors, lengths):
                m = evaluated_model(model, rule, factor, s, device)
                bpb, beyond = evaluate(m, held, length, s, device)
                rows.append({"kind": "eval", "encoding": label, "seed": seed, "factor": factor,
                             "eval_len": length, "bpb": bpb, "bpb_beyond": beyond})
        evals = [r for r in rows if r["seed"] == seed and r["encoding"] == enc]
        print(f"  seed {seed} {enc:11s} trained in {seconds:6.1f} s: train loss "
              f"{training[-1]['loss_start']:.2f} -> {training[-1]['loss_end']:.2f} bits/byte; "
              "held-out " + ", ".join(f"{r['eval_len']}: {r['bpb']:.3f}" for r in evals),
              flush=True)
        env["wall_s"] = round(earlier_s + time.perf_counter() - start, 1)
        common.write_json(out_dir, NAME, env, training + rows)

    env["wall_s"] = round(earlier_s + time.perf_counter() - start, 1)
    tables = [_table(rows, s, "bpb", "Held-out bits per byte over whole windows"),
              _table(rows, s, "bpb_beyond", f"Bits per byte at positions >= {s.train_len} "
                     "(past the training length) only"),
              _training_table(training)]
    common.write_json(out_dir, NAME, env, training + rows)
    common.write_markdown(out_dir, NAME, {k: v for k, v in env.items() if k != "data"}, tables)
    plotted = _plot(rows, s, env, out_dir / f"{NAME}.png")
    for table in tables:
        print("\n" + table)
    print(f"\n{env['wall_s']} s; wrote {out_dir.resolve()}/{NAME}.md, .json"
          + (", .png" if plotted else " (no plot: matplotlib is not installed)"), flush=True)
    return {"env": env, "training": training, "rows": rows, "tables": tables}


def _previous(out_dir: Path, env: dict):
    """``(training rows, eval rows, wall seconds)`` of the run in ``out_dir`` to resume."""
    path = out_dir / f"{NAME}.json"
    if not path.exists():
        return [], [], 0.0
    before = json.loads(path.read_text())
    old = before["environment"]

    def same(e):  # threads change the speed, not the numbers
        return json.dumps([{**e["settings"], "threads": None}, e["data"]], sort_keys=True)

    if same(old) != same(env):
        raise ValueError(f"--resume: {path} was run with other settings or data; pass another "
                         "--out, or the same settings")
    rows = before["rows"]  # saved after a model's evaluations: every model is complete
    return ([r for r in rows if r["kind"] == "training"],
            [r for r in rows if r["kind"] == "eval"], old["wall_s"])


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def _stats(rows, label, factor, key):
    """``(mean, sample std or None)`` of ``key`` over seeds; None when nothing to average."""
    values = [r[key] for r in rows if r["encoding"] == label and r["factor"] == factor
              and r[key] is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _table(rows, s: Settings, key: str, title: str) -> str:
    seeds = len({r["seed"] for r in rows})
    header = ["encoding", *(f"{f}x ({f * s.train_len})" for f in s.factors)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, _, _ in VARIANTS:
        cells = []
        for f in s.factors:
            stat = _stats(rows, label, f, key)
            cells.append("-" if stat is None else f"{stat[0]:.3f}" + (
                f" ± {stat[1]:.3f}" if stat[1] is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    spread = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "one seed"
    return f"### {title} ({spread}; lower is better)\n\n" + "\n".join(lines)


def _training_table(training) -> str:
    lines = ["| encoding | parameters | train loss, first 10% of steps | last 10% | seconds |",
             "| --- | --- | --- | --- | --- |"]
    for enc in ENCODINGS:
        mine = [t for t in training if t["encoding"] == enc]
        lines.append(f"| {enc} | {mine[0]['params']:,} | "
                     f"{statistics.fmean(t['loss_start'] for t in mine):.3f} | "
                     f"{statistics.fmean(t['loss_end'] for t in mine):.3f} | "
                     f"{statistics.fmean(t['seconds'] for t in mine):.1f} |")
    return "### Training (bits per byte, mean over seeds)\n\n" + "\n".join(lines)


def _plot(rows, s: Settings, env: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "bpb", "whole windows"),
                           (axes[1], "bpb_beyond", f"positions >= {s.train_len} only")):
        for label, _, rule in VARIANTS:
            points = [(f * s.train_len, _stats(rows, label, f, key)) for f in s.factors]
            points = [(x, st) for x, st in points if st is not None]
            if points:
                ax.errorbar([x for x, _ in points], [st[0] for _, st in points],
                            yerr=[st[1] or 0.0 for _, st in points], marker="o", capsize=3,
                            linestyle="--" if rule else "-", label=label)
        ax.axvline(s.train_len, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (bytes)")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    # env["gpu"] reads "none (CPU ...)" off a GPU: the title names the CPU without nesting.
    where = env["gpu"][len("none ("):-1] if env["gpu"].startswith("none (") else env["gpu"]
    fig.suptitle(f"Length extrapolation, trained at {s.train_len} ({where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def parse_settings(argv=None):
    """``(Settings, args)`` from the command line: a preset, then any field overridden;
    ``args.out``, ``args.resume``."""
    parser = argparse.ArgumentParser(prog="posenc-bench extrapolation",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.RESULTS,
                        help="output folder (default: ./posenc_bench_results)")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a tiny run (CI, under a minute)")
    preset.add_argument("--large", action="store_true",
                        help="train 512, evaluate to 4096, bf16 autocast (for a GPU)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out (same settings), e.g. one cut "
                             "short by a time limit")
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "factors":
            parser.add_argument(flag, type=lambda t: tuple(int(x) for x in t.split(",")),
                                help="evaluation lengths as multiples of --train-len, "
                                     "e.g. 1,2,4,8")
        elif field.name == "dtype":
            parser.add_argument(flag, choices=("float32", "bfloat16"))
        else:
            parser.add_argument(flag, type=type(field.default))
    args = parser.parse_args(argv)
    values = dict(PRESETS["quick" if args.quick else "large" if args.large else "default"])
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                   if getattr(args, f.name) is not None})
    s = Settings(**values)
    for name in ("train_len", "d_model", "layers", "heads", "batch", "steps", "seeds",
                 "eval_tokens", "threads"):
        low = 0 if name == "threads" else 1
        if getattr(s, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(s, name)}")
    if s.d_model % s.heads or (s.d_model // s.heads) % 2:
        parser.error(f"--d-model {s.d_model} must be --heads {s.heads} times an even head_dim")
    if not s.factors or min(s.factors) < 1:
        parser.error(f"--factors must be positive integers, got {s.factors}")
    if not s.lr > 0:
        parser.error(f"--lr must be > 0, got {s.lr}")
    return s, args


def main(argv=None) -> int:
    s, args = parse_settings(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    # On CPU the layers must take their PyTorch path: interpreting the kernels is for tests.
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"posenc_triton\..*")  # slow-path notes
            result = run(s, args.out, resume=args.resume)
    finally:
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    bad = [r for r in result["rows"] if not math.isfinite(r["bpb"])]
    for r in bad:
        print(f"NOT FINITE: {r['encoding']} seed {r['seed']} at {r['eval_len']}: {r['bpb']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
