"""What scaling out costs: each rank's parameter bytes, and the bytes each step sends between ranks (parallel.py).
The tests hold these formulas to the bytes collectives.py counts in a real run.

Formulas from the config alone (no model is built), so they answer "how many GPUs does Mixtral-8x7B need?" on a
laptop. The communication model is the usual one: a ring all-reduce of S bytes sends 2 (N-1)/N S per rank, an
all-gather sends a rank's own part to the N-1 others, an all-to-all sends every row that leaves the rank.
Left out: activations, the KV cache (see `KVCache.nbytes`), and the latency of each collective (a fixed cost per call
that dominates at small batch sizes: compare `collectives_per_step`).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig

INDEX_BYTES = 8                     # the per-expert counts that expert parallelism exchanges first are int64


def _local_kv_heads(config: ModelConfig, world_size: int) -> int:
    """kv heads per rank under tensor parallelism: Hkv/N, or 1 when N > Hkv (each replicated on N/Hkv ranks)."""
    return max(config.n_kv_heads // world_size, 1)


def rank_parameter_bytes(config: ModelConfig, mode: str | None, world_size: int, dtype_bytes: int = 2
                         ) -> dict[str, int]:
    """Bytes of parameters one rank holds: {'replicated', 'sharded', 'rank', 'one_process'}.

    mode None: one process (world_size ignored). 'expert': E/N experts per rank, the rest replicated. 'tensor':
    1/N of wq, wo, the FFN (of every expert) and, when N divides the vocabulary and the head is untied, the head;
    wk/wv hold Hkv/N heads (or one, replicated, when N > Hkv); embedding, norms and router replicated.
    """
    c, n = config, world_size
    d, hd, inner = c.dim, c.head_dim, c.hidden_dim
    q_size, kv_size = c.n_heads * hd, c.n_kv_heads * hd
    attention = 2 * d * q_size + 2 * d * kv_size                       # wq, wo; wk, wv
    ffn = 3 * d * inner * max(c.n_experts, 1)                           # dense FFN, or all experts
    router = d * c.n_experts
    head = 0 if c.tie_embeddings else c.vocab_size * d
    trunk = c.vocab_size * d + (2 * c.n_layers + 1) * d                 # embedding, norms
    one = trunk + head + c.n_layers * (attention + ffn + router)
    if mode is None:
        return {"replicated": one * dtype_bytes, "sharded": 0, "rank": one * dtype_bytes, "one_process": one * dtype_bytes}
    if mode == "expert":
        replicated = trunk + head + c.n_layers * (attention + router)
        sharded = c.n_layers * ffn // n
    elif mode == "tensor":
        split_head = not c.tie_embeddings and c.vocab_size % n == 0
        replicated = trunk + c.n_layers * router + (0 if split_head else head)
        local_attention = 2 * d * q_size // n + 2 * d * _local_kv_heads(c, n) * hd
        sharded = c.n_layers * (local_attention + ffn // n) + (head // n if split_head else 0)
    else:
        raise ValueError(f"mode must be 'expert', 'tensor' or None, got {mode!r}")
    return {"replicated": replicated * dtype_bytes, "sharded": sharded * dtype_bytes,
            "rank": (replicated + sharded) * dtype_bytes, "one_process": one * dtype_bytes}


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters a model (or one rank's share of it) actually holds, tied weights once, packed ones too."""
    return model.num_parameters() * model.dtype.itemsize


def step_traffic(config: ModelConfig, mode: str, world_size: int, n_tokens: int, dtype_bytes: int = 2,
                 routing: list[torch.Tensor] | None = None, rank: int | None = None) -> dict[str, float]:
    """Bytes one rank sends in one forward over `n_tokens` tokens (B for a decoding step): per kind of collective.

    'tensor' (exact): per layer two all-reduces of (tokens, dim), and one all-gather of the logits when the head is split.
    'expert': per layer the per-expert counts, then every (token, expert) pair whose expert lives on another rank goes
    there and back (two all-to-alls), and an all-gather of the token shares. With `routing` (per layer the (tokens, k)
    chosen experts, e.g. `model.chosen_experts()` of one process) and `rank`: that rank's exact bytes; without: the
    mean over ranks under uniform routing, where a pair leaves its rank with probability (N-1)/N.
    """
    c, n, b = config, world_size, dtype_bytes
    row = c.dim * b
    if mode == "tensor":
        split_head = not c.tie_embeddings and c.vocab_size % n == 0
        return {"all_reduce": c.n_layers * 2 * (2 * (n - 1) * n_tokens * row / n), "all_to_all": 0.0,
                "all_gather": (n - 1) * n_tokens * (c.vocab_size // n) * b if split_head else 0.0}
    if mode != "expert":
        raise ValueError(f"mode must be 'expert' or 'tensor', got {mode!r}")
    share = math.ceil(n_tokens / n)
    counts = c.n_layers * (n - 1) * (c.n_experts // n) * INDEX_BYTES
    gather = c.n_layers * (n - 1) * share * row
    k = c.experts_per_token
    if routing is None:
        pairs_out = pairs_back = n_tokens * k / n * (n - 1) / n                  # per layer, on average
        return {"all_reduce": 0.0, "all_to_all": counts + c.n_layers * (pairs_out + pairs_back) * row,
                "all_gather": float(gather)}
    if rank is None:
        raise ValueError("step_traffic: give the rank whose bytes to count along with the routing")
    per_rank = c.n_experts // n
    start, stop = min(rank * share, n_tokens), min((rank + 1) * share, n_tokens)
    moved = 0
    for experts in routing:                                                      # (tokens, k) per layer
        home = experts // per_rank                                               # the rank holding each expert
        mine = torch.zeros(n_tokens, dtype=torch.bool)
        mine[start:stop] = True
        sent = int((home[mine] != rank).sum())                                   # my pairs that leave
        returned = int((home[~mine] == rank).sum())                              # others' pairs I compute, sent back
        moved += (sent + returned) * row
    return {"all_reduce": 0.0, "all_to_all": float(counts + moved), "all_gather": float(gather)}


def collectives_per_step(config: ModelConfig, mode: str, world_size: int) -> int:
    """How many collective calls one forward makes: each costs a latency (~10-100 us on NCCL, more on gloo)."""
    if mode == "tensor":
        return 2 * config.n_layers + (not config.tie_embeddings and config.vocab_size % world_size == 0)
    return 4 * config.n_layers                                                   # counts, dispatch, combine, gather
