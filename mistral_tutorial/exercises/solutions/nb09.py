"""Solutions to notebook 09's exercises: Fig 7's proportions, Table 5's two fractions, their random baselines."""

from __future__ import annotations

import math

import torch


def expert_proportions(assignment: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    rows = []
    for experts in assignment:                                        # per layer, (T, k) chosen experts
        counts = torch.bincount(experts.reshape(-1), minlength=n_experts).float()   # first and second choices
        rows.append(counts / counts.sum())                            # shares of the layer's T k assignments
    return torch.stack(rows)                                          # (L, E), rows sum to 1


def same_first_choice(assignment: list[torch.Tensor]) -> torch.Tensor:
    # Table 5, first choice: token t + 1's first expert is token t's first expert, over the T - 1 pairs
    return torch.stack([(experts[1:, 0] == experts[:-1, 0]).float().mean() for experts in assignment])   # (L,)


def share_an_expert(assignment: list[torch.Tensor]) -> torch.Tensor:
    fractions = []
    for experts in assignment:
        current, following = experts[:-1], experts[1:]                # (T-1, k) each
        # some expert among the k of both tokens, whatever its slot in each
        shared = (current[:, :, None] == following[:, None, :]).any(dim=(1, 2))   # (T-1,)
        fractions.append(shared.float().mean())
    return torch.stack(fractions)                                     # (L,)


def random_baseline(n_experts: int, k: int) -> tuple[float, float]:
    first_choice = 1 / n_experts
    # two random k-subsets of E experts are disjoint with probability C(E - k, k) / C(E, k)
    top_k = 1 - math.comb(n_experts - k, k) / math.comb(n_experts, k)
    return first_choice, top_k
