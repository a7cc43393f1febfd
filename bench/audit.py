"""Static audit of the ALiBi attention kernels' machine code, no GPU needed.

    python -m posenc_triton.bench.audit [--full] [--arch 90 80] [--json PATH]

Every kernel (forward, backward preprocess, dq, dkdv) is compiled, for every autotune config
the prune leaves, exactly as a real launch specialises it: the launchers in
:mod:`posenc_triton.alibi_ops` run on ``meta`` tensors with the kernels swapped for recorders,
and each recorded argument is specialised the way Triton's JIT does (integers equal to 1
become constants, multiples of 16 and 16-byte aligned pointers get the divisibility hint that
enables multi-buffering). Triton's bundled ``ptxas -v`` and ``nvdisasm`` then give, per config:
registers, spill bytes, shared memory, ``wgmma`` (HGMMA) vs ``mma.sync`` (HMMA), serialised
``wgmma`` (ptxas warning C7515), TMA loads (UTMALDG), and the main loop's FP ALU instructions
per score. Main loop = the SASS loop holding the tensor-core ops (with the fewest FP ALU
instructions, then the shortest, when several do); FP ALU = FFMA + FMUL + FADD + FMNMX; per
score = per element of the ``BLOCK_M x BLOCK_N`` score tile one thread holds
(``BLOCK_M * BLOCK_N / (32 * num_warps)``).

A forward and backward loop in the style of Triton's fused-attention tutorial
(``python/tutorials/06-fused-attention.py``, no bias) is compiled the same way for comparison.
``main`` exits 1 when a config the autotuner can pick spills, serialises ``wgmma`` or needs
more shared memory than the device has. The default run is the CI subset (D = 128, bf16);
``--full`` adds D = 64 / 256, fp16 and fp32, key masks and packed input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from posenc_triton.alibi_skip import DEFAULT_SKIP_TOL

SHARED_LIMIT = {90: 232448, 80: 166912}  # dynamic shared memory per block, bytes
FP_ALU = ("FFMA", "FMUL", "FADD", "FMNMX")
# A representative launch: B2 H32 S4096 (the benchmark's), GQA with 8 KV heads or MHA.
BATCH, HEADS, SEQLEN = 2, 32, 4096


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str            # fwd, preprocess, dq, dkdv, tutorial-fwd, ...
    head_dim: int = 128
    dtype: str = "bf16"
    causal: bool = True
    group: int = 4         # query heads per KV head; 1 (MHA) becomes a constant
    key_mask: bool = False
    varlen: bool = False
    dropout: bool = False      # fused attention dropout (every kernel)
    slope_grad: bool = False   # trainable slopes (the dq kernel)
    skip: bool = True          # certified tile skipping (the default); False: skip_tol=0

    def label(self) -> str:
        extra = "".join((" mask" if self.key_mask else "", " varlen" if self.varlen else "",
                         " dropout" if self.dropout else "",
                         " slope-grad" if self.slope_grad else "",
                         "" if self.skip else " no-skip"))
        return (f"{self.kernel} D{self.head_dim} {self.dtype} "
                f"{'causal' if self.causal else 'full'} g{self.group}{extra}")


@dataclasses.dataclass
class Report:
    case: Case
    arch: int
    config: tuple          # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    wgmma: int = 0         # HGMMA in the SASS
    mma_sync: int = 0      # HMMA
    serialised: bool = False
    tma_loads: int = 0     # UTMALDG
    loop_instructions: int = 0
    fp_per_score: float = 0.0
    error: str = ""

    def problems(self) -> list:
        out = []
        if self.error:
            out.append(self.error)
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.serialised:
            out.append("serialised wgmma (C7515)")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared {self.shared} B > {SHARED_LIMIT[self.arch]} B")
        return out


# ------------------------------------------------------------------------------------------
# Record the launches the real launchers make (meta tensors: shapes and strides only)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    name: str
    fn: object             # the @triton.jit function
    configs: list          # triton.Config list before pruning ([] for a fixed launch)
    args: tuple
    meta: dict


class _Recorder:
    def __init__(self, name, fn, configs, launches):
        self.name, self.fn, self.configs, self.launches = name, fn, configs, launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(Launch(self.name, self.fn, self.configs, args, meta))
        return launch


@contextlib.contextmanager
def _recording(launches, tma: bool):
    """The launchers run with the kernels swapped for recorders; ``tma``: as on sm_90, where
    the tiles the kernels loop over come through tensor descriptors."""
    from posenc_triton import alibi_configs, alibi_tma
    from posenc_triton.kernels import alibi_attention as kern
    from posenc_triton.kernels import alibi_attention_bwd as bwd

    table = (("fwd", kern.alibi_fwd_kernel, alibi_configs.FWD_CONFIGS),
             ("preprocess", bwd.alibi_bwd_preprocess_kernel, None),
             ("dkdv", bwd.alibi_bwd_dkdv_kernel, alibi_configs.DKDV_CONFIGS),
             ("dq", bwd.alibi_bwd_dq_kernel, alibi_configs.DQ_CONFIGS))
    recorders = {hooked: tuple(_Recorder(name, fn, [
        alibi_configs.config(*c, pre_hook=alibi_tma.descriptor_blocks if hooked else None)
        for c in configs or []], launches) for name, fn, configs in table)
        for hooked in (False, True)}
    real = alibi_configs.dense_kernels, alibi_tma.tma_capable
    alibi_configs.dense_kernels = lambda interpreting, tma=False: recorders[tma]
    alibi_tma.tma_capable = lambda t: tma
    try:
        yield
    finally:
        alibi_configs.dense_kernels, alibi_tma.tma_capable = real


def record(case: Case, arch: int = 90) -> list:
    """The launches of one forward and backward call shaped by ``case`` on ``arch``."""
    from posenc_triton import alibi_ops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    kv_heads = HEADS // case.group
    dev = "meta"
    if case.varlen:  # 8 sequences packed: [total, H, D]
        total, batch = BATCH * SEQLEN, 8
        q = torch.empty(total, HEADS, case.head_dim, dtype=dtype, device=dev)
        k = torch.empty(total, kv_heads, case.head_dim, dtype=dtype, device=dev)
        cu = torch.empty(batch + 1, dtype=torch.int32, device=dev)
        packed = (cu, cu, SEQLEN, SEQLEN)
    else:
        q = torch.empty(BATCH, HEADS, SEQLEN, case.head_dim, dtype=dtype, device=dev)
        k = torch.empty(BATCH, kv_heads, SEQLEN, case.head_dim, dtype=dtype, device=dev)
        packed = (None, None, SEQLEN, SEQLEN)
    v = torch.empty_like(k)
    slopes = torch.empty(HEADS, dtype=torch.float32, device=dev)
    mask = torch.empty(BATCH, SEQLEN, dtype=torch.bool, device=dev) if case.key_mask else None
    scale = case.head_dim ** -0.5
    dropout = (0.1, torch.empty(1, dtype=torch.int64, device=dev)) if case.dropout else (0.0,)
    skip_tol = DEFAULT_SKIP_TOL if case.skip else 0.0
    launches = []
    with _recording(launches, tma=arch >= 90):
        out, lse = alibi_ops.launch_alibi_fwd(q, k, v, slopes, mask, *packed, case.causal,
                                              scale, "bhsd", *dropout, skip_tol=skip_tol)
        alibi_ops.launch_alibi_bwd(torch.empty_like(out), q, k, v, slopes, mask, *packed, out,
                                   lse, case.causal, scale, "bhsd", *dropout,
                                   slopes_grad=case.slope_grad, skip_tol=skip_tol)
    return launches


# ------------------------------------------------------------------------------------------
# Compile as the JIT specialises, and read ptxas -v and the SASS
# ------------------------------------------------------------------------------------------

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                  torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8",
                  torch.bool: "*i1"}


def specialise(fn, args, constexprs):
    """``(signature, constants, attrs)`` for ``triton.compile``: what the JIT derives from
    these argument values (1 -> constant; multiple of 16 or aligned pointer -> divisibility)."""
    signature, constants, attrs = {}, {}, {}
    positional = iter(args)
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[(i,)] = constexprs[param.name]
            continue
        value = next(positional)
        if isinstance(value, TensorDescriptor):  # the block as the config's pre-hook set it
            dtype = _POINTER_TYPES[value.base.dtype][1:]
            signature[param.name] = f"tensordesc<{dtype}{list(value.block_shape)}>"
        elif value is None:
            signature[param.name] = "constexpr"
            constants[(i,)] = None
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(value, bool) or not isinstance(value, int):
            signature[param.name] = "fp32"
        elif value == 1:
            signature[param.name] = "constexpr"
            constants[(i,)] = 1
        else:
            signature[param.name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


@functools.cache
def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia import compiler

    if name == "ptxas":
        return compiler.get_ptxas(arch).path
    return os.path.join(os.path.dirname(compiler.get_ptxas(arch).path), name)


def _compile(fn, signature, constants, attrs, arch, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v``'s log for ``ptx``, with Triton's own flags."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={gpu}", path, "-o", path + ".o"],
                                capture_output=True, text=True, check=True)
    return result.stderr + result.stdout


def _sass(cubin: bytes, arch: int) -> list:
    """``[(opcode, branch_target_or_None)]`` and label positions from ``nvdisasm``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("nvdisasm", arch), "-c", path], capture_output=True,
                              text=True, check=True).stdout
    return text


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\(?(\.L_x_\d+)\)?")


