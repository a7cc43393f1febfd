"""The correctness half of ``posenc-bench --device-check``: every kernel variant at real sizes.

Forward and backward through the public API against the float64 reference, with the project's
rules (``tests/conftest.py``): flash-attn's 2x rule for fp16/bf16 attention (``error_rule``),
the tolerance table otherwise (``table_rule``). Each check returns ``{"checks": [...]}``, one
entry per tensor with its error and ``ok``. Tiny shapes in the dry run (Triton's interpreter).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

from . import bench_alibi, common

# The project's one tolerance table (tests/conftest.py imports it): (rtol, atol) by dtype for a
# kernel against the float64 reference; the fp32 attention backward sums more products.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
              torch.bfloat16: (1e-2, 1e-2)}
FP32_BWD_ATOL = 5e-5
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def table_rule(name, actual, ref64, dtype, atol=None) -> dict:
    """``|actual - ref64| <= atol + rtol * |ref64|`` element-wise (the tolerance table)."""
    rtol, table_atol = TOLERANCES[dtype]
    atol = atol or table_atol
    diff = (actual.double() - ref64).abs()
    excess = (diff - rtol * ref64.abs()).max().item() if diff.numel() else 0.0
    return {"tensor": name, "err": diff.max().item() if diff.numel() else 0.0,
            "rule": f"atol {atol:g} + rtol {rtol:g}", "ok": bool(excess <= atol)}


def error_rule(name, actual, ref64, ref_same, dtype, atol=None) -> dict:
    """flash-attn's rule for fp16/bf16: ``max|actual - ref64| <= 2 max|ref_same - ref64| +
    atol(dtype)``, ``ref_same`` the same-dtype reference; fp32 takes the table."""
    if dtype == FP32:
        return table_rule(name, actual, ref64, dtype, atol)
    err = (actual.double() - ref64).abs().max().item()
    bound = 2 * (ref_same.double() - ref64).abs().max().item() + TOLERANCES[dtype][1]
    return {"tensor": name, "err": err, "bound": bound, "rule": "2x same-dtype",
            "ok": bool(err <= bound)}


def fwd_bwd(fn, inputs, grad_outs=None):
    """``(outputs, gradients w.r.t. inputs, grad_outs)`` of ``fn(*inputs)`` (a tuple)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = [o for o in fn(*leaves) if o is not None]
    if grad_outs is None:
        grad_outs = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])
    return [o.detach() for o in outs], list(grads), grad_outs


def poison_freed(*like: torch.Tensor) -> None:
    """Best effort on CUDA: blocks the size of ``like`` are filled with NaN and freed, so the
    caching allocator hands NaN to the outputs allocated next (an unwritten element fails)."""
    if common.HAS_CUDA:
        blocks = [torch.full_like(t, float("nan")) for t in like]
        del blocks


@dataclasses.dataclass
class RopeCheck:
    name: str
    dtype: torch.dtype
    shape: tuple  # (B, S, Hq, Hk, D, R) on the GPU
    tiny: tuple  # the same in the dry run
    interleaved: bool = False
    layout: str = "bshd"
    positions: str = ""  # "ids": position_ids [B, S]; "offsets": seqlen_offsets [B]
    fused: bool = False  # q, k: views of one [B, S, Hq + 2 Hk, D] projection

    def __call__(self, dry: bool) -> dict:
        import posenc_triton
        from posenc_triton import reference

        b, s, hq, hk, d, r = self.tiny if dry else self.shape
        dev, table = common.DEVICE, s + 4096 if s == 1 else s + 64
        cos, sin = posenc_triton.rope_cos_sin(
            table, posenc_triton.rope_frequencies(r, device=dev)[0])
        kw = {"interleaved": self.interleaved, "layout": self.layout}
        if self.positions == "ids":
            kw["position_ids"] = torch.randint(0, table, (b, s), device=dev)
        elif self.positions == "offsets":
            kw["seqlen_offsets"] = torch.randint(0, table - s + 1, (b,), device=dev)
        bhsd = (lambda t: t.transpose(1, 2)) if self.layout == "bhsd" else (lambda t: t)
        if self.fused:
            inputs = [torch.randn(b, s, hq + 2 * hk, d, device=dev, dtype=self.dtype)]
            split = lambda x: (bhsd(x[:, :, :hq]), bhsd(x[:, :, hq:hq + hk]))
        else:
            inputs = [bhsd(torch.randn(b, s, h, d, device=dev, dtype=self.dtype))
                      for h in (hq, hk)]
            split = lambda q, k: (q, k)
        poison_freed(*inputs, *inputs)
        outs, grads, grad_outs = fwd_bwd(
            lambda *x: posenc_triton.apply_rope(*split(*x), cos, sin, **kw), inputs)
        outs64, grads64, _ = fwd_bwd(lambda *x: reference.apply_rope_reference(
            *split(*x), cos.double(), sin.double(), **kw), [t.double() for t in inputs],
            [g.double() for g in grad_outs])
        names = ("q_out", "k_out", *(f"d{n}" for n in (("qkv",) if self.fused else "qk")))
        return {"checks": [table_rule(n, a, e, self.dtype)
                           for n, a, e in zip(names, outs + grads, outs64 + grads64)]}


