"""Tile fractions of the skipping ALiBi forward at lengths the interpreter cannot run.

    python -m posenc_triton.bench.skip_fractions [--seqlens 4096 16384 65536] [--heads 32]
                                                 [--dim 128] [--block 128 64]

A replica in PyTorch of the forward kernel's skip rule (``kernels/alibi_attention.py``:
``_stages``, the band and the tile before it first, ``_reach``, ``_skip_bounds``), causal,
``skip_tol = 2**-24``, standard slopes, N(0, 1) fp16 inputs: for each query block, the key
tiles the kernel computes against the dense kernel's. It is a prediction, not a count: on a
GPU ``posenc_triton.alibi_tile_counts`` reads the kernels' own counters, and
``tests/test_alibi_skip.py`` checks that this replica gives the kernels' counts where the
interpreter runs them. The dq kernel's bound (the exact log-sum-exp, at least the running
max) skips at least as many key tiles per query block.
"""

from __future__ import annotations

import argparse
import math

import torch

LOG2E = 1.4426950408889634


def forward_tiles(q, k, slopes, block_m: int, block_n: int, skip_tol: float = 2.0 ** -24,
                  scale=None) -> tuple:
    """``(computed, dense)`` key tiles of the causal skipping forward for ``q [H, S, D]``,
    ``k [H, S, D]`` (one sequence, MHA, Sq == Sk) and ``slopes [H]``."""
    heads, seqlen, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    qk_scale = scale * LOG2E
    log2_tol = math.log2(skip_tol) - 1.0
    kmax = torch.linalg.vector_norm(k.float(), dim=-1).amax(-1)  # [H]
    qn = torch.linalg.vector_norm(q.float(), dim=-1)  # [H, S]
    done = dense = 0
    for h in range(heads):
        slope = float(slopes[h]) * LOG2E
        tail = min(math.log2(seqlen), -math.log2(max(1.0 - 2.0 ** -slope, 1e-30)))
        for start in range(0, seqlen, block_m):
            rows = torch.arange(start, min(start + block_m, seqlen))
            a = min(start + 1, seqlen) // block_n * block_n
            b = min(start + block_m, seqlen)
            dense += a // block_n + math.ceil((b - a) / block_n)
            a = max(a - block_n, 0)  # the tile before the band
            keys = torch.arange(a, b)
            s = (q[h, rows].float() @ k[h, keys].float().T) * qk_scale \
                - slope * (rows[:, None] - keys[None, :])
            s = s.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
            m = s.amax(1)
            r = (qk_scale * qn[h, rows] * kmax[h] - m + tail - log2_tol) / slope
            reach = torch.where(r < 2 ** 30, torch.ceil(r), torch.full_like(r, 2 ** 30))
            low = int((rows - reach.clamp(min=0).long()).min()) + 1
            lo = min(max(low, 0) // block_n * block_n, a)
            done += (a - lo) // block_n + math.ceil((b - a) / block_n)
    return done, dense


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, nargs=2, default=[128, 64],
                        metavar=("BLOCK_M", "BLOCK_N"))
    args = parser.parse_args(argv)
    from posenc_triton.alibi import alibi_slopes

    slopes = alibi_slopes(args.heads)
    print("| S | H | D | tile | forward tiles computed / dense |\n| --- | --- | --- | --- | --- |")
    for seqlen in args.seqlens:
        torch.manual_seed(0)
        q, k = (torch.randn(args.heads, seqlen, args.dim).half() for _ in range(2))
        done, dense = forward_tiles(q, k, slopes, *args.block)
        print(f"| {seqlen} | {args.heads} | {args.dim} | {tuple(args.block)} | "
              f"{done / dense:.3f} ({done} / {dense}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
