"""One decoder layer of Mistral / Mixtral: pre-norm attention, then pre-norm SwiGLU (dense) or sparse MoE.

    h   = x + Attention(RMSNorm(x))
    out = h + FFN(RMSNorm(h))          FFN = SwiGLU (Mistral 7B) or top-2 of 8 SwiGLU experts (Mixtral 8x7B)
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .cache import KVCache
from .config import ModelConfig
from .embedding import RMSNorm
from .feedforward import FeedForward
from .moe import MoeLayer


class TransformerBlock(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads, config.head_dim, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.is_moe:
            self.feed_forward: nn.Module = MoeLayer(config.dim, config.hidden_dim, config.n_experts,
                                                    config.experts_per_token)
        else:
            self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, is_causal: bool = False) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, is_causal)   # (B, T, dim)
        return h + self.feed_forward(self.ffn_norm(h))                                     # (B, T, dim)
