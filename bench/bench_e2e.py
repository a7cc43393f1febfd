"""End-to-end benchmark: a training step of small Llama and BLOOM models, unpatched vs patched.

    python -m posenc_triton.bench.bench_e2e [--out DIR] [--quick]

(``posenc-bench --e2e`` runs it after the kernel benchmarks.)

Models from transformers, built from a config with random weights (seed 0), bf16, train mode
(dropout is 0 in both configs), batch 4 of 2048 random tokens, labels = inputs:

* llama: ``LlamaForCausalLM``, 12 layers, hidden 1024, 16 heads, 4 KV heads, intermediate
  2816, vocab 32000, ``attn_implementation="sdpa"``. Patched: ``apply(model)`` (the fused
  RoPE kernel as ``apply_rotary_pos_emb``), undone by ``unpatch(model)`` afterwards.
* bloom: ``BloomForCausalLM``, 12 layers, hidden 1024, 16 heads, vocab 32000, eager attention
  (its ALiBi bias materialised in every layer). Patched: ``apply(model)`` (attention
  through ``posenc_triton.alibi_attention``), undone by ``unpatch(model)``.

Each column builds its own model from the same seed (so the same weights), the unpatched one
first. Before timing, both compute the loss of one batch and its gradients; the patched loss
must match the unpatched one within ``LOSS_TOLERANCE`` (relative) and every parameter's
gradient within ``GRAD_TOLERANCE`` (``|g - g_unpatched| / |g_unpatched|``, Euclidean norms),
else "FAIL". The gradients are the sensitive part: with random weights attention scores are
near zero, so a wrong rotation barely moves the loss but moves the q/k projections'
gradients by O(1). A training step is forward, ``loss.backward()``, ``AdamW.step()`` and
``zero_grad``; its time is the median of ``STEPS`` steps after ``WARMUP`` (Triton's
autotuning happens in the check and the warm-up), each timed between
``torch.cuda.synchronize`` calls. Tokens/s = batch * seqlen / time. Peak memory:
``torch.cuda.max_memory_allocated`` over warm-up and timed steps (weights, gradients and
AdamW state included), after a reset.

About a minute on an H100 (estimated: two models, four columns, ~20 steps each).

For developers: ``--cpu-dry-run`` runs the same code on CPU with tiny models (2 layers,
hidden 64, seq 32; perf_counter timer, Triton's interpreter); its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from . import common

DTYPE = torch.bfloat16
IMPLS = ["unpatched", "patched"]
LOSS_TOLERANCE = 1e-2  # |patched loss - unpatched loss| / unpatched loss
# Worst |g - g_unpatched| / |g_unpatched| over parameters. bf16 rounding alone gave 2.2e-2
# (layer 0's k_proj; the Llama config at B1 S1024 on CPU, where apply() runs the fp32
# reference); RoPE without any rotation gives about 0.8.
GRAD_TOLERANCE = 1e-1
WARMUP, STEPS = 3, 20


@dataclasses.dataclass
class Case:
    family: str  # "llama" or "bloom"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seqlen: int
    batch: int

    @property
    def name(self) -> str:
        heads = f"H{self.heads}" + (f"/{self.kv_heads}kv" if self.family == "llama" else "")
        return f"{self.family} {self.layers}L d{self.hidden} {heads} B{self.batch} S{self.seqlen}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen


def cases(quick: bool, dry: bool) -> list:
    """Both models in every mode; ``--quick`` takes fewer steps instead (see ``steps``)."""
    del quick
    if dry:
        return [Case("llama", 2, 64, 4, 2, 176, 512, 32, 2),
                Case("bloom", 2, 64, 4, 4, 256, 512, 32, 2)]
    return [Case("llama", 12, 1024, 16, 4, 2816, 32000, 2048, 4),
            Case("bloom", 12, 1024, 16, 16, 4096, 32000, 2048, 4)]


def steps(quick: bool, dry: bool) -> tuple:
    """``(warm-up steps, timed steps)``."""
    return (1, 2) if dry else (2, 5) if quick else (WARMUP, STEPS)


def build(case: Case) -> torch.nn.Module:
    """The model of ``case`` with seed-0 random weights, bf16, on the device, in train mode."""
    import transformers

    if case.family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
            num_hidden_layers=case.layers, num_attention_heads=case.heads,
            num_key_value_heads=case.kv_heads, max_position_embeddings=case.seqlen,
            attn_implementation="sdpa")
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.BloomConfig(
            vocab_size=case.vocab, hidden_size=case.hidden, n_layer=case.layers,
            n_head=case.heads, attn_implementation="eager")
        cls = transformers.BloomForCausalLM
    torch.manual_seed(0)
    with torch.device(common.DEVICE):
        model = cls(config)
    return model.to(DTYPE).train()


def patchers(case: Case):
    """``(patch, unpatch)``: ``patch(model) -> model`` and ``unpatch(model)``; or a string
    saying why the patched column cannot run."""
    try:
        from posenc_triton.integrations import transformers as integration
    except ImportError as exc:
        return f"n/a ({exc})"
    return integration.apply, integration.unpatch


def check(row: dict, model, ids, base: dict) -> None:
    """Loss and gradients of ``model`` on ``ids``: kept in ``base`` (on the host, out of the
    way of the peak memory) for the unpatched column, compared with it for the patched one."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    row["loss"] = loss.float().item()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    if row["impl"] == "unpatched":
        base.update(loss=row["loss"], grads=grads)
        row["check"] = "the base"
        return
    if "loss" not in base:
        row["check"] = "none (the unpatched column failed)"
        return
    row["loss_err"] = abs(row["loss"] - base["loss"]) / abs(base["loss"])
    errors = {name: ((g - base["grads"][name]).norm() /
                     base["grads"][name].norm().clamp_min(1e-30)).item()
              if name in base["grads"] else float("inf") for name, g in grads.items()}
    row["grad_param"], row["grad_err"] = max(errors.items(), key=lambda kv: kv[1],
                                             default=("none", float("inf")))
    ok = row["loss_err"] <= LOSS_TOLERANCE and row["grad_err"] <= GRAD_TOLERANCE
    row["check"] = "ok" if ok else "FAIL"