def rope_past_2_31(dry: bool) -> dict:
    """RoPE of a q past 2^31 elements (bf16, 4.4 GB): the batch rows around element 2^31,
    and the last, against the reference (64-bit offsets)."""
    if dry:
        return {"status": "skipped: dry run", "note": "4.4 GB: GPU only"}
    import posenc_triton
    from posenc_triton import reference

    q = torch.randn(130, 4096, 32, 128, device="cuda", dtype=BF16)  # 2^24 elements a row
    assert q.numel() > 2**31
    cos, sin = posenc_triton.rope_cos_sin(
        4096, posenc_triton.rope_frequencies(128, device="cuda")[0])
    out, _ = posenc_triton.apply_rope(q, None, cos, sin)
    rows = slice(127, 130)  # row 128 starts at element 2^31
    ref, _ = reference.apply_rope_reference(q[rows].double(), None, cos.double(), sin.double())
    return {"checks": [table_rule("q_out rows 127..129", out[rows], ref, BF16)]}


def key_mask(kind: str, batch: int, seqlen_k: int) -> torch.Tensor:
    """bool ``[B, Sk]`` (True = keep): right/left padding to a different length per row (all,
    half + 3, 5, 1 keys), or a random scatter."""
    if kind == "random":
        return torch.rand(batch, seqlen_k, device=common.DEVICE) > 0.4
    lengths = torch.tensor([seqlen_k, seqlen_k // 2 + 3, 5, 1] * batch, device=common.DEVICE)
    pos = torch.arange(seqlen_k, device=common.DEVICE)
    return (pos.flip(0) if kind == "left" else pos)[None, :] < lengths[:batch, None]


@dataclasses.dataclass
class AlibiCheck:
    name: str
    dtype: torch.dtype
    shape: tuple  # (B, Hq, Hk, Sq, Sk, D) on the GPU; packed: B, Sq, Sk unused
    tiny: tuple  # the same in the dry run
    causal: bool = True
    layout: str = "bhsd"
    mask: str = ""  # key_padding_mask kind (key_mask)
    lengths: tuple = ()  # packed: ((q lengths), (k lengths)) on the GPU
    tiny_lengths: tuple = ()
    batch_slopes: bool = False  # random [B, Hq] slopes instead of the default [Hq]
    scale: Optional[float] = None
    cache: bool = False  # KV cache: cache_seqlens [B] of Sk, Sk/2 + 7, 1, 3Sk/4 (fwd only)

    def __call__(self, dry: bool) -> dict:
        import posenc_triton
        from posenc_triton import reference

        if self.cache and "cache_seqlens" not in inspect.signature(
                posenc_triton.alibi_attention).parameters:
            return {"status": "skipped: no cache_seqlens in this version"}
        b, hq, hk, sq, sk, d = self.tiny if dry else self.shape
        dev, lengths = common.DEVICE, self.tiny_lengths if dry else self.lengths
        kw = {"is_causal": self.causal, "scale": self.scale}
        if lengths:  # packed [total, H, D]
            b = len(lengths[0])
            cu_q, cu_k = (bench_alibi.cu_seqlens(n, dev) for n in lengths)
            shapes = [(sum(lengths[0]), hq, d), *[(sum(lengths[1]), hk, d)] * 2]
        elif self.layout == "bhsd":
            shapes = [(b, hq, sq, d), *[(b, hk, sk, d)] * 2]
        else:
            shapes = [(b, sq, hq, d), *[(b, sk, hk, d)] * 2]
        inputs = [torch.randn(s, device=dev, dtype=self.dtype) for s in shapes]
        slopes = (torch.rand(b, hq, device=dev) * 0.5 + 0.01 if self.batch_slopes
                  else posenc_triton.alibi_slopes(hq, device=dev))
        if lengths:
            def ours(q, k, v):
                return (posenc_triton.alibi_attention(q, k, v, slopes, cu_seqlens_q=cu_q,
                                                      cu_seqlens_k=cu_k, **kw),)

            def ref(q, k, v, upcast):
                return (reference.alibi_attention_varlen_reference(
                    q, k, v, cu_q, cu_k, slopes, upcast=upcast, **kw),)
        else:
            kw.update(layout=self.layout,
                      key_padding_mask=key_mask(self.mask, b, sk) if self.mask else None)
            cache = torch.tensor([sk, sk // 2 + 7, 1, 3 * sk // 4] * b, device=dev)[:b]

            def ours(q, k, v):
                extra = {"cache_seqlens": cache} if self.cache else {}
                return (posenc_triton.alibi_attention(q, k, v, slopes, **kw, **extra),)

            def ref(q, k, v, upcast):
                if self.cache:
                    return (reference.alibi_attention_kvcache_reference(
                        q, k, v, cache, slopes, upcast=upcast, **kw),)
                return (reference.alibi_attention_reference(q, k, v, slopes, upcast=upcast,
                                                            **kw),)
        poison_freed(*inputs, inputs[0])
        if self.cache:  # inference only
            with torch.no_grad():
                out, out64 = ours(*inputs)[0], ref(*(t.double() for t in inputs), True)[0]
                return {"checks": [error_rule("out", out, out64, ref(*inputs, False)[0],
                                              self.dtype)]}
        outs, grads, grad_outs = fwd_bwd(ours, inputs)
        outs64, grads64, _ = fwd_bwd(lambda *t: ref(*t, True), [t.double() for t in inputs],
                                     [g.double() for g in grad_outs])
        same = (outs64, grads64) if self.dtype == FP32 else fwd_bwd(
            lambda *t: ref(*t, False), inputs, grad_outs)[:2]
        checks = [error_rule("out", outs[0], outs64[0], same[0][0], self.dtype)]
        checks += [error_rule(n, g, g64, gs, self.dtype, atol=FP32_BWD_ATOL)
                   for n, g, g64, gs in zip(("dq", "dk", "dv"), grads, grads64, same[1])]
        return {"checks": checks}


def correctness_cases(dry: bool) -> list:
    """``(name, run, estimated seconds on an H100/H200)``: every kernel variant once, at real
    sizes (``tiny`` in the dry run)."""
    rope = [  # (B, S, Hq, Hk, D, R)
        (RopeCheck("rope bf16 rotate-half bshd GQA q[4,4096,32,128] k8", BF16,
                   (4, 4096, 32, 8, 128, 128), (2, 24, 4, 2, 32, 32)), 6),
        (RopeCheck("rope fp16 interleaved bhsd R64 of D80 position_ids q[2,3000,12,80] k4", FP16,
                   (2, 3000, 12, 4, 80, 64), (2, 19, 3, 1, 40, 24), interleaved=True,
                   layout="bhsd", positions="ids"), 6),
        (RopeCheck("rope fp32 fused-QKV views seqlen_offsets[B] q[2,2048,8,256] k2", FP32,
                   (2, 2048, 8, 2, 256, 256), (2, 13, 2, 1, 64, 64), positions="offsets",
                   fused=True), 6),
        (RopeCheck("rope bf16 decode S=1 seqlen_offsets[B] B64 q32 k8 D128", BF16,
                   (64, 1, 32, 8, 128, 128), (3, 1, 4, 2, 32, 32), positions="offsets"), 4),
    ]
    packed = bench_alibi.PACKED_LENGTHS
    alibi = [  # (B, Hq, Hk, Sq, Sk, D)
        (AlibiCheck("alibi bf16 causal GQA B1 Hq16 Hk4 S4096 D128", BF16,
                    (1, 16, 4, 4096, 4096, 128), (1, 4, 2, 24, 24, 32)), 20),
        (AlibiCheck("alibi fp16 symmetric bshd B2 H8 S2048 D64 [B,Hq] slopes", FP16,
                    (2, 8, 8, 2048, 2048, 64), (2, 2, 2, 20, 20, 16), causal=False,
                    layout="bshd", batch_slopes=True), 15),
        (AlibiCheck("alibi bf16 causal B1 Hq4 Hk2 Sq1000 Sk3000 D256", BF16,
                    (1, 4, 2, 1000, 3000, 256), (1, 2, 1, 9, 30, 64)), 20),
        (AlibiCheck("alibi fp32 causal B1 H4 S2047 D128", FP32,
                    (1, 4, 4, 2047, 2047, 128), (1, 2, 2, 19, 19, 32)), 15),
        (AlibiCheck("alibi fp32 symmetric GQA B1 Hq4 Hk2 S1500 D256", FP32,
                    (1, 4, 2, 1500, 1500, 256), (1, 2, 1, 17, 17, 48), causal=False), 20),
        (AlibiCheck("alibi bf16 causal key mask (random) B4 Hq8 Hk2 S2048 D128", BF16,
                    (4, 8, 2, 2048, 2048, 128), (3, 2, 1, 20, 20, 32), mask="random"), 15),
        (AlibiCheck("alibi fp16 symmetric key mask (left) bshd B3 Hq8 Hk4 Sq777 Sk1300 D80",
                    FP16, (3, 8, 4, 777, 1300, 80), (2, 2, 2, 11, 23, 40), causal=False,
                    layout="bshd", mask="left"), 15),
        (AlibiCheck("alibi bf16 packed causal 8 seqs T16384 Hq16 Hk4 D128", BF16,
                    (0, 16, 4, 0, 0, 128), (0, 4, 2, 0, 0, 32), lengths=(packed, packed),
                    tiny_lengths=((7, 0, 23), (19, 5, 16))), 25),
        (AlibiCheck("alibi fp16 packed symmetric Sq!=Sk Hq8 Hk2 D64 [B,Hq] slopes", FP16,
                    (0, 8, 2, 0, 0, 64), (0, 2, 1, 0, 0, 16), causal=False,
                    lengths=((512, 1, 2000, 777), (1024, 300, 2000, 1500)),
                    tiny_lengths=((5, 1, 12), (9, 3, 12)), batch_slopes=True), 15),
        (AlibiCheck("alibi bf16 causal B1 H4 S8192 D128 scale 0.05", BF16,
                    (1, 4, 4, 8192, 8192, 128), (1, 2, 2, 33, 33, 32), scale=0.05), 20),
        (AlibiCheck("alibi bf16 decode B4 Hq32 Hk8 Sq1 Sk4097 D128", BF16,
                    (4, 32, 8, 1, 4097, 128), (2, 4, 2, 1, 33, 32)), 15),
        (AlibiCheck("alibi fp16 chunked prefill B1 H8 Sq48 Sk6000 D128", FP16,
                    (1, 8, 8, 48, 6000, 128), (1, 2, 2, 5, 40, 32)), 15),
        (AlibiCheck("alibi bf16 KV cache (cache_seqlens) fwd B4 Hq32 Hk8 Sq4 Sk4097 D128",
                    BF16, (4, 32, 8, 4, 4097, 128), (4, 4, 2, 2, 40, 32), cache=True), 10),
    ]
    def case(check, estimate):
        return check.name, lambda: check(dry), estimate

    return [*(case(*c) for c in rope),
            ("rope bf16 q[130,4096,32,128] past 2^31 elements", lambda: rope_past_2_31(dry), 15),
            *(case(*c) for c in alibi)]


