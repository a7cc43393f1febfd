"""RoPE benchmark: posenc_triton.apply_rope against eager PyTorch, torch.compile, Liger, flash-attn.

    python -m posenc_triton.bench.bench_rope [--out DIR] [--quick]

(``posenc-bench`` runs it with the others.)

bf16, layout bshd, rotate-half, q and k rotated by one call. Columns:

* ours: ``apply_rope(q, k, cos, sin, position_ids=..., seqlen_offsets=...)`` on the float32
  ``[T, R/2]`` tables. With tensor positions (decode, packed) it checks them against the
  table, one device sync per call.
* ours (unchecked): the same with ``check_positions=False`` (no sync; a position past the
  table would give NaN), like the peers, which check nothing; "n/a" without tensor
  positions, where the two are the same call.
* eager: Hugging Face Llama's ``apply_rotary_pos_emb`` (``q*cos + rotate_half(q)*sin``) on
  cos/sin already gathered per position as ``[B|1, S, D]`` in q's dtype: Hugging Face builds
  those once per model forward and shares them across layers, so they are built untimed.
* compile: ``torch.compile(dynamic=False)`` of that eager function.
* liger / flash-attn: Liger-Kernel's ``LigerRopeFunction`` (in place, on the gathered
  cos/sin) and flash-attn's ``apply_rotary_emb`` (one call for q, one for k, on bf16 tables,
  ``cu_seqlens`` for the packed case), when importable; "n/a" otherwise.

Modes: fwd; bwd = ``torch.autograd.grad`` through a retained graph (forward untimed);
fwd+bwd = forward then ``torch.autograd.grad``. Decode shapes run fwd only and also report
host µs per call (``common.host_us``). GB/s = (bytes read + bytes written) / time with q and
k each read once and written once (gradients likewise in bwd; twice in fwd+bwd); cos/sin and
positions are not counted. The copy column is ``common.copy_gbps`` measured in the same run.

Before timing, every implementation's output (fwd) or gradients (bwd modes) is compared
with ``reference.apply_rope_reference`` in float64; a failure prints "FAIL" beside the time.

For developers: ``--cpu-dry-run`` runs the same code on CPU with tiny shapes (perf_counter
timer, Triton's interpreter) to test this script; its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch

from . import common

DTYPE = torch.bfloat16
IMPLS = ["ours", "ours (unchecked)", "eager", "compile", "liger", "flash-attn"]
TOLERANCE = 2e-2  # largest error / largest |reference|: a few bf16 ulps (eager rounds 3 times)



def peers() -> dict:
    """The optional peers, imported only now: a dry run must set TRITON_INTERPRET first."""
    flash = common.optional("flash_attn.layers.rotary:apply_rotary_emb")
    return {
        "liger": common.optional("liger_kernel.ops.rope:LigerRopeFunction.apply",
                                 "liger_kernel.transformers.rope:liger_rotary_pos_emb"),
        "flash": flash or common.optional("flash_attn.ops.triton.rotary:apply_rotary"),
        "flash_autograd": flash is not None,
    }


@dataclasses.dataclass
class Case:
    name: str
    batch: int
    seqlen: int
    hq: int
    hk: int
    dim: int
    kind: str = "prefill"  # "decode": S=1, per-batch seqlen_offsets; "packed": position_ids
    lens: tuple = ()  # packed sequence lengths
    table: int = 4096  # cos/sin rows (decode positions are drawn below it)

    @property
    def modes(self):
        return ("fwd",) if self.kind == "decode" else ("fwd", "bwd", "fwd+bwd")


def cases(quick: bool, dry: bool) -> list:
    if dry:
        return [Case("q[2,64,4,32] k2", 2, 64, 4, 2, 32, table=64),
                Case("decode B3 q4 k2 D32", 3, 1, 4, 2, 32, "decode", table=64),
                Case("packed S48 (3 seqs)", 1, 48, 4, 2, 32, "packed", (16, 8, 24), table=24)]
    lens = (4096, 2048, 6144, 1024, 3072)
    full = [Case("q[8,4096,32,128] k8", 8, 4096, 32, 8, 128),
            Case("q[8,4096,32,128] k32", 8, 4096, 32, 32, 128),
            *(Case(f"decode B{b} q32 k8 D128", b, 1, 32, 8, 128, "decode") for b in (1, 16, 64)),
            Case("packed S16384 (5 seqs) q32 k8", 1, 16384, 32, 8, 128, "packed", lens, 6144)]
    return [full[0], full[3], full[5]] if quick else full


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin):
    """Hugging Face Llama's ``apply_rotary_pos_emb`` on bshd (cos/sin ``[B or 1, S, D]``)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    grad_q: torch.Tensor
    grad_k: torch.Tensor
    cos: torch.Tensor  # [T, R/2] float32
    sin: torch.Tensor
    position_ids: Optional[torch.Tensor]
    offsets: object  # int or [B] tensor
    cos_hf: torch.Tensor  # [B|1, S, D], q's dtype
    sin_hf: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]


