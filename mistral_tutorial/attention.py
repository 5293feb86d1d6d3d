"""Causal self-attention with grouped-query heads (Ainslie et al. 2023), masked by Mistral's sliding window (masks.py).

Mistral 7B, Fig 1 caption: "each token can attend to at most W tokens from the previous layer": query i sees key j
iff i - W < j <= i (W keys, itself included; masks.py). W = None is full causal attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .masks import sliding_window_mask, window_mask  # noqa: F401  (mt.attention.window_mask, as before)
from .rope import apply_rope

if TYPE_CHECKING:  # pragma: no cover
    from .cache import KVCache


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each key/value head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    batch, n_kv_heads, seq_len, head_dim = x.shape
    return x[:, :, None].expand(batch, n_kv_heads, n_rep, seq_len, head_dim).reshape(
        batch, n_kv_heads * n_rep, seq_len, head_dim)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) for q (B, H, Tq, D), k (B, H, Tk, D): (B, H, Tq, Tk), softmax in fp32."""
    # Vaswani et al. 2017, eq. (1): Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])    # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


class Attention(nn.Module):
    """Multi-head attention with H query heads sharing Hkv key/value heads (GQA; Hkv = H is MHA, Hkv = 1 is MQA).

    Weights are named as in the reference implementation: wq (H*D, dim), wk and wv (Hkv*D, dim), wo (dim, H*D).
    On a CPU, packed.py swaps wq, wk, wv for three parts of one packed matrix (one product), and wo for another.
    Set `record_weights = True` to keep the last attention weights (B, H, Tq, Tk) in `last_weights` for plots.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int = 0) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.n_rep = n_heads // n_kv_heads
        self.layer_idx = layer_idx
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.record_weights = False
        self.last_weights: torch.Tensor | None = None
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim).

        cos, sin: (B or 1, T, D) rotary angles of the T positions. mask: boolean, broadcastable to (B, H, T, Tk), True
        where attention is allowed (None: all allowed, or causal if `is_causal`). With a cache, the new keys and
        values are stored and the attended ones come from the cache (see cache.py).
        """
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)                      # (B, T, H, D)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)                   # (B, T, Hkv, D)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)                   # (B, T, Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                     # (B, heads, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                         # (B, Hkv, Tk, D)

        if self.record_weights:
            full_mask = mask
            if is_causal:
                full_mask = sliding_window_mask(seq_len, None, device=x.device)
            weights = attention_weights(q, repeat_kv(k, self.n_rep), full_mask)               # (B, H, T, Tk)
            self.last_weights = weights.detach()
            out = weights @ repeat_kv(v, self.n_rep)                                          # (B, H, T, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                                 enable_gqa=self.n_rep > 1)                   # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)       # (B, T, H*D)
        return self.wo(out)                                                                   # (B, T, dim)
