"""ALiBi attention benchmark: posenc_triton.alibi_attention against FlexAttention, SDPA, eager.

    python -m posenc_triton.bench.bench_alibi [--out DIR] [--quick]

(``posenc-bench`` runs it with the others.)

bf16, layout bhsd, default scale 1/sqrt(D), bottom-right causal alignment. Columns:

* ours: ``alibi_attention(q, k, v, slopes, is_causal=...)`` (GQA native; certified tile
  skipping on, its default), with the fraction of the dense kernels' tiles it computed
  (``alibi_tile_counts``, the kernels' own counters) beside the times.
* ours (skip_tol=0): the same kernels computing every tile (the base where the float32
  reference does not fit).
* flex: ``torch.compile(flex_attention)`` with an ALiBi ``score_mod``
  (``score - slope[h] * (q_idx + Sk - Sq - kv_idx)``, absolute value when not causal), a
  bottom-right causal ``create_block_mask`` (built untimed), ``enable_gqa=True`` for GQA.
* sdpa+bias: ``F.scaled_dot_product_attention`` with the ALiBi bias materialised
  ``[1, H, Sq, Sk]`` in bf16 (built untimed, as a model builds it once for all layers) and
  k/v repeated for GQA inside the timing.
* eager: ``reference.alibi_attention_reference(..., upcast=False)`` (bf16 matmuls, fp32
  softmax); "skipped (memory)" when its fp32 ``B*H*Sq*Sk`` scores would pass 8 GiB.
* sdpa (no bias): plain SDPA, causal (bottom-right via ``causal_lower_right`` when
  Sq != Sk): the ceiling, not ALiBi, so not checked.

Packed cases (``lengths``) hold several sequences in one batch row of ``T = sum(lengths)``
tokens: ours takes them as ``[T, H, D]`` views with ``cu_seqlens`` (and ``max_seqlen_*``, so
no sync); flex uses a document block mask; sdpa+bias a block-diagonal bias; eager the
per-sequence reference; the bias-free SDPA ceiling does not apply.

Modes: fwd, and fwd+bwd (forward then ``torch.autograd.grad`` for q, k, v). TFLOP/s:
``4*B*Hq*Sq*Sk*D`` times the visible fraction (0.5 causal when Sq == Sk, counted exactly
otherwise), x3.5 for fwd+bwd. Peak memory is the CUDA peak of one call, inputs included.
The long-context cases (B1 H32 D128 causal, S = 16384 and 65536) are skipping's: ours
against flex and against itself at ``skip_tol=0``. The last case (S=65536 H8) is a memory
check: ours only, fwd+bwd.

Before timing, outputs (fwd) or gradients (fwd+bwd) are compared with the float32
reference where its scores fit in 8 GiB, else with ours; a failure prints "FAIL".

Decode cases (mode "decode": KV-cache decoding and chunked prefill, bf16, Hq 32 / Hk 8,
D 128, B 1/16/64, Sk 4096 and 32768, Sq 1 and 16, causal) time the forward: ours (the
split-KV path, chosen by shape), flex with the same ``score_mod`` and ``enable_gqa``, and
sdpa+bias with ``enable_gqa``. GB/s is the bytes of K and V read per second, against the
copy bandwidth (bytes read + written per second of a 1 GiB device-to-device copy) measured
in the same run; host µs per call (calls back to back, no sync) at B=1.

For developers: ``--cpu-dry-run`` runs the same code on CPU with tiny shapes (perf_counter
timer, Triton's interpreter) to test this script; its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import common

DTYPE = torch.bfloat16
IMPLS = ["ours", "ours (skip_tol=0)", "flex", "sdpa+bias", "eager", "sdpa (no bias)"]
TOLERANCE = 3e-2  # largest error / largest |expected|, bf16 attention outputs and gradients
EAGER_LIMIT = 8 << 30  # bytes of fp32 scores beyond which the eager reference is skipped
BIAS_LIMIT = 16 << 30  # bytes of materialised bf16 bias beyond which sdpa+bias is skipped
PACKED_LENGTHS = (4096, 1024, 3000, 512, 2048, 1800, 2500, 1404)  # 16384 tokens


@dataclasses.dataclass
class Case:
    name: str
    batch: int
    hq: int
    hk: int
    sq: int
    sk: int
    dim: int
    causal: bool = True
    memory_check: bool = False  # ours only, fwd+bwd, peak memory is the point
    lengths: tuple = ()  # packed: the sequences in one batch row (sq = sk = their sum)

    @property
    def modes(self):
        return ("fwd+bwd",) if self.memory_check else ("fwd", "fwd+bwd")

    def flops(self) -> float:
        """Forward FLOPs: two matmuls of 2*D per visible (query, key) pair."""
        if self.lengths:
            pairs = sum(n * (n + 1) // 2 if self.causal else n * n for n in self.lengths)
            return 4.0 * self.batch * self.hq * pairs * self.dim
        if not self.causal:
            visible = 1.0
        elif self.sq == self.sk:
            visible = 0.5
        else:  # bottom-right: query i sees keys j <= i + Sk - Sq
            pairs = sum(min(max(i + self.sk - self.sq + 1, 0), self.sk) for i in range(self.sq))
            visible = pairs / (self.sq * self.sk)
        return 4.0 * self.batch * self.hq * self.sq * self.sk * self.dim * visible


def cases(quick: bool, dry: bool) -> list:
    if dry:
        return [Case("B1 H4 S64 D32 causal", 1, 4, 4, 64, 64, 32),
                Case("B1 H4 S64 D32 non-causal", 1, 4, 4, 64, 64, 32, causal=False),
                Case("GQA B1 Hq4 Hk2 S64 D32", 1, 4, 2, 64, 64, 32),
                Case("chunk B1 H4 Sq16 Sk64 D32", 1, 4, 4, 16, 64, 32),
                Case("packed 3 seqs T64 H4 D32", 1, 4, 4, 64, 64, 32, lengths=(20, 7, 37)),
                Case("memory B1 H2 S128 D32", 1, 2, 2, 128, 128, 32, memory_check=True)]
    full = [Case("B2 H32 S4096 D128 causal", 2, 32, 32, 4096, 4096, 128),
            Case("B2 H32 S4096 D128 non-causal", 2, 32, 32, 4096, 4096, 128, causal=False),
            Case("B1 H32 S16384 D128 causal", 1, 32, 32, 16384, 16384, 128),
            Case("B1 H32 S65536 D128 causal", 1, 32, 32, 65536, 65536, 128),
            Case("B4 H16 S2048 D64 causal", 4, 16, 16, 2048, 2048, 64),
            Case("GQA B2 Hq32 Hk8 S4096 D128", 2, 32, 8, 4096, 4096, 128),
            Case("chunk B2 H32 Sq128 Sk8192 D128", 2, 32, 32, 128, 8192, 128),
            Case("packed 8 seqs T16384 H32 D128 causal", 1, 32, 32, 16384, 16384, 128,
                 lengths=PACKED_LENGTHS),
            Case("memory B1 H8 S65536 D128", 1, 8, 8, 65536, 65536, 128, memory_check=True)]
    return [full[0], full[6], full[7]] if quick else full


def decode_cases(quick: bool, dry: bool) -> list:
    """Few query rows against a long KV cache: the split-KV path's shapes."""
    if dry:  # Sk past alibi_decode.MIN_SEQLEN_K, so the split path runs
        return [Case("decode B1 Sq2 Sk520 Hq2/1 D16", 1, 2, 1, 2, 520, 16)]
    full = [Case(f"decode B{b} Sq{sq} Sk{sk} Hq32/8 D128", b, 32, 8, sq, sk, 128)
            for b in (1, 16, 64) for sk in (4096, 32768) for sq in (1, 16)]
    full.append(Case("decode B1 Sq1 Sk65536 Hq32/8 D128", 1, 32, 8, 1, 65536, 128))
    return [full[2], full[5], full[-1]] if quick else full


