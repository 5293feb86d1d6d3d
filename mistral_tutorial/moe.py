"""Mixtral's sparse mixture of experts (Jiang et al. 2024, §2.1): each token goes to k of E SwiGLU experts.

Mixtral §2.1 (its equations are unnumbered): y = sum_i G(x)_i * E_i(x), with G(x) = Softmax(TopK(x W_g)).
transformers 5.x computes the same weights in another order (softmax over all E in fp32 -> top-k -> renormalise);
`route` does that, `route_paper` the paper's form, and the two agree (softmax is monotone, and renormalising
restricts it to the chosen k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def route(router_logits: torch.Tensor, experts_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' order: softmax over all E (fp32) -> top-k -> renormalise. (N, E) -> weights (N, k) fp32, ids (N, k)."""
    probs = torch.softmax(router_logits.float(), dim=-1)                  # (N, E)
    weights, experts = probs.topk(experts_per_token, dim=-1)              # (N, k)
    weights = weights / weights.sum(dim=-1, keepdim=True)                 # renormalise over the chosen k
    return weights, experts


def route_paper(router_logits: torch.Tensor, experts_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral §2.1: G(x) = Softmax(TopK(x W_g)), the softmax taken over the k kept logits only."""
    top_logits, experts = router_logits.float().topk(experts_per_token, dim=-1)   # (N, k)
    return torch.softmax(top_logits, dim=-1), experts


class MoeLayer(nn.Module):
    """E SwiGLU experts and a linear router; (..., dim) -> (..., dim).

    Expert weights are stacked: w1 and w3 (E, hidden_dim, dim), w2 (E, dim, hidden_dim) (reference names: w1 gate,
    w3 up, w2 down). After a forward, `last_router_logits` (N, E), `last_experts` (N, k) and `last_weights` (N, k) hold
    the routing of its N tokens, for analysis; `last_dropped` counts token-expert pairs dropped by the capacity limit.

    capacity_factor: None (default, as Mixtral: no limit) or c > 0, each expert then takes at most
    ceil(c * N * k / E) token slots, in token order (Switch Transformer, Fedus et al. 2021); the rest are dropped
    (they contribute nothing; the residual connection carries the token on). jitter_noise: in training, the input is
    multiplied by U(1 - eps, 1 + eps) before routing (as transformers' router_jitter_noise).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, experts_per_token: int,
                 capacity_factor: float | None = None, jitter_noise: float = 0.0) -> None:
        super().__init__()
        if not 1 <= experts_per_token <= n_experts:
            raise ValueError(f"experts_per_token must lie in 1..{n_experts}, got {experts_per_token}")
        self.n_experts, self.experts_per_token = n_experts, experts_per_token
        self.capacity_factor, self.jitter_noise = capacity_factor, jitter_noise
        self.gate = nn.Linear(dim, n_experts, bias=False)                                  # W_g
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))                    # (E, I, dim) gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))                    # (E, dim, I) down
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))                    # (E, I, dim) up
        for w in (self.w1, self.w2, self.w3):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=math.sqrt(5))
        self.record_routing = True
        self.last_router_logits: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_dropped = 0

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert e on x (n, dim) -> (n, dim): w2[e] (silu(w1[e] x) * w3[e] x)."""
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                       # (N, dim)
        routed = x
        if self.training and self.jitter_noise > 0:
            routed = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x = routed                                                                     # experts see the jittered input too, as in transformers
        router_logits = self.gate(routed)                                                  # (N, E)
        # Mixtral §2.1: y = sum_{i in top-k} G(x)_i * E_i(x)
        weights, experts = route(router_logits, self.experts_per_token)                    # (N, k), (N, k)

        # Dispatch: sort the N*k (token, expert) pairs by expert, so each expert runs once on its own tokens
        flat_experts = experts.reshape(-1)                                                 # (N*k,)
        order = flat_experts.argsort(stable=True)                                          # pairs grouped by expert
        token_of_pair = order // self.experts_per_token                                    # (N*k,) token index
        weight_of_pair = weights.reshape(-1)[order]                                        # (N*k,)
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()           # tokens per expert

        capacity = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * x.shape[0] * self.experts_per_token / self.n_experts)
        out = torch.zeros_like(x)
        dropped, start = 0, 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            stop = start + (count if capacity is None else min(count, capacity))
            dropped += start + count - stop
            tokens = token_of_pair[start:stop]                                             # (n_e,)
            y = self.expert(e, x[tokens]) * weight_of_pair[start:stop, None].to(x.dtype)   # (n_e, dim)
            out.index_add_(0, tokens, y)
            start += count
        if self.record_routing:
            # kept with its graph in training, so the load-balancing loss can train the router
            self.last_router_logits, self.last_experts, self.last_weights = router_logits, experts, weights
            self.last_dropped = dropped
        return out.reshape(shape)
