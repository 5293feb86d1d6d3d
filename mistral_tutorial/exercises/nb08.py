"""Notebook 08's exercises: Mixtral's total and active parameters, upcycling a dense FFN into experts, and the
sparse MoE layer's forward pass by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..build import upcycle
from ..config import ModelConfig
from ..model import Transformer
from ..moe import MoeLayer
from ..presets import mixtral_8x7b_v0_1
from .checker import Case, Exercise


def _counts_reference(config: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_parameters(), model.num_parameters(active=True)


def _count_cases() -> list[Case]:
    small = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, n_experts=4,
                        experts_per_token=2, sliding_window=None)
    return [Case((mixtral_8x7b_v0_1(),), "Mixtral 8x7B"), Case((small,)),
            Case((small.replace(n_experts=8, experts_per_token=1),), "k = 1"),
            Case((small.replace(n_experts=3, experts_per_token=3),), "k = E: everything active"),
            Case((small.replace(tie_embeddings=True, head_dim=16),), "tied embeddings, head_dim != dim / n_heads")]


def _moe_counts(config: ModelConfig, router: bool = True, router_active: bool = True, scale_all: bool = False
                ) -> tuple[int, int]:
    """(total, active) with one of the classic slips."""
    c = config
    shared = (c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim
              + c.n_layers * (2 * c.dim * (c.n_heads + c.n_kv_heads) * c.head_dim + 2 * c.dim))
    expert, gate = 3 * c.dim * c.hidden_dim, c.dim * c.n_experts if router else 0
    total = shared + c.n_layers * (gate + c.n_experts * expert)
    if scale_all:
        return total, total * c.experts_per_token // c.n_experts
    return total, shared + c.n_layers * ((gate if router_active else 0) + c.experts_per_token * expert)


def _upcycle_reference(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, n_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mt.upcycle on a one-layer dense model holding this FFN; its stacked expert weights."""
    hidden_dim, dim = w1.shape
    dense = Transformer(ModelConfig(vocab_size=4, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                                    hidden_dim=hidden_dim, sliding_window=None)).to(w1.dtype)
    with torch.no_grad():
        for name, weight in (("w1", w1), ("w2", w2), ("w3", w3)):
            getattr(dense.layers[0].feed_forward, name).weight.copy_(weight)
    experts = upcycle(dense, n_experts, experts_per_token=1).layers[0].feed_forward
    return experts.w1.detach(), experts.w2.detach(), experts.w3.detach()


def _upcycle_cases() -> list[Case]:
    g = torch.Generator().manual_seed(801)
    return [Case((torch.randn(h, d, generator=g), torch.randn(d, h, generator=g), torch.randn(h, d, generator=g), e), label)
            for h, d, e, label in [(12, 8, 4, ""), (6, 4, 8, "Mixtral's E = 8"), (5, 3, 1, "E = 1")]]


def _moe_reference(x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, k: int
                   ) -> torch.Tensor:
    n_experts, hidden_dim, dim = w1.shape
    layer = MoeLayer(dim, hidden_dim, n_experts, k).to(x.dtype)
    with torch.no_grad():
        layer.gate.weight.copy_(gate)
        for name, weight in (("w1", w1), ("w2", w2), ("w3", w3)):
            getattr(layer, name).copy_(weight)
        return layer(x)


def _moe_cases() -> list[Case]:
    g = torch.Generator().manual_seed(802)
    cases = []
    for n, dim, hidden, e, k, label in [(6, 8, 12, 4, 2, ""), (13, 6, 10, 8, 2, "Mixtral's E = 8, k = 2"),
                                        (5, 4, 6, 3, 1, "k = 1"), (1, 8, 12, 4, 2, "one token"),
                                        (4, 4, 6, 2, 2, "k = E")]:
        cases.append(Case((torch.randn(n, dim, generator=g), torch.randn(e, dim, generator=g),
                           torch.randn(e, hidden, dim, generator=g) / dim ** 0.5,
                           torch.randn(e, dim, hidden, generator=g) / hidden ** 0.5,
                           torch.randn(e, hidden, dim, generator=g) / dim ** 0.5, k), label))
    return cases


