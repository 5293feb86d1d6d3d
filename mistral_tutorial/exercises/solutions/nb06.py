"""Solutions to notebook 06's exercises: top-k routing, the load-balancing loss, noisy top-k gating, the dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Mixtral §2.1: G(x) = Softmax(TopK(x W_g)), the softmax over the k kept logits only
    top_logits, experts = router_logits.float().topk(k, dim=-1)      # (N, k), best first
    return torch.softmax(top_logits, dim=-1), experts                 # weights (N, k) fp32, experts (N, k)


def load_balancing_loss(router_logits: torch.Tensor, n_experts: int, k: int) -> torch.Tensor:
    probs = torch.softmax(router_logits.float(), dim=-1)              # (N, E)
    chosen = probs.topk(k, dim=-1).indices                            # (N, k)
    fraction = F.one_hot(chosen, n_experts).float().sum(dim=1).mean(dim=0)   # (E,) f_i, summing to k
    mean_prob = probs.mean(dim=0)                                     # (E,) P_i
    # Switch Transformer eq. (4): loss = E * sum_i f_i * P_i (alpha applied by the caller)
    return n_experts * (fraction * mean_prob).sum()


def noisy_top_k_gates(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, noise: torch.Tensor,
                      k: int) -> torch.Tensor:
    # Shazeer et al. 2017, eq. (4): H(x) = x W_g + StandardNormal() * Softplus(x W_noise), with a floor of 0.01
    noisy = x @ w_gate + noise * (F.softplus(x @ w_noise) + 1e-2)    # (N, E)
    # eq. (5): KeepTopK(H, k) = H where in the top k, else -inf; eq. (3): G = Softmax(KeepTopK(H, k))
    top = noisy.topk(k, dim=-1)
    kept = torch.full_like(noisy, float("-inf")).scatter(-1, top.indices, top.values)
    return torch.softmax(kept, dim=-1)                                # (N, E), zero outside the top k


def dispatch(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = experts.shape[1]
    flat = experts.reshape(-1)                                        # (N*k,) pair p = token p // k, slot p % k
    order = flat.argsort(stable=True)                                 # pairs grouped by expert, token order kept
    tokens = order // k                                               # (N*k,) the token of each pair
    counts = torch.bincount(flat, minlength=n_experts)                # (E,) pairs per expert
    return tokens, counts
