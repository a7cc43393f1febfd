"""Compile every kernel for an H100 (sm_90) without a GPU: ``python tests/compile_kernels.py``.

The interpreter accepts code that compiled Triton rejects (a plain global in a kernel, say);
this builds each kernel down to a cubin with Triton's bundled ptxas, checks that its shared
memory fits the H100, and prints one line per kernel. Exit status 1 on any failure.

Arguments carry no alignment or divisibility hints here, so no cp.async multi-buffering is
generated and shared memory is understated (about 2x for the attention tiles): the figures of
a real launch (and registers, spills, wgmma) come from ``python -m posenc_triton.bench.audit``.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are imported: real @triton.jit

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from posenc_triton import alibi_configs
from posenc_triton import alibi_decode as decode_ops
from posenc_triton.kernels import alibi_attention, alibi_attention_bwd, alibi_decode, rope

SM90 = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # 227 KiB of dynamic shared memory per block

ROPE_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "qo_ptr": "*bf16", "ko_ptr": "*bf16",
              "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "offsets_ptr": "*i64"}
ATTN_TYPES = {**dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"), "*bf16"),
              "LSE": "*fp32", "LSE_BIAS": "*fp32", "DELTA": "*fp32", "SLOPES": "*fp32",
              "KPM": "*u8", "CU_Q": "*i32", "CU_K": "*i32", "sm_scale": "fp32", "SEED": "*i64",
              "DSLOPE": "*fp32", "dropout_p": "fp32", "KMAX": "*fp32", "COUNTS": "*i32",
              "LIM": "*i32", "BOUNDS": "*i32", "skip_log2": "fp32"}
# the dkdv kernel's period of the preprocess's query terms (ignored by the other kernels);
# tile skipping on (the default), its counters off (alibi_tile_counts turns them on)
BWD = {"BIAS_PERIOD": alibi_configs.bias_period(), "PARTIAL_ROWS": False, "SKIP": True,
       "COUNT": False}
# the pointer path (bench/audit.py compiles the TMA one with real descriptors)
POINTERS = {"K_DESC": None, "V_DESC": None, "Q_DESC": None, "DO_DESC": None, "USE_TMA": False}
ATTN_TYPES_FP32 = {**ATTN_TYPES, **dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"),
                                                 "*fp32")}


def compile_sm90(kernel, types, constexprs, num_warps=4, num_stages=3):
    """Shared memory (bytes) of ``kernel`` built for sm_90; unnamed arguments are int32.

    A non-constexpr argument named in ``constexprs`` (with value 1) is built the way Triton
    specialises an integer argument equal to 1 at launch: as a constant.
    """
    signature, constants = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr or param.name in constexprs:
            signature[param.name] = "constexpr"
            constants[(i,)] = constexprs[param.name]
        else:
            signature[param.name] = types.get(param.name, "i32")
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=SM90, options={"num_warps": num_warps,
                                                    "num_stages": num_stages})
    return compiled.metadata.shared


def cases():
    """``(name, kernel, types, constexprs, num_warps, num_stages)`` worth compiling."""
    for half, dim in ((64, 128), (40, 96)):
        for interleaved in (False, True):
            yield (f"rope R={2 * half} D={dim} interleaved={interleaved}", rope.rope_kernel,
                   ROPE_TYPES, {"HALF": half, "D": dim, "BLOCK_S": 4, "BLOCK_H": 8,
                                "BLOCK_R": triton.next_power_of_2(half),
                                "BLOCK_T": triton.next_power_of_2(max(dim - 2 * half, 1)),
                                "HAS_POS": True, "HAS_OFFSETS": interleaved,
                                "INTERLEAVED": interleaved, "CONJUGATE": interleaved,
                                "COPY_TAIL": 2 * half < dim}, 4, 1)
    # Decode: S = 1, one KV head, offsets in a tensor; Triton makes the ones constants.
    yield ("rope R=128 D=128 decode S=1 Hk=1", rope.rope_kernel, ROPE_TYPES,
           {"HALF": 64, "D": 128, "BLOCK_S": 1, "BLOCK_H": 8, "BLOCK_R": 64, "BLOCK_T": 1,
            "HAS_POS": False, "HAS_OFFSETS": True, "INTERLEAVED": False, "CONJUGATE": False,
            "COPY_TAIL": False, "S": 1, "Hk": 1, "n_s_blocks": 1, "stride_qd": 1,
            "stride_kd": 1}, 4, 1)
    kernels = (("fwd", alibi_attention.alibi_fwd_kernel, alibi_configs.FWD_CONFIGS),
               ("dq", alibi_attention_bwd.alibi_bwd_dq_kernel, alibi_configs.DQ_CONFIGS),
               ("dkdv", alibi_attention_bwd.alibi_bwd_dkdv_kernel, alibi_configs.DKDV_CONFIGS))
    for name, kernel, configs in kernels:
        # The largest config at D=128 (with the key mask, or packed), the pruned list's first
        # at D=256, and at D=256 in fp32 (IEEE products), whose tiles are twice the bytes.
        for head_dim, masked, varlen, fp32 in ((128, True, False, False),
                                               (128, False, True, False),
                                               (256, False, False, False),
                                               (256, False, False, True)):
            meta = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "IS_CAUSAL": True,
                    "HAS_KEY_MASK": masked, "IS_VARLEN": varlen, "HAS_DROPOUT": False,
                    "HAS_SLOPE_GRAD": False, "INPUT_PRECISION": "ieee" if fp32 else None,
                    "INTERPRETER": False, **POINTERS, **BWD}
            pruned = alibi_configs.prune_configs([alibi_configs.config(*c) for c in configs], {},
                                              kernel=name, **meta)
            config = pruned[0]
            yield (f"alibi {name} D={head_dim} mask={masked} varlen={varlen} fp32={fp32} "
                   f"{tuple(config.kwargs.values())}",
                   kernel, ATTN_TYPES_FP32 if fp32 else ATTN_TYPES, {**meta, **config.kwargs},
                   config.num_warps, config.num_stages)
        # Dropout and (dq) the slope gradient, at D=128 with the largest config.
        # dq also: the partial rows of a context-parallel chunk pair.
        for dropout, slope_grad, partial in ((True, True, False), (False, True, False),
                                             (False, True, True))[:3 if name == "dq" else 1]:
            meta = {"HEAD_DIM": 128, "BLOCK_D": 128, "IS_CAUSAL": True, "HAS_KEY_MASK": False,
                    "IS_VARLEN": False, "HAS_DROPOUT": dropout, "HAS_SLOPE_GRAD": slope_grad,
                    "INPUT_PRECISION": None, "INTERPRETER": False, **POINTERS, **BWD,
                    "PARTIAL_ROWS": partial, "COUNT": True}
            config = alibi_configs.config(*configs[0])
            yield (f"alibi {name} D=128 dropout={dropout} slope_grad={slope_grad} "
                   f"partial_rows={partial} {tuple(config.kwargs.values())}", kernel, ATTN_TYPES,
                   {**meta, **config.kwargs}, config.num_warps, config.num_stages)
        # Decode (Sq = 1), MHA, packed: lengths and group arrive specialised to constants.
        meta = {"HEAD_DIM": 64, "BLOCK_D": 64, "IS_CAUSAL": True, "HAS_KEY_MASK": False,
                "IS_VARLEN": True, "HAS_DROPOUT": False, "HAS_SLOPE_GRAD": False,
                "INPUT_PRECISION": None, "INTERPRETER": False, **POINTERS, **BWD, "BIAS_PERIOD": 64,
                "BLOCK_M": 64, "BLOCK_N": 64, "seqlen_q": 1, "SQ_BUCKET": 1, "group": 1}
        yield f"alibi {name} D=64 varlen=True Sq=1 group=1", kernel, ATTN_TYPES, meta, 4, 2
    yield from decode_cases()


def decode_cases():
    """The split-KV decode kernels with the tiles ``alibi_decode._split_blocks`` picks: GQA decode
    (Sq = 1, mask and cache lengths), the largest tiles (64 rows at D = 256, bf16 and fp32),
    packed MHA decode with Triton's constant ones, and the merge."""
    import torch

    types = {**ATTN_TYPES, "OP": "*fp32", "LP": "*fp32", "SEQLENS": "*i32"}
    for dtype, head_dim, rows, masked, varlen, extra in (
            (torch.bfloat16, 128, 4, True, False, {"seqlen_q": 1}),
            (torch.bfloat16, 256, 64, False, False, {}),
            (torch.float32, 256, 64, False, False, {}),
            (torch.bfloat16, 64, 1, False, True, {"seqlen_q": 1, "group": 1})):
        query = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")
        tiles = decode_ops._split_blocks(query, rows)
        num_warps, num_stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        fp32 = dtype == torch.float32
        meta = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "IS_CAUSAL": True,
                "HAS_KEY_MASK": masked, "HAS_SEQLENS": masked, "IS_VARLEN": varlen,
                "INPUT_PRECISION": "ieee" if fp32 else None, "INTERPRETER": False,
                "SKIP": True, "COUNT": masked, **tiles, **extra}
        yield (f"alibi decode split D={head_dim} rows={rows} mask+seqlens={masked} "
               f"varlen={varlen} fp32={fp32} {tuple(tiles.values())}",
               alibi_decode.alibi_decode_split_kernel, ATTN_TYPES_FP32 | types if fp32 else types,
               meta, num_warps, num_stages)
    for head_dim in (128, 256):
        meta = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_M": decode_ops._MERGE_BLOCK_M,
                "INTERPRETER": False}
        yield (f"alibi decode merge D={head_dim}", alibi_decode.alibi_decode_merge_kernel,
               {"OP": "*fp32", "LP": "*fp32", "O": "*bf16", "LSE": "*fp32"}, meta, 4, 1)


def main() -> int:
    failed = 0
    for name, kernel, types, constexprs, num_warps, num_stages in cases():
        try:
            shared = compile_sm90(kernel, types, constexprs, num_warps, num_stages)
            ok = shared <= SM90_SHARED_BYTES
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {shared} B shared")
        except Exception as error:
            ok = False
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:300]}")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