def main_loop(sass: str, tensor_op: str) -> list:
    """Opcodes of the SASS loop (backward branch) holding ``tensor_op`` with the fewest FP
    ALU instructions, the shortest of those: an unmasked stage's, which runs most tiles (the
    masked band's loop may be shorter where the unmasked loop's bounds are not uniform)."""
    ops, labels, branches = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        instr = _INSTR.search(line)
        if instr:
            opcode, operands = instr.groups()
            if opcode.startswith("BRA"):
                target = _TARGET.search(operands)
                if target:
                    branches.append((len(ops), target.group(1)))
            ops.append(opcode)
    loops = [ops[labels[t]:at + 1] for at, t in branches if t in labels and labels[t] <= at]
    loops = [loop for loop in loops if any(op.startswith(tensor_op) for op in loop)]
    fp = lambda loop: sum(op.split(".")[0] in FP_ALU for op in loop)
    return min(loops, key=lambda loop: (fp(loop), len(loop))) if loops else []


def analyse(compiled, arch: int, report: Report, block_m: int, block_n: int,
            num_warps: int) -> Report:
    log = _ptxas(compiled.asm["ptx"], arch)
    report.registers = int(re.search(r"Used (\d+) registers", log).group(1))
    report.spill_bytes = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)",
                                                        log))
    report.serialised = "C7515" in log
    report.shared = compiled.metadata.shared
    sass = _sass(compiled.asm["cubin"], arch)
    opcodes = [m.group(1) for m in _INSTR.finditer(sass)]
    report.wgmma = sum(op.startswith("HGMMA") for op in opcodes)
    report.mma_sync = sum(op.startswith("HMMA") for op in opcodes)
    report.tma_loads = sum(op.startswith("UTMALDG") for op in opcodes)
    loop = main_loop(sass, "HGMMA" if report.wgmma else "HMMA")
    report.loop_instructions = len(loop)
    per_thread = block_m * block_n / (32 * num_warps)
    report.fp_per_score = sum(op.split(".")[0] in FP_ALU for op in loop) / per_thread
    return report