def make_inputs(case: Case, posenc_triton) -> Inputs:
    dev = common.DEVICE
    q, grad_q = (torch.randn(case.batch, case.seqlen, case.hq, case.dim, device=dev, dtype=DTYPE)
                 for _ in range(2))
    k, grad_k = (torch.randn(case.batch, case.seqlen, case.hk, case.dim, device=dev, dtype=DTYPE)
                 for _ in range(2))
    inv_freq, scaling = posenc_triton.rope_frequencies(case.dim, device=dev)
    cos, sin = posenc_triton.rope_cos_sin(case.table, inv_freq, scaling)
    position_ids, offsets, cu_seqlens = None, 0, None
    if case.kind == "decode":
        offsets = torch.randint(0, case.table - 1, (case.batch,), device=dev, dtype=torch.int32)
        positions = offsets[:, None].long()
    elif case.kind == "packed":
        position_ids = torch.cat([torch.arange(n, device=dev) for n in case.lens])
        positions = position_ids[None]
        cu_seqlens = torch.tensor([0, *itertools.accumulate(case.lens)], device=dev,
                                  dtype=torch.int32)
    else:
        positions = torch.arange(case.seqlen, device=dev)[None]
    cos_hf, sin_hf = (torch.cat((t, t), -1)[positions].to(DTYPE) for t in (cos, sin))
    return Inputs(q, k, grad_q, grad_k, cos, sin, position_ids, offsets, cos_hf, sin_hf,
                  cu_seqlens)


def implementations(case: Case, x: Inputs, posenc_triton, found: dict) -> dict:
    """``{name: fn(q, k) -> (q_out, k_out)}``; None for a peer that is not installed."""
    compiled = torch.compile(hf_rope, dynamic=False)
    def ours(check):
        return lambda q, k: posenc_triton.apply_rope(
            q, k, x.cos, x.sin, position_ids=x.position_ids, seqlen_offsets=x.offsets,
            check_positions=check)

    tensor_positions = x.position_ids is not None or isinstance(x.offsets, torch.Tensor)
    impls = {
        "ours": ours(True),
        "ours (unchecked)": ours(False) if tensor_positions else None,
        "eager": lambda q, k: hf_rope(q, k, x.cos_hf, x.sin_hf),
        "compile": lambda q, k: compiled(q, k, x.cos_hf, x.sin_hf),
        "liger": None, "flash-attn": None,
    }
    liger, flash_rotary = found["liger"], found["flash"]
    if liger is not None:  # Liger takes HF's [B, H, S, D] views of bshd memory
        impls["liger"] = lambda q, k: tuple(t.transpose(1, 2) for t in liger(
            q.transpose(1, 2), k.transpose(1, 2), x.cos_hf, x.sin_hf))
    if flash_rotary is not None:
        cos, sin = x.cos.to(DTYPE), x.sin.to(DTYPE)  # flash-attn wants the input's dtype

        def flash(q, k):
            if x.cu_seqlens is None:
                return tuple(flash_rotary(t, cos, sin, seqlen_offsets=x.offsets) for t in (q, k))
            return tuple(flash_rotary(t[0], cos, sin, cu_seqlens=x.cu_seqlens,
                                       max_seqlen=max(case.lens))[None] for t in (q, k))

        impls["flash-attn"] = flash
    return impls


def expected(x: Inputs, reference) -> dict:
    """Float64 reference: outputs and the gradients of ``<out, grad>``."""
    q, k = (t.double().requires_grad_() for t in (x.q, x.k))
    out = reference.apply_rope_reference(q, k, x.cos.double(), x.sin.double(),
                                         position_ids=x.position_ids, seqlen_offsets=x.offsets)
    grads = torch.autograd.grad(out, (q, k), (x.grad_q.double(), x.grad_k.double()))
    return {"fwd": tuple(t.detach().float() for t in out), "grad": tuple(t.float() for t in grads)}


