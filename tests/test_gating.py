"""Shazeer et al. 2017's noisy top-k gating (eqs. 3-5) with its importance and load losses (eqs. 6-7, appendix A),
re-derived by hand in plain loops.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial.gating import cv_squared  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Shazeer et al. 2017: noisy top-k gating, importance and load
def _gate(dim: int, n_experts: int, k: int, **kwargs) -> mt.NoisyTopKGate:
    gate = mt.NoisyTopKGate(dim, n_experts, k, **kwargs)
    with torch.no_grad():                          # the paper's zero init makes every logit tie; randomise
        gate.w_gate.normal_(0.0, 0.5)
        gate.w_noise.normal_(0.0, 0.5)
    return gate


def _softmax_top_k_rows(h: torch.Tensor, k: int) -> torch.Tensor:
    """Eqs. (3) and (5) by hand: per row, softmax over the k largest entries, zero elsewhere."""
    out = torch.zeros_like(h, dtype=torch.float64)
    for n in range(h.shape[0]):
        row = h[n].double().tolist()
        top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        z = sum(math.exp(row[i]) for i in top)
        for i in top:
            out[n, i] = math.exp(row[i]) / z
    return out


def _cv_squared_by_hand(x: torch.Tensor) -> float:
    """CV(x)^2 = Var(x) / Mean(x)^2 with the sample variance, dividing by n - 1 (the library's documented choice;
    Shazeer's tensor2tensor code divides by n, which scales the loss by n / (n - 1), a constant)."""
    values = x.double().tolist()
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / mean ** 2


def _kth_excluding(row: list[float], k: int, i: int) -> float:
    """Appendix A: the k-th highest component of v, excluding component i (k counts from 1)."""
    others = sorted((v for j, v in enumerate(row) if j != i), reverse=True)
    return others[k - 1]


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_top_k_gates_in_eval(k):
    torch.manual_seed(30 + k)
    gate = _gate(12, 6, k, w_importance=1.0, w_load=0.0).eval()
    x = torch.randn(40, 12)
    gates, importance_loss = gate(x)
    gates, importance_loss = gates.detach(), importance_loss.detach()
    assert gates.shape == (40, 6)
    assert ((gates > 0).sum(dim=1) == k).all(), "each row keeps exactly k experts"
    torch.testing.assert_close(gates.sum(dim=1).double(), torch.ones(40, dtype=torch.float64), atol=1e-6, rtol=0)
    expected = _softmax_top_k_rows(x.double() @ gate.w_gate.detach().double(), k)    # eval: H(x) = x W_g
    torch.testing.assert_close(gates.detach().double(), expected, atol=1e-6, rtol=0)
    # eq. (6): Importance(X) = sum_x G(x); L_importance = w * CV(Importance)^2
    importance = expected.sum(dim=0)
    assert abs(float(importance_loss) - _cv_squared_by_hand(importance)) < 1e-5
    # without noise the load is the hard count of tokens per expert
    gate.w_importance, gate.w_load = 0.0, 1.0
    _, load_loss = gate(x)
    assert abs(float(load_loss.detach()) - _cv_squared_by_hand((expected > 0).sum(dim=0).double())) < 1e-5


def test_cv_squared_by_hand():
    x = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    assert abs(float(cv_squared(x)) - _cv_squared_by_hand(x)) < 1e-6
    assert float(cv_squared(torch.full((5,), 2.5))) == 0.0
    assert float(cv_squared(torch.tensor([7.0]))) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_top_k_training_load_estimate(k, monkeypatch):
    torch.manual_seed(40 + k)
    n_experts, dim = 6, 10
    gate = _gate(dim, n_experts, k, w_importance=0.3, w_load=0.7).train()
    x = torch.randn(25, dim)
    seen = {}
    original = gate._smooth_load

    def spy(clean, noisy, noise_std, top_values):
        seen.update(noisy=noisy.detach().clone())
        seen["load"] = original(clean, noisy, noise_std, top_values)
        return seen["load"]

    monkeypatch.setattr(gate, "_smooth_load", spy)
    gates, aux = gate(x)
    assert "noisy" in seen, "training mode with k < E must use the smooth load estimate"

    clean = (x.double() @ gate.w_gate.detach().double()).tolist()                       # (x W_g)
    sigma = (F.softplus(x.double() @ gate.w_noise.detach().double()) + 0.01).tolist()   # Softplus(x W_noise) + eps
    noisy = seen["noisy"].double()
    # eq. (4): H(x)_i = (x W_g)_i + StandardNormal() * sigma_i, so (H - x W_g) / sigma is standard normal
    z = (noisy - torch.tensor(clean, dtype=torch.float64)) / torch.tensor(sigma, dtype=torch.float64)
    assert abs(float(z.mean())) < 0.35 and 0.7 < float(z.std()) < 1.3, f"noise mean {z.mean():.2f}, std {z.std():.2f}"
    # eqs. (3)-(5) on the noisy logits H(x)
    torch.testing.assert_close(gates.detach().double(), _softmax_top_k_rows(noisy, k), atol=1e-6, rtol=0)
    # appendix A, eqs. (8)-(10): P(x, i) = Phi((x W_g)_i - kth_excluding(H(x), k, i)) / sigma_i), Load_i = sum_x P
    load = [0.0] * n_experts
    for n, row in enumerate(noisy.tolist()):
        for i in range(n_experts):
            load[i] += _normal_cdf((clean[n][i] - _kth_excluding(row, k, i)) / sigma[n][i])
    torch.testing.assert_close(seen["load"].detach().double(), torch.tensor(load, dtype=torch.float64), atol=1e-5,
                               rtol=1e-5)
    # eq. (7): L = w_importance CV(Importance)^2 + w_load CV(Load)^2
    expected = 0.3 * _cv_squared_by_hand(gates.detach().sum(dim=0)) + 0.7 * _cv_squared_by_hand(torch.tensor(load))
    assert abs(float(aux.detach()) - expected) < 1e-5 * max(1.0, expected)

    aux.backward()
    for name in ("w_gate", "w_noise"):
        grad = getattr(gate, name).grad
        assert grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name} gets a zero or non-finite gradient"
