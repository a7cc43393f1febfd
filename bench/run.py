"""The benchmarks' main job: ``posenc-bench [--out DIR] [--quick] [--e2e]``.

The same as ``python -m posenc_triton.bench``. With CUDA: runs ``bench_rope`` and
``bench_alibi`` (``--quick``: a few shapes each) and, with ``--e2e``, ``bench_e2e`` (a
training step of small Llama and BLOOM models, unpatched against patched), showing a progress
bar; writes their tables, JSON and plots to the output folder (``./posenc_bench_results`` by
default) with the GPU's name and the versions, and prints the short tables last. Exit status
1 if one of ours failed a check or raised.

Without CUDA: says so and runs a correctness smoke test instead: every kernel (apply_rope
rotate-half and interleaved, alibi_attention causal and not, forward and backward) on tiny
shapes through Triton's interpreter against the float64 reference; writes its table to
``smoke.md`` and ``smoke.json``; exit status 1 on a failure. Under a minute on a laptop.

``posenc-bench extrapolation [--quick | --large] ...``: the length-extrapolation study
(``bench_extrapolation``), on CPU or GPU.
"""

from __future__ import annotations

import time

import torch

from . import common

# Largest error / largest |reference| allowed by input dtype (ALiBi in bf16 is the loosest).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def benchmarks(args) -> int:
    """Every benchmark script in turn (on CPU too with ``--cpu-dry-run``), then a summary."""
    from . import bench_alibi, bench_e2e, bench_rope

    scripts = [bench_rope, bench_alibi] + ([bench_e2e] if args.e2e else [])
    reports = [script.main(args.out, args.quick, args.cpu_dry_run) for script in scripts]
    env = reports[0].env
    print(f"\n\n## Summary ({env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
          f"details in {args.out.resolve()}/)")
    for report in reports:
        for title in ("Bandwidth", "Decode host time", "Throughput"):
            for table in report.tables:
                if table.startswith(f"### {title}"):
                    print("\n" + table)
    return common.exit_status(reports)


def smoke_cases(posenc_triton, reference) -> list:
    """``(name, dtype, ours(*inputs), ref(*inputs), inputs)`` on tiny, odd shapes."""
    def rand(*shape, dtype):
        return torch.randn(*shape, dtype=dtype)

    inv_freq, _ = posenc_triton.rope_frequencies(24)  # partial rotary: R=24 of D=32
    cos, sin = posenc_triton.rope_cos_sin(40, inv_freq)
    position_ids = torch.randint(0, 40, (2, 12))
    offsets = torch.tensor([3, 27])

    def rope(interleaved, **kw):
        def ours(q, k):
            return posenc_triton.apply_rope(q, k, cos, sin, interleaved=interleaved, **kw)

        def ref(q, k):
            return reference.apply_rope_reference(q, k, cos.double(), sin.double(),
                                                  interleaved=interleaved, **kw)
        return ours, ref

    def alibi(is_causal):
        def ours(q, k, v):
            return (posenc_triton.alibi_attention(q, k, v, is_causal=is_causal),)

        def ref(q, k, v):
            return (reference.alibi_attention_reference(q, k, v, is_causal=is_causal),)
        return ours, ref

    # Three packed sequences: q lengths 7, 0, 23; k lengths 19, 5, 16.
    cu_q = torch.tensor([0, 7, 7, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 19, 24, 40], dtype=torch.int32)

    def packed(q, k, v):
        return (posenc_triton.alibi_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),)

    def packed_ref(q, k, v):
        return (reference.alibi_attention_varlen_reference(q, k, v, cu_q, cu_k),)

    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        cases += [
            (f"apply_rope rotate-half position_ids q[2,12,4,32] k2 {name}", dtype,
             *rope(False, position_ids=position_ids),
             (rand(2, 12, 4, 32, dtype=dtype), rand(2, 12, 2, 32, dtype=dtype))),
            (f"apply_rope interleaved offsets bhsd q[2,3,9,32] k3 {name}", dtype,
             *rope(True, seqlen_offsets=offsets, layout="bhsd"),
             (rand(2, 3, 9, 32, dtype=dtype), rand(2, 3, 9, 32, dtype=dtype))),
            (f"alibi_attention causal GQA Hq4 Hk2 Sq24 Sk40 D32 {name}", dtype, *alibi(True),
             (rand(1, 4, 24, 32, dtype=dtype), rand(1, 2, 40, 32, dtype=dtype),
              rand(1, 2, 40, 32, dtype=dtype))),
            (f"alibi_attention non-causal H3 S33 D16 {name}", dtype, *alibi(False),
             tuple(rand(2, 3, 33, 16, dtype=dtype) for _ in range(3))),
            (f"alibi_attention packed causal Sq 7,0,23 Sk 19,5,16 Hq4 Hk2 D32 {name}", dtype,
             packed, packed_ref, (rand(30, 4, 32, dtype=dtype), rand(40, 2, 32, dtype=dtype),
                                  rand(40, 2, 32, dtype=dtype))),
        ]
    return cases


