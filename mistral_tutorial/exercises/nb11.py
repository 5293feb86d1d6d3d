"""Notebook 11's exercises: expert parallelism's dispatch counts, one rank's bytes under expert parallelism, a
Megatron column or row shard of a weight, and the bytes of a ring all-reduce."""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from ..parallel_costs import rank_parameter_bytes, step_traffic
from ..presets import mixtral_8x7b_v0_1
from ..sharding import Parallelism
from .checker import Case, Exercise


def _moe_config(n_experts: int, k: int) -> ModelConfig:
    return ModelConfig(vocab_size=4, dim=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, hidden_dim=2,
                       n_experts=n_experts, experts_per_token=k, sliding_window=None)


def _counts_reference(experts: torch.Tensor, n_experts: int, world_size: int) -> torch.Tensor:
    """Pairs (token, expert) from each token's rank to each expert's rank, with the library's ownership rules."""
    config = _moe_config(n_experts, experts.shape[1])
    owner = torch.empty(n_experts, dtype=torch.long)
    for rank in range(world_size):
        owner[list(Parallelism("expert", rank, world_size).experts(config))] = rank
    share = math.ceil(experts.shape[0] / world_size)                        # tokens per rank, as parallel.py cuts
    counts = torch.zeros(world_size, world_size, dtype=torch.long)
    for token, chosen in enumerate(experts.tolist()):
        for expert in chosen:
            counts[token // share, owner[expert]] += 1
    return counts


def _counts_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1101)
    cases = []
    for n_tokens, n_experts, k, world_size, label in [(8, 8, 2, 2, "Mixtral's E = 8, k = 2 on two ranks"),
                                                      (12, 8, 2, 4, ""), (7, 4, 1, 2, "an uneven last share"),
                                                      (3, 8, 2, 4, "more ranks than tokens per share"),
                                                      (5, 4, 2, 1, "one rank: nothing travels")]:
        experts = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])
        cases.append(Case((experts, n_experts, world_size), label))
    return cases


def _bytes_reference(config: ModelConfig, world_size: int, dtype_bytes: int) -> int:
    return rank_parameter_bytes(config, "expert", world_size, dtype_bytes)["rank"]


def _bytes_cases() -> list[Case]:
    small = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, n_experts=4,
                        experts_per_token=2, sliding_window=None, tie_embeddings=True)
    return [Case((mixtral_8x7b_v0_1(), 8, 2), "Mixtral 8x7B on 8 ranks, bf16"), Case((mixtral_8x7b_v0_1(), 2, 2)),
            Case((mixtral_8x7b_v0_1(), 1, 4), "one rank, fp32"), Case((small, 4, 4), "tied embeddings")]


def _shard_reference(weight: torch.Tensor, rank: int, world_size: int, parallel: str) -> torch.Tensor:
    """Parallelism('tensor', ...).take on an FFN weight: w1 is column-parallel, w2 row-parallel (Megatron)."""
    out_features, in_features = weight.shape
    if parallel == "column":                                              # w1: (hidden, dim), split its outputs
        config, key = _ffn_config(in_features, out_features), "layers.0.feed_forward.w1.weight"
    else:                                                                 # w2: (dim, hidden), split its inputs
        config, key = _ffn_config(out_features, in_features), "layers.0.feed_forward.w2.weight"
    part, _ = Parallelism("tensor", rank, world_size).take(key, None, weight, config)
    return part


def _ffn_config(dim: int, hidden_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=4, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, hidden_dim=hidden_dim)


def _shard_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1102)
    return [Case((torch.randn(out, inp, generator=g), rank, n, kind), label)
            for out, inp, rank, n, kind, label in [(12, 8, 1, 4, "column", "column-parallel (wq, w1, w3)"),
                                                   (8, 12, 2, 4, "row", "row-parallel (wo, w2)"),
                                                   (6, 6, 0, 2, "column", "a square weight"), (6, 6, 1, 2, "row", ""),
                                                   (16, 4, 7, 8, "column", "the last of eight ranks"),
                                                   (5, 3, 0, 1, "row", "one rank: the whole weight")]]


def _ring_reference(n_bytes: int, world_size: int) -> float:
    """One all-reduce of step_traffic's tensor mode (a layer does two), on a model whose rows are n_bytes long."""
    config = ModelConfig(vocab_size=4, dim=n_bytes, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, hidden_dim=2,
                         tie_embeddings=True)
    return step_traffic(config, "tensor", world_size, n_tokens=1, dtype_bytes=1)["all_reduce"] / 2