def _moe(x, gate, w1, w2, w3, k, renormalise=True, weighted=True, swap=False):
    """The MoE layer with one of the classic slips switched on."""
    probs = torch.softmax(x @ gate.T, dim=-1)                                   # (N, E)
    weights, experts = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True) if renormalise else weights
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, e in zip(weights[token], experts[token]):
            gate_w, up_w = (w3[e], w1[e]) if swap else (w1[e], w3[e])
            y = F.linear(F.silu(F.linear(x[token], gate_w)) * F.linear(x[token], up_w), w2[e])
            out[token] += (weight if weighted else 1.0) * y
    return out


EXERCISES = [
    Exercise(
        "08.1-moe-parameters", "moe_parameters", _counts_reference,
        "Transformer(config).num_parameters() and num_parameters(active=True)", _count_cases,
        hint="total: as the dense model, with E SwiGLU experts per layer instead of one, plus a router of d x E per "
             "layer. Active: only k experts per layer run for a token, but everything else (router included) does.",
        more="expert = 3 d hidden; shared = V d (x2 if untied) + d + L (attention + 2 d norms); total = shared + "
             "L (d E + E expert); active = shared + L (d E + k expert).",
        mistakes={"active = total x k / E: only the experts are sparse; embeddings, attention, norms and the router "
                  "run for every token.": lambda c: _moe_counts(c, scale_all=True),
                  "the router is missing: d x E weights per layer, in the total and in the active count.":
                  lambda c: _moe_counts(c, router=False),
                  "the router was left out of the active count: it runs for every token.":
                  lambda c: _moe_counts(c, router_active=False)}),
    Exercise(
        "08.2-upcycle-experts", "upcycle_ffn", _upcycle_reference, "mt.upcycle", _upcycle_cases,
        hint="every expert starts as an exact copy of the dense FFN: each weight stacked E times along a new first "
             "axis, (E, out, in), unscaled (the routing weights already sum to 1).",
        more="`w[None].repeat(n_experts, 1, 1)` for each of w1, w2, w3 (`expand` is a view: fine to read, but the "
             "experts must be trained apart later, so copy).",
        mistakes={"the copies were divided by E: the routing weights of the k chosen experts already sum to 1, so "
                  "every copy stays the dense FFN.": lambda w1, w2, w3, e: tuple(w[None].repeat(e, 1, 1) / e
                                                                                 for w in (w1, w2, w3)),
                  "w1 and w3 were swapped: expert e's gate is the dense gate w1, its up projection w3.":
                  lambda w1, w2, w3, e: tuple(w[None].repeat(e, 1, 1) for w in (w3, w2, w1))}),
    Exercise(
        "08.3-moe-forward", "moe_forward", _moe_reference, "mt.MoeLayer", _moe_cases,
        hint="route each token (softmax over E, top k, renormalise over the k), run each chosen expert's SwiGLU on "
             "it, and sum the k outputs *weighted* by the routing weights.",
        more="weights, experts = route(x @ gate.T, k); expert e: F.linear(F.silu(F.linear(x, w1[e])) * "
             "F.linear(x, w3[e]), w2[e]). A loop over tokens is fine here; the library groups tokens by expert.",
        mistakes={"the weights were not renormalised over the k chosen experts: softmax over all E, then the top k, "
                  "then divide by their sum.": lambda *a: _moe(*a, renormalise=False),
                  "the experts' outputs were summed without their routing weights.": lambda *a: _moe(*a, weighted=False),
                  "w1 and w3 were swapped inside the experts: the SiLU goes on w1 (the gate).":
                  lambda *a: _moe(*a, swap=True)}),
]
