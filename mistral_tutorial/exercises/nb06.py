"""Notebook 06's exercises: top-k routing in the paper's order, the load-balancing loss, Shazeer's noisy top-k gating,
and the dispatch that groups (token, expert) pairs by expert."""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

from ..gating import NoisyTopKGate, load_balancing_loss
from ..moe import route, route_paper
from .checker import Case, Exercise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_logits(n_tokens: int, n_experts: int, g: torch.Generator) -> torch.Tensor:
    """(N, E) router logits with no ties in any row (so the top k is unambiguous, in bf16 too)."""
    ranks = torch.stack([torch.randperm(n_experts, generator=g) for _ in range(n_tokens)]).float()   # (N, E)
    return 0.7 * ranks + 0.2 * torch.rand(n_tokens, n_experts, generator=g) - 2.0


def _route_cases() -> list[Case]:
    g = _generator(601)
    return [Case((distinct_logits(n, e, g).to(dtype), k), label)
            for n, e, k, dtype, label in [(6, 8, 2, torch.float32, "Mixtral's E = 8, k = 2"), (5, 4, 1, torch.float32, "k = 1"),
                                          (3, 3, 3, torch.float32, "k = E: every expert"), (1, 8, 2, torch.float32, "one token"),
                                          (4, 8, 2, torch.bfloat16, "bf16 logits (weights in fp32)")]]


def _loss_cases() -> list[Case]:
    g = _generator(602)
    uneven = distinct_logits(16, 8, g)
    uneven[:, :2] += 6.0
    return [Case((distinct_logits(32, 8, g), 8, 2)), Case((distinct_logits(20, 4, g), 4, 1), "k = 1 (Switch)"),
            Case((uneven, 8, 2), "a router that prefers two experts"), Case((distinct_logits(7, 6, g), 6, 3))]


def _noisy_reference(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, noise: torch.Tensor, k: int
                     ) -> torch.Tensor:
    """mt.NoisyTopKGate in training mode, handed the case's standard normal draws in place of its own."""
    gate = NoisyTopKGate(x.shape[1], w_gate.shape[1], k).train()
    with torch.no_grad():
        gate.w_gate.copy_(w_gate)
        gate.w_noise.copy_(w_noise)
        with mock.patch.object(torch, "randn_like", lambda like: noise.to(like)):
            gates, _ = gate(x)
    return gates


def _noisy_cases() -> list[Case]:
    g = _generator(603)
    cases = []
    for n, dim, e, k, label in [(6, 5, 8, 2, ""), (4, 3, 4, 1, "k = 1"), (5, 4, 6, 3, ""), (3, 4, 4, 4, "k = E")]:
        cases.append(Case((torch.randn(n, dim, generator=g), torch.randn(dim, e, generator=g),
                           0.5 * torch.randn(dim, e, generator=g), torch.randn(n, e, generator=g), k), label))
    return cases


