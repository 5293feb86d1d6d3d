"""Mixtral's sparse mixture-of-experts layer: the router's choice, one layer against transformers'
MixtralSparseMoeBlock (every experts kernel), and the Switch Transformer's capacity and router jitter.

References, never the code under test: transformers 5.x (`MixtralTopKRouter`, `MixtralSparseMoeBlock`), Mixtral eq. 2
re-derived in plain loops, the Switch Transformer's capacity. Besides the numbers, the discrete outcomes are compared:
the chosen experts of every token, the dropped token slots.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from conftest import max_abs_diff, report  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
)

import mistral_tutorial as mt  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _hf_block_config(dim: int, hidden_dim: int, n_experts: int, k: int, jitter: float = 0.0,
                     experts_impl: str = "eager") -> transformers.MixtralConfig:
    config = transformers.MixtralConfig(hidden_size=dim, intermediate_size=hidden_dim, num_local_experts=n_experts,
                                        num_experts_per_tok=k, router_jitter_noise=jitter, hidden_act="silu")
    config._experts_implementation = experts_impl        # a standalone block has no model to pick one
    return config


def _hf_block_like(layer: mt.MoeLayer, jitter: float = 0.0, experts_impl: str = "eager") -> MixtralSparseMoeBlock:
    """transformers' block holding our layer's weights: gate -> router, cat([w1, w3], 1) -> gate_up_proj, w2 -> down."""
    n_experts, hidden_dim, dim = layer.w1.shape
    block = MixtralSparseMoeBlock(_hf_block_config(dim, hidden_dim, n_experts, layer.experts_per_token, jitter,
                                                   experts_impl))
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.w1, layer.w3], dim=1))      # (E, 2I, dim): gate, then up
        block.experts.down_proj.copy_(layer.w2)                                         # (E, dim, I)
    return block.eval()


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


# ---------------------------------------------------------------------------------------------------------------------
# Routing
@pytest.mark.parametrize("n_experts,k", [(2, 1), (4, 2), (8, 2), (8, 3), (6, 1)])
def test_route_matches_transformers_router(n_experts, k):
    torch.manual_seed(n_experts * 10 + k)
    dim = 24
    router = MixtralTopKRouter(_hf_block_config(dim, 32, n_experts, k))
    torch.nn.init.normal_(router.weight, 0.0, 0.5)
    x = torch.randn(57, dim)
    with torch.no_grad():
        logits, hf_weights, hf_experts = router(x)
    weights, experts = mt.route(logits, k)
    assert torch.equal(experts, hf_experts)
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=0)
    report(f"route vs MixtralTopKRouter E={n_experts} k={k}", max_abs_diff(weights, hf_weights))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_paper_agrees_with_route(k):
    torch.manual_seed(k)
    logits = torch.randn(200, 8) * 3
    w, e = mt.route(logits, k)
    w_paper, e_paper = mt.route_paper(logits, k)
    assert torch.equal(e, e_paper)
    torch.testing.assert_close(w_paper, w, atol=1e-6, rtol=1e-5)
    # Mixtral §2.1's G(x) by hand: G(x)_i = exp(l_i) / sum_{j in top-k} exp(l_j), for the k largest logits
    for n in range(logits.shape[0]):
        top = sorted(range(8), key=lambda i: -float(logits[n, i]))[:k]
        z = sum(math.exp(float(logits[n, j])) for j in top)
        assert e[n].tolist() == top
        for slot, i in enumerate(top):
            assert abs(float(w_paper[n, slot]) - math.exp(float(logits[n, i])) / z) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# One MoE layer against MixtralSparseMoeBlock
LAYER_CASES = [(e, k) for e in (2, 3, 5, 8) for k in (1, 2, 3) if k <= e]


@pytest.mark.parametrize("n_tokens", [1, 7, 64])
@pytest.mark.parametrize("n_experts,k", LAYER_CASES)
def test_moe_layer_matches_transformers_block(n_experts, k, n_tokens):
    torch.manual_seed(100 * n_experts + 10 * k + n_tokens)
    dim, hidden_dim = 16, 24
    layer = mt.MoeLayer(dim, hidden_dim, n_experts, k).eval()
    torch.nn.init.normal_(layer.gate.weight, 0.0, 0.5)
    block = _hf_block_like(layer)
    shape = (1, n_tokens, dim) if n_tokens < 64 else (2, n_tokens // 2, dim)
    x = torch.randn(shape)
    with torch.no_grad():
        ours = layer(x)
        theirs = block(x.clone())
        _, _, hf_experts = block.gate(x.reshape(-1, dim))
    assert ours.shape == x.shape
    assert torch.equal(layer.last_experts, hf_experts), "a token went to other experts than transformers'"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    report(f"MoeLayer vs block E={n_experts} k={k} N={n_tokens}", max_abs_diff(ours, theirs))


@pytest.mark.parametrize("experts_impl", ["grouped_mm", "batched_mm"])
def test_moe_layer_matches_other_transformers_kernels(experts_impl):
    """The same against the fused kernels transformers picks for a whole model (grouped_mm by default)."""
    torch.manual_seed(7)
    layer = mt.MoeLayer(16, 24, 8, 2).eval()
    torch.nn.init.normal_(layer.gate.weight, 0.0, 0.5)
    block = _hf_block_like(layer, experts_impl=experts_impl)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        ours, theirs = layer(x), block(x.clone())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    report(f"MoeLayer vs block ({experts_impl})", max_abs_diff(ours, theirs))


# ---------------------------------------------------------------------------------------------------------------------
# Capacity (Switch Transformer) and router jitter
def _layer_pair(capacity_factor: float | None, seed: int = 50, n_experts: int = 4, k: int = 2
                ) -> tuple[mt.MoeLayer, mt.MoeLayer]:
    """(an uncapped layer, a capped one holding the same weights)."""
    torch.manual_seed(seed)
    plain = mt.MoeLayer(16, 24, n_experts, k).eval()
    torch.nn.init.normal_(plain.gate.weight, 0.0, 0.5)
    capped = mt.MoeLayer(16, 24, n_experts, k, capacity_factor=capacity_factor).eval()
    capped.load_state_dict(plain.state_dict())
    return plain, capped


def _hf_router_choice(layer: mt.MoeLayer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' routing weights (N, k) and experts (N, k) for our layer's router weight."""
    _, weights, experts = _hf_block_like(layer).gate(tokens)
    return weights, experts


