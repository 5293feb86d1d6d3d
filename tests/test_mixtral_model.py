"""Mixtral 8x7B's shape in miniature against transformers' MixtralForCausalLM: logits, chosen experts in every layer,
the load-balancing loss, greedy tokens (conftest's one tie rule), loading the weights in every format, and upcycling.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_greedy_matches, hf_greedy_no_cache, max_abs_diff, randomize_, report  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    load_balancing_loss_func,
)

import mistral_tutorial as mt  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def _hf_top_k(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' router choice (MixtralTopKRouter.forward): top-k of softmax(logits) in fp32, best first."""
    return torch.topk(torch.softmax(router_logits.float(), dim=-1), k, dim=-1).indices


# Whole-model configs: (n_experts, experts_per_token, sliding_window)


MODEL_CASES = [(2, 1, None), (4, 2, 6), (8, 2, None), (8, 3, 10), (5, 3, None), (3, 1, 7)]


def _tiny_config(n_experts: int, k: int, window: int | None) -> mt.ModelConfig:
    return mt.ModelConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, norm_eps=1e-5,
                          sliding_window=window, max_position_embeddings=256, n_experts=n_experts,
                          experts_per_token=k)


def _pair(n_experts: int, k: int, window: int | None) -> tuple[transformers.MixtralForCausalLM, mt.Transformer]:
    """A random transformers Mixtral (as shipped: sdpa attention, its default experts kernel) and our copy of it."""
    torch.manual_seed(1000 + 100 * n_experts + 10 * k + (window or 0))
    hf = transformers.MixtralForCausalLM(_tiny_config(n_experts, k, window).to_hf())
    hf = randomize_(hf.float()).eval()
    return hf, mt.Transformer.from_hf(hf).eval()


def _ids(batch: int, seq_len: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


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
    report(f"Mixtral logits E={n_experts} k={k} W={window}", max_abs_diff(ours, out.logits))
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
    report(f"aux loss E={n_experts} k={k} (unmasked, masked)",
            max(max_abs_diff(ours, ref), max_abs_diff(ours_masked, ref_masked)))


@pytest.mark.parametrize("n_experts,k,window", MODEL_CASES)
def test_greedy_generation_matches_transformers(n_experts, k, window):
    hf, m = _pair(n_experts, k, window)
    ids = _ids(2, 9, seed=11 + n_experts)
    ours = mt.generate(m, ids, max_new_tokens=64)
    ref, gaps = hf_greedy_no_cache(hf, ids, 64)
    assert ours.shape == ref.shape == (2, 64)
    assert_greedy_matches(ours, ref, gaps, f"E={n_experts} k={k} W={window}")
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
        report(f"load {name} E={n_experts} k={k} W={window}", max_abs_diff(logits, ref))


# ---------------------------------------------------------------------------------------------------------------------
# Upcycling
def _dense_model() -> mt.Transformer:
    torch.manual_seed(21)
    cfg = _tiny_config(2, 1, 6).replace(n_experts=0)
    hf = randomize_(transformers.MistralForCausalLM(cfg.to_hf()).float()).eval()
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
    report("upcycle vs dense", max_abs_diff(ours, ref))
    # the router is really used: the tokens spread over more than one expert
    assert len(set(moe.chosen_experts()[0].flatten().tolist())) > 1

    noisy = mt.upcycle(dense, n_experts=4, experts_per_token=2, noise_std=0.05)
    with torch.no_grad():
        differ = max_abs_diff(noisy(ids), ref)
    assert differ > 1e-3, f"noise_std > 0 should move the logits, max diff {differ:.2e}"
