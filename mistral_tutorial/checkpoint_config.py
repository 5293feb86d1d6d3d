"""The contract between a checkpoint's config and ModelConfig: what is read, what is ignored, and what is refused.

A transformers `config.json` (or PretrainedConfig) and a mistral reference `params.json` say how a model computes.
Every field is one of three kinds:
  - read: it becomes a ModelConfig field (hidden_size -> dim, rope_scaling -> rope_scaling, ...);
  - inert: it cannot change a forward pass in eval mode (token ids, dropout, training-only router settings, ...);
  - neutral-only: it names a feature this library does not implement (biases, qk-norm, soft-capping, shared experts,
    ...) and is accepted only at the value that switches the feature off.
Anything else, and any field of the wrong type, raises one CheckpointConfigError naming the field and its value:
a model that differs from its checkpoint never loads in silence. Missing optional fields take transformers' defaults
for that model_type, so a config means here what it means in transformers.

Returns keyword arguments for ModelConfig; config.py builds it (this module does not import config.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointConfigError, ConfigError
from .rope import check_rope_scaling

MODEL_TYPES = ("mistral", "mixtral", "llama")

# transformers' defaults for fields a config.json may leave out (MistralConfig, MixtralConfig, LlamaConfig in 5.x)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": dict(num_key_value_heads=8, sliding_window=4096, rms_norm_eps=1e-6, max_position_embeddings=131072),
    "mixtral": dict(num_key_value_heads=8, sliding_window=None, rms_norm_eps=1e-5, max_position_embeddings=131072,
                    num_local_experts=8, num_experts_per_tok=2),
    "llama": dict(num_key_value_heads=None, sliding_window=None, rms_norm_eps=1e-6, max_position_embeddings=2048),
}
# and the rope_theta each class assumes when a config gives none (`default_theta`)
HF_DEFAULT_THETA = {"mistral": 10000.0, "mixtral": 1000000.0, "llama": 10000.0}
HF_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads")
HF_READ = {*HF_REQUIRED, "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
           "sliding_window", "tie_word_embeddings", "num_local_experts", "num_experts_per_tok", "rope_theta",
           "rope_parameters", "rope_scaling", "original_max_position_embeddings", "hidden_act"}

# No effect on a forward pass in eval mode (PretrainedConfig's generic fields, generation defaults, training knobs).
HF_INERT = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "use_cache", "torchscript",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "tf_legacy_loss",
    "is_decoder", "tie_encoder_decoder", "cross_attention_hidden_size", "gradient_checkpointing",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "initializer_range", "attention_dropout",                    # dropout is off in eval mode
    "output_router_logits", "router_aux_loss_coef",              # the load-balancing loss: training only
    "router_jitter_noise",                                       # transformers' Mixtral applies it only in training
    "pretraining_tp",                                            # transformers 5.x ignores it (4.x: the same product)
    "is_llama_config", "transformers.js_config",                 # SmolLM2's metadata
}

# field -> (the values that switch the feature off, what the feature is)
HF_NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "hidden_act": (("silu", "swish"), "the FFN activation (SwiGLU uses SiLU)"),
    "attention_bias": ((False, None), "biases on the q/k/v/o projections"),
    "mlp_bias": ((False, None), "biases on the FFN projections"),
    "qk_norm": ((False, None), "a norm on queries and keys (qk-norm)"),
    "use_qk_norm": ((False, None), "a norm on queries and keys (qk-norm)"),
    "qk_layernorm": ((False, None), "a norm on queries and keys (qk-norm)"),
    "use_qk_layernorm": ((False, None), "a norm on queries and keys (qk-norm)"),
    "final_logit_softcapping": ((None,), "tanh soft-capping of the logits"),
    "attn_logit_softcapping": ((None,), "tanh soft-capping of the attention scores"),
    "partial_rotary_factor": ((1.0, None), "RoPE on part of each head"),
    "rope_interleaved": ((False, None), "RoPE on interleaved pairs (this library loads the rotate-half layout)"),
    "norm_topk_prob": ((True, None), "Mixtral's renormalisation of the top-k router weights (it always renormalises)"),
    "n_shared_experts": ((None, 0), "shared experts"),
    "num_shared_experts": ((None, 0), "shared experts"),
    "shared_expert_intermediate_size": ((None, 0), "shared experts"),
    "moe_shared_expert_intermediate_size": ((None, 0), "shared experts"),
    "moe_intermediate_size": ((None,), "experts narrower than intermediate_size"),
    "first_k_dense_replace": ((None, 0), "dense FFNs in the first layers of an MoE model"),
    "decoder_sparse_step": ((None, 1), "MoE in only some layers"),
    "mlp_only_layers": ((None, []), "MoE in only some layers"),
    "moe_layer_freq": ((None, 1), "MoE in only some layers"),
    "routed_scaling_factor": ((None, 1.0), "a scale on the routed experts' output"),
    "scoring_func": ((None, "softmax"), "a router score other than softmax"),
    "topk_method": ((None, "greedy"), "a top-k routing other than greedy"),
    "n_group": ((None, 1), "group-limited routing"),
    "topk_group": ((None, 1), "group-limited routing"),
    "embedding_multiplier": ((None, 1.0), "a scale on the embeddings"),
    "residual_multiplier": ((None, 1.0), "a scale on the residual branches"),
    "attention_multiplier": ((None,), "an attention scale other than 1/sqrt(head_dim)"),
    "logits_scaling": ((None, 1.0), "a scale on the logits"),
    "query_pre_attn_scalar": ((None,), "an attention scale other than 1/sqrt(head_dim)"),
    "layer_types": ((None,), "different attention types per layer"),
    "attention_chunk_size": ((None,), "chunked attention"),
    "no_rope_layers": ((None,), "layers without RoPE"),
    "use_sliding_window": ((None,), "a switch for the window (this library reads sliding_window alone)"),
    "max_window_layers": ((None,), "a window on only some layers"),
    "quantization_config": ((None,), "quantized weights (GPTQ, AWQ, bitsandbytes, ...): load a float checkpoint"),
    "auto_map": ((None,), "custom modelling code (trust_remote_code)"),
    "pruned_heads": ((None, {}), "pruned attention heads"),
    "is_encoder_decoder": ((False, None), "an encoder-decoder model"),
    "add_cross_attention": ((False, None), "cross-attention"),
}


def fail(source: str, message: str) -> CheckpointConfigError:
    """The error for one problem of one config: `source: message` on one line."""
    return CheckpointConfigError(f"{source}: {message}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """value is one of `allowed`, of the same type (so that 0 is not False and "1" is not 1)."""
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON at `path`; FileNotFoundError if absent, CheckpointConfigError if unreadable or not JSON."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:           # not UTF-8, not JSON, or nested to blow the stack
        raise CheckpointConfigError(f"{path}: not a valid JSON {what} ({type(err).__name__}: {str(err)[:200]})"
                                    ) from None


def _int(c: dict[str, Any], key: str, source: str, optional: bool = False) -> int | None:
    """c[key] as a positive int (None allowed when `optional`); anything else is refused naming the key."""
    value = c.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(source, f"{key} must be a positive int{' or null' if optional else ''}, got {_short(value)}")
    return value


def _number(c: dict[str, Any], key: str, source: str, default: float) -> float:
    """c[key] (or `default`) as a finite float > 0."""
    value = c.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise fail(source, f"{key} must be a finite number > 0, got {_short(value)}")
    return float(value)


def _as_dict(config: Any, source: str, what: str) -> tuple[dict[str, Any], str]:
    """A config given as a dict, an object with to_dict() (PretrainedConfig) or a JSON path -> (dict, source)."""
    if isinstance(config, (str, Path)):
        source = str(config)
        config = read_json(config, what)
    elif hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise fail(source, f"a {what} must be a JSON object (a dict), got {type(config).__name__} {_short(config)}")
    return config, source


# ---------------------------------------------------------------------------------------------------------------------
def _hf_rope(c: dict[str, Any], source: str, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from `rope_parameters`, the older `rope_scaling` and a top-level rope_theta."""
    parts = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = c.get(key)
        if value is not None and not isinstance(value, dict):
            raise fail(source, f"{key} must be a dict or null, got {_short(value)}")
        parts[key] = dict(value or {})
    rope = {**parts["rope_parameters"], **parts["rope_scaling"]}          # transformers: rope_scaling wins
    for key in set(parts["rope_parameters"]) & set(parts["rope_scaling"]):
        if parts["rope_parameters"][key] != parts["rope_scaling"][key]:
            raise fail(source, f"rope_parameters and rope_scaling disagree on {key}: "
                               f"{parts['rope_parameters'][key]!r} vs {parts['rope_scaling'][key]!r}")
    if "type" in rope and rope.setdefault("rope_type", rope["type"]) != rope["type"]:
        raise fail(source, f"rope type given twice: rope_type={rope['rope_type']!r}, type={rope['type']!r}")
    rope.pop("type", None)
    rope_type = rope.pop("rope_type", "default")
    if "rope_theta" in rope and "rope_theta" in c and rope["rope_theta"] != c["rope_theta"]:
        raise fail(source, f"rope_theta given twice: {c['rope_theta']!r} and {rope['rope_theta']!r} in rope_parameters")
    theta = _number({"rope_theta": rope.pop("rope_theta", c.get("rope_theta", default_theta))}, "rope_theta", source,
                    default_theta)
    factor = rope.pop("partial_rotary_factor", None)
    if not _is_neutral(factor, (1.0, None)):
        raise fail(source, f"partial_rotary_factor={_short(factor)} is not implemented (RoPE on part of each head)")
    original = c.get("original_max_position_embeddings")
    if rope_type == "llama3":
        if original is not None and rope.setdefault("original_max_position_embeddings", original) != original:
            raise fail(source, f"original_max_position_embeddings given twice: {original!r} and "
                               f"{rope['original_max_position_embeddings']!r} in the rope parameters")
        # transformers: without it, the pre-training context is max_position_embeddings
        rope.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    elif original is not None:
        raise fail(source, f"original_max_position_embeddings={_short(original)} without llama3 rope scaling: "
                           f"this library does not know what it would change")
    if rope_type in ("default", None):
        if rope:
            raise fail(source, f"rope_type 'default' (plain RoPE) with scaling fields {_short(rope)}: "
                               f"give a rope_type ('linear' or 'llama3') or drop them")
        return theta, None
    try:
        return theta, check_rope_scaling({"rope_type": rope_type, **rope})
    except ConfigError as err:
        raise fail(source, str(err)) from None


