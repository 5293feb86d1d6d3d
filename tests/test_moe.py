"""Mixtral's sparse mixture of experts, Shazeer's noisy top-k gating and the Switch load-balancing loss.

References, never the code under test: transformers 5.x (`MixtralTopKRouter`, `MixtralSparseMoeBlock`,
`MixtralForCausalLM`, `load_balancing_loss_func`), the papers' formulas re-derived here in plain loops (Mixtral eq. 2,
Shazeer et al. 2017 eqs. 3-7 and appendix A, Switch Transformer capacity), and the mistral reference checkpoint layout
written by hand. Besides the numbers, the discrete outcomes are compared: the chosen experts of every token in every
layer, the dropped token slots, the greedy tokens.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
    load_balancing_loss_func,
)

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial.gating import cv_squared  # noqa: E402

TIE = 1e-4          # transformers' top-2 logits closer than this: either greedy token is right


# ---------------------------------------------------------------------------------------------------------------------
# helpers (kept here: conftest.py belongs to another file's owner)
def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _report(name: str, value: float) -> None:
    print(f"[parity] {name}: max|diff| = {value:.3e}")


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


def _hf_top_k(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' router choice (MixtralTopKRouter.forward): top-k of softmax(logits) in fp32, best first."""
    return torch.topk(torch.softmax(router_logits.float(), dim=-1), k, dim=-1).indices


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _randomize_(model: torch.nn.Module, std: float = 0.08) -> torch.nn.Module:
    """N(0, std) matrices (bigger than transformers' 0.02, so routing and greedy choices are decisive), N(1, 0.1)
    norm gains."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, std)
    return model


# Whole-model configs: (n_experts, experts_per_token, sliding_window)
MODEL_CASES = [(2, 1, None), (4, 2, 6), (8, 2, None), (8, 3, 10), (5, 3, None), (3, 1, 7)]


def _tiny_config(n_experts: int, k: int, window: int | None) -> mt.ModelConfig:
    return mt.ModelConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, norm_eps=1e-5,
                          sliding_window=window, max_position_embeddings=256, n_experts=n_experts,
                          experts_per_token=k)


@functools.cache
def _pair(n_experts: int, k: int, window: int | None) -> tuple[transformers.MixtralForCausalLM, mt.Transformer]:
    """A random transformers Mixtral (as shipped: sdpa attention, its default experts kernel) and our copy of it."""
    torch.manual_seed(1000 + 100 * n_experts + 10 * k + (window or 0))
    hf = transformers.MixtralForCausalLM(_tiny_config(n_experts, k, window).to_hf())
    hf = _randomize_(hf.float()).eval()
    return hf, mt.Transformer.from_hf(hf).eval()


def _ids(batch: int, seq_len: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


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
    _report(f"route vs MixtralTopKRouter E={n_experts} k={k}", _diff(weights, hf_weights))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_paper_agrees_with_route(k):
    torch.manual_seed(k)
    logits = torch.randn(200, 8) * 3
    w, e = mt.route(logits, k)
    w_paper, e_paper = mt.route_paper(logits, k)
    assert torch.equal(e, e_paper)
    torch.testing.assert_close(w_paper, w, atol=1e-6, rtol=1e-5)
    # Mixtral eq. (2) by hand: G(x)_i = exp(l_i) / sum_{j in top-k} exp(l_j), for the k largest logits
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
    _report(f"MoeLayer vs block E={n_experts} k={k} N={n_tokens}", _diff(ours, theirs))


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
    _report(f"MoeLayer vs block ({experts_impl})", _diff(ours, theirs))


# ---------------------------------------------------------------------------------------------------------------------
# Whole model against MixtralForCausalLM
@pytest.mark.parametrize("n_experts,k,window", MODEL_CASES)
def test_model_logits_and_chosen_experts(n_experts, k, window):
    hf, m = _pair(n_experts, k, window)
    ids = _ids(2, 23, seed=n_experts)                    # longer than every window: the window mask is exercised
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=False, output_router_logits=True)
        ours = m(ids)
    torch.testing.assert_close(ours, out.logits, atol=1e-4, rtol=0)
    _report(f"Mixtral logits E={n_experts} k={k} W={window}", _diff(ours, out.logits))
    assert len(out.router_logits) == len(m.chosen_experts()) == len(m.router_logits()) == 3
    for layer, (theirs, chosen, logits) in enumerate(zip(out.router_logits, m.chosen_experts(), m.router_logits())):
        assert chosen.shape == (ids.numel(), k)
        expected = _hf_top_k(theirs, k)
        bad = (chosen != expected).any(dim=-1).nonzero().flatten().tolist()
        assert not bad, f"layer {layer}: tokens {bad} chose {chosen[bad].tolist()}, transformers {expected[bad].tolist()}"
        torch.testing.assert_close(logits, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_experts,k,window", MODEL_CASES[:4])
def test_load_balancing_loss_matches_transformers(n_experts, k, window):
    hf, m = _pair(n_experts, k, window)
    ids = _ids(2, 13, seed=3)
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=False, output_router_logits=True)
        m(ids)
    ref = load_balancing_loss_func(tuple(out.router_logits), n_experts, k)
    ours = mt.load_balancing_loss(m.router_logits(), n_experts, k)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0                                      # left padding
    mask[1, -3:] = 0
    ref_masked = load_balancing_loss_func(tuple(out.router_logits), n_experts, k, attention_mask=mask)
    ours_masked = mt.load_balancing_loss(m.router_logits(), n_experts, k, attention_mask=mask)
    torch.testing.assert_close(ours_masked, ref_masked, atol=1e-6, rtol=1e-5)
    assert abs(float(ref_masked) - float(ref)) > 1e-6, "the mask must matter in this case"
    _report(f"aux loss E={n_experts} k={k} (unmasked, masked)",
            max(_diff(ours, ref), _diff(ours_masked, ref_masked)))


@torch.no_grad()
def _hf_greedy(hf: transformers.PreTrainedModel, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' no-cache forward over the whole sequence at every step, argmax; also each step's top-2 gap."""
    seq, tokens, gaps = ids.clone(), [], []
    for _ in range(n):
        last = hf(input_ids=seq, use_cache=False).logits[:, -1].float()           # (B, vocab)
        top2 = last.topk(2, dim=-1).values
        tokens.append(last.argmax(dim=-1))
        gaps.append(top2[:, 0] - top2[:, 1])
        seq = torch.cat([seq, tokens[-1][:, None]], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(gaps, dim=1)


@pytest.mark.parametrize("n_experts,k,window", MODEL_CASES)
def test_greedy_generation_matches_transformers(n_experts, k, window):
    hf, m = _pair(n_experts, k, window)
    ids = _ids(2, 9, seed=11 + n_experts)
    ours = mt.generate(m, ids, max_new_tokens=64)
    ref, gaps = _hf_greedy(hf, ids, 64)
    assert ours.shape == ref.shape == (2, 64)
    for b in range(2):
        differ = (ours[b] != ref[b]).nonzero().flatten()
        if differ.numel() == 0:
            continue
        step = int(differ[0])
        gap = float(gaps[b, step])
        assert gap < TIE, (f"row {b} diverges at step {step} (ours {int(ours[b, step])}, transformers "
                           f"{int(ref[b, step])}) with a top-2 gap of {gap:.3e}: not a tie")
        warnings.warn(f"E={n_experts} k={k} W={window} row {b}: a genuine tie at step {step} (gap {gap:.2e})",
                      stacklevel=1)
    print(f"[greedy] E={n_experts} k={k} W={window}: min top-2 gap {float(gaps.min()):.2e}, "
          f"identical rows {int((ours == ref).all(dim=1).sum())}/2")


# ---------------------------------------------------------------------------------------------------------------------
# Loading Mixtral weights in every format
def _half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' q/k rows per head are two halves (2, D/2); the reference interleaves them as pairs (D/2, 2)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, in_features)                    # (H, 2, D/2, dim)
    return halves.transpose(1, 2).reshape(out_features, in_features).contiguous()      # (H, D/2, 2, dim) flattened


def _write_reference_folder(hf: transformers.MixtralForCausalLM, cfg: mt.ModelConfig, path) -> None:
    """params.json + consolidated.safetensors in mistral-inference's layout, written from transformers' weights."""
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
              "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
              "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
              "moe": {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token}}
    if cfg.sliding_window is not None:
        params["sliding_window"] = cfg.sliding_window
    (path / "params.json").write_text(json.dumps(params))
    sd = hf.state_dict()
    hidden = cfg.hidden_dim
    ref = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        ref[f"layers.{i}.attention.wq.weight"] = _half_to_interleaved(sd[p + "self_attn.q_proj.weight"], cfg.n_heads)
        ref[f"layers.{i}.attention.wk.weight"] = _half_to_interleaved(sd[p + "self_attn.k_proj.weight"],
                                                                      cfg.n_kv_heads)
        ref[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        ref[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        ref[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        ref[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        ref[f"layers.{i}.feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]   # (E,2I,dim), (E,dim,I)
        for e in range(cfg.n_experts):
            ref[f"layers.{i}.feed_forward.experts.{e}.w1.weight"] = gate_up[e, :hidden]
            ref[f"layers.{i}.feed_forward.experts.{e}.w3.weight"] = gate_up[e, hidden:]
            ref[f"layers.{i}.feed_forward.experts.{e}.w2.weight"] = down[e]
    save_file({k: v.detach().clone().contiguous() for k, v in ref.items()}, str(path / "consolidated.safetensors"))


@pytest.mark.parametrize("n_experts,k,window", [(4, 2, 6), (8, 2, None), (3, 1, 7)])
def test_loading_every_format_gives_transformers_logits(n_experts, k, window, tmp_path):
    hf, in_memory = _pair(n_experts, k, window)
    cfg = _tiny_config(n_experts, k, window)
    ids = _ids(2, 17, seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits

    # transformers on disk: experts one by one, as the original Mixtral checkpoints
    disk = tmp_path / "hf"
    hf.save_pretrained(disk)
    with safe_open(str(disk / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        hidden = cfg.hidden_dim
        for i in range(cfg.n_layers):
            assert f"model.layers.{i}.block_sparse_moe.gate.weight" in keys
            gate_up = hf.state_dict()[f"model.layers.{i}.mlp.experts.gate_up_proj"]
            for e in range(n_experts):
                for w in ("w1", "w2", "w3"):
                    assert f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight" in keys
                torch.testing.assert_close(f.get_tensor(f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"),
                                           gate_up[e, :hidden], atol=0, rtol=0)
        assert not any("gate_up_proj" in key or "down_proj" in key for key in keys)
    from_disk = mt.Transformer.from_pretrained(disk)

    # the mistral reference folder (interleaved wq/wk, experts one by one)
    reference = tmp_path / "reference"
    reference.mkdir()
    _write_reference_folder(hf, cfg, reference)
    from_reference = mt.Transformer.from_pretrained(reference)
    assert from_reference.config.n_experts == n_experts and from_reference.config.experts_per_token == k

    for name, model in (("from_hf (fused)", in_memory), ("transformers dir", from_disk),
                        ("reference folder", from_reference)):
        with torch.no_grad():
            logits = model(ids)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0, msg=lambda s, n=name: f"{n}: {s}")
        _report(f"load {name} E={n_experts} k={k} W={window}", _diff(logits, ref))


# ---------------------------------------------------------------------------------------------------------------------
# Upcycling
def _dense_model() -> mt.Transformer:
    torch.manual_seed(21)
    cfg = _tiny_config(2, 1, 6).replace(n_experts=0)
    hf = _randomize_(transformers.MistralForCausalLM(cfg.to_hf()).float()).eval()
    return mt.Transformer.from_hf(hf).eval()


def test_upcycle_keeps_the_dense_logits():
    dense = _dense_model()
    moe = mt.upcycle(dense, n_experts=4, experts_per_token=2)
    assert moe.config.n_experts == 4 and moe.config.experts_per_token == 2
    assert moe.config.replace(n_experts=0) == dense.config
    ids = _ids(2, 15, seed=8)
    with torch.no_grad():
        ref, ours = dense(ids), moe(ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    _report("upcycle vs dense", _diff(ours, ref))
    # the router is really used: the tokens spread over more than one expert
    assert len(set(moe.chosen_experts()[0].flatten().tolist())) > 1

    noisy = mt.upcycle(dense, n_experts=4, experts_per_token=2, noise_std=0.05)
    with torch.no_grad():
        differ = _diff(noisy(ids), ref)
    assert differ > 1e-3, f"noise_std > 0 should move the logits, max diff {differ:.2e}"


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
        assert _diff(trained, ref) > 1e-3, "jitter in training mode must change the output"
        assert torch.equal(x, x_before), "the caller's input is left alone"
        # transformers draws the same U(1 - eps, 1 + eps) factors from the same seed
        block = _hf_block_like(plain, jitter=0.2).train()
        torch.manual_seed(5)
        theirs = block(x.clone())
    torch.testing.assert_close(trained, theirs, atol=1e-5, rtol=0)
    _report("jitter (train) vs transformers", _diff(trained, theirs))
