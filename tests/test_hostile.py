"""Hostile cases: configs the model does not implement, junk configs, careless inputs and CLI mistakes.

Each is either implemented exactly (llama3 and linear rope scaling, held to transformers' LlamaForCausalLM) or refused
with one error that names the field or argument and its value: never a model that differs from its checkpoint, never
a KeyError or a torch error from deep inside. References are transformers or a plain re-derivation.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_greedy_matches, build_pair, hf_greedy_no_cache, hf_logits, max_abs_diff, report, tiny_config

import mistral_tutorial as mt
from mistral_tutorial import assets, cli, config_json, loading, params_json, resolve

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
LINEAR = dict(rope_type="linear", factor=4.0)


def scaled_config(scaling: dict | None, **overrides) -> mt.ModelConfig:
    """A tiny Llama-shaped config (no window, head_dim 32 so that all three llama3 bands occur) with a rope scaling."""
    fields = dict(sliding_window=None, head_dim=32, rope_theta=500000.0, rope_scaling=scaling)
    fields.update(overrides)
    return tiny_config(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# Rope scaling: implemented exactly
def llama3_frequencies_by_hand(head_dim: int, theta: float, factor: float, low: float, high: float, context: int
                               ) -> list[float]:
    """Llama 3.1's `apply_scaling`, written out one frequency at a time in float64 (no library code)."""
    out = []
    for d in range(0, head_dim, 2):
        freq = 1.0 / theta ** (d / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            out.append(freq)
        elif wavelength > context / low:
            out.append(freq / factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def test_llama3_frequencies_match_a_re_derivation_with_all_three_bands():
    scaling = mt.rope.check_rope_scaling(LLAMA3)
    ours = mt.RotaryEmbedding(32, 500000.0, scaling).inv_freq
    expected = torch.tensor(llama3_frequencies_by_hand(32, 500000.0, 8.0, 1.0, 4.0, 64), dtype=torch.float64)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
    plain = mt.RotaryEmbedding(32, 500000.0).inv_freq
    ratio = plain / ours
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any()      # high and low bands
    assert ((ratio > 1.01) & (ratio < 7.99)).any()                                    # the blended band


def test_linear_frequencies_are_divided_by_the_factor():
    ours = mt.RotaryEmbedding(32, 10000.0, LINEAR).inv_freq
    plain = [1.0 / 10000.0 ** (d / 32) for d in range(0, 32, 2)]
    torch.testing.assert_close(ours.double(), torch.tensor(plain, dtype=torch.float64) / 4.0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@torch.no_grad()
def test_rope_scaling_matches_transformers(scaling, model_type):
    cfg = scaled_config(scaling, sliding_window=None if model_type == "llama" else 48)
    hf, ours = build_pair(cfg, model_type)
    assert hf.model.rotary_emb.rope_type == scaling["rope_type"]                     # transformers did scale
    assert ours.config.rope_scaling == scaling
    ids = torch.randint(0, cfg.vocab_size, (2, 160))                                 # past the 64-token context
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report(f"{scaling['rope_type']} rope, {model_type}, logits", diff)
    assert diff <= 1e-4
    # the test can fail: the same weights with plain RoPE are far off
    plain = mt.Transformer(cfg.replace(rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    assert max_abs_diff(plain(ids), hf_logits(hf, ids)) > 0.05
    # greedy tokens, cached generation against transformers' no-cache forward
    prompt = ids[:1, :90]
    ref, gaps = hf_greedy_no_cache(hf, prompt, 24)
    assert_greedy_matches(mt.generate(ours, prompt, max_new_tokens=24), ref, gaps, f"{scaling['rope_type']} greedy")


@torch.no_grad()
def test_llama3_checkpoint_folder_loads_exactly(tmp_path):
    """The issue's case end to end: a saved Llama-3-style folder, read back by from_pretrained, against transformers
    reading the same folder."""
    hf, _ = build_pair(scaled_config(LLAMA3), "llama")
    hf.save_pretrained(tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.model.rotary_emb.rope_type == "llama3"
    ours = mt.Transformer.from_pretrained(tmp_path)
    assert ours.config.rope_scaling == LLAMA3
    ids = torch.randint(0, 128, (1, 150))
    diff = max_abs_diff(ours(ids), hf_logits(theirs, ids))
    report("llama3 rope, from_pretrained folder", diff)
    assert diff <= 1e-4


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu_pytorch_tanh"), ("mlp_bias", True),
                                          ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_checkpoint_folder_with_an_unimplemented_field_is_refused(tmp_path, field, value):
    hf, _ = build_pair(scaled_config(None), "llama")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None) if field == "rope_scaling" else None
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(mt.CheckpointError, match=field):
        mt.Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
def test_rope_scaling_round_trips(scaling, tmp_path):
    cfg = scaled_config(scaling)
    for model_type in ("llama", "mistral"):
        hf_config = cfg.to_hf(model_type)
        assert mt.ModelConfig.from_hf(hf_config) == cfg
        assert mt.ModelConfig.from_hf(hf_config.to_dict()) == cfg
    cfg.to_hf("llama").save_pretrained(tmp_path)                                    # config.json as written on disk
    assert mt.ModelConfig.from_hf(tmp_path / "config.json") == cfg
    with pytest.raises(mt.ConfigError, match="rope_scaling"):
        cfg.to_params()                                                              # params.json cannot say it


def test_llama_3_1_config_json_as_published(tmp_path):
    """The shape of Llama 3.1's config.json (older `rope_scaling` key, rope_theta outside it) reads as transformers
    reads it."""
    config = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                  rope_theta=500000.0, attention_bias=False, mlp_bias=False, hidden_act="silu", pretraining_tp=1,
                  tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=[2, 3],
                  architectures=["LlamaForCausalLM"], transformers_version="4.43.0", use_cache=True,
                  initializer_range=0.02, attention_dropout=0.0,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64, "rope_type": "llama3"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = mt.ModelConfig.from_hf(tmp_path / "config.json")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ours == mt.ModelConfig.from_hf(theirs)
    assert ours.rope_scaling == LLAMA3 and ours.rope_theta == 500000.0
    legacy = {**config, "rope_scaling": {"type": "linear", "factor": 2.0}}                # the oldest spelling
    assert mt.ModelConfig.from_hf(legacy).rope_scaling == {"rope_type": "linear", "factor": 2.0}


PUBLISHED = {
    "mistral-7b-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "mixtral-8x7b-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
        "use_cache": True, "vocab_size": 32000},
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152},
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_json_loads_as_transformers_reads_it(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    ours = mt.ModelConfig.from_hf(tmp_path / "config.json")
    assert ours == mt.ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
    if name in mt.presets.PRESETS:
        preset = mt.presets.PRESETS[name]()
        assert ours.replace(max_position_embeddings=preset.max_position_embeddings) == preset


def test_llama3_without_original_context_uses_max_positions_like_transformers():
    config = tiny_config(sliding_window=None).to_hf("llama").to_dict()
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0}
    theirs = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    ours = mt.ModelConfig.from_hf(config)
    assert ours.rope_scaling["original_max_position_embeddings"] == \
        theirs.rope_parameters["original_max_position_embeddings"] == config["max_position_embeddings"]


# ---------------------------------------------------------------------------------------------------------------------
# Fields the model does not implement: refused, naming the field and the value
def _base(model_type: str = "mistral") -> dict:
    cfg = tiny_config(n_experts=4, sliding_window=None) if model_type == "mixtral" else \
        tiny_config(sliding_window=None if model_type == "llama" else 4)
    return cfg.to_hf(model_type).to_dict()


REFUSED = [
    ("mistral", "hidden_act", "gelu"),
    ("mistral", "hidden_act", "relu"),
    ("llama", "attention_bias", True),
    ("llama", "mlp_bias", True),
    ("mistral", "qk_norm", True),
    ("mistral", "use_qk_norm", True),
    ("llama", "final_logit_softcapping", 30.0),
    ("llama", "attn_logit_softcapping", 50.0),
    ("llama", "partial_rotary_factor", 0.5),
    ("mixtral", "norm_topk_prob", False),
    ("mixtral", "n_shared_experts", 2),
    ("mixtral", "shared_expert_intermediate_size", 128),
    ("mixtral", "moe_intermediate_size", 32),
    ("mixtral", "first_k_dense_replace", 1),
    ("mixtral", "routed_scaling_factor", 2.5),
    ("mixtral", "scoring_func", "sigmoid"),
    ("mistral", "num_local_experts", 8),
    ("llama", "sliding_window", 16),
    ("mistral", "layer_types", ["sliding_attention", "full_attention"]),
    ("llama", "quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("llama", "auto_map", {"AutoModelForCausalLM": "modeling.MyModel"}),
    ("llama", "logits_scaling", 4.0),
    ("llama", "query_pre_attn_scalar", 144),
    ("llama", "something_new", 1),
    ("mistral", "model_type", "qwen2"),
    ("mistral", "model_type", "gemma2"),
]


@pytest.mark.parametrize("model_type, field, value", REFUSED, ids=[f"{f}={v}" for _, f, v in REFUSED])
def test_unimplemented_field_is_refused(model_type, field, value):
    config = {**_base(model_type), field: value}
    with pytest.raises(mt.CheckpointError) as err:
        mt.ModelConfig.from_hf(config)
    assert isinstance(err.value, mt.ConfigError) and isinstance(err.value, ValueError)
    assert field in str(err.value) and repr(value)[:20] in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0},
                                  {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
                                  {"rope_type": "su"}, {"rope_type": "proportional", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0},                     # fields missing
                                  {"rope_type": "linear", "factor": 2.0, "beta_fast": 32},    # a field too many
                                  {"rope_type": "linear", "factor": -2.0},
                                  {"rope_type": "linear", "factor": float("nan")},
                                  {"rope_type": "linear", "factor": "2"},
                                  {"rope_type": "default", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192}],
                         ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items())[:40])
def test_unimplemented_rope_is_refused(rope):
    for key in ("rope_parameters", "rope_scaling"):
        config = {**_base("llama"), key: {**rope, "rope_theta": 10000.0}}
        with pytest.raises(mt.CheckpointError, match="rope"):
            mt.ModelConfig.from_hf(config)


@pytest.mark.parametrize("model_type, field, value", [
    ("mistral", "hidden_act", "silu"), ("mistral", "hidden_act", "swish"), ("llama", "attention_bias", False),
    ("llama", "mlp_bias", False), ("mixtral", "norm_topk_prob", True), ("llama", "final_logit_softcapping", None),
    ("mixtral", "router_jitter_noise", 0.1), ("mixtral", "router_aux_loss_coef", 0.02), ("llama", "pretraining_tp", 2),
    ("mistral", "eos_token_id", [2, 7]), ("mistral", "torch_dtype", "bfloat16"), ("llama", "rope_scaling", None),
])
def test_neutral_and_inert_values_load(model_type, field, value):
    base = _base(model_type)
    assert mt.ModelConfig.from_hf({**base, field: value}) == mt.ModelConfig.from_hf(base)


@torch.no_grad()
def test_transformers_mixtral_ignores_norm_topk_prob_which_is_why_it_is_refused():
    """transformers' Mixtral always renormalises the top-k weights: a config with norm_topk_prob=False gives the same
    model there, so the checkpoint's intent cannot be honoured by either library."""
    cfg = tiny_config(n_experts=4, sliding_window=None)
    hf, _ = build_pair(cfg, "mixtral")
    other_config = cfg.to_hf("mixtral", norm_topk_prob=False)
    other_config._attn_implementation = "eager"
    other = transformers.MixtralForCausalLM(other_config).eval()
    other.load_state_dict(hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    assert torch.equal(hf_logits(hf, ids), hf_logits(other, ids))


@torch.no_grad()
def test_router_jitter_and_aux_loss_are_inert_in_eval_mode_in_transformers_too():
    """Why router_jitter_noise and router_aux_loss_coef load: transformers' Mixtral in eval mode gives the same logits
    with them on, and our copy of either model is the same."""
    cfg = tiny_config(n_experts=4, sliding_window=None)
    hf, ours = build_pair(cfg, "mixtral")
    noisy_config = cfg.to_hf("mixtral", router_jitter_noise=0.5, router_aux_loss_coef=0.5, output_router_logits=True)
    noisy_config._attn_implementation = "eager"
    noisy = transformers.MixtralForCausalLM(noisy_config).eval()
    noisy.load_state_dict(hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    assert torch.equal(hf_logits(hf, ids), hf_logits(noisy, ids))
    assert mt.ModelConfig.from_hf(noisy_config) == ours.config


# ---------------------------------------------------------------------------------------------------------------------
# Malformed configs: one CheckpointError naming the key
@pytest.mark.parametrize("key", ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
def test_missing_required_key_is_named(key):
    config = _base("mistral")
    del config[key]
    with pytest.raises(mt.CheckpointError, match=key):
        mt.ModelConfig.from_hf(config)


@pytest.mark.parametrize("config", [[1, 2], "not a path/config.json", None, 42, 3.5, b"{}", {1, 2}],
                         ids=["list", "string", "None", "int", "float", "bytes", "set"])
def test_config_that_is_not_a_dict(config):
    if isinstance(config, str):                                      # a string is a path: here one that does not exist
        with pytest.raises(FileNotFoundError, match="config"):
            mt.ModelConfig.from_hf(config)
        return
    with pytest.raises(mt.CheckpointError, match="dict"):
        mt.ModelConfig.from_hf(config)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "64"), ("hidden_size", 64.0), ("hidden_size", True), ("hidden_size", -64), ("hidden_size", 0),
    ("hidden_size", None), ("num_attention_heads", 0), ("num_key_value_heads", 3), ("vocab_size", [128]),
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", float("nan")), ("rms_norm_eps", 0), ("rms_norm_eps", None),
    ("tie_word_embeddings", "false"), ("tie_word_embeddings", 1), ("sliding_window", 4.5), ("sliding_window", -1),
    ("sliding_window", "4096"), ("max_position_embeddings", None), ("head_dim", 15), ("head_dim", "16"),
    ("rope_parameters", "default"), ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("inf")}), ("rope_theta", "1e4"),
])
def test_wrong_type_or_value_is_named(key, value):
    config = {**_base("mistral"), key: value}
    with pytest.raises(mt.CheckpointError) as err:
        mt.ModelConfig.from_hf(config)
    message = str(err.value)
    assert key.split("_")[0] in message or "n_heads" in message, message


