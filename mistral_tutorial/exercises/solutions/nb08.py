"""Solutions to notebook 08's exercises: total and active parameters, upcycling, the MoE layer by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_parameters(config) -> tuple[int, int]:
    c = config
    attention = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim   # wq, wo; wk, wv
    norms = 2 * c.dim
    router = c.dim * c.n_experts                                       # W_g (E, d)
    expert = 3 * c.dim * c.hidden_dim                                  # one SwiGLU expert
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim   # table, head, final norm
    shared = embeddings + c.n_layers * (attention + norms + router)    # used by every token
    total = shared + c.n_layers * c.n_experts * expert
    active = shared + c.n_layers * c.experts_per_token * expert        # k of the E experts run per token
    return total, active


def upcycle_ffn(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, n_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Komatsuzaki et al. 2022: every expert starts as the dense FFN, (out, in) -> (E, out, in)
    return tuple(w[None].repeat(n_experts, 1, 1) for w in (w1, w2, w3))


def moe_forward(x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                k: int) -> torch.Tensor:
    probs = torch.softmax((x @ gate.T).float(), dim=-1)                # (N, E) router probabilities
    weights, experts = probs.topk(k, dim=-1)                           # (N, k)
    weights = weights / weights.sum(dim=-1, keepdim=True)              # renormalised over the chosen k
    out = torch.zeros_like(x)                                          # (N, d)
    for token in range(x.shape[0]):
        for weight, e in zip(weights[token], experts[token].tolist()):
            h = x[token]                                               # (d,)
            y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T        # expert e's SwiGLU, (d,)
            # Mixtral §2.1: y = sum over the top k of G(x)_i * E_i(x)
            out[token] += weight.to(x.dtype) * y
    return out