def measure(row: dict, impl, case: Case, mode: str, x: Inputs, ref: dict) -> None:
    """Check ``impl`` in ``mode``, then time it; figures go into ``row``."""
    # Fresh copies per implementation: Liger rotates its inputs and gradients in place.
    q, k, grad_q, grad_k = (t.clone() for t in (x.q, x.k, x.grad_q, x.grad_k))
    if mode == "fwd":
        def run():
            return impl(q, k)
    else:
        q.requires_grad_()
        k.requires_grad_()
        outs = impl(q, k) if mode == "bwd" else None

        def run():
            return torch.autograd.grad(outs if mode == "bwd" else impl(q, k), (q, k),
                                       (grad_q, grad_k), retain_graph=mode == "bwd")
    err = common.max_rel_error(run(), ref["fwd" if mode == "fwd" else "grad"])
    row.update(err=err, check="ok" if err <= TOLERANCE else "FAIL")
    row["ms"] = common.time_ms(run)
    nbytes = 2 * (x.q.numel() + x.k.numel()) * x.q.element_size()
    row["gbps"] = common.gbps(nbytes * (2 if mode == "fwd+bwd" else 1), row["ms"])
    if case.kind == "decode":
        row["host_us"] = common.host_us(run)


def run_case(report: common.Report, case: Case, found: dict, posenc_triton, reference,
             modes=None) -> None:
    """Every implementation of ``case`` in ``modes`` (default: the case's own) into ``report``."""
    torch._dynamo.reset()  # one compiled graph per shape, never past the recompile limit
    x = make_inputs(case, posenc_triton)
    ref = expected(x, reference)
    impls = implementations(case, x, posenc_triton, found)
    for mode, name in itertools.product(modes or case.modes, IMPLS):
        row = report.add(case=case.name, mode=mode, impl=name)
        if impls[name] is None:
            row["note"] = "n/a"
        elif name == "flash-attn" and mode != "fwd" and not found["flash_autograd"]:
            row["note"] = "n/a (no autograd entry point)"
        else:
            report.measure(row, measure, impls[name], case, mode, x, ref)


def main(out_dir=common.RESULTS, quick: bool = False, dry: bool = False) -> common.Report:
    # Imported here, not at the top: a dry run sets TRITON_INTERPRET first.
    import posenc_triton
    from posenc_triton import reference

    torch.manual_seed(0)
    found = peers()
    report = common.Report("rope", IMPLS, "gbps", "GB/s", DTYPE)
    copy = common.copy_gbps(1 << 30 if common.HAS_CUDA else 1 << 24)
    report.env["copy_gbps"] = copy
    report.ceiling = ("device-to-device copy", copy)
    print(f"device-to-device copy: {copy:.0f} GB/s", flush=True)
    for case in common.progress(cases(quick, dry), "rope"):
        run_case(report, case, found, posenc_triton, reference)
        report.save_rows(out_dir)
    tables(report, copy, {c.name for c in cases(quick, dry) if c.kind == "decode"})
    report.write(out_dir)
    return report


def tables(report: common.Report, copy: float, decode=()) -> None:
    """The time, bandwidth (against ``copy`` GB/s) and, for the ``decode`` cases, host-time
    tables of ``report``'s rows."""
    report.table("Time (ms, median)", "ms", "{:.4f}",
                 [("ours/compile", lambda r: common.ratio(r, "ours", "compile"))])
    report.table("Bandwidth (GB/s, q and k read + written)", "gbps", "{:.0f}",
                 [("copy", lambda r: f"{copy:.0f}"),
                  ("ours/copy", lambda r: f"{r['ours']['gbps'] / copy:.2f}"
                   if r["ours"].get("gbps") else "-")])
    if decode:
        report.table("Decode host time (µs per call, no sync between calls)", "host_us",
                     "{:.1f}", [("ours/fastest peer", lambda r: _vs_fastest_peer(r, "ours")),
                                ("unchecked/fastest peer",
                                 lambda r: _vs_fastest_peer(r, "ours (unchecked)"))],
                     where=lambda case, mode: case in decode)


def _vs_fastest_peer(by_impl: dict, name: str) -> str:
    peers = [r["host_us"] for n, r in by_impl.items()
             if not n.startswith("ours") and r.get("host_us")]
    ours = by_impl.get(name, {}).get("host_us")
    return f"{ours / min(peers):.2f}" if ours and peers else "-"


if __name__ == "__main__":
    raise SystemExit(common.run_script(__doc__, main))
