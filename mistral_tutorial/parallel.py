"""Scale out over N processes with torch.distributed: expert parallelism (GShard) and tensor parallelism (Megatron).

Every rank runs the same program on the same tokens and holds the replicated pieces (embedding, norms, router) and
its own slice of the rest:
- parallel="expert" (MoE models): E/N whole experts per rank. Each rank routes its share of the tokens, sends every
  (token, expert) pair to the rank that holds the expert (an all-to-all), the experts run, and the results come back
  by a second all-to-all; an all-gather then gives every rank every token again.
- parallel="tensor" (any model): H/N query heads per rank with their kv heads, 1/N of the FFN width (of every expert),
  V/N rows of the head. One all-reduce after attention, one after the FFN, one all-gather of the logits.
Every rank so computes the logits of one process (to fp32 round-off), and `generate` runs unchanged on every rank.

Built by `Transformer.from_pretrained(path, parallel=...)`: the loader builds the model on `meta`, `shard_modules`
swaps in this rank's modules, and `take` cuts each checkpoint tensor to this rank's rows or columns before it is read.
The collectives are written out (all_reduce, all_to_all_single, all_gather on a process group) rather than left to
DTensor's `parallelize_module`, so each equation sits above its line; Megatron's kv-head replication and the
expert all-to-all have no built-in style there anyway.
Left out: training (the collectives here carry no gradients), pipeline parallelism, data-parallel attention under
expert parallelism, capacity limits, overlapping communication with compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .feedforward import FeedForward
from .moe import MoeLayer, route

MODES = ("expert", "tensor")
# Bytes this process has sent per kind of collective (ring algorithms for all-reduce and all-gather): see `traffic`.
TRAFFIC = {"all_reduce": 0, "all_to_all": 0, "all_gather": 0}


def reset_traffic() -> None:
    for kind in TRAFFIC:
        TRAFFIC[kind] = 0


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum x over the ranks, in place. A ring all-reduce sends 2 (N-1)/N of the tensor's bytes per rank."""
    n = dist.get_world_size(group)
    TRAFFIC["all_reduce"] += 2 * (n - 1) * x.numel() * x.element_size() // n
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's x (same shape on each), concatenated along `dim`. Each rank sends its x to the N-1 others."""
    n = dist.get_world_size(group)
    TRAFFIC["all_gather"] += (n - 1) * x.numel() * x.element_size()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_to_all(x: torch.Tensor, send_rows: list[int], receive_rows: list[int], group: dist.ProcessGroup | None
               ) -> torch.Tensor:
    """Rows x[...] in N consecutive blocks of send_rows[j] rows, block j to rank j; returns the blocks received."""
    rank = dist.get_rank(group)
    TRAFFIC["all_to_all"] += (sum(send_rows) - send_rows[rank]) * x[:1].numel() * x.element_size()
    out = x.new_empty((sum(receive_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), receive_rows, send_rows, group=group)
    return out


# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallelism:
    """How one rank shares the model: mode 'expert' or 'tensor', over `world_size` ranks of `group`."""

    mode: str
    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls, mode: str, group: dist.ProcessGroup | None = None) -> Parallelism:
        """This process's place in the initialised process group (the default one unless `group` is given)."""
        if mode not in MODES:
            raise ValueError(f"parallel must be one of {MODES} (or None for one process), got {mode!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"parallel={mode!r} needs torch.distributed to be initialised in every process: launch with "
                f"`torchrun --nproc-per-node N script.py` and call torch.distributed.init_process_group('gloo') "
                f"(CPUs) or ('nccl') (one GPU per rank) before loading")
        return cls(mode, dist.get_rank(group), dist.get_world_size(group), group)

    # -- which part of each weight this rank holds ---------------------------------------------------------------
    def check(self, config: ModelConfig) -> None:
        """Raise ValueError naming the size N does not divide, and the N that would, before anything is read."""
        check_parallel(config, self.mode, self.world_size)

    def heads(self, config: ModelConfig) -> tuple[range, range]:
        """(this rank's query heads, its kv heads). Megatron: with N > Hkv each kv head is replicated on N/Hkv ranks."""
        n, r = self.world_size, self.rank
        per_rank = config.n_heads // n
        query = range(r * per_rank, (r + 1) * per_rank)
        if config.n_kv_heads >= n:
            kv_per_rank = config.n_kv_heads // n
            return query, range(r * kv_per_rank, (r + 1) * kv_per_rank)
        kv = r // (n // config.n_kv_heads)                       # the group that this rank's query heads belong to
        return query, range(kv, kv + 1)

    def split_head(self, config: ModelConfig) -> bool:
        """Is the output head split by vocabulary? (tensor mode, an untied head and N dividing the vocabulary)"""
        return self.mode == "tensor" and not config.tie_embeddings and config.vocab_size % self.world_size == 0

    def experts(self, config: ModelConfig) -> range:
        """This rank's experts: all of them under tensor parallelism, E/N consecutive ones under expert parallelism."""
        if self.mode == "tensor":
            return range(config.n_experts)
        per_rank = config.n_experts // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _cut(self, key: str, config: ModelConfig) -> tuple[int, slice] | None:
        """(dimension counted from the end, this rank's slice of it) for the weight `key`; None if replicated."""
        if self.mode != "tensor":
            return None
        n, r = self.world_size, self.rank
        query, kv = self.heads(config)
        D, hidden = config.head_dim, config.hidden_dim // n
        if key.endswith("attention.wq.weight"):
            return -2, slice(query.start * D, query.stop * D)              # column-parallel: rows of W
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            return -2, slice(kv.start * D, kv.stop * D)
        if key.endswith("attention.wo.weight"):
            return -1, slice(query.start * D, query.stop * D)              # row-parallel: columns of W
        if key.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w1", "feed_forward.w3")):
            return -2, slice(r * hidden, (r + 1) * hidden)
        if key.endswith(("feed_forward.w2.weight", "feed_forward.w2")):
            return -1, slice(r * hidden, (r + 1) * hidden)
        if key == "output.weight" and self.split_head(config):
            rows = config.vocab_size // n
            return -2, slice(r * rows, (r + 1) * rows)
        return None

    def take(self, key: str, expert: int | None, tensor: torch.Tensor, config: ModelConfig
             ) -> tuple[torch.Tensor | None, int | None]:
        """This rank's part of checkpoint tensor `tensor` for our weight `key` (expert slot `expert` of a stacked one).

        Returns (a view of the rows or columns this rank holds, its local expert slot), or (None, None) when the
        rank holds none of it (another rank's expert). A view of a memory-mapped tensor reads only those bytes.
        """
        if self.mode == "expert" and key.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")):
            mine = self.experts(config)
            if expert is None:                                              # the whole stack (E, ...) at once
                return tensor[mine.start:mine.stop], None
            return (tensor, expert - mine.start) if expert in mine else (None, None)
        cut = self._cut(key, config)
        if cut is None:
            return tensor, expert
        dim, part = cut
        return tensor.narrow(tensor.dim() + dim, part.start, part.stop - part.start), expert

    def holds(self, key: str, expert: int | None, config: ModelConfig) -> bool:
        """Does this rank keep any of (key, expert)? False only for another rank's expert."""
        return not (self.mode == "expert" and expert is not None and expert not in self.experts(config))

    # -- the modules ----------------------------------------------------------------------------------------------
    def shard_modules(self, model: nn.Module) -> nn.Module:
        """Swap this rank's modules into a Transformer, in place (on `meta`: the loader then fills them)."""
        config: ModelConfig = model.config
        self.check(config)
        n = self.world_size
        for block in model.layers:
            if self.mode == "tensor":
                query, kv = self.heads(config)
                block.attention = TensorParallelAttention(config.dim, len(query), len(kv), config.head_dim,
                                                          block.layer_idx, self.group)
                if config.is_moe:
                    block.feed_forward = TensorParallelMoe(config.dim, config.hidden_dim // n, config.n_experts,
                                                           config.experts_per_token, self.group)
                else:
                    block.feed_forward = TensorParallelFeedForward(config.dim, config.hidden_dim // n, self.group)
            else:
                block.feed_forward = ExpertParallelMoe(config.dim, config.hidden_dim, config.n_experts,
                                                       config.experts_per_token, self.rank, n, self.group)
        if self.split_head(config):
            model.output = VocabParallelHead(config.dim, config.vocab_size // n, self.group)
        model.parallelism = self
        return model


def check_parallel(config: ModelConfig, mode: str, world_size: int) -> None:
    """Raise ValueError when `world_size` ranks cannot share `config` in `mode`, naming the size and the fix."""
    n = world_size
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES} (or None for one process), got {mode!r}")
    if mode == "expert":
        if not config.is_moe:
            raise ValueError("parallel='expert' needs an MoE model (n_experts > 0); for a dense model use "
                             "parallel='tensor'")
        if config.n_experts % n:
            raise ValueError(f"parallel='expert': {n} ranks cannot share {config.n_experts} experts evenly (E/N must "
                             f"be whole); run on N in {_divisors(config.n_experts)}, or use parallel='tensor'")
        return
    fixes = f"run on N in {_divisors(math.gcd(config.n_heads, config.hidden_dim))}"
    if config.n_heads % n:
        raise ValueError(f"parallel='tensor': {n} ranks cannot share {config.n_heads} attention heads evenly "
                         f"(n_heads / N must be whole); {fixes}")
    if config.hidden_dim % n:
        raise ValueError(f"parallel='tensor': {n} ranks cannot share the FFN width {config.hidden_dim} evenly "
                         f"(hidden_dim / N must be whole); {fixes}")
    if config.n_kv_heads % n and n % config.n_kv_heads:
        raise ValueError(f"parallel='tensor': {n} ranks and {config.n_kv_heads} kv heads: each rank needs whole kv "
                         f"heads (n_kv_heads / N whole) or each kv head a whole number of ranks (N / n_kv_heads "
                         f"whole, Megatron's replication); {fixes} that also divides or is a multiple of "
                         f"{config.n_kv_heads}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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

        # 4. combine: back to the rank that sent each pair, in the order sent; Mixtral eq. (1) sums them
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


def init_from_torchrun(device: str = "cpu") -> str:
    """Join the process group that `torchrun` describes (its RANK, WORLD_SIZE, MASTER_ADDR... variables): gloo on
    CPUs, NCCL with one GPU per rank. Returns this rank's device ('cpu', or 'cuda:<LOCAL_RANK>' for device 'cuda')."""
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--parallel runs under torchrun, one process per rank: "
                           "torchrun --nproc-per-node N -m mistral_tutorial.cli generate ... --parallel tensor")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device