def hf_fields(config: Any, source: str = "transformers config") -> dict[str, Any]:
    """ModelConfig keyword arguments from a transformers config: a dict, a PretrainedConfig, or a config.json path."""
    c, source = _as_dict(config, source, "transformers config")
    model_type = c.get("model_type")
    if model_type not in MODEL_TYPES:
        raise fail(source, f"model_type {_short(model_type)} is not implemented: expected one of {list(MODEL_TYPES)}")
    missing = [k for k in HF_REQUIRED if k not in c]
    if missing:
        raise fail(source, f"missing required field(s) {missing}: not a complete {model_type} config")
    quantization = c.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        c = {k: v for k, v in c.items() if k != "quantization_config"}      # transformers dequantized a GGUF
    unknown = sorted((k for k in c if k not in HF_READ | HF_INERT | set(HF_NEUTRAL_ONLY)), key=str)
    if unknown:
        shown = ", ".join(f"{k}={_short(c[k])}" for k in unknown[:6])
        raise fail(source, f"unknown field(s) {shown}{' ...' if len(unknown) > 6 else ''}: this library cannot tell "
                           f"whether they change the model, so it refuses to guess; remove them if they do not")
    for key, (allowed, feature) in HF_NEUTRAL_ONLY.items():
        if key in c and not _is_neutral(c[key], allowed):
            raise fail(source, f"{key}={_short(c[key])} is not implemented ({feature}); "
                               f"this library loads only {' or '.join(map(repr, allowed))}")

    defaults = HF_DEFAULTS[model_type]
    c = {**defaults, **c}                      # an explicit null stays null: transformers' own meaning (kv heads = H)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        _int(c, key, source)
    n_heads = c["num_attention_heads"]
    n_kv_heads = _int(c, "num_key_value_heads", source, optional=True) or n_heads
    head_dim = _int(c, "head_dim", source, optional=True) or c["hidden_size"] // n_heads
    window = _int(c, "sliding_window", source, optional=True)
    if model_type == "llama" and window is not None:
        raise fail(source, f"sliding_window={window} in a llama config: transformers' Llama has no window and would "
                           f"ignore it; use model_type 'mistral' for a windowed model, or null")
    tie = c.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise fail(source, f"tie_word_embeddings must be true or false, got {_short(tie)}")
    n_experts, experts_per_token = 0, 2
    if model_type == "mixtral":
        n_experts = _int(c, "num_local_experts", source)
        experts_per_token = _int(c, "num_experts_per_tok", source)
    else:
        for key in ("num_local_experts", "num_experts_per_tok"):
            if c.get(key) is not None:
                raise fail(source, f"{key}={_short(c[key])} in a {model_type} config: transformers' "
                                   f"{model_type.capitalize()} has no experts and would ignore it; use 'mixtral'")
    rope_theta, rope_scaling = _hf_rope(c, source, HF_DEFAULT_THETA[model_type])
    return dict(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=c["intermediate_size"],
                norm_eps=_number(c, "rms_norm_eps", source, 1e-6), rope_theta=rope_theta, sliding_window=window,
                max_position_embeddings=c["max_position_embeddings"], n_experts=n_experts,
                experts_per_token=experts_per_token, tie_embeddings=tie, rope_scaling=rope_scaling)


