"""Scale out over N processes with torch.distributed: expert parallelism (GShard) and tensor parallelism (Megatron).

Every rank runs the same program on the same tokens and holds the replicated pieces (embedding, norms, router) and
its own slice of the rest:
- parallel="expert" (MoE models): E/N whole experts per rank. Each rank routes its share of the tokens, sends every
  (token, expert) pair to the rank that holds the expert (an all-to-all), the experts run, and the results come back
  by a second all-to-all; an all-gather then gives every rank every token again.
- parallel="tensor" (any model): H/N query heads per rank with their kv heads, 1/N of the FFN width (of every expert),
  V/N rows of the head. One all-reduce after attention, one after the FFN, one all-gather of the logits.
Every rank so computes the logits of one process (to fp32 round-off), and `generate` runs unchanged on every rank.

Built by `Transformer.from_pretrained(path, parallel=...)`: the loader builds the model on `meta`, and sharding.py
swaps in this rank's modules (these) and cuts each checkpoint tensor to this rank's rows or columns before it is read.
The collectives (collectives.py: all_reduce, all_to_all, all_gather on a process group, each counting its bytes) are
called by hand rather than left to DTensor's `parallelize_module`, so each equation sits above its line; Megatron's
kv-head replication and the expert all-to-all have no built-in style there anyway.
Left out: training (the collectives here carry no gradients), pipeline parallelism, data-parallel attention under
expert parallelism, capacity limits, overlapping communication with compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .collectives import all_gather, all_reduce, all_to_all
from .feedforward import FeedForward
from .moe import MoeLayer, route


# ---------------------------------------------------------------------------------------------------------------------
# Megatron-LM (Shoeybi et al. 2019, §3): split X W into column blocks and the next product into row blocks,
#   Y = [X A_1, ..., X A_N] (column-parallel, no communication),  Z = sum_r Y_r B_r (row-parallel: one all-reduce).
class TensorParallelAttention(Attention):
    """This rank's H/N query heads and their kv heads: wq, wk, wv column-parallel, wo row-parallel.

    Attention(x) = sum_r Attention_r(x) wo_r: each rank's heads give a partial sum (B, T, dim), summed by one
    all-reduce. The KV cache of this layer holds only this rank's kv heads (`Transformer.new_cache` reads them here).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer_idx)
        self.group = group

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return all_reduce(super().forward(x, *args, **kwargs), self.group)       # (B, T, dim)


class TensorParallelFeedForward(FeedForward):
    """SwiGLU with this rank's 1/N of the hidden units: w1, w3 column-parallel (hidden_dim/N rows), w2 row-parallel.

    FFN(x) = sum_r w2_r (silu(w1_r x) * w3_r x): SiLU and the product act unit by unit, so each rank's units are exact.
    """

    def __init__(self, dim: int, hidden_dim: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, hidden_dim)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)                        # (..., dim)


