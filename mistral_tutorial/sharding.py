"""Which share of the model each rank holds: the sizes N must divide, the slice of every weight, the modules to swap.

`Parallelism(mode, rank, world_size)` answers, from the config alone, which heads, hidden units, experts and vocabulary
rows rank r of N holds (`heads`, `experts`, `take`), and swaps parallel.py's layers into a model built on `meta`
(`shard_modules`); the loader (assemble.py) then reads only those slices. `check_parallel` refuses a size N does not
divide before anything is read. `init_from_torchrun` joins the process group a `torchrun` launch describes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .parallel import (
    ExpertParallelMoe,
    TensorParallelAttention,
    TensorParallelFeedForward,
    TensorParallelMoe,
    VocabParallelHead,
)

MODES = ("expert", "tensor")


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
                f"`torchrun --standalone --nproc-per-node N script.py` and call "
                f"torch.distributed.init_process_group('gloo') (CPUs) or ('nccl') (one GPU per rank) before loading")
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


def init_from_torchrun(device: str = "cpu") -> str:
    """Join the process group that `torchrun` describes (its RANK, WORLD_SIZE, MASTER_ADDR... variables): gloo on
    CPUs, NCCL with one GPU per rank. Returns this rank's device ('cpu', or 'cuda:<LOCAL_RANK>' for device 'cuda')."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--parallel runs under torchrun, one process per rank: torchrun --standalone "
                           "--nproc-per-node N -m mistral_tutorial.cli generate ... --parallel tensor")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device
