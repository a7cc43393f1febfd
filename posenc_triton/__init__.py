"""posenc_triton: fused Triton kernels for rotary (RoPE) and ALiBi positional encodings."""

from posenc_triton.alibi import (
    alibi_attention,
    alibi_attention_varlen,
    alibi_attention_with_kvcache,
    alibi_slopes,
)
from posenc_triton.alibi_counts import alibi_tile_counts
from posenc_triton.nn import (
    ALiBiAttention,
    RoPEAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)
from posenc_triton.rope import apply_rope, rope_cos_sin, rope_frequencies

__version__ = "0.1.0"

__all__ = [
    "ALiBiAttention",
    "RoPEAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "alibi_attention",
    "alibi_attention_varlen",
    "alibi_attention_with_kvcache",
    "alibi_slopes",
    "alibi_tile_counts",
    "apply_rope",
    "rope_cos_sin",
    "rope_frequencies",
]
