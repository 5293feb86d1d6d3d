"""Solutions to notebook 07's exercises: a dense model's parameter count, the pre-norm block, the tied head."""

from __future__ import annotations

import torch


def count_parameters(config) -> int:
    c = config
    attention = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2   # wq, wo; wk, wv
    feed_forward = 3 * c.dim * c.hidden_dim                            # w1, w3 (hidden, d); w2 (d, hidden)
    norms = 2 * c.dim                                                  # attention_norm, ffn_norm
    embedding = c.vocab_size * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim             # a tied head is the embedding itself
    return embedding + c.n_layers * (attention + feed_forward + norms) + c.dim + head   # + the final norm


def pre_norm_block(x, attention, feed_forward, attention_norm, ffn_norm) -> torch.Tensor:
    h = x + attention(attention_norm(x))                               # (B, T, d): the raw stream plus attention
    return h + feed_forward(ffn_norm(h))                               # (B, T, d)


def tied_logits(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, embedding: torch.Tensor) -> torch.Tensor:
    h32 = hidden.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(hidden.dtype) * norm_weight
    return normed @ embedding.T                                        # (B, T, d) @ (d, V) -> (B, T, V)