# ------------------------------------------------------------------------------------------
# The audit
# ------------------------------------------------------------------------------------------


def _named(launch: Launch) -> dict:
    """The launch's non-constexpr arguments by name, as a pre-hook or a prune sees them."""
    return dict(zip([p.name for p in launch.fn.params if not p.is_constexpr], launch.args))


def _pruned(launch: Launch, arch: int = 90) -> list:
    """``[(meta, (BLOCK_M, BLOCK_N, num_warps, num_stages), config)]``: what the autotuner may
    run on ``arch``."""
    from posenc_triton import alibi_configs

    if not launch.configs:  # a fixed launch (the preprocess)
        return [(launch.meta, (launch.meta["BLOCK_M"], 0, 4, 3), None)]
    named = _named(launch)
    configs = launch.configs
    if not launch.name.startswith("tutorial"):
        real, alibi_configs.arch = alibi_configs.arch, lambda t: arch
        try:
            configs = alibi_configs.prune_configs(configs, named, kernel=launch.name,
                                                  **launch.meta)
        finally:
            alibi_configs.arch = real
    out = []
    for c in configs:
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        out.append(({**launch.meta, **c.kwargs}, tile, c))
    return out


_CACHE: dict = {}


def audit_case(case: Case, arch: int = 90) -> list:
    """Reports for every kernel launch of ``case`` and every config it may run."""
    if case.kernel.startswith("tutorial"):
        from posenc_triton.bench import audit_tutorial

        launches = audit_tutorial.launches(case)
    else:
        launches = [la for la in record(case, arch) if la.name == case.kernel]
    reports = []
    for launch in launches:
        for meta, tile, config in _pruned(launch, arch):
            if config is not None and config.pre_hook is not None:
                config.pre_hook({**_named(launch), **meta})
            report = Report(case, arch, tile)
            key = (launch.fn.fn.__qualname__, arch, tile, repr(specialise(launch.fn, launch.args,
                                                                          meta)))
            if key in _CACHE:
                reports.append(dataclasses.replace(_CACHE[key], case=case))
                continue
            try:
                compiled = _compile(launch.fn, *specialise(launch.fn, launch.args, meta), arch,
                                    tile[2], tile[3])
                analyse(compiled, arch, report, tile[0], tile[1] or 1, tile[2])
            except Exception as error:  # reported as a problem of this config
                report.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            _CACHE[key] = report
            reports.append(report)
    return reports