def smoke_test(out_dir) -> int:
    interpreted = common.use_interpreter()  # before the package (and its kernels) is imported
    import posenc_triton
    from posenc_triton import reference

    print("No CUDA device found: running the CPU correctness smoke test instead of the "
          "benchmarks.\n" + ("Kernels run through Triton's interpreter (TRITON_INTERPRET=1)."
                             if interpreted else
                             "Triton is not importable: CPU calls run the PyTorch reference."))
    torch.manual_seed(0)
    lines = ["| kernel | fwd error | bwd error | result |", "| --- | --- | --- | --- |"]
    failed = 0
    start = time.perf_counter()
    rows = []
    for name, dtype, ours, ref, inputs in common.progress(smoke_cases(posenc_triton, reference),
                                                          "smoke test"):
        x = [t.clone().requires_grad_() for t in inputs]
        x64 = [t.detach().double().requires_grad_() for t in inputs]
        outcome, note = common.attempt(_compare, ours, ref, x, x64)
        errors = outcome or (float("inf"), float("inf"))
        ok = note is None and max(errors) <= TOLERANCE[dtype]
        failed += not ok
        rows.append({"kernel": name, "fwd_error": errors[0], "bwd_error": errors[1],
                     "result": "pass" if ok else "FAIL", "note": note})
        lines.append(f"| {name} | {errors[0]:.1e} | {errors[1]:.1e} | "
                     f"{'pass' if ok else 'FAIL' + (f' ({note})' if note else '')} |")
    summary = (f"{len(rows) - failed} passed, {failed} failed "
               f"in {time.perf_counter() - start:.1f} s")
    print("\n".join(lines) + "\n\n" + summary)
    env = {**common.environment(torch.float32), "gpu": "none (CPU smoke test)",
           "dtype": "float32, bfloat16", "timer": "none (correctness only)"}
    common.write_json(out_dir, "smoke", env, rows)
    common.write_markdown(out_dir, "smoke", env, ["\n".join(lines), summary])
    print(f"wrote {out_dir.resolve()}/smoke.md, .json")
    return 1 if failed else 0


def _compare(ours, ref, x, x64):
    """Forward and backward errors of ``ours(*x)`` against the float64 ``ref(*x64)``."""
    out = [t for t in ours(*x) if t is not None]
    out64 = [t for t in ref(*x64) if t is not None]
    grads_out = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(out, x, grads_out)
    grads64 = torch.autograd.grad(out64, x64, [g.double() for g in grads_out])
    return common.max_rel_error(out, out64), common.max_rel_error(grads, grads64)


def cli() -> int:
    """The ``posenc-bench`` command."""
    import sys

    if sys.argv[1:2] == ["extrapolation"]:  # the length-extrapolation study, CPU or GPU
        from .bench_extrapolation import main

        return main(sys.argv[2:])
    args = common.parse_args(__doc__, runner=True)
    if args.device_check:  # one budgeted call for a lent GPU
        from .device_check import cli as device_check

        return device_check(args)
    if common.HAS_CUDA or args.cpu_dry_run:
        return benchmarks(args)
    return smoke_test(args.out)


if __name__ == "__main__":
    raise SystemExit(cli())
