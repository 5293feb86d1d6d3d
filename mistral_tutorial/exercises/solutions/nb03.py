"""Solutions to notebook 03's exercises: the causal mask, repeat_kv, the attention weights, grouped-query attention."""

from __future__ import annotations

import math

import torch


def make_causal_mask(seq_len: int) -> torch.Tensor:
    # (T, T) bool, row i = query, column j = key: True where j <= i
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): query head h uses kv head h // n_rep
    return x.repeat_interleave(n_rep, dim=1)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Vaswani et al. 2017, eq. (1): softmax(Q K^T / sqrt(d_k)), masked keys at -inf
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])         # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)          # each row sums to 1 over its keys


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]                                  # query heads per kv head
    k = k.repeat_interleave(n_rep, dim=1)                             # (B, H, T, D)
    v = v.repeat_interleave(n_rep, dim=1)                             # (B, H, T, D)
    seq_len = q.shape[2]
    i = torch.arange(seq_len)[:, None]                                # query positions (T, 1)
    j = torch.arange(seq_len)[None, :]                                # key positions (1, T)
    allowed = j <= i                                                  # causal
    if window is not None:
        allowed = allowed & (j > i - window)                          # Mistral: i - W < j <= i
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])         # (B, H, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v                          # (B, H, T, D)