def materialised_bias(slopes, case: Case, reference) -> torch.Tensor:
    """``[1, H, Sq, Sk]`` bf16 ALiBi bias, built head by head (fp32 distances are exact);
    block-diagonal for packed cases (``-inf`` across sequences)."""
    if case.lengths:
        bias = torch.full((1, case.hq, case.sq, case.sk), float("-inf"), device=slopes.device,
                          dtype=DTYPE)
        for start, n in zip(starts(case.lengths), case.lengths):
            bias[:, :, start:start + n, start:start + n] = reference.alibi_bias(
                slopes, n, n, case.causal)
        return bias
    bias = torch.empty(1, case.hq, case.sq, case.sk, device=slopes.device, dtype=DTYPE)
    for h in range(case.hq):
        bias[:, h] = reference.alibi_bias(slopes[h:h + 1], case.sq, case.sk, case.causal)[0]
    return bias


def starts(lengths) -> list:
    """First token of each packed sequence."""
    return [sum(lengths[:i]) for i in range(len(lengths))]


def cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([*starts(lengths), sum(lengths)], dtype=torch.int32, device=device)


def packed(fn):
    """``fn`` on ``[T, H, D]`` views of ``[1, H, T, D]`` tensors, its output viewed back."""
    return lambda q, k, v: fn(*(t[0].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)[None]


def implementations(case: Case, slopes, posenc_triton, reference) -> dict:
    """``{name: factory}``: ``factory()`` builds ``fn(q, k, v) -> out`` (masks, bias, compiled
    function), or returns a string saying why that column is not run."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shift, group, gqa = case.sk - case.sq, case.hq // case.hk, case.hq != case.hk

    if case.lengths:
        cu = cu_seqlens(case.lengths, common.DEVICE)
        doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=common.DEVICE),
                                      torch.tensor(case.lengths, device=common.DEVICE))

    def ours(skip_tol=posenc_triton.alibi_skip.DEFAULT_SKIP_TOL):
        if case.lengths:
            longest = max(case.lengths)
            return packed(lambda q, k, v: posenc_triton.alibi_attention(
                q, k, v, slopes, is_causal=case.causal, cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=longest, max_seqlen_k=longest, skip_tol=skip_tol))
        return lambda q, k, v: posenc_triton.alibi_attention(q, k, v, slopes,
                                                             is_causal=case.causal,
                                                             skip_tol=skip_tol)

    def flex():
        def score_mod(score, b, h, q_idx, kv_idx):
            dist = q_idx + shift - kv_idx
            return score - slopes[h] * (dist if case.causal else dist.abs())

        def visible(b, h, q_idx, kv_idx):
            seen = q_idx + shift >= kv_idx
            if case.lengths:
                same = doc[q_idx] == doc[kv_idx]
                return same & seen if case.causal else same
            return seen

        block_mask = None
        if case.causal or case.lengths:
            block_mask = create_block_mask(visible, None, None, case.sq, case.sk,
                                           device=common.DEVICE)
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                        enable_gqa=gqa)

    def sdpa_bias():
        if case.hq * case.sq * case.sk * 2 > BIAS_LIMIT:
            return "skipped (memory)"
        bias = materialised_bias(slopes, case, reference)

        def repeat(t):
            return t.repeat_interleave(group, dim=1) if gqa else t

        return lambda q, k, v: F.scaled_dot_product_attention(q, repeat(k), repeat(v),
                                                              attn_mask=bias)

    def eager():
        if case.lengths:
            return packed(lambda q, k, v: reference.alibi_attention_varlen_reference(
                q, k, v, cu, cu, slopes, is_causal=case.causal, upcast=False))
        if case.batch * case.hq * case.sq * case.sk * 4 > EAGER_LIMIT:
            return "skipped (memory)"
        return lambda q, k, v: reference.alibi_attention_reference(
            q, k, v, slopes, is_causal=case.causal, upcast=False)

    def ceiling():
        if case.lengths:
            return "n/a (packed)"
        lower_right = case.causal and case.sq != case.sk
        mask = causal_lower_right(case.sq, case.sk) if lower_right else None
        return lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=case.causal and not lower_right, enable_gqa=gqa)

    if case.memory_check:
        return {"ours": ours}
    return {"ours": ours, "ours (skip_tol=0)": lambda: ours(0.0), "flex": flex,
            "sdpa+bias": sdpa_bias, "eager": eager, "sdpa (no bias)": ceiling}


def tile_fractions(case: Case, q, k, v, slopes, posenc_triton) -> dict:
    """``{mode: tiles computed / dense}`` of ours on these inputs, from the kernels' counters
    (``fwd+bwd``: forward, dq and dkdv together; ``decode``: the split-KV forward, and
    ``"bytes"``: K/V bytes read / dense)."""
    kwargs = {"is_causal": case.causal}
    if case.lengths:
        cu, longest = cu_seqlens(case.lengths, q.device), max(case.lengths)
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
        kwargs.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                      max_seqlen_k=longest)
    counts = posenc_triton.alibi_tile_counts(q, k, v, slopes, **kwargs)
    frac = lambda names: (sum(counts[n][0] for n in names)
                          / max(sum(counts[n][1] for n in names), 1))
    out = {"fwd": frac(["forward"]), "fwd+bwd": frac(["forward", "dq", "dkdv"]),
           "decode": frac(["forward"])}
    if "bytes" in counts:
        out["bytes"] = frac(["bytes"])
    return out


def runner(impl, mode: str, q, k, v, grad_out):
    """A call of ``impl`` in ``mode``, returning the tensors to check."""
    if mode == "fwd":
        return lambda: (impl(q, k, v),)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return lambda: torch.autograd.grad(impl(q, k, v), (q, k, v), grad_out)


def measure(row: dict, run, case: Case, mode: str, expected) -> None:
    """Check ``run()`` against ``expected`` (a string: why not), then time it."""
    result = run()
    if isinstance(expected, str):
        row["check"] = expected
    elif case.memory_check:
        row["check"] = "ok" if all(torch.isfinite(t).all() for t in result) else "FAIL"
    else:
        row["err"] = common.max_rel_error(result, expected)
        row["check"] = "ok" if row["err"] <= TOLERANCE else "FAIL"
    del result
    row["ms"] = common.time_ms(run)
    row["tflops"] = case.flops() * (3.5 if mode == "fwd+bwd" else 1.0) / row["ms"] / 1e9
    row["peak_gib"] = common.peak_gib(run)


def run_case(report: common.Report, case: Case, posenc_triton, reference, modes=None) -> None:
    """Every implementation of ``case`` in ``modes`` (default: the case's own) into ``report``."""
    torch._dynamo.reset()  # one compiled graph per shape, never past the recompile limit
    dev = common.DEVICE
    q, grad_out = (torch.randn(case.batch, case.hq, case.sq, case.dim, device=dev, dtype=DTYPE)
                   for _ in range(2))
    k, v = (torch.randn(case.batch, case.hk, case.sk, case.dim, device=dev, dtype=DTYPE)
            for _ in range(2))
    slopes = posenc_triton.alibi_slopes(case.hq, device=dev)
    impls = {}
    for name, factory in implementations(case, slopes, posenc_triton, reference).items():
        fn, note = common.attempt(factory)
        impls[name] = fn if fn is not None else note
    # Every output must match the float32 reference where its scores fit, else ours.
    # (Packed: one sequence at a time, whose scores always fit.)
    fits = bool(case.lengths) or case.batch * case.hq * case.sq * case.sk * 4 <= EAGER_LIMIT
    fractions = {} if case.memory_check else tile_fractions(case, q, k, v, slopes,
                                                            posenc_triton)

    def base(a, b, c):
        if case.lengths:
            cu = cu_seqlens(case.lengths, dev)
            return packed(lambda *t: reference.alibi_attention_varlen_reference(
                *t, cu, cu, slopes, is_causal=case.causal))(a, b, c)
        if fits:
            return reference.alibi_attention_reference(a, b, c, slopes, is_causal=case.causal)
        return impls["ours (skip_tol=0)"](a, b, c)

    for mode in modes or case.modes:
        expected = "memory check: finite" if case.memory_check else None
        if expected is None:
            expected, note = common.attempt(runner(base, mode, q, k, v, grad_out))
            expected = note or expected
        for name, impl in impls.items():
            row = report.add(case=case.name, mode=mode, impl=name)
            if not callable(impl):
                row["note"] = impl
                continue
            check = expected
            if name == "sdpa (no bias)":
                check = "none (no ALiBi)"
            elif name == "ours (skip_tol=0)" and not fits:
                check = "none (the base)"
            if name == "ours" and mode in fractions:
                row["tiles"] = fractions[mode]
            report.measure(row, measure, runner(impl, mode, q, k, v, grad_out), case, mode,
                           check)


def run_decode_case(report: common.Report, case: Case, posenc_triton, reference,
                    copy_gbps: float) -> None:
    """ours, flex and sdpa+bias forward on one decode shape, checked against the float32
    reference, into ``report`` (mode "decode")."""
    torch._dynamo.reset()
    dev = common.DEVICE
    q = torch.randn(case.batch, case.hq, case.sq, case.dim, device=dev, dtype=DTYPE)
    k, v = (torch.randn(case.batch, case.hk, case.sk, case.dim, device=dev, dtype=DTYPE)
            for _ in range(2))
    slopes = posenc_triton.alibi_slopes(case.hq, device=dev)
    impls = implementations(case, slopes, posenc_triton, reference)
    fractions = tile_fractions(case, q, k, v, slopes, posenc_triton)

    def sdpa():
        bias = materialised_bias(slopes, case, reference)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                              enable_gqa=True)

    # The float32 reference repeats K/V for GQA: where that passes 8 GiB, ours is the base.
    fits = 2 * case.batch * case.hq * case.sk * case.dim * 4 <= EAGER_LIMIT
    base = impls["ours (skip_tol=0)"]() if not fits else (
        lambda *t: reference.alibi_attention_reference(*t, slopes, is_causal=case.causal))
    expected, note = common.attempt(lambda: (base(q, k, v),))
    for name in ("ours", "ours (skip_tol=0)", "flex", "sdpa+bias"):
        row = report.add(case=case.name, mode="decode", impl=name)
        fn, why = common.attempt(sdpa if name == "sdpa+bias" else impls[name])
        if fn is None:
            row["note"] = why
            continue
        if name == "ours":
            row["tiles"], row["bytes"] = fractions["decode"], fractions.get("bytes")
        check = ("none (the base)" if name == "ours (skip_tol=0)" and not fits
                 else note or expected)
        report.measure(row, measure_decode, fn, (q, k, v), case, check, copy_gbps)


def measure_decode(row: dict, fn, inputs, case: Case, expected, copy_gbps: float) -> None:
    result = fn(*inputs)
    if isinstance(expected, str):
        row["check"] = expected
    else:
        row["err"] = common.max_rel_error((result,), expected)
        row["check"] = "ok" if row["err"] <= TOLERANCE else "FAIL"
    del result
    row["ms"] = common.time_ms(lambda: fn(*inputs))
    row["gbps"] = common.gbps(2 * inputs[1].numel() * inputs[1].element_size(), row["ms"])
    row["of_copy"] = row["gbps"] / copy_gbps
    row["tflops"] = case.flops() / row["ms"] / 1e9
    if case.batch == 1:
        row["host_us"] = common.host_us(lambda: fn(*inputs))


def main(out_dir=common.RESULTS, quick: bool = False, dry: bool = False) -> common.Report:
    # Imported here, not at the top: a dry run sets TRITON_INTERPRET first.
    import posenc_triton
    from posenc_triton import reference

    torch.manual_seed(0)
    report = common.Report("alibi", IMPLS, "tflops", "TFLOP/s", DTYPE)
    for case in common.progress(cases(quick, dry), "alibi"):
        run_case(report, case, posenc_triton, reference)
        report.save_rows(out_dir)
    tables(report)
    copy = common.copy_gbps(1 << 20 if dry else 1 << 30)
    report.env["copy_gbps"] = round(copy, 1)
    for case in common.progress(decode_cases(quick, dry), "alibi decode"):
        run_decode_case(report, case, posenc_triton, reference, copy)
        report.save_rows(out_dir)
    decode_tables(report, copy)
    report.write(out_dir)
    return report


def tables(report: common.Report) -> None:
    """The time, throughput and peak-memory tables of ``report``'s rows (decode apart)."""
    dense = lambda case, mode: mode != "decode"
    report.table("Time (ms, median)", "ms", "{:.3f}",
                 [("ours/flex (speed)", lambda r: common.ratio(r, "flex", "ours")),
                  ("ours/skip_tol=0 (speed)",
                   lambda r: common.ratio(r, "ours (skip_tol=0)", "ours")),
                  ("ours: tiles of dense", _tiles)], where=dense)
    report.table("Throughput (TFLOP/s)", "tflops", "{:.0f}",
                 [("ours/flex (speed)", lambda r: common.ratio(r, "flex", "ours")),
                  ("ours/ceiling", lambda r: common.ratio(r, "sdpa (no bias)", "ours"))],
                 where=dense)
    report.table("Peak memory (GiB, one call, inputs included)", "peak_gib", "{:.2f}",
                 where=dense)


def _tiles(rows: dict, key: str = "tiles") -> str:
    value = rows.get("ours", {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def decode_tables(report: common.Report, copy_gbps: float) -> None:
    """The decode rows: time, K/V bytes read per second against the copy, host time at B=1."""
    decode = lambda case, mode: mode == "decode"
    of_copy = lambda r: f"{r['ours']['of_copy']:.2f}" if "of_copy" in r.get("ours", {}) else "-"
    report.table("Decode: time (ms, median)", "ms", "{:.4f}",
                 [("flex/ours (speed)", lambda r: common.ratio(r, "flex", "ours")),
                  ("sdpa+bias/ours (speed)", lambda r: common.ratio(r, "sdpa+bias", "ours")),
                  ("ours/skip_tol=0 (speed)",
                   lambda r: common.ratio(r, "ours (skip_tol=0)", "ours")),
                  ("ours: tiles of dense", _tiles),
                  ("ours: K/V bytes of dense", lambda r: _tiles(r, "bytes"))], where=decode)
    report.table(f"Decode: K/V read (GB/s; copy {copy_gbps:.0f} GB/s read + write)", "gbps",
                 "{:.0f}", [("ours/copy", of_copy)], where=decode)
    report.table("Decode: host time per call (µs, B=1, no sync)", "host_us", "{:.1f}",
                 where=lambda case, mode: decode(case, mode) and case.startswith("decode B1 "))


if __name__ == "__main__":
    raise SystemExit(common.run_script(__doc__, main))