def test_capacity_large_drops_nothing():
    plain, capped = _layer_pair(capacity_factor=8.0)
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        ref, ours = plain(x), capped(x)
    assert capped.last_dropped == 0
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("n_experts,k", [(4, 2), (8, 3)])
def test_capacity_small_drops_the_overflow(capacity_factor, n_experts, k):
    _, capped = _layer_pair(capacity_factor, seed=60 + n_experts, n_experts=n_experts, k=k)
    x = torch.randn(1, 40, 16)
    tokens = x.reshape(-1, 16)
    n = tokens.shape[0]
    with torch.no_grad():
        ours = capped(x).reshape(n, 16)
        hf_weights, hf_experts = _hf_router_choice(capped, tokens)
    capacity = math.ceil(capacity_factor * n * k / n_experts)
    counts = torch.bincount(hf_experts.flatten(), minlength=n_experts).tolist()
    expected_dropped = sum(max(0, c - capacity) for c in counts)
    assert capped.last_dropped == expected_dropped
    assert expected_dropped > 0 or capacity_factor == 1.0

    # By hand: each expert takes its first `capacity` token slots in token order; a dropped slot adds nothing
    expected = torch.zeros(n, 16, dtype=torch.float64)
    used = [0] * n_experts
    with torch.no_grad():
        for t in range(n):
            for slot in range(k):
                e = int(hf_experts[t, slot])
                if used[e] < capacity:
                    used[e] += 1
                    y = _swiglu(tokens[t:t + 1], capped.w1[e], capped.w2[e], capped.w3[e])
                    expected[t] += (hf_weights[t, slot] * y[0]).double()
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)



def test_jitter_changes_training_outputs_only():
    torch.manual_seed(70)
    plain = mt.MoeLayer(16, 24, 4, 2).eval()
    torch.nn.init.normal_(plain.gate.weight, 0.0, 0.5)
    jittery = mt.MoeLayer(16, 24, 4, 2, jitter_noise=0.2)
    jittery.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 16)
    x_before = x.clone()
    with torch.no_grad():
        ref = plain(x)
        jittery.eval()
        torch.testing.assert_close(jittery(x), ref, atol=0, rtol=0)
        jittery.train()
        torch.manual_seed(5)
        trained = jittery(x)
        assert max_abs_diff(trained, ref) > 1e-3, "jitter in training mode must change the output"
        assert torch.equal(x, x_before), "the caller's input is left alone"
        # transformers draws the same U(1 - eps, 1 + eps) factors from the same seed
        block = _hf_block_like(plain, jitter=0.2).train()
        torch.manual_seed(5)
        theirs = block(x.clone())
    torch.testing.assert_close(trained, theirs, atol=1e-5, rtol=0)
    report("jitter (train) vs transformers", max_abs_diff(trained, theirs))
