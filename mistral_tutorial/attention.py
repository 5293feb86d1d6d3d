"""Causal self-attention with grouped-query heads (Ainslie et al. 2023) and Mistral's sliding-window mask.

Mistral 7B §2: "each token can attend to at most W tokens from the previous layer": query i sees key j iff
i - W < j <= i (W keys, itself included). W = None is full causal attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

if TYPE_CHECKING:  # pragma: no cover
    from .cache import KVCache


def sliding_window_mask(seq_len: int, window: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: i - window < j <= i.

    window=None gives the plain causal mask (j <= i). Covers one sequence without a cache; the cached case, where
    queries and keys come from different ranges, is `window_mask` below and `cache.py`.
    """
    positions = torch.arange(seq_len, device=device)
    return window_mask(positions, positions, window)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (..., Tq, Tk) mask for queries at `query_pos` (..., Tq) and keys at `key_pos` (..., Tk).

    True where key_pos <= query_pos and, with a window W, key_pos > query_pos - W.
    """
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1 (or None for full attention), got {window}")
    q = query_pos[..., :, None]                                    # (..., Tq, 1)
    k = key_pos[..., None, :]                                      # (..., 1, Tk)
    # Mistral 7B §2: causal, and at most W keys back (itself included)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


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
