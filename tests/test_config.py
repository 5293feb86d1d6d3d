"""ModelConfig: the papers' Table 1 numbers, parameter counts, converters, validation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers
from conftest import tiny_config

import mistral_tutorial as mt

# Mistral 7B paper (Jiang et al. 2023), Table 1
MISTRAL_7B_TABLE_1 = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                          sliding_window=4096, vocab_size=32000)
# Mixtral paper (Jiang et al. 2024), Table 1: the same trunk, 8 experts, top-2; full attention (§2 text: "a fully dense
# context length"); rope_theta 1e6 (its transformers config)
MIXTRAL_TABLE_1 = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                       vocab_size=32000, n_experts=8, experts_per_token=2, sliding_window=None, rope_theta=1e6)

HAVE_MOE = importlib.util.find_spec("mistral_tutorial.moe") is not None


def count_by_formula(dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, n_experts=0, tied=False):
    """Parameters of a Mistral/Mixtral decoder, re-derived from the architecture (no library code)."""
    attention = dim * n_heads * head_dim + 2 * dim * n_kv_heads * head_dim + n_heads * head_dim * dim  # wq, wk, wv, wo
    swiglu = 3 * dim * hidden_dim                                                                      # w1, w2, w3
    ffn = swiglu if n_experts == 0 else n_experts * swiglu + dim * n_experts                           # + router
    norms = 2 * dim
    embedding = vocab_size * dim
    head = 0 if tied else vocab_size * dim
    return embedding + n_layers * (attention + ffn + norms) + dim + head


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [mt.presets.mistral_7b_v0_1, mt.presets.PRESETS["mistral-7b-v0.1"]])
def test_mistral_7b_preset_is_table_1(make):
    cfg = make()
    for field, value in MISTRAL_7B_TABLE_1.items():
        assert getattr(cfg, field) == value, field
    assert cfg.n_experts == 0 and not cfg.is_moe
    assert cfg.rope_theta == 10000.0 and cfg.norm_eps == 1e-5 and not cfg.tie_embeddings


@pytest.mark.parametrize("make", [mt.presets.mixtral_8x7b_v0_1, mt.presets.PRESETS["mixtral-8x7b-v0.1"]])
def test_mixtral_preset_is_table_1(make):
    cfg = make()
    for field, value in MIXTRAL_TABLE_1.items():
        assert getattr(cfg, field) == value, field
    assert cfg.is_moe


def test_formula_gives_the_published_counts():
    assert count_by_formula(**{k: MISTRAL_7B_TABLE_1[k] for k in
                               ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")}
                            ) == 7_241_732_096
    assert count_by_formula(4096, 32, 32, 8, 128, 14336, 32000, n_experts=8) == 46_702_792_704


def _hf_meta_count(cfg: mt.ModelConfig) -> int:
    hf_config = cfg.to_hf()
    cls = transformers.MixtralForCausalLM if cfg.is_moe else transformers.MistralForCausalLM
    with torch.device("meta"):
        hf = cls(hf_config)
    return sum(p.numel() for p in hf.parameters())


def test_mistral_7b_parameter_count_on_meta():
    cfg = mt.presets.mistral_7b_v0_1()
    expected = count_by_formula(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                                cfg.vocab_size)
    assert expected == 7_241_732_096
    with torch.device("meta"):
        model = mt.Transformer(cfg)
    assert model.num_parameters() == expected
    assert _hf_meta_count(cfg) == expected


def test_mixtral_parameter_count_transformers_on_meta():
    cfg = mt.presets.mixtral_8x7b_v0_1()
    expected = count_by_formula(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                                cfg.vocab_size, n_experts=cfg.n_experts)
    assert expected == 46_702_792_704
    assert _hf_meta_count(cfg) == expected


@pytest.mark.skipif(not HAVE_MOE, reason="mistral_tutorial.moe (the MoE layer) is not written yet")
def test_mixtral_parameter_count_ours_on_meta():
    cfg = mt.presets.mixtral_8x7b_v0_1()
    with torch.device("meta"):
        model = mt.Transformer(cfg)
    assert model.num_parameters() == 46_702_792_704
    # active: 2 of 8 experts per layer
    per_expert = 3 * cfg.dim * cfg.hidden_dim
    assert model.num_parameters(active=True) == 46_702_792_704 - cfg.n_layers * 6 * per_expert


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=True), dict(n_kv_heads=1, head_dim=24),
                                       dict(sliding_window=None)])
def test_tiny_parameter_count_matches_formula_and_transformers(overrides):
    cfg = tiny_config(**overrides)
    expected = count_by_formula(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
                                cfg.vocab_size, tied=cfg.tie_embeddings)
    with torch.device("meta"):
        model = mt.Transformer(cfg)
    assert model.num_parameters() == expected
    assert _hf_meta_count(cfg) == expected


# ---------------------------------------------------------------------------------------------------------------------
ROUND_TRIP_CONFIGS = [
    mt.presets.mistral_7b_v0_1(),
    mt.presets.mixtral_8x7b_v0_1(),
    tiny_config(),
    tiny_config(tie_embeddings=True, rope_theta=5e5, norm_eps=1e-6),
    tiny_config(n_kv_heads=1, head_dim=24, sliding_window=1),
    tiny_config(sliding_window=None, max_position_embeddings=77),
    tiny_config(n_experts=4, experts_per_token=1, sliding_window=None),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP_CONFIGS, ids=lambda c: f"d{c.dim}-w{c.sliding_window}-e{c.n_experts}")
def test_round_trip_through_transformers_config(cfg):
    hf_config = cfg.to_hf()
    assert hf_config.model_type == ("mixtral" if cfg.is_moe else "mistral")
    assert mt.ModelConfig.from_hf(hf_config) == cfg
    assert mt.ModelConfig.from_hf(hf_config.to_dict()) == cfg


@pytest.mark.parametrize("cfg", ROUND_TRIP_CONFIGS, ids=lambda c: f"d{c.dim}-w{c.sliding_window}-e{c.n_experts}")
def test_round_trip_through_params_json(cfg):
    params = cfg.to_params()
    assert mt.ModelConfig.from_params(params) == cfg


def test_params_json_from_a_file(tmp_path):
    import json

    cfg = tiny_config()
    (tmp_path / "params.json").write_text(json.dumps(cfg.to_params()))
    assert mt.ModelConfig.from_params(tmp_path / "params.json") == cfg
    assert mt.ModelConfig.from_params(str(tmp_path / "params.json")) == cfg


def test_params_json_uses_reference_names():
    params = mt.presets.mixtral_8x7b_v0_1().to_params()
    assert params["moe"] == {"num_experts": 8, "num_experts_per_tok": 2}
    assert "sliding_window" not in params
    assert mt.presets.mistral_7b_v0_1().to_params()["sliding_window"] == 4096


# Mistral-7B-v0.1's params.json as released: no rope_theta (mistral-src's one_file_ref.py, its demo, has no such
# field and would refuse one)
MISTRAL_7B_V0_1_PARAMS = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                          "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}


def test_params_json_without_rope_theta_loads_1e4_and_says_why():
    with pytest.warns(mt.AssumedDefaultWarning) as record:
        cfg = mt.ModelConfig.from_params(MISTRAL_7B_V0_1_PARAMS)
    # transformers' MistralConfig defaults are Mistral-7B-v0.1's: its theta is what a params.json without one means here
    assert cfg.rope_theta == transformers.MistralConfig().rope_parameters["rope_theta"] == 1e4
    assert len(record) == 1
    message = str(record[0].message)
    for said in ("rope_theta = 10000", "Mistral-7B-v0.1", "3dc8aed", "mistral-inference", "1e6"):
        assert said in message, said
    for unsaid in ("norm_eps", "head_dim", "n_kv_heads"):              # stated in the file: nothing to say
        assert unsaid not in message


@pytest.mark.parametrize("absent", ["left out", "null"])
def test_every_assumed_field_is_named_in_one_warning(absent):
    params = {k: v for k, v in MISTRAL_7B_V0_1_PARAMS.items() if k not in ("head_dim", "n_kv_heads", "norm_eps")}
    if absent == "null":
        params.update(head_dim=None, n_kv_heads=None, norm_eps=None, rope_theta=None)
    with pytest.warns(mt.AssumedDefaultWarning) as record:
        cfg = mt.ModelConfig.from_params(params)
    assert len(record) == 1
    message = str(record[0].message)
    # the values taken, re-derived: Mistral 7B's eps, dim / n_heads, one key/value head per query head
    assert (cfg.rope_theta, cfg.norm_eps, cfg.head_dim, cfg.n_kv_heads) == (1e4, 1e-5, 4096 // 32, 32)
    for said in ("rope_theta = 10000", "norm_eps = 1e-05", "head_dim = dim // n_heads = 128", "n_kv_heads = n_heads = 32"):
        assert said in message, said


def test_a_params_json_that_states_every_field_loads_silently():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg in ROUND_TRIP_CONFIGS:
            assert mt.ModelConfig.from_params(cfg.to_params()) == cfg
        mt.ModelConfig.from_params({**MISTRAL_7B_V0_1_PARAMS, "rope_theta": 1e4})


def test_llama_round_trip():
    cfg = tiny_config(sliding_window=None)
    hf_config = cfg.to_hf("llama")
    assert isinstance(hf_config, transformers.LlamaConfig)
    assert mt.ModelConfig.from_hf(hf_config) == cfg


# ---------------------------------------------------------------------------------------------------------------------
def test_from_hf_mistral_config():
    hf_config = transformers.MistralConfig(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                                           num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                                           sliding_window=17, max_position_embeddings=300, rms_norm_eps=1e-6,
                                           rope_parameters={"rope_type": "default", "rope_theta": 123.0},
                                           tie_word_embeddings=True)
    cfg = mt.ModelConfig.from_hf(hf_config)
    assert (cfg.vocab_size, cfg.dim, cfg.hidden_dim, cfg.n_layers) == (1000, 96, 200, 3)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (6, 2, 32)
    assert (cfg.sliding_window, cfg.max_position_embeddings, cfg.norm_eps, cfg.rope_theta) == (17, 300, 1e-6, 123.0)
    assert cfg.tie_embeddings and not cfg.is_moe


def test_from_hf_default_configs():
    # transformers' defaults are the released models
    mistral = mt.ModelConfig.from_hf(transformers.MistralConfig())
    for field, value in MISTRAL_7B_TABLE_1.items():
        assert getattr(mistral, field) == value, field

    mixtral = mt.ModelConfig.from_hf(transformers.MixtralConfig())
    for field, value in MIXTRAL_TABLE_1.items():
        assert getattr(mixtral, field) == value, field

    llama = mt.ModelConfig.from_hf(transformers.LlamaConfig())      # Llama 2 7B: MHA, no window
    assert (llama.dim, llama.hidden_dim, llama.n_heads, llama.n_kv_heads) == (4096, 11008, 32, 32)
    assert llama.sliding_window is None and llama.head_dim == 128 and not llama.is_moe


def test_from_hf_llama_ignores_any_window_and_mixtral_keeps_experts():
    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=50)
    assert mt.ModelConfig.from_hf(llama).sliding_window is None
    mixtral = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                         num_local_experts=5, num_experts_per_tok=3, sliding_window=8)
    cfg = mt.ModelConfig.from_hf(mixtral)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.sliding_window, cfg.head_dim) == (5, 3, 8, 16)


def test_from_hf_rejects_other_models():
    with pytest.raises(mt.ConfigError, match="model_type"):
        mt.ModelConfig.from_hf(transformers.GPT2Config())
    with pytest.raises(mt.ConfigError, match="attention_bias"):
        mt.ModelConfig.from_hf(transformers.LlamaConfig(attention_bias=True))


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads"),
    (dict(dim=0), "dim"),
    (dict(n_layers=-1), "n_layers"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-3), "sliding_window"),
    (dict(head_dim=15), "head_dim"),
    (dict(n_experts=4, experts_per_token=5), "experts_per_token"),
    (dict(n_experts=4, experts_per_token=0), "experts_per_token"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(mt.ConfigError, match=field):
        tiny_config(**overrides)
    # and `replace` validates again
    with pytest.raises(mt.ConfigError, match=field):
        tiny_config().replace(**overrides)


def test_config_error_is_a_value_error():
    assert issubclass(mt.ConfigError, ValueError)


def test_to_hf_refuses_impossible_targets():
    with pytest.raises(mt.ConfigError, match="sliding_window"):
        tiny_config(sliding_window=4).to_hf("llama")
    with pytest.raises(mt.ConfigError, match="n_experts"):
        tiny_config().to_hf("mixtral")


def test_boolean_window_is_rejected():
    with pytest.raises(mt.ConfigError, match="sliding_window"):
        tiny_config(sliding_window=True)