def test_missing_optional_fields_take_transformers_defaults():
    """A config.json may leave out fields transformers has defaults for: the same defaults apply here."""
    minimal = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 8}
    for model_type, cls in (("mistral", transformers.MistralConfig), ("mixtral", transformers.MixtralConfig),
                            ("llama", transformers.LlamaConfig)):
        ours = mt.ModelConfig.from_hf({"model_type": model_type, **minimal})
        assert ours == mt.ModelConfig.from_hf(cls(**minimal)), model_type
        theirs = cls(**minimal)
        assert (ours.n_kv_heads, ours.norm_eps, ours.max_position_embeddings) == (
            theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.max_position_embeddings), model_type
        assert ours.sliding_window == getattr(theirs, "sliding_window", None), model_type


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "mistral", "hidden_size": 64')
    with pytest.raises(mt.CheckpointError, match="config.json"):
        mt.ModelConfig.from_hf(path)
    (tmp_path / "params.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(mt.CheckpointError, match="params.json"):
        mt.ModelConfig.from_params(tmp_path / "params.json")
    with pytest.raises(FileNotFoundError, match="params.json"):
        mt.ModelConfig.from_params(tmp_path / "missing" / "params.json")


@pytest.mark.parametrize("change, field", [
    (dict(use_scaled_rope=True), "use_scaled_rope"), (dict(vision_encoder={"hidden_size": 1024}), "vision_encoder"),
    (dict(lora={"rank": 16}), "lora"), (dict(quantization={"qformat_weight": "fp8_e4m3"}), "quantization"),
    (dict(multiple_of=256), "multiple_of"), (dict(moe={"num_experts": 8}), "moe"),
    (dict(moe={"num_experts": 8, "num_experts_per_tok": 2, "shared": 1}), "moe"), (dict(moe=[8, 2]), "moe"),
    (dict(dim="128"), "dim"), (dict(n_kv_heads=2.0), "n_kv_heads"), (dict(norm_eps="tiny"), "norm_eps"),
    (dict(sliding_window=[4096]), "sliding_window"), (dict(tied_embeddings="yes"), "tied_embeddings"),
    (dict(model_type="pixtral"), "model_type"), (dict(n_heads=3), "n_heads"),
])
def test_params_json_refusals_name_the_field(change, field):
    params = {**tiny_config(n_experts=4, sliding_window=None).to_params(), **change}
    with pytest.raises(mt.CheckpointError, match=field) as err:
        mt.ModelConfig.from_params(params)
    assert isinstance(err.value, mt.ConfigError)


@pytest.mark.parametrize("read, base, neutral_only", [
    (mt.ModelConfig.from_params, lambda: tiny_config().to_params(), dict(lora={"rank": 16})),
    (mt.ModelConfig.from_hf, lambda: _base("mistral"), dict(attention_bias=True)),
], ids=["params.json", "config.json"])
def test_both_readers_word_refusals_alike(read, base, neutral_only):
    """One rule for both files: unknown fields listed (six at most, then ' ...'); a feature not implemented says
    which value would load."""
    many = {f"mystery_{i}": i for i in range(8)}
    with pytest.raises(mt.CheckpointError, match=r"unknown field\(s\) mystery_0=0, .*mystery_5=5 \.\.\.: .*refuses"):
        read({**base(), **many})
    key = next(iter(neutral_only))
    with pytest.raises(mt.CheckpointError, match=rf"{key}=.* is not implemented \(.*\); this library loads only"):
        read({**base(), **neutral_only})


@pytest.mark.parametrize("params", [[], "no/such/params.json", None, 7], ids=["list", "path", "None", "int"])
def test_params_json_that_is_not_a_dict(params):
    error = FileNotFoundError if isinstance(params, str) else mt.CheckpointError
    with pytest.raises(error):
        mt.ModelConfig.from_params(params)


# ---------------------------------------------------------------------------------------------------------------------
# Seeded fuzzing: junk configs give CheckpointError (a ConfigError too), or a config that validates; nothing else
JUNK_VALUES = [None, True, False, 0, -1, 1, 3, 7, 64, 2**40, 0.0, -0.5, 1e-5, 4.0, float("nan"), float("inf"), "",
               "silu", "64", "llama", "default", [], [1, 2], {}, {"rope_type": "llama3"}, {"a": {"b": None}}]


def _junk(rng: random.Random, depth: int = 0) -> object:
    value = rng.choice(JUNK_VALUES)
    if depth < 2 and rng.random() < 0.1:
        return {rng.choice(["rope_type", "factor", "type", "x", "rope_theta"]): _junk(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return value


def _mutated(rng: random.Random, base: dict, known: list[str]) -> dict:
    config = dict(base)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        if action < 0.35 and config:
            config[rng.choice(list(config))] = _junk(rng)                   # a known key, a junk value
        elif action < 0.55 and config:
            del config[rng.choice(list(config))]                            # a key dropped
        elif action < 0.8:
            config[rng.choice(known)] = _junk(rng)                          # a key of another model, a junk value
        else:
            config["".join(rng.choice("abcdefghij_") for _ in range(rng.randint(1, 12)))] = _junk(rng)
    return config


def _loads_or_refuses(read, config) -> None:
    try:
        cfg = read(config)
    except mt.CheckpointError as err:
        assert isinstance(err, mt.ConfigError) and str(err), config
        return
    except FileNotFoundError:
        assert isinstance(config, str), config
        return
    cfg.validate()                                                          # what loads is a valid config
    _builds(cfg)


def _builds(cfg: mt.ModelConfig) -> None:
    """A valid config builds a model (on meta; sizes capped, as the rotary table is a real CPU tensor)."""
    if max(cfg.dim, cfg.head_dim, cfg.hidden_dim, cfg.n_heads, cfg.n_experts) <= 4096:
        with torch.device("meta"):
            mt.Transformer(cfg.replace(vocab_size=min(cfg.vocab_size, 256), n_layers=1))


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_transformers_configs(seed):
    rng = random.Random(seed)
    known = sorted(config_json.HF_READ | set(config_json.HF_NEUTRAL_ONLY))
    bases = [_base("mistral"), _base("mixtral"), _base("llama"), scaled_config(LLAMA3).to_hf("llama").to_dict()]
    for _ in range(150):
        _loads_or_refuses(mt.ModelConfig.from_hf, _mutated(rng, rng.choice(bases), known))
    for _ in range(50):                                                     # no base at all
        _loads_or_refuses(mt.ModelConfig.from_hf, {rng.choice(known): _junk(rng) for _ in range(rng.randint(0, 8))})
    for junk in JUNK_VALUES:
        _loads_or_refuses(mt.ModelConfig.from_hf, junk)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.filterwarnings("ignore::mistral_tutorial.errors.AssumedDefaultWarning")   # fields left out on purpose;
def test_fuzz_params_json(seed):                                                        # the warning: test_config.py
    rng = random.Random(100 + seed)
    known = sorted(params_json.PARAMS_READ | set(params_json.PARAMS_NEUTRAL_ONLY))
    bases = [tiny_config().to_params(), tiny_config(n_experts=4, sliding_window=None).to_params()]
    for _ in range(150):
        _loads_or_refuses(mt.ModelConfig.from_params, _mutated(rng, rng.choice(bases), known))
    for junk in JUNK_VALUES:
        _loads_or_refuses(mt.ModelConfig.from_params, junk)


def test_fuzz_model_config_fields():
    rng = random.Random(7)
    fields = [f.name for f in mt.ModelConfig.__dataclass_fields__.values()]
    for _ in range(300):
        changes = {rng.choice(fields): _junk(rng) for _ in range(rng.randint(1, 3))}
        try:
            cfg = tiny_config(**changes)
        except mt.ConfigError:
            continue
        _builds(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: token ids must be integers
@pytest.fixture(scope="module")
def model():
    return mt.Transformer(tiny_config(sliding_window=4)).eval()


@pytest.mark.parametrize("prompt, word", [
    ([1.0, 2.0, 3.0], "float"), ([1, 2.7, 3], "float"), ([[1, 2], [3, 4.5]], "float"), ([True, False, True], "bool"),
    ([1, True], "bool"), ([[1, 2], [False]], "bool"), (torch.tensor([[1.0, 2.0]]), "float32"),
    (torch.tensor([[True, False]]), "bool"), (torch.tensor([1, 2], dtype=torch.float64), "float64"),
    (np.array([1.0, 2.0]), "float64"), (np.array([True, False]), "bool"), ([np.float32(1.0), 2], "float32"),
    ([1, None, 3], "None"), ([1, "2"], "str"), ({1, 2, 3}, "set"), (5, "int"), (None, "None"),
    ([torch.tensor(1.5)], "float"),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else v)
def test_non_integer_token_ids_are_refused(model, prompt, word):
    with pytest.raises(TypeError, match=word):
        mt.generate(model, prompt, max_new_tokens=2)


@pytest.mark.parametrize("prompt", ["hello world", ["hello", "world"], [["hello"]]], ids=["str", "list", "nested"])
def test_a_string_prompt_says_tokenize_first(model, prompt):
    with pytest.raises(TypeError, match="tokenize first"):
        mt.generate(model, prompt, max_new_tokens=2)
    with pytest.raises(TypeError, match="tokenize first"):
        model("hello world")


@pytest.mark.parametrize("tokens", [torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool),
                                    torch.zeros(1, 3, dtype=torch.float16)], ids=["float32", "bool", "float16"])
def test_non_integer_tensors_to_the_model(model, tokens):
    with pytest.raises(TypeError, match=str(tokens.dtype).split(".")[1]):
        model(tokens)


def test_numpy_integers_are_token_ids(model):
    expected = mt.generate(model, [[5, 6, 7]], max_new_tokens=4)
    for prompt in ([np.int64(5), np.int32(6), np.uint8(7)], np.array([5, 6, 7]), np.array([[5, 6, 7]], np.int32),
                   np.array([5, 6, 7], np.uint16), [np.array([5, 6, 7])], torch.tensor([5, 6, 7], dtype=torch.int16),
                   (5, 6, 7), [torch.tensor(5), torch.tensor(6), torch.tensor(7)]):
        assert torch.equal(mt.generate(model, prompt, max_new_tokens=4), expected), prompt
    assert torch.equal(mt.generate(model, [[5, 6, 7]], max_new_tokens=4, stop_tokens=np.array([expected[0, 0]])),
                       expected[:, :1])


def test_non_integer_stop_tokens_are_refused(model):
    for stops in ([2.0], [True], torch.tensor([1.5]), "2"):
        with pytest.raises(TypeError, match="stop_tokens"):
            mt.generate(model, [1, 2, 3], max_new_tokens=2, stop_tokens=stops)


# Sampling settings: each names the parameter and the value
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(temperature=float("nan")), ValueError, "temperature"), (dict(temperature=float("inf")), ValueError,
                                                                  "temperature"),
    (dict(temperature=-0.5), ValueError, "temperature"), (dict(temperature="1.0"), TypeError, "temperature"),
    (dict(temperature=None), TypeError, "temperature"), (dict(temperature=True), TypeError, "temperature"),
    (dict(temperature=1.0, top_k=-1), ValueError, "top_k"), (dict(temperature=1.0, top_k=2.5), TypeError, "top_k"),
    (dict(temperature=1.0, top_k=True), TypeError, "top_k"), (dict(temperature=1.0, top_p=0.0), ValueError, "top_p"),
    (dict(temperature=1.0, top_p=1.01), ValueError, "top_p"),
    (dict(temperature=1.0, top_p=float("nan")), ValueError, "top_p"),
    (dict(temperature=1.0, top_p="0.9"), TypeError, "top_p"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"), (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"), (dict(max_new_tokens="3"), TypeError, "max_new_tokens"),
    (dict(seed=1.5), TypeError, "seed"), (dict(seed="42"), TypeError, "seed"), (dict(seed=True), TypeError, "seed"),
    (dict(seed=2**70), ValueError, "seed"), (dict(prefill_chunk_size=0), ValueError, "prefill_chunk_size"),
    (dict(prefill_chunk_size=1.5), TypeError, "prefill_chunk_size"), (dict(on_token="print"), TypeError, "on_token"),
], ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
def test_bad_sampling_settings_name_the_parameter(model, kwargs, error, name):
    with pytest.raises(error, match=name) as err:
        mt.generate(model, [[1, 2, 3]], **{"max_new_tokens": 2, **kwargs})
    value = next(iter(v for k, v in kwargs.items() if k == name))
    assert str(value)[:6] in str(err.value) or type(value).__name__ in str(err.value)


def test_sample_next_checks_its_settings_too():
    logits = torch.randn(2, 10)
    for kwargs in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(temperature=1.0, top_p=0.0),
                   dict(temperature=1.0, top_k=-3)):
        with pytest.raises(ValueError, match=next(iter(kwargs)) if len(kwargs) == 1 else list(kwargs)[1]):
            mt.sample_next(logits, **kwargs)


@pytest.mark.parametrize("temperature", [1e-7, 1e-30, 1e-45, 5e-324])
def test_tiny_temperature_is_greedy_not_a_crash(temperature):
    logits = torch.randn(4, 50) * 30
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(mt.sample_next(logits, temperature=temperature, generator=generator), logits.argmax(-1))
    assert torch.equal(mt.sample_next(logits, temperature=temperature, top_k=5, top_p=0.5, generator=generator),
                       logits.argmax(-1))


def test_numpy_numbers_are_fine_settings(model):
    a = mt.generate(model, [1, 2, 3], max_new_tokens=np.int64(3), temperature=np.float32(0.8), top_k=np.int32(5),
                    top_p=np.float64(0.9), seed=np.int64(3))
    b = mt.generate(model, [1, 2, 3], max_new_tokens=3, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert torch.equal(a, b)


def test_an_override_that_is_not_a_field_is_named(tmp_path):
    with pytest.raises(TypeError, match="window") as err:
        tiny_config().replace(window=32)
    assert "sliding_window" in str(err.value)                                 # and the right name is listed
    hf, _ = build_pair(tiny_config(), "mistral")
    hf.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="window"):
        mt.Transformer.from_pretrained(tmp_path, window=32)


@pytest.mark.parametrize("config", [{"dim": 64}, None, "config.json"], ids=["dict", "None", "str"])
def test_transformer_wants_a_model_config(config):
    with pytest.raises(TypeError, match="ModelConfig"):
        mt.Transformer(config)


def test_generate_wants_our_model():
    hf = transformers.LlamaForCausalLM(tiny_config(sliding_window=None).to_hf("llama"))
    with pytest.raises(TypeError, match="Transformer"):
        mt.generate(hf, [1, 2, 3])


# ---------------------------------------------------------------------------------------------------------------------
# CLI: one line on stderr, non-zero exit, before any model loads
def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mistral_tutorial.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    return result, time.perf_counter() - start


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]


