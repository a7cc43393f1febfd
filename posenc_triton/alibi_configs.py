"""Autotune configs of the dense ALiBi kernels and the rule that prunes them per launch.

Tiles are ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. The lists offer only tiles that
compile without register spills on sm_90 in some variant; :func:`prune_configs` drops, per
launch, those that spill in that variant (``SPILLS``) or overflow shared memory. The measured
figures behind every entry are in ``bench/NOTES.md`` and ``bench/results/audit/`` (re-measure
with ``python -m posenc_triton.bench.audit`` on each Triton release). Triton is imported
lazily.
"""

from __future__ import annotations

import functools

import torch

from posenc_triton import _backend

# Largest first; the last tile of each list is the conservative one that fits D = 256 on any
# recent GPU. Tiles that spill in every variant are not offered at all (bench/NOTES.md).
# dkdv's BLOCK_M must divide the largest one (``bias_period``).
FWD_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
               (64, 64, 8, 2), (64, 32, 4, 2)]
DKDV_CONFIGS = [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3), (16, 64, 4, 1),
                (32, 32, 8, 2)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 2)]

# Tiles pruned in one variant only ("a+b": both at once), kept for the others. One line per
# entry says why; the spills are measured in bench/NOTES.md ("Prunes per variant", "Issue 18").
SPILLS = {
    "fwd": {
        "pointers": [(128, 128, 8, 3), (64, 128, 4, 3)],  # pointer loads hold 16 more registers
        "pointers+symmetric": [(128, 64, 8, 3)],  # the symmetric forward's four loop stages
        "dropout": [(128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)],  # Philox rounds
        "sm80+key_mask": [(128, 64, 8, 3)],  # the key mask's loads on mma.sync
        "triton38+symmetric": [(128, 128, 8, 3), (64, 128, 4, 3)],  # Triton 3.8's allocator
        "skip+symmetric": [(128, 128, 8, 3)],  # the skip bounds of both directions
    },
    "dq": {
        "pointers+dropout": [(64, 64, 4, 3)],  # Philox rounds with pointer loads
        "dropout+slope_grad": [(128, 64, 8, 3), (64, 64, 4, 3)],  # Philox and the row sums
        "varlen": [(64, 64, 4, 3)],  # packed input's sequence bounds
        "sm80": [(128, 64, 8, 3), (128, 32, 8, 3)],  # 128-row tiles on mma.sync
        "sm80+slope_grad": [(64, 64, 4, 3)],  # the slope gradient's row sums on mma.sync
        "sm80+key_mask": [(64, 64, 4, 3)],  # the key mask's loads on mma.sync
        "triton38+dropout": [(64, 64, 4, 3)],  # Triton 3.8's allocator
        "triton38+symmetric+slope_grad": [(64, 64, 4, 3)],  # Triton 3.8's allocator
        "skip+symmetric+slope_grad": [(64, 64, 4, 3)],  # the skip bounds and the row sums
        # Triton 3.8's allocator with the skip bounds
        "triton38+skip+symmetric": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
        "triton38+skip+dropout": [(128, 64, 8, 3)],
        "triton38+skip+slope_grad": [(128, 64, 8, 3), (64, 64, 4, 3)],
    },
    "dkdv": {
        "gqa": [(32, 64, 4, 3)],  # the loop over a KV head's query heads: scalars
        "pointers+gqa": [(32, 128, 8, 3)],  # the same loop with pointer loads
        "dropout": [(32, 128, 8, 3), (16, 64, 4, 1)],  # Philox rounds
        "pointers+symmetric+dropout": [(32, 64, 4, 3)],  # both directions' Philox rounds
        "symmetric+dropout+gqa": [(16, 128, 8, 3)],  # both directions, per query head
        "tma+mha": [(32, 32, 8, 2)],  # the 8-warp D = 256 tile with descriptors
        "sm80": [(32, 128, 8, 3), (16, 128, 8, 3)],  # 128-key tiles on mma.sync
        "sm80+dropout": [(32, 64, 4, 3)],  # Philox rounds on mma.sync
        "triton38+gqa": [(32, 128, 8, 3)],  # Triton 3.8's allocator
        "triton38+symmetric+gqa": [(16, 128, 8, 3)],  # Triton 3.8's allocator
        "triton38+dropout": [(32, 64, 4, 3)],  # Triton 3.8's allocator
        "triton38+dropout+gqa": [(16, 128, 8, 3)],  # Triton 3.8's allocator
        "skip+symmetric+gqa": [(32, 128, 8, 3)],  # both directions' query bounds, per head
        "triton39": [(16, 64, 4, 1)],  # offered for Triton 3.8's symmetric GQA dkdv only
        "key_mask": [(16, 64, 4, 1)],  # (the same)
        "varlen": [(16, 64, 4, 1)],  # (the same)
    },
}

# fp32 inputs (IEEE products: no tensor cores, both operand tiles in registers): every larger
# tile spills on sm_90; this one holds 66-128 registers at D = 64-256 with pointer loads.
IEEE_TILE = (16, 16, 4, 1)
AUTOTUNE_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_KEY_MASK",
                "IS_VARLEN", "HAS_DROPOUT", "SKIP", "INPUT_PRECISION"]