class TensorParallelMoe(MoeLayer):
    """Every expert with this rank's 1/N of its hidden units (the router replicated, so every rank routes alike).

    y = sum_i G(x)_i E_i(x) = sum_r sum_i G(x)_i E_i^(r)(x): one all-reduce of the partial sums.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, experts_per_token: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, hidden_dim, n_experts, experts_per_token)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)                        # (..., dim)


class VocabParallelHead(nn.Linear):
    """V/N rows of the output head: each rank's logits for its slice of the vocabulary, then one all-gather."""

    def __init__(self, dim: int, vocab_rows: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, vocab_rows, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather(F.linear(x, self.weight), dim=-1, group=self.group)   # (..., V/N) -> (..., V)


class ExpertParallelMoe(nn.Module):
    """E/N of the experts on this rank (GShard, Lepikhin et al. 2020; DeepSpeed-MoE); (..., dim) -> (..., dim).

    Every rank holds all N tokens (attention is replicated) and takes a contiguous share of ceil(N/ranks) of them:
      1. route its tokens (the router is replicated; every rank routes all tokens, so the records match one process),
      2. dispatch: send each (token, expert) pair to the rank holding the expert (all-to-all, uneven split sizes),
      3. run the experts it holds on what arrives,
      4. combine: the outputs go back the same way (all-to-all), weighted and summed, y = sum_i G(x)_i E_i(x),
      5. all-gather the shares, so every rank holds every token's output again.
    No capacity limit: no pair is dropped, so the result is one process's, to round-off. Records as MoeLayer, plus
    `last_sent` (pairs this rank sent to each rank) for the pictures.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, experts_per_token: int, rank: int, world_size: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group
        self.world_size, self.rank = world_size, rank
        self.n_experts, self.experts_per_token = n_experts, experts_per_token
        self.local_experts = n_experts // self.world_size                                  # E/N
        self.first_expert = self.rank * self.local_experts
        self.gate = nn.Linear(dim, n_experts, bias=False)                                  # W_g, replicated
        self.w1 = nn.Parameter(torch.empty(self.local_experts, hidden_dim, dim))           # (E/N, I, dim) gate
        self.w2 = nn.Parameter(torch.empty(self.local_experts, dim, hidden_dim))           # (E/N, dim, I) down
        self.w3 = nn.Parameter(torch.empty(self.local_experts, hidden_dim, dim))           # (E/N, I, dim) up
        self.record_routing = True
        self.last_router_logits = self.last_experts = self.last_weights = self.last_sent = None
        self.last_dropped = 0

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of local expert e (global id first_expert + e) on x (n, dim) -> (n, dim)."""
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                       # (N, dim), every rank
        n_tokens, k, ranks = x.shape[0], self.experts_per_token, self.world_size
        router_logits = self.gate(x)                                                       # (N, E)
        weights, experts = route(router_logits, k)                                         # (N, k), (N, k)

        # 1. this rank's share: tokens [start, stop), pairs sorted by expert, so by the rank that holds it
        share = -(-n_tokens // ranks)                                                      # ceil(N / ranks)
        start, stop = min(self.rank * share, n_tokens), min((self.rank + 1) * share, n_tokens)
        my_experts = experts[start:stop].reshape(-1)                                       # (n*k,)
        order = my_experts.argsort(stable=True)
        token_of_pair = order // k                                                         # (n*k,) in [0, n)
        per_expert = torch.bincount(my_experts, minlength=self.n_experts)                  # (E,) pairs per expert
        send_rows = per_expert.view(ranks, -1).sum(dim=1).tolist()                         # pairs to each rank

        # 2. dispatch: first how many pairs per expert each rank will get, then the token vectors themselves
        arriving = all_to_all(per_expert, [self.local_experts] * ranks, [self.local_experts] * ranks, self.group)
        arriving = arriving.view(ranks, self.local_experts)                                # (source rank, E/N)
        receive_rows = arriving.sum(dim=1).tolist()
        received = all_to_all(x[start:stop][token_of_pair], send_rows, receive_rows, self.group)   # (m, dim)

        # 3. the local experts: rows arrive grouped by source rank, then by expert within each source's block
        local_expert = torch.repeat_interleave(torch.arange(self.local_experts, device=x.device).repeat(ranks),
                                               arriving.reshape(-1))                       # (m,) local expert ids
        by_expert = local_expert.argsort(stable=True)                                      # tokens in global order
        outputs = torch.empty_like(received)
        begin = 0
        for e, count in enumerate(arriving.sum(dim=0).tolist()):
            rows = by_expert[begin:begin + count]
            if count:
                outputs[rows] = self.expert(e, received[rows])
            begin += count

        # 4. combine: back to the rank that sent each pair, in the order sent; Mixtral §2.1's sum over the experts
        returned = all_to_all(outputs, receive_rows, send_rows, self.group)                # (n*k, dim)
        weight_of_pair = weights[start:stop].reshape(-1)[order]                            # (n*k,)
        mine = x.new_zeros((stop - start, x.shape[1]))
        mine.index_add_(0, token_of_pair, returned * weight_of_pair[:, None].to(x.dtype))

        # 5. every rank gets every token back (shares padded to ceil(N/ranks) rows for the all-gather)
        padded = torch.cat([mine, x.new_zeros((share - mine.shape[0], x.shape[1]))])
        out = all_gather(padded, dim=0, group=self.group)[:n_tokens]                       # (N, dim)
        if self.record_routing:
            self.last_router_logits, self.last_experts, self.last_weights = router_logits, experts, weights
            self.last_sent = send_rows
        return out.reshape(shape)

