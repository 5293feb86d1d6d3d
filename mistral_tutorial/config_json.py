"""Reading a transformers `config.json` (or PretrainedConfig): its fields, sorted into read, inert and neutral-only.

hf_fields turns one into ModelConfig keyword arguments. Missing optional fields take transformers' defaults for that
model_type, so a config means here what it means in transformers. The RoPE fields are read in config_json_rope.py,
the shared checks and the contract itself are in checkpoint_config.py, and the reference params.json in
params_json.py; config.py builds the ModelConfig (this module does not import config.py).
"""

from __future__ import annotations

from typing import Any

from .checkpoint_config import as_dict, fail, positive_int, positive_number, refuse_unread, short_repr
from .config_json_rope import hf_rope

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


def hf_fields(config: Any, source: str = "transformers config") -> dict[str, Any]:
    """ModelConfig keyword arguments from a transformers config: a dict, a PretrainedConfig, or a config.json path."""
    c, source = as_dict(config, source, "transformers config")
    model_type = c.get("model_type")
    if model_type not in MODEL_TYPES:
        raise fail(source, f"model_type {short_repr(model_type)} is not implemented: "
                           f"expected one of {list(MODEL_TYPES)}")
    missing = [k for k in HF_REQUIRED if k not in c]
    if missing:
        raise fail(source, f"missing required field(s) {missing}: not a complete {model_type} config")
    quantization = c.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        c = {k: v for k, v in c.items() if k != "quantization_config"}      # transformers dequantized a GGUF
    refuse_unread(c, HF_READ, HF_INERT, HF_NEUTRAL_ONLY, source)

    defaults = HF_DEFAULTS[model_type]
    c = {**defaults, **c}                      # an explicit null stays null: transformers' own meaning (kv heads = H)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        positive_int(c, key, source)
    n_heads = c["num_attention_heads"]
    n_kv_heads = positive_int(c, "num_key_value_heads", source, optional=True) or n_heads
    head_dim = positive_int(c, "head_dim", source, optional=True) or c["hidden_size"] // n_heads
    window = positive_int(c, "sliding_window", source, optional=True)
    if model_type == "llama" and window is not None:
        raise fail(source, f"sliding_window={window} in a llama config: transformers' Llama has no window and would "
                           f"ignore it; use model_type 'mistral' for a windowed model, or null")
    tie = c.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise fail(source, f"tie_word_embeddings must be true or false, got {short_repr(tie)}")
    n_experts, experts_per_token = 0, 2
    if model_type == "mixtral":
        n_experts = positive_int(c, "num_local_experts", source)
        experts_per_token = positive_int(c, "num_experts_per_tok", source)
    else:
        for key in ("num_local_experts", "num_experts_per_tok"):
            if c.get(key) is not None:
                raise fail(source, f"{key}={short_repr(c[key])} in a {model_type} config: transformers' "
                                   f"{model_type.capitalize()} has no experts and would ignore it; use 'mixtral'")
    rope_theta, rope_scaling = hf_rope(c, source, HF_DEFAULT_THETA[model_type])
    return dict(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=c["intermediate_size"],
                norm_eps=positive_number(c, "rms_norm_eps", source, 1e-6), rope_theta=rope_theta,
                sliding_window=window, max_position_embeddings=c["max_position_embeddings"], n_experts=n_experts,
                experts_per_token=experts_per_token, tie_embeddings=tie, rope_scaling=rope_scaling)
