"""The published configurations.

Mistral 7B (Jiang et al. 2023, Table 1): dim 4096, n_layers 32, head_dim 128, hidden_dim 14336, n_heads 32, n_kv_heads 8,
window_size 4096, context_len 8192, vocab_size 32000. The v0.1 transformers config adds rope_theta 1e4, rms_norm_eps 1e-5
and max_position_embeddings 32768.

Mixtral 8x7B (Jiang et al. 2024, Table 1): the same trunk with num_experts 8, top_k_experts 2, context_len 32768, and
(§2 text) "a fully dense context length of 32k tokens": no sliding window. Its transformers config has rope_theta 1e6.
"""

from __future__ import annotations

from .config import ModelConfig


def mistral_7b_v0_1() -> ModelConfig:
    """Mistral-7B-v0.1: 7.24 B parameters, sliding window W = 4096."""
    return ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
        norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768,
        n_experts=0, experts_per_token=2, tie_embeddings=False,
    )


def mixtral_8x7b_v0_1() -> ModelConfig:
    """Mixtral-8x7B-v0.1: 46.7 B parameters in all, 12.9 B active per token (8 experts, top-2), full attention.

    46.7 B / 12.9 B are the release post's figures (mistral.ai/news/mixtral-of-experts) and what this config counts;
    the paper's abstract rounds them to 47B and 13B.
    """
    return ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
        norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_position_embeddings=32768,
        n_experts=8, experts_per_token=2, tie_embeddings=False,
    )


PRESETS = {"mistral-7b-v0.1": mistral_7b_v0_1, "mixtral-8x7b-v0.1": mixtral_8x7b_v0_1}
