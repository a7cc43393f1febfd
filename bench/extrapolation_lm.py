"""The length-extrapolation study's data and models (``bench_extrapolation`` runs them).

* Data: the top-level ``*.py`` files of the running Python's standard library as bytes, split
  by file name (``crc32(name) % 10 == 0``: held out), so the split is fixed by name alone.
* Models: small pre-norm decoders over bytes that differ only in their position encoding,
  built on the package's own layers (``RoPEAttention``, ``ALiBiAttention``,
  ``SinusoidalPositionalEncoding``); NoPE, sinusoidal and learned attend with plain causal
  SDPA.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from posenc_triton._attention import SelfAttentionBase
from posenc_triton.nn import ALiBiAttention, RoPEAttention, SinusoidalPositionalEncoding

ENCODINGS = ("nope", "sinusoidal", "learned", "rope", "alibi")


# ------------------------------------------------------------------------------------------
# Data: the standard library's source, split by file name
# ------------------------------------------------------------------------------------------


def is_held_out(name: str) -> bool:
    """Whether the file ``name`` (a base name) belongs to the held-out split."""
    return zlib.crc32(name.encode()) % 10 == 0


def stdlib_split(root: Optional[Path] = None):
    """``(train, held_out, info)``: uint8 tensors of the concatenated bytes of the top-level
    ``*.py`` files of ``root`` (default: this Python's standard library), sorted by name and
    split with :func:`is_held_out`; ``info`` names the files and counts the bytes."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    parts = {True: [], False: []}
    for path in files:
        parts[is_held_out(path.name)].append(path)
    if not parts[True] or not parts[False]:
        raise ValueError(f"no standard-library source to split in {root} (found {len(files)} "
                         "*.py files)")

    def load(paths):
        data = b"".join(p.read_bytes() for p in paths)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    train, held = load(parts[False]), load(parts[True])
    info = {"root": str(root), "train_files": len(parts[False]), "train_bytes": train.numel(),
            "held_out_files": [p.name for p in parts[True]], "held_out_bytes": held.numel(),
            "crc32": f"{zlib.crc32(train.numpy().tobytes()):08x}/"
                     f"{zlib.crc32(held.numpy().tobytes()):08x}"}
    return train, held, info


# ------------------------------------------------------------------------------------------
# The model: a pre-norm decoder whose only difference is the position encoding
# ------------------------------------------------------------------------------------------


class _CausalAttention(SelfAttentionBase):
    """Attention with no position information (NoPE, or positions added to the input)."""

    def forward(self, x: torch.Tensor, attention_mask=None, is_causal: bool = True):
        batch, seqlen, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._project(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.d_model))


class _Block(torch.nn.Module):
    def __init__(self, attention: torch.nn.Module, d_model: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.attn = attention
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.norm1(x), is_causal=True)
        return x + self.mlp(self.norm2(x))


class ByteLM(torch.nn.Module):
    """Byte-level causal LM: ``tokens [B, S]`` (int, < 256) → ``logits [B, S, 256]``.

    ``encoding``: one of ``ENCODINGS``; ``scaling``: a RoPE scaling dict (``rope`` only).
    ``train_len`` sizes the learned table and is RoPE's ``max_position_embeddings``.
    """

    def __init__(self, encoding: str, train_len: int, d_model: int, layers: int, heads: int,
                 scaling: Optional[dict] = None):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if scaling is not None and encoding != "rope":
            raise ValueError(f"scaling applies to encoding='rope' only, got {encoding!r}")
        self.encoding, self.train_len = encoding, train_len
        self.embed = torch.nn.Embedding(256, d_model)
        if encoding == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(d_model)
        elif encoding == "learned":
            self.table = torch.nn.Embedding(train_len, d_model)

        def attention():
            if encoding == "rope":
                return RoPEAttention(d_model, heads, train_len, scaling=scaling)
            if encoding == "alibi":
                return ALiBiAttention(d_model, heads, train_len)
            return _CausalAttention(d_model, heads, train_len)

        self.blocks = torch.nn.ModuleList(_Block(attention(), d_model) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.encoding == "sinusoidal":
            x = self.positions(x)
        elif self.encoding == "learned":  # positions past the table reuse its last row
            pos = torch.arange(tokens.shape[1], device=tokens.device).clamp(max=self.train_len - 1)
            x = x + self.table(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def rope_scaling(rule: Optional[str], factor: float, train_len: int) -> Optional[dict]:
    """The Hugging Face scaling dict of ``rule`` for evaluating at ``factor x train_len``."""
    if rule is None:
        return None
    if rule == "ntk":
        return {"rope_type": "dynamic", "factor": 1.0}
    scaling = {"rope_type": rule, "factor": float(factor)}
    if rule == "yarn":
        scaling["original_max_position_embeddings"] = train_len
    return scaling
