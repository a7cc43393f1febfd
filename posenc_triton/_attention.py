"""The base of every attention module: projections and argument checks.

Shared by the fast modules (:mod:`posenc_triton.nn`) and their references
(:mod:`posenc_triton.reference`), so both take the same constructor arguments and hold the
same parameter names.
"""

from __future__ import annotations

from typing import Optional

import torch

from posenc_triton import _checks


class SelfAttentionBase(torch.nn.Module):
    """Projections and argument checks shared by the attention modules (fast and reference).

    ``q_proj: d_model -> d_model``, ``k_proj, v_proj: d_model -> num_kv_heads * head_dim``,
    ``o_proj: d_model -> d_model``, with ``head_dim = d_model // num_heads``. The parameter
    names are the same in every module, so ``load_state_dict`` moves weights between them.
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int = 2048,
                 dropout: float = 0.0, *, num_kv_heads: Optional[int] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        _checks.positive_int("d_model", d_model)
        _checks.positive_int("num_heads", num_heads)
        _checks.positive_int("max_seq_len", max_seq_len)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _checks.positive_int("num_kv_heads", num_kv_heads)
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads} (GQA/MQA)")
        _checks.probability("dropout", dropout)
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.max_seq_len, self.dropout = max_seq_len, float(dropout)
        kv_dim = num_kv_heads * self.head_dim
        factory = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(d_model, d_model, **factory)
        self.k_proj = torch.nn.Linear(d_model, kv_dim, **factory)
        self.v_proj = torch.nn.Linear(d_model, kv_dim, **factory)
        self.o_proj = torch.nn.Linear(d_model, d_model, **factory)

    def _check_input(self, x, attention_mask, is_causal) -> None:
        _checks.check_activations(x, self.d_model)
        _checks.check_bool("is_causal", is_causal)
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a torch.Tensor or None, "
                            f"got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be a bool tensor (True = keep), "
                            f"got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"attention_mask must have shape [B, S] = {list(x.shape[:2])}, "
                             f"got {list(attention_mask.shape)}")
        if attention_mask.device != x.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but x is on "
                             f"{x.device}")

    def _rotary_dim(self, rotary_dim) -> int:
        """``rotary_dim`` checked (None: the whole head)."""
        rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
        if not _checks.is_int(rotary_dim) or not 0 < rotary_dim <= self.head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even int in 2..head_dim={self.head_dim}, "
                             f"got {rotary_dim!r}")
        return rotary_dim

    def _project(self, x: torch.Tensor):
        """``q [B, S, H, D]``, ``k, v [B, S, Hk, D]``: views of the projections' outputs."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        return q, k, v

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}")
