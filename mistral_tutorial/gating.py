"""Gating and balancing losses: Shazeer et al. 2017 (noisy top-k, importance and load losses) and the Switch /
Mixtral load-balancing loss that transformers trains Mixtral with.

Left out: the hierarchical MoE and the batchwise mask of Shazeer's appendix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, Var(x) / Mean(x)^2, of a (E,) vector (0 for a single value)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    # Shazeer et al. 2017, eq. (7): L_importance = w * CV(Importance(X))^2; the variance is the sample variance
    # (divided by E - 1; tensor2tensor divides by E: a constant factor E / (E - 1))
    return x.float().var() / (x.float().mean() ** 2 + eps)


class NoisyTopKGate(nn.Module):
    """Shazeer et al. 2017 noisy top-k gating, eqs. (3)-(5), with the importance and load losses (eqs. 6-7, app. A).

    forward(x (N, dim)) -> gates (N, E) (zero outside each row's top k), aux_loss (scalar). In eval mode no noise is
    added, and the load is computed without it.
    """

    def __init__(self, dim: int, n_experts: int, k: int, w_importance: float = 0.1, w_load: float = 0.1,
                 noisy: bool = True) -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must lie in 1..{n_experts}, got {k}")
        self.n_experts, self.k, self.noisy = n_experts, k, noisy
        self.w_importance, self.w_load = w_importance, w_load
        self.w_gate = nn.Parameter(torch.zeros(dim, n_experts))       # zero init, as the paper (appendix A)
        self.w_noise = nn.Parameter(torch.zeros(dim, n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = x @ self.w_gate                                        # (N, E)
        use_noise = self.noisy and self.training
        if use_noise:
            noise_std = F.softplus(x @ self.w_noise) + 1e-2            # (N, E)
            # eq. (4): H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)
            noisy = clean + torch.randn_like(clean) * noise_std
        else:
            noisy = clean
        # eq. (5): KeepTopK(v, k)_i = v_i if v_i is in the top k of v, else -inf; eq. (3): G = Softmax(KeepTopK(H, k))
        top_values, top_idx = noisy.topk(min(self.k + 1, self.n_experts), dim=-1)         # (N, k+1)
        kept = torch.full_like(noisy, float("-inf")).scatter(-1, top_idx[:, :self.k], top_values[:, :self.k])
        gates = torch.softmax(kept, dim=-1)                            # (N, E), zero outside the top k

        importance = gates.sum(dim=0)                                  # eq. (6): Importance(X) = sum_x G(x)
        if use_noise and self.k < self.n_experts:
            load = self._smooth_load(clean, noisy, noise_std, top_values)
        else:
            load = (gates > 0).sum(dim=0).float()                      # without noise: the hard count
        aux_loss = self.w_importance * cv_squared(importance) + self.w_load * cv_squared(load)
        return gates, aux_loss

    def _smooth_load(self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                     top_values: torch.Tensor) -> torch.Tensor:
        """Appendix A, eqs. (8)-(10): Load(X)_i = sum_x P(x, i), a differentiable estimate of the expert's count.

        P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)): the probability that expert i
        stays in the top k if only its own noise were drawn again.
        """
        threshold_if_in = top_values[:, self.k:self.k + 1]            # (N, 1): the (k+1)-th value
        threshold_if_out = top_values[:, self.k - 1:self.k]           # (N, 1): the k-th value
        is_in = noisy > threshold_if_in                                # (N, E)
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)  # (E,)


def load_balancing_loss(router_logits: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor], n_experts: int,
                        experts_per_token: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer auxiliary loss (Fedus et al. 2021, eqs. 4-6), as transformers trains Mixtral.

    router_logits: one (N, E) tensor per layer (N = B*T tokens). loss = E * sum_i f_i * P_i, where f_i is the number of
    times expert i is among a token's top k, divided by the number of tokens (so the f_i sum to k; all layers pooled),
    and P_i the mean router probability of expert i. attention_mask (B, T): padding tokens (0) are left out. Uniform routing gives k.
    """
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    counts = torch.zeros(n_experts, dtype=torch.float32, device=layers[0].device)
    prob_sum = torch.zeros(n_experts, dtype=torch.float32, device=layers[0].device)
    n_tokens = torch.zeros((), dtype=torch.float32, device=layers[0].device)
    keep = None if attention_mask is None else attention_mask.reshape(-1).float().to(layers[0].device)  # (N,)
    for logits in layers:
        probs = torch.softmax(logits.float(), dim=-1)                                   # (N, E)
        chosen = probs.topk(experts_per_token, dim=-1).indices                          # (N, k)
        one_hot = F.one_hot(chosen, n_experts).float().sum(dim=1)                       # (N, E): slots per expert
        if keep is not None:
            one_hot, probs = one_hot * keep[:, None], probs * keep[:, None]
        counts += one_hot.sum(dim=0)
        prob_sum += probs.sum(dim=0)
        n_tokens += logits.shape[0] if keep is None else keep.sum()
    # Switch eq. (4): loss = alpha * N * sum_i f_i * P_i (alpha applied by the caller)
    return n_experts * torch.sum((counts / n_tokens) * (prob_sum / n_tokens))
