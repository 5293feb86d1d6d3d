"""Solutions to notebook 11's exercises: dispatch counts, one rank's bytes, a Megatron shard, a ring all-reduce."""

from __future__ import annotations

import math

import torch


def dispatch_counts(experts: torch.Tensor, n_experts: int, world_size: int) -> torch.Tensor:
    share = math.ceil(experts.shape[0] / world_size)                  # tokens per rank: [r s, (r + 1) s)
    experts_per_rank = n_experts // world_size                        # rank r holds experts [r E/N, (r + 1) E/N)
    counts = torch.zeros(world_size, world_size, dtype=torch.long)    # [token's rank, expert's rank]
    for token, chosen in enumerate(experts.tolist()):
        for expert in chosen:                                         # each of its k (token, expert) pairs
            counts[token // share, expert // experts_per_rank] += 1
    return counts


def expert_parallel_bytes(config, world_size: int, dtype_bytes: int) -> int:
    c = config
    experts = c.n_layers * c.n_experts * 3 * c.dim * c.hidden_dim    # split: E/N experts per rank
    attention = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim
    per_layer = attention + 2 * c.dim + c.dim * c.n_experts          # attention, two norms, the router
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim   # table, head, final norm
    replicated = embeddings + c.n_layers * per_layer                  # on every rank
    return (replicated + experts // world_size) * dtype_bytes


def shard_linear(weight: torch.Tensor, rank: int, world_size: int, parallel: str) -> torch.Tensor:
    out_features, in_features = weight.shape                          # nn.Linear: (out, in)
    if parallel == "column":                                          # split the outputs: a block of rows
        part = out_features // world_size
        return weight[rank * part:(rank + 1) * part]
    part = in_features // world_size                                  # row-parallel: split the inputs, columns
    return weight[:, rank * part:(rank + 1) * part]


def ring_all_reduce_bytes(n_bytes: int, world_size: int) -> float:
    # reduce-scatter, then all-gather: each sends N - 1 chunks of S / N
    return 2 * (world_size - 1) * n_bytes / world_size