def _dispatch_reference(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert by expert, the tokens that chose it, in token order; and the count of each (a plain loop)."""
    tokens = [(experts == e).any(dim=1).nonzero().flatten() for e in range(n_experts)]
    return torch.cat(tokens), torch.tensor([len(t) for t in tokens], dtype=torch.long)


def _dispatch_cases() -> list[Case]:
    g = _generator(604)
    cases = []
    for n, e, k, label in [(6, 4, 2, ""), (10, 8, 2, "some experts chosen by no token"), (5, 3, 1, "k = 1"),
                           (4, 3, 3, "k = E"), (1, 8, 2, "one token")]:
        cases.append(Case((route(distinct_logits(n, e, g), k)[1], e), label))
    return cases


def _softmax_then_keep(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)


def _smallest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    low, experts = logits.float().topk(k, dim=-1, largest=False)
    return torch.softmax(low, dim=-1), experts


def _noisy_gates(x, w_gate, w_noise, noise, k, soft=True, fill=float("-inf"), normalise=True):
    """Noisy top-k gates with one of the classic mistakes switched on."""
    std = F.softplus(x @ w_noise) + 1e-2 if soft else x @ w_noise
    h = x @ w_gate + noise * std
    kept = h.topk(k, dim=-1)
    if not normalise:
        return torch.zeros_like(h).scatter(-1, kept.indices, torch.softmax(h, -1).gather(-1, kept.indices))
    return torch.softmax(torch.full_like(h, fill).scatter(-1, kept.indices, kept.values), dim=-1)


def _clean_choice(x, w_gate, w_noise, noise, k):
    """Gates over the experts the clean logits pick, weighted by the noisy ones."""
    clean = x @ w_gate
    h = clean + noise * (F.softplus(x @ w_noise) + 1e-2)
    chosen = clean.topk(k, dim=-1).indices
    return torch.softmax(torch.full_like(h, float("-inf")).scatter(-1, chosen, h.gather(-1, chosen)), dim=-1)


EXERCISES = [
    Exercise(
        "06.1-top-k-routing", "route", route_paper, "mt.route_paper (= mt.route, transformers' order)", _route_cases,
        hint="the paper's order: the top k of the logits first, then a softmax over those k only; weights in fp32, "
             "experts best first.",
        more="`top_logits, experts = router_logits.float().topk(k, dim=-1)`, then `torch.softmax(top_logits, -1)`. "
             "A softmax over all E first gives the same weights only once they are renormalised over the k.",
        mistakes={"a softmax over all E, then the top k, without renormalising: the k weights no longer sum to 1.":
                  _softmax_then_keep,
                  "these are the k smallest logits: topk(largest=True), the default, keeps the largest.":
                  _smallest,
                  "the weights are in the logits' dtype: take the softmax in fp32, as Mixtral's router does.":
                  lambda z, k: tuple(w.to(z.dtype) if w.is_floating_point() else w for w in route_paper(z, k))}),
    Exercise(
        "06.2-load-balancing-loss", "load_balancing_loss", load_balancing_loss, "mt.load_balancing_loss",
        _loss_cases,
        hint="loss = E * sum_i f_i P_i: f_i = how often expert i is among a token's top k, divided by the number of "
             "tokens N (so the f_i sum to k); P_i = the mean softmax probability of expert i over all tokens.",
        more="probs = softmax(logits.float()); chosen = probs.topk(k).indices; f = one_hot(chosen, E).sum(1).mean(0); "
             "P = probs.mean(0); return E * (f * P).sum(). Even routing gives k.",
        mistakes={"only the first choice is counted: f_i counts every one of a token's k choices.":
                  lambda z, e, k: load_balancing_loss(z, e, 1) * 1.0,
                  "f_i was divided by N * k: the loss is then k times too small; divide by N (the f_i sum to k).":
                  lambda z, e, k: load_balancing_loss(z, e, k) / k,
                  "the factor E is missing (Switch eq. 4: alpha N sum_i f_i P_i, with N the number of experts).":
                  lambda z, e, k: load_balancing_loss(z, e, k) / e}),
    Exercise(
        "06.3-noisy-top-k-gating", "noisy_top_k_gates", _noisy_reference, "mt.NoisyTopKGate (training mode)",
        _noisy_cases,
        hint="H = x W_g + noise * (Softplus(x W_noise) + 0.01); keep the top k of H (not of x W_g), set the rest to "
             "-inf, softmax: zero outside the top k, summing to 1.",
        more="Shazeer et al. 2017 eqs. (3)-(5): `top = h.topk(k, -1)`; `kept = torch.full_like(h, float('-inf'))"
             ".scatter(-1, top.indices, top.values)`; `torch.softmax(kept, -1)`. The 0.01 floor is the library's "
             "(as in tensor2tensor).",
        mistakes={"the top k were taken from the clean logits x W_g: the noisy H decides which experts are kept.":
                  _clean_choice,
                  "the noise scale has no Softplus: it must be positive, Softplus(x W_noise) + 0.01.":
                  lambda *a: _noisy_gates(*a, soft=False),
                  "the softmax ran over all E and the rest was set to 0: KeepTopK puts -inf before the softmax, so the "
                  "k gates sum to 1.": lambda *a: _noisy_gates(*a, normalise=False),
                  "the dropped experts were set to 0 before the softmax: a 0 logit still gets weight; use -inf.":
                  lambda *a: _noisy_gates(*a, fill=0.0)}),
    Exercise(
        "06.4-dispatch", "dispatch", _dispatch_reference, "a loop over the experts", _dispatch_cases,
        hint="flatten experts to N * k (token, expert) pairs; pair p belongs to token p // k; a *stable* sort by "
             "expert groups the pairs, each group in token order; the counts are a bincount with minlength E.",
        more="`flat = experts.reshape(-1)`; `order = flat.argsort(stable=True)`; tokens = order // k; "
             "counts = torch.bincount(flat, minlength=n_experts).",
        mistakes={"the pair index was divided by E instead of k: pair p = token * k + slot, so its token is p // k.":
                  lambda ex, e: (ex.reshape(-1).argsort(stable=True) // e, torch.bincount(ex.reshape(-1), minlength=e)),
                  "the counts are of first choices only: every one of the k choices takes a slot.":
                  lambda ex, e: (ex.reshape(-1).argsort(stable=True) // ex.shape[1],
                                 torch.bincount(ex[:, 0], minlength=e)),
                  "the counts have no minlength: an expert no token chose still needs its count of 0.":
                  lambda ex, e: (ex.reshape(-1).argsort(stable=True) // ex.shape[1], torch.bincount(ex.reshape(-1)))}),
]

