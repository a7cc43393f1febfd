"""The benchmarks' main job: ``python bench/run.py [--out DIR] [--quick]``.

With CUDA: runs ``bench_rope`` and ``bench_alibi`` (``--quick``: a few shapes each), writes
their tables, JSON and plots to the output folder (``bench/results/`` by default) and prints
the short tables last. Exit status 1 if one of our kernels failed a check or raised.

Without CUDA: says so and runs a correctness smoke test instead: every kernel (apply_rope
rotate-half and interleaved, alibi_attention causal and not, forward and backward) on tiny
shapes through Triton's interpreter against the float64 reference; exit status 1 on a
failure. Under a minute on a laptop.
"""

from __future__ import annotations

import sys
import time

import common
import torch

# Largest error / largest |reference| allowed by input dtype (ALiBi in bf16 is the loosest).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def gpu_benchmarks(args) -> int:
    import bench_alibi
    import bench_rope

    reports = [bench_rope.main(args.out, args.quick), bench_alibi.main(args.out, args.quick)]
    print(f"\n\n## Summary ({reports[0].env['gpu']}, torch {reports[0].env['torch']}, "
          f"triton {reports[0].env['triton']}; details in {args.out}/)")
    for report in reports:
        for title in ("Bandwidth", "Decode host time", "Throughput"):
            for table in report.tables:
                if table.startswith(f"### {title}"):
                    print("\n" + table)
    failed = [r for report in reports for r in report.failures() if r["impl"] == "ours"]
    for row in failed:
        print(f"OURS FAILED: {row['case']} {row['mode']}: {row.get('note') or row.get('check')}")
    return 1 if failed else 0


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
        ]
    return cases


def smoke_test() -> int:
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
    for name, dtype, ours, ref, inputs in smoke_cases(posenc_triton, reference):
        x = [t.clone().requires_grad_() for t in inputs]
        x64 = [t.detach().double().requires_grad_() for t in inputs]
        outcome, note = common.attempt(_compare, ours, ref, x, x64)
        errors = outcome or (float("inf"), float("inf"))
        ok = note is None and max(errors) <= TOLERANCE[dtype]
        failed += not ok
        lines.append(f"| {name} | {errors[0]:.1e} | {errors[1]:.1e} | "
                     f"{'pass' if ok else 'FAIL' + (f' ({note})' if note else '')} |")
    print("\n".join(lines))
    print(f"\n{len(lines) - 2 - failed} passed, {failed} failed "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _compare(ours, ref, x, x64):
    """Forward and backward errors of ``ours(*x)`` against the float64 ``ref(*x64)``."""
    out = [t for t in ours(*x) if t is not None]
    out64 = [t for t in ref(*x64) if t is not None]
    grads_out = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(out, x, grads_out)
    grads64 = torch.autograd.grad(out64, x64, [g.double() for g in grads_out])
    return common.max_rel_error(out, out64), common.max_rel_error(grads, grads64)


def main() -> int:
    args = common.parse_args(__doc__, smoke_test_without_cuda=True)
    return gpu_benchmarks(args) if common.HAS_CUDA else smoke_test()


if __name__ == "__main__":
    sys.exit(main())
