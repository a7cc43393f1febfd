"""Ring ALiBi attention (posenc_triton.distributed) against the float64 reference on the full
sequence: spawned processes on gloo (CPU tensors, Triton's interpreter), world sizes 2 and 4.

Each world size runs every case in one spawn (process start-up dominates on CPU); a case is a
function of ``(rank, world, **params)`` that raises on failure, and its test reports every
rank's traceback.
"""

import datetime
import os
import socket
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_alibi_slopes_grad import check_dslopes

from conftest import check_error_rule
from posenc_triton import alibi_ops, alibi_slopes
from posenc_triton.distributed import (
    chunk_ids,
    ring_alibi_attention,
    shard_sequence,
    unshard_sequence,
)
from posenc_triton.reference import alibi_attention_reference

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _slopes(kind, batch, heads, rank=0):
    if kind == "default":
        return None
    if kind == "batch":  # [B, Hq], positive and varied
        return torch.rand(batch, heads, generator=torch.Generator().manual_seed(7)) + 0.05
    if kind == "mixed":  # slopes of 0 for some heads, 1.0 for others, trainable
        return torch.tensor([0.0, 1.0] * (heads // 2) + [0.5] * (heads % 2)).requires_grad_()
    return alibi_slopes(heads).requires_grad_()  # "trainable"


def ring_matches_reference(rank, world, *, sharding, is_causal, dtype, heads, kv_heads, seqlen,
                           head_dim, slopes="default", layout="bhsd", dropout_p=0.0):
    """The ring's output shard and gradient shards (slopes: summed over the group) meet the
    error rule against the float64 reference on the full sequence."""
    batch, seq_dim = 2, 2 if layout == "bhsd" else 1
    gen = torch.Generator().manual_seed(seqlen * 31 + heads)  # the same on every rank
    shape = lambda h: (batch, h, seqlen, head_dim) if layout == "bhsd" else (
        batch, seqlen, h, head_dim)
    q, k, v = (torch.randn(shape(h), generator=gen, dtype=torch.float64)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(shape(heads), generator=gen, dtype=torch.float64)
    slope = _slopes(slopes, batch, heads)
    shards = [shard_sequence(t.to(dtype), seq_dim, sharding=sharding).detach().requires_grad_()
              for t in (q, k, v)]
    torch.manual_seed(1234)  # the ring's dropout key, drawn again below
    out = ring_alibi_attention(*shards, slope, is_causal=is_causal, layout=layout,
                               sharding=sharding, dropout_p=dropout_p)
    out.backward(shard_sequence(grad.to(dtype), seq_dim, sharding=sharding))
    mask = None
    if dropout_p > 0:
        torch.manual_seed(1234)
        mask = _global_dropout_mask(alibi_ops.draw_dropout_seed("cpu"), dropout_p, world,
                                    sharding, batch, heads, seqlen)
    refs = {}
    for name, upcast, cast in (("64", True, torch.float64), ("same", False, dtype)):
        leaves = [t.to(cast).clone().requires_grad_() for t in (q, k, v)]
        ref_slopes = None if slope is None else slope.detach().clone().requires_grad_()
        ref = alibi_attention_reference(*leaves, ref_slopes, is_causal=is_causal, layout=layout,
                                        upcast=upcast, dropout_p=dropout_p, dropout_mask=mask)
        ref.backward(grad.to(cast))
        refs[name] = [ref, *(t.grad for t in leaves),
                      None if ref_slopes is None else ref_slopes.grad]
    got = [out, *(t.grad for t in shards)]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        want, same = (shard_sequence(r[i].detach(), seq_dim, sharding=sharding)
                      for r in (refs["64"], refs["same"]))
        if dtype == torch.float64:  # the reference route: the same maths
            torch.testing.assert_close(got[i].detach(), want)
        else:
            check_error_rule(f"rank {rank} {name}", got[i].detach(), want, same, dtype)
    if slope is not None and slope.requires_grad:  # the shares sum to the gradient
        share = slope.grad.clone()
        dist.all_reduce(share)
        if dtype == torch.float64:
            torch.testing.assert_close(share.double(), refs["64"][4].double())
        else:
            check_dslopes(share, refs["64"][4].double(), refs["same"][4], dtype)


def _global_dropout_mask(seed, p, world, sharding, batch, heads, seqlen):
    """The keep-mask the ring draws, as one ``[B, Hq, S, S]``: pair ``(qc, kc)`` of chunks
    under the key ``seed + qc * n + kc``."""
    n = world * (2 if sharding == "zigzag" else 1)
    c = seqlen // n
    mask = torch.ones(batch, heads, seqlen, seqlen, dtype=torch.bool)
    for qc in range(n):
        for kc in range(n):
            mask[..., qc * c:(qc + 1) * c, kc * c:(kc + 1) * c] = alibi_ops.dropout_keep_mask(
                seed + qc * n + kc, p, batch, heads, c, c)
    return mask


def local_positions_fail(rank, world, **params):
    """A ring that drops the global offsets (every pair at local positions) must fail."""
    fwd, bwd = alibi_ops.launch_alibi_fwd, alibi_ops.launch_alibi_bwd
    alibi_ops.launch_alibi_fwd = lambda *a, pos_offset=0, **kw: fwd(*a, **kw)
    alibi_ops.launch_alibi_bwd = lambda *a, pos_offset=0, **kw: bwd(*a, **kw)
    try:
        ring_matches_reference(rank, world, **params)
    except AssertionError:
        return
    finally:
        alibi_ops.launch_alibi_fwd, alibi_ops.launch_alibi_bwd = fwd, bwd
    raise AssertionError("the ring met the rule with local positions: the test cannot fail")


def bad_input(rank, world, *, what):
    """A clear error on every rank, never a hang (the group has a timeout)."""
    q = torch.randn(1, 2, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    expect, call = ValueError, None
    if what == "uneven":
        s = 8 if rank == 0 else 4
        q, k, v = (t[:, :, :s] for t in (q, k, v))
        match = "ranks disagree on q.shape"
    elif what == "slopes":
        call = lambda: ring_alibi_attention(q, k, v, torch.full((2,), 0.5 + rank))
        match = "slopes differ across ranks"
    elif what == "device":
        q, k, v = (t.to("meta") for t in (q, k, v))
        match = "cannot send meta tensors"
    elif what == "lengths":
        k = v = k[:, :, :6]
        match = "k and v have 6 tokens but q has 8"
    elif what == "odd":
        q, k, v = (t[:, :, :7] for t in (q, k, v))
        match = "S_local must be even"
    elif what == "sharding":
        call = lambda: ring_alibi_attention(q, k, v, sharding="ring")
        match = "sharding must be one of"
    elif what == "shard":
        call = lambda: shard_sequence(torch.randn(2, 6 * world + 2), 1)
        match = "not a multiple of"
    call = call or (lambda: ring_alibi_attention(q, k, v))
    with pytest.raises(expect, match=match):
        call()


def shards_round_trip(rank, world, *, sharding):
    """``unshard(shard(x)) == x``, the shards in the documented order, and the gradient of a
    shard through ``unshard`` sums every rank's."""
    x = torch.arange(2 * 4 * world * 3, dtype=torch.float64).reshape(2, 4 * world, 3)
    local = shard_sequence(x, 1, sharding=sharding).requires_grad_()
    chunks = x.chunk(world * (2 if sharding == "zigzag" else 1), 1)
    assert torch.equal(local, torch.cat([chunks[c] for c in chunk_ids(rank, world, sharding)], 1))
    full = unshard_sequence(local, 1, sharding=sharding)
    assert torch.equal(full, x)
    (full * (rank + 1)).sum().backward()  # every rank's loss weighs the whole sequence
    assert torch.equal(local.grad, torch.full_like(local, world * (world + 1) / 2))


def _case(check, **params):
    return check, params


CASES = {
    2: {
        "zigzag causal fp32 GQA trainable": _case(ring_matches_reference,
            sharding="zigzag", is_causal=True, dtype=torch.float32, heads=6, kv_heads=2,
            seqlen=48, head_dim=24, slopes="trainable"),
        "zigzag symmetric bf16 bshd [B, Hq]": _case(ring_matches_reference,
            sharding="zigzag", is_causal=False, dtype=torch.bfloat16, heads=4, kv_heads=4,
            seqlen=40, head_dim=16, slopes="batch", layout="bshd"),
        "contiguous causal bf16 MQA": _case(ring_matches_reference,
            sharding="contiguous", is_causal=True, dtype=torch.bfloat16, heads=4, kv_heads=1,
            seqlen=36, head_dim=32),
        "contiguous symmetric fp32 slopes 0 and 1": _case(ring_matches_reference,
            sharding="contiguous", is_causal=False, dtype=torch.float32, heads=3, kv_heads=3,
            seqlen=32, head_dim=16, slopes="mixed", layout="bshd"),
        "zigzag causal fp32 dropout": _case(ring_matches_reference,
            sharding="zigzag", is_causal=True, dtype=torch.float32, heads=2, kv_heads=2,
            seqlen=32, head_dim=16, slopes="trainable", dropout_p=0.25),
        "zigzag causal float64 reference route": _case(ring_matches_reference,
            sharding="zigzag", is_causal=True, dtype=torch.float64, heads=2, kv_heads=1,
            seqlen=24, head_dim=8, slopes="trainable"),
        "local positions fail": _case(local_positions_fail,
            sharding="zigzag", is_causal=True, dtype=torch.float32, heads=2, kv_heads=2,
            seqlen=32, head_dim=16),
        **{f"bad input: {what}": _case(bad_input, what=what) for what in (
            "uneven", "slopes", "device", "lengths", "odd", "sharding", "shard")},
        **{f"round trip {s}": _case(shards_round_trip, sharding=s) for s in (
            "zigzag", "contiguous")},
    },
    4: {
        "zigzag causal bf16 GQA trainable": _case(ring_matches_reference,
            sharding="zigzag", is_causal=True, dtype=torch.bfloat16, heads=4, kv_heads=2,
            seqlen=64, head_dim=16, slopes="trainable"),
        "contiguous symmetric fp32 [B, Hq]": _case(ring_matches_reference,
            sharding="contiguous", is_causal=False, dtype=torch.float32, heads=2, kv_heads=1,
            seqlen=48, head_dim=16, slopes="batch"),
        "local positions fail": _case(local_positions_fail,
            sharding="contiguous", is_causal=True, dtype=torch.float32, heads=2, kv_heads=2,
            seqlen=32, head_dim=16),
        "bad input: uneven": _case(bad_input, what="uneven"),
        "round trip zigzag": _case(shards_round_trip, sharding="zigzag"),
    },
}


def _worker(rank, world, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    failures = {}
    for name, (case, params) in CASES[world].items():
        try:
            case(rank, world, **params)
        except Exception:  # reported by the test of the case
            failures[name] = traceback.format_exc()
    torch.save(failures, os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ring_failures():
    """``{world: {case: [traceback per failing rank]}}``, one spawn per world size."""
    found = {}
    for world in CASES:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_worker, args=(world, _free_port(), folder), nprocs=world, join=True)
            found[world] = {}
            for rank in range(world):
                for name, error in torch.load(os.path.join(folder, f"{rank}.pt")).items():
                    found[world].setdefault(name, []).append(f"rank {rank}:\n{error}")
    return found


@pytest.mark.parametrize("world, name", [(w, n) for w in CASES for n in CASES[w]])
def test_ring(ring_failures, world, name):
    errors = ring_failures[world].get(name)
    assert not errors, "\n".join(errors)



def test_benchmark_runs_under_torchrun_on_cpu():
    # the multi-GPU benchmark's code path, on gloo: torchrun, two ranks, a table from rank 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), "-m",
               "posenc_triton.bench.bench_context_parallel", "--cpu-dry-run", "--full"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ring S=32 |" in result.stdout and "alibi_attention S=32" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_benchmark_without_cuda_says_what_it_needs():
    result = subprocess.run([sys.executable, "-m", "posenc_triton.bench.bench_context_parallel"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "needs CUDA GPUs" in result.stderr