# Under the interpreter: one fixed tile, no autotuning (tests shrink it).
INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
PREPROCESS_BLOCK_M = 64


def config(block_m, block_n, num_warps, num_stages, pre_hook=None):
    """The ``triton.Config`` of a tile."""
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


def tile_of(cfg) -> tuple:
    """A ``triton.Config``'s ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``."""
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def prune_configs(configs, named_args, kernel=None, **kwargs):
    """Keep the configs that neither spill registers nor overflow sm_90's 227 KiB of shared
    memory (``python -m posenc_triton.bench.audit`` checks both on the sm_90 machine code).

    fp32 (IEEE products) runs ``IEEE_TILE`` only, the tile that fits every head dim. Shared
    memory: every tile up to 256 bytes per head row (bf16/fp16 at D <= 128); small tiles with
    shallow pipelines beyond (D = 256). Registers: ``SPILLS`` lists the tiles that spill in a
    variant.
    """
    def get(name):
        return kwargs.get(name, named_args.get(name))

    if get("INPUT_PRECISION") == "ieee":
        return [config(*IEEE_TILE, pre_hook=configs[0].pre_hook)]

    on = {"all": True, "symmetric": not get("IS_CAUSAL"), "gqa": get("group") != 1,
          "mha": get("group") == 1, "tma": bool(get("USE_TMA")),
          "dropout": get("HAS_DROPOUT"), "slope_grad": get("HAS_SLOPE_GRAD"),
          "pointers": not get("USE_TMA"), "key_mask": get("HAS_KEY_MASK"),
          "varlen": get("IS_VARLEN"), "skip": get("SKIP"),
          "sm80": arch(get("Q")) < 90, "triton38": triton_version() < (3, 9),
          "triton39": triton_version() >= (3, 9)}
    drop = {tile for variant, tiles in SPILLS.get(kernel, {}).items()
            if all(on[part] for part in variant.split("+")) for tile in tiles}
    kept = [c for c in configs if tile_of(c) not in drop] or configs[-1:]
    if get("BLOCK_D") <= 128:
        # A warp's tensor-core ops take 16 rows of the score tile (keys in dkdv): with fewer
        # rows than 16 a warp, warps compute the same scores twice. Such tiles (8 warps on 64
        # or 32 rows) serve D = 256's registers only.
        rows = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
        return [c for c in kept if c.kwargs[rows] >= 16 * c.num_warps] or kept

    def small(cs):
        return [c for c in cs
                if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 and c.num_stages == 2]

    return small(kept) or small(configs)  # a spill is slow, too much shared memory fails


@functools.cache
def triton_version() -> tuple:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def arch(t) -> int:
    """``t``'s GPU as ``10 * major + minor``; sm_90 for anything else (the static audit)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


def bias_period() -> int:
    """The period of the dkdv kernel's query terms: every ``BLOCK_M`` it may run with divides
    it, and it is no larger, so the terms stay as small as a tile's. Interpreted, twice the
    tile, so that the tests see query tiles that start inside a period (as a GPU's smaller
    tiles do)."""
    if _backend.interpreting():
        return 2 * INTERPRETER_META["BLOCK_M"]
    return max(max(c[0] for c in DKDV_CONFIGS), IEEE_TILE[0])


def min_block_m(kernel: str = "dq") -> int:
    """The smallest ``BLOCK_M`` the ``dq`` (or ``"fwd"``) kernel may run with."""
    if _backend.interpreting():
        return INTERPRETER_META["BLOCK_M"]
    return min(min(c[0] for c in {"dq": DQ_CONFIGS, "fwd": FWD_CONFIGS}[kernel]), IEEE_TILE[0])


def min_block_n() -> int:
    """The smallest ``BLOCK_N`` the ``dkdv`` kernel may run with."""
    if _backend.interpreting():
        return INTERPRETER_META["BLOCK_N"]
    return min(min(c[1] for c in DKDV_CONFIGS), IEEE_TILE[1])


@functools.cache
def dense_kernels(interpreting: bool, tma: bool = False):
    """``(fwd, preprocess, dkdv, dq)``; autotuned on GPU (``tma``: with the pre-hook that sizes
    the descriptors' blocks), raw kernels under the interpreter."""
    import triton

    from posenc_triton import alibi_tma
    from posenc_triton.kernels import alibi_attention as kern
    from posenc_triton.kernels import alibi_attention_bwd as bwd

    kernels = (kern.alibi_fwd_kernel, bwd.alibi_bwd_dkdv_kernel, bwd.alibi_bwd_dq_kernel)
    if not interpreting:
        hook = alibi_tma.descriptor_blocks if tma else None
        kernels = tuple(
            triton.autotune([config(*c, pre_hook=hook) for c in configs],
                            key=AUTOTUNE_KEY + extra_key,
                            prune_configs_by={"early_config_prune": functools.partial(
                                prune_configs, kernel=name)})(kernel)
            for kernel, configs, name, extra_key in zip(
                kernels, (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS), ("fwd", "dkdv", "dq"),
                ([], ["group"], ["HAS_SLOPE_GRAD"])))
    fwd, dkdv, dq = kernels
    return fwd, bwd.alibi_bwd_preprocess_kernel, dkdv, dq