# ---------------------------------------------------------------------------------------------------------------------
PARAMS_REQUIRED = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
PARAMS_READ = {*PARAMS_REQUIRED, "n_kv_heads", "head_dim", "norm_eps", "rope_theta", "sliding_window", "max_seq_len",
               "max_position_embeddings", "moe", "tied_embeddings"}
PARAMS_INERT = {"max_batch_size"}
PARAMS_NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "model_type": ((None, "transformer"), "a model other than the text transformer"),
    "lora": ((None,), "LoRA adapters"),
    "vision_encoder": ((None,), "a vision encoder (Pixtral)"),
    "quantization": ((None,), "quantized weights"),
    "use_scaled_rope": ((False, None), "Llama 3.1's rope scaling, whose factors the reference code hard-codes: load "
                                       "the transformers config.json, which states them"),
    "rope_scaling": ((None,), "rope scaling in a params.json: load the transformers config.json"),
}


def params_fields(params: Any, source: str = "params.json") -> dict[str, Any]:
    """ModelConfig keyword arguments from a mistral reference `params.json` (a dict or its path)."""
    p, source = _as_dict(params, source, "params.json")
    missing = [k for k in PARAMS_REQUIRED if k not in p]
    if missing:
        raise fail(source, f"missing required field(s) {missing}: not a mistral reference params.json")
    unknown = sorted((k for k in p if k not in PARAMS_READ | PARAMS_INERT | set(PARAMS_NEUTRAL_ONLY)), key=str)
    if unknown:
        shown = ", ".join(f"{k}={_short(p[k])}" for k in unknown[:6])
        raise fail(source, f"unknown field(s) {shown}: this library cannot tell whether they change the model, so it "
                           f"refuses to guess; remove them if they do not")
    for key, (allowed, feature) in PARAMS_NEUTRAL_ONLY.items():
        if key in p and not _is_neutral(p[key], allowed):
            raise fail(source, f"{key}={_short(p[key])} is not implemented ({feature})")
    for key in PARAMS_REQUIRED:
        _int(p, key, source)
    for key in ("n_kv_heads", "head_dim", "sliding_window", "max_seq_len", "max_position_embeddings"):
        _int(p, key, source, optional=True)
    tied = p.get("tied_embeddings", False)
    if not isinstance(tied, bool):
        raise fail(source, f"tied_embeddings must be true or false, got {_short(tied)}")
    moe = p.get("moe")
    n_experts, experts_per_token = 0, 2
    if moe is not None:
        if not isinstance(moe, dict) or set(moe) != {"num_experts", "num_experts_per_tok"}:
            raise fail(source, f"moe must be {{'num_experts': E, 'num_experts_per_tok': k}}, got {_short(moe)}")
        n_experts = _int(moe, "num_experts", source)
        experts_per_token = _int(moe, "num_experts_per_tok", source)
    return dict(vocab_size=p["vocab_size"], dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                n_kv_heads=p.get("n_kv_heads") or p["n_heads"], head_dim=p.get("head_dim"),
                hidden_dim=p["hidden_dim"], norm_eps=_number(p, "norm_eps", source, 1e-5),
                rope_theta=_number(p, "rope_theta", source, 10000.0), sliding_window=p.get("sliding_window"),
                max_position_embeddings=p.get("max_position_embeddings") or p.get("max_seq_len") or 32768,
                n_experts=n_experts, experts_per_token=experts_per_token, tie_embeddings=tied)