def cases(full: bool) -> list:
    """D = 128 bf16, causal and symmetric, GQA and MHA (the CI subset), the preprocess and the
    tutorial's loops, fused dropout and trainable slopes once each; ``full`` adds the other head
    dims and dtypes, key masks, packed input, and the variants in every causal/group pairing."""
    out = [Case(kernel, causal=causal, group=group) for kernel in ("fwd", "dq", "dkdv")
           for causal in (True, False) for group in (4, 1)]
    # the dropout and trainable-slope variants (their own compiled code)
    out += [Case(kernel, dropout=True) for kernel in ("fwd", "dq", "dkdv")]
    out += [Case("dq", causal=causal, group=group, slope_grad=True)
            for causal, group in ((True, 4), (False, 1))]
    out += [Case(kernel, causal=causal, skip=False) for kernel in ("fwd", "dq", "dkdv")
            for causal in (True, False)]  # skip_tol=0: today's dense kernels
    out += [Case("preprocess"), Case("preprocess", causal=False)]
    out += [Case(f"tutorial-{kernel}", causal=False, group=1) for kernel in ("fwd", "dq", "dkdv")]
    if full:
        for kernel in ("fwd", "dq", "dkdv"):
            out += [Case(kernel, causal=causal, group=group, dropout=True)
                    for causal, group in ((True, 1), (False, 4), (False, 1))]
        out += [Case("dq", causal=causal, group=group, slope_grad=True)
                for causal, group in ((True, 1), (False, 4))]
        out += [Case("dq", dropout=True, slope_grad=True)]
        for kernel in ("fwd", "dq", "dkdv"):
            for head_dim, dtype in ((64, "bf16"), (256, "bf16"), (80, "bf16"), (128, "fp16"),
                                    (64, "fp32"), (128, "fp32"), (256, "fp32")):
                out.append(Case(kernel, head_dim, dtype))
            out += [Case(kernel, key_mask=True), Case(kernel, varlen=True),
                    Case(kernel, 256, group=1), Case(kernel, 64, group=1, causal=False)]
        out += [Case("preprocess", 256, "fp32"), Case("preprocess", 64)]
    return out


def _fp(report: Report) -> str:
    """FP ALU per score, or "-" where no loop holds tensor-core ops (IEEE fp32 products)."""
    return f"{report.fp_per_score:.2f}" if report.loop_instructions else "-"


def table(reports: list) -> str:
    head = ("| case | arch | tile (M,N,w,s) | regs | spill B | shared B | wgmma | mma | C7515 "
            "| TMA | loop instr | FP ALU/score | problems |")
    rows = [head, "|" + " --- |" * 13]
    for r in reports:
        rows.append(f"| {r.case.label()} | sm_{r.arch} | {r.config} | {r.registers} | "
                    f"{r.spill_bytes} | {r.shared} | {r.wgmma} | {r.mma_sync} | "
                    f"{'yes' if r.serialised else 'no'} | {r.tma_loads} | "
                    f"{r.loop_instructions} | {_fp(r)} | "
                    f"{'; '.join(r.problems()) or 'ok'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every head dim, dtype, variant")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=[80, 90])
    parser.add_argument("--kernels", nargs="+", help="only these kernels (fwd, dq, ...)")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    from posenc_triton import _backend

    if _backend.interpreting():
        print("the audit compiles real kernels: run it with TRITON_INTERPRET unset or 0")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton <= 3.9's default, stated
    work = [(case, arch) for arch in args.arch for case in cases(args.full)
            if not args.kernels or case.kernel in args.kernels]
    if args.jobs > 1:  # compiles are CPU-bound and independent
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            per_case = pool.starmap(audit_case, work)
    else:
        per_case = [audit_case(case, arch) for case, arch in work]
    reports = [report for reports in per_case for report in reports]
    print(table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(r), "problems": r.problems()} for r in reports],
                      f, indent=1)
    # tutorial kernels are a yardstick, not ours to fix
    bad = [r for r in reports if r.problems() and not r.case.kernel.startswith("tutorial")]
    print(f"\n{len(reports)} configs, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
