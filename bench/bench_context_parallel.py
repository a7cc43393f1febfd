"""Context-parallel ALiBi attention benchmark: ring_alibi_attention over the ranks of torchrun.

    torchrun --nproc-per-node N -m posenc_triton.bench.bench_context_parallel [--seqlens ...]

Per sequence length (the whole sequence, ``S / N`` tokens a rank): the ring's forward and
forward+backward (the slowest rank's median, every rank timed by ``triton.testing.do_bench``
between barriers), and at ``N = 1`` or where the full sequence fits one GPU (``--full``),
``alibi_attention`` on the full sequence on rank 0 for comparison: the ring's speed-up is
``full / ring``, ideally ``N``. ``bench/NOTES.md`` has the cost model the figures test.
Needs CUDA and NCCL; ``--cpu-dry-run`` runs the code path on gloo with Triton's interpreter
at toy sizes (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from posenc_triton.bench.common import median_ms, time_ms, use_interpreter


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sharding", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--full", action="store_true",
                        help="also time alibi_attention on the full sequence on rank 0")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def length(args, seqlen, rank, world, device, dtype, timer) -> None:
    """One table row for the ring at ``seqlen`` tokens (and one for the full-sequence call)."""
    from posenc_triton import alibi_attention
    from posenc_triton.distributed import ring_alibi_attention, shard_sequence

    gen = torch.Generator(device=device).manual_seed(seqlen)
    kv_heads = args.kv_heads or args.heads
    q, k, v = (torch.randn((args.batch, h, seqlen, args.head_dim), generator=gen,
                           device=device, dtype=dtype) for h in (args.heads, kv_heads, kv_heads))
    local = [shard_sequence(t, 2, sharding=args.sharding).requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(local[0])

    def forward():
        return ring_alibi_attention(*local, sharding=args.sharding, check_ranks=False)

    times = []
    for fn in (forward, lambda: forward().backward(grad)):
        dist.barrier()
        mine = torch.tensor([timer(fn)], device=device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        times.append(mine.item())
    if rank == 0:
        print(f"| ring S={seqlen} | {times[0]:.3f} | {times[1]:.3f} |", flush=True)
    if rank == 0 and (args.full or world == 1):
        full = [t.detach().requires_grad_() for t in (q, k, v)]
        full_grad = torch.randn_like(q)
        fwd = timer(lambda: alibi_attention(*full))
        both = timer(lambda: alibi_attention(*full).backward(full_grad))
        print(f"| alibi_attention S={seqlen}, one device | {fwd:.3f} | {both:.3f} |", flush=True)


def main() -> int:
    args = parse()
    if args.cpu_dry_run:
        use_interpreter()
        args.seqlens, args.heads, args.head_dim = [16 * int(os.environ["WORLD_SIZE"])], 2, 16
    elif not torch.cuda.is_available():
        raise SystemExit("bench_context_parallel needs CUDA GPUs (one per rank, NCCL); "
                         "--cpu-dry-run runs the code path on gloo")
    backend = "gloo" if args.cpu_dry_run else "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if args.cpu_dry_run else f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device != "cpu":
        torch.cuda.set_device(device)
    timer = median_ms if args.cpu_dry_run else time_ms
    dtype = torch.float32 if args.cpu_dry_run else torch.bfloat16
    if rank == 0:
        name = "CPU dry run" if args.cpu_dry_run else torch.cuda.get_device_name()
        print(f"| {world} x {name}, {args.sharding}, B{args.batch} H{args.heads} "
              f"D{args.head_dim} {str(dtype)[6:]} | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for seqlen in args.seqlens:
        length(args, seqlen, rank, world, device, dtype, timer)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