CLI_MISTAKES = [
    (["info", "--length", "-100"], "--length"),
    (["info", "mistral-7b-v0.1", "--length", "lots"], "--length"),
    (["generate", "hi", "--sliding-window", "-5"], "--sliding-window"),
    (["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--temperature", "1", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--temperature", "1", "--top-k", "-2"], "--top-k"),
    (["generate", "hi", "--top-k", "5"], "--top-k"),                         # greedy: top-k would be ignored
    (["generate", "hi", "--device", "gpu"], "--device"),
    (["generate", "hi", "--model", "/no/such/model"], "no such file"),
    (["generate", "   "], "empty"),
    (["route", "x", "--out", "."], "directory"),
    (["route", "x", "--out", "figure"], ".png"),
    (["route", "x", "--out", "no/such/folder/r.png"], "does not exist"),
    (["route", "x", "--out", "r.png", "--layer", "-1"], "--layer"),
    (["info", "/no/such/model"], "no such file"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("args, word", CLI_MISTAKES, ids=[" ".join(a) for a, _ in CLI_MISTAKES])
def test_cli_mistake_is_one_line_before_any_model_loads(args, word, monkeypatch, capsys, tmp_path):
    """In process, with every way to load a model replaced by a failure: the error comes first."""
    monkeypatch.chdir(tmp_path)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pretrained", no_loading)
    monkeypatch.setattr(resolve, "load_model_and_tokenizer", no_loading)
    monkeypatch.setattr(assets, "require_default_model", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli.main(args))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []                                    # nothing written


@pytest.mark.parametrize("args, word", [CLI_MISTAKES[0], CLI_MISTAKES[4], CLI_MISTAKES[12]],
                         ids=["length", "temperature", "out-dir"])
def test_cli_mistake_in_a_subprocess(args, word):
    result, seconds = run_cli(*args)
    lines = _error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and word in lines[0], result.stderr
    assert seconds < 60, f"an argument error took {seconds:.1f} s"           # a model load alone takes ~20 s


def _broken_checkpoint(tmp_path, kind: str):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "bad-json":
        (folder / "config.json").write_text('{"model_type": "mistral",')
    elif kind == "list-json":
        (folder / "config.json").write_text("[1, 2, 3]")
    elif kind == "yarn":
        config = scaled_config(None).to_hf("llama").to_dict()
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "params-missing":
        (folder / "params.json").write_text(json.dumps({"dim": 64}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind, word", [("bad-json", "config.json"), ("list-json", "dict"), ("yarn", "yarn"),
                                        ("params-missing", "n_layers")])
def test_cli_broken_checkpoint_is_one_line(tmp_path, kind, word):
    folder = _broken_checkpoint(tmp_path, kind)
    result, _ = run_cli("info", str(folder))
    lines = _error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], \
        result.stderr
    if kind == "yarn":                                                     # --debug: the traceback instead
        debug, _ = run_cli("info", str(folder), "--debug")
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointConfigError" in debug.stderr


def test_route_writes_exactly_the_path_given(tmp_path, capsys):
    out = tmp_path / "Figure.PNG"
    assert cli.main(["route", "def f(x): return x", "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["Figure.PNG"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