def train(row: dict, model, ids, warmup: int, timed: int) -> None:
    """Time training steps of ``model`` on ``ids``; figures go into ``row``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if common.HAS_CUDA:
        common.sync()
        torch.cuda.reset_peak_memory_stats()
    row["ms"] = common.median_ms(step, warmup, timed)
    row["tokens_per_s"] = ids.numel() / row["ms"] * 1e3
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if common.HAS_CUDA else None


def measure(row: dict, case: Case, patch, unpatch, ids, base: dict, warmup: int,
            timed: int) -> None:
    """Build the model, patch it (patched column), check, time, and always unpatch."""
    model = build(case)
    try:
        if patch is not None:
            model = patch(model)
        check(row, model, ids, base)
        train(row, model, ids, warmup, timed)
    finally:
        if unpatch is not None:
            unpatch(model)  # patching is module-global: never leak it into later runs


def free() -> None:
    gc.collect()
    if common.HAS_CUDA:
        torch.cuda.empty_cache()


def run_case(report: common.Report, case: Case, warmup: int, timed: int) -> None:
    ids = torch.randint(0, case.vocab, (case.batch, case.seqlen), device=common.DEVICE,
                        generator=torch.Generator(common.DEVICE).manual_seed(1))
    patched = patchers(case)
    base = {}
    for impl in IMPLS:
        row = report.add(case=case.name, mode="train step", impl=impl, tokens=case.tokens)
        if impl == "unpatched":
            report.measure(row, measure, case, None, None, ids, base, warmup, timed)
        elif isinstance(patched, str):
            row["note"] = patched
        else:
            report.measure(row, measure, case, *patched, ids, base, warmup, timed)
        free()


def main(out_dir=common.RESULTS, quick: bool = False, dry: bool = False) -> common.Report:
    report = common.Report("e2e", IMPLS, "tokens_per_s", "tokens/s", DTYPE)
    report.ours = "patched"
    try:
        import transformers

        report.env["transformers"] = transformers.__version__
    except ImportError:
        report.env["transformers"] = None
    warmup, timed = steps(quick, dry)
    report.env["steps"] = f"{warmup} warm-up, median of {timed}"
    for case in common.progress(cases(quick, dry), "e2e"):
        if report.env["transformers"] is None:
            report.add(case=case.name, mode="train step", impl="unpatched",
                       note="n/a (transformers is not installed: pip install transformers)")
        else:
            run_case(report, case, warmup, timed)
        report.save_rows(out_dir)
    report.table("Training step (ms, median)", "ms", "{:.1f}")
    report.table("Throughput (tokens/s, training step)", "tokens_per_s", "{:.0f}",
                 [("patched/unpatched (speed)",
                   lambda r: common.ratio(r, "patched", "unpatched", "tokens_per_s"))])
    report.table("Peak memory (GiB, training step)", "peak_gib", "{:.2f}",
                 [("patched/unpatched (memory)",
                   lambda r: common.ratio(r, "patched", "unpatched", "peak_gib"))])
    report.table("Check (loss on one batch before training)", "loss", "{:.4f}",
                 [("loss rel. error", lambda r: _fmt(r, "loss_err")),
                  ("worst grad rel. error", lambda r: _fmt(r, "grad_err")),
                  ("worst parameter", lambda r: (r.get("patched") or {}).get("grad_param", "-"))])
    report.write(out_dir)
    return report


def _fmt(by_impl: dict, key: str) -> str:
    value = (by_impl.get("patched") or {}).get(key)
    return "-" if value is None else f"{value:.1e}"


if __name__ == "__main__":
    raise SystemExit(common.run_script(__doc__, main))
