"""The three collectives the parallel layers call, each counting the bytes this process sends (`TRAFFIC`).

all_reduce (tensor parallelism's partial sums), all_gather (the vocabulary-parallel logits, expert parallelism's token
shares) and all_to_all (expert parallelism's dispatch and combine) wrap torch.distributed on a process group. The
layers that call them are parallel.py's; the formulas the counts are checked against are parallel_costs.py's.
Left out: gradients (nothing here is differentiable), asynchronous calls, overlapping communication with compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Bytes this process has sent per kind of collective (ring all-reduce and all-gather): see parallel_costs.step_traffic.
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