def _round_robin(experts, n_experts, world_size):
    counts = torch.zeros(world_size, world_size, dtype=torch.long)
    for token, chosen in enumerate(experts.tolist()):
        for expert in chosen:
            counts[token % world_size, expert // (n_experts // world_size)] += 1
    return counts


def _experts_round_robin(experts, n_experts, world_size):
    share = math.ceil(experts.shape[0] / world_size)
    counts = torch.zeros(world_size, world_size, dtype=torch.long)
    for token, chosen in enumerate(experts.tolist()):
        for expert in chosen:
            counts[token // share, expert % world_size] += 1
    return counts


EXERCISES = [
    Exercise(
        "11.1-dispatch-counts", "dispatch_counts", _counts_reference,
        "sharding.Parallelism('expert', ...).experts and parallel.py's token shares", _counts_cases,
        hint="rank r holds the tokens [r s, (r + 1) s) with s = ceil(T / N), and the E/N consecutive experts "
             "[r E/N, (r + 1) E/N); count every (token, expert) pair, k per token, at [token's rank, expert's rank].",
        more="`share = math.ceil(T / world_size)`; for each token t and each of its k experts e: "
             "`counts[t // share, e // (n_experts // world_size)] += 1`. The diagonal never travels.",
        mistakes={"the tokens were dealt round-robin (t % N): each rank holds a contiguous share of ceil(T / N) tokens.":
                  _round_robin,
                  "the experts were dealt round-robin (e % N): each rank holds E/N consecutive experts, e // (E/N).":
                  _experts_round_robin}),
    Exercise(
        "11.2-expert-parallel-bytes", "expert_parallel_bytes", _bytes_reference,
        "parallel_costs.rank_parameter_bytes(config, 'expert', N)", _bytes_cases,
        hint="only the experts are split (E/N per rank); the embedding, the head (unless tied), attention, norms and "
             "the routers are replicated on every rank.",
        more="experts = L E 3 d hidden; one rank: (everything else) + experts / N, times dtype_bytes.",
        mistakes={"everything was divided by N: only the experts are split; the rest is replicated.":
                  lambda c, n, b: rank_parameter_bytes(c, None, 1, b)["rank"] // n,
                  "the routers were split too: every rank routes every token, so each holds all of W_g.":
                  lambda c, n, b: _bytes_reference(c, n, b) - c.n_layers * c.dim * c.n_experts * b * (n - 1) // n}),
    Exercise(
        "11.3-shard-linear", "shard_linear", _shard_reference, "sharding.Parallelism('tensor', ...).take",
        _shard_cases,
        hint="an nn.Linear weight is (out_features, in_features): column-parallel splits the outputs, so it takes a "
             "contiguous block of *rows*; row-parallel splits the inputs, a block of *columns*.",
        more="column: `weight[rank * out // N:(rank + 1) * out // N]`; row: `weight[:, rank * inp // N:(rank + 1) * "
             "inp // N]` (Megatron: wq, wk, wv, w1, w3 by columns, wo and w2 by rows).",
        mistakes={"rows and columns are swapped: column-parallel cuts the *outputs*, the rows of an (out, in) weight.":
                  lambda w, r, n, kind: _shard_reference(w, r, n, "row" if kind == "column" else "column"),
                  "the rank took every N-th row or column (a strided slice): each rank's part is one contiguous block.":
                  lambda w, r, n, kind: w[r::n] if kind == "column" else w[:, r::n]}),
    Exercise(
        "11.4-ring-all-reduce", "ring_all_reduce_bytes", _ring_reference, "parallel_costs.step_traffic",
        lambda: [Case((8192, 8), "one 4096-wide bf16 row on eight ranks"), Case((1_000_000, 2)), Case((12, 3)),
                 Case((100, 1), "one rank: nothing to send")],
        hint="a ring all-reduce is a reduce-scatter then an all-gather; each sends (N - 1)/N of the S bytes from "
             "every rank: 2 (N - 1)/N S in all.",
        more="`2 * (world_size - 1) * n_bytes / world_size`: a rank sends N - 1 chunks of S/N in each of the two "
             "phases. It tends to 2 S as N grows: the bandwidth cost barely depends on N.",
        mistakes={"that is one phase: the reduce-scatter and the all-gather each send (N - 1)/N S.":
                  lambda s, n: (n - 1) * s / n,
                  "the chunks are S/N: 2 (N - 1) S / N, not 2 (N - 1) S.": lambda s, n: 2.0 * (n - 1) * s}),
]
