"""Reading a mistral reference `params.json`: its few fields, sorted into read, inert and neutral-only.

params_fields turns one into ModelConfig keyword arguments. A params.json states no rope scaling: a model that needs
it is loaded from its transformers config.json (config_json.py). The shared checks and the contract are in
checkpoint_config.py; config.py builds the ModelConfig (this module does not import config.py).
"""

from __future__ import annotations

from typing import Any

from .checkpoint_config import as_dict, fail, positive_int, positive_number, refuse_unread, short_repr

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
    p, source = as_dict(params, source, "params.json")
    missing = [k for k in PARAMS_REQUIRED if k not in p]
    if missing:
        raise fail(source, f"missing required field(s) {missing}: not a mistral reference params.json")
    refuse_unread(p, PARAMS_READ, PARAMS_INERT, PARAMS_NEUTRAL_ONLY, source)
    for key in PARAMS_REQUIRED:
        positive_int(p, key, source)
    for key in ("n_kv_heads", "head_dim", "sliding_window", "max_seq_len", "max_position_embeddings"):
        positive_int(p, key, source, optional=True)
    tied = p.get("tied_embeddings", False)
    if not isinstance(tied, bool):
        raise fail(source, f"tied_embeddings must be true or false, got {short_repr(tied)}")
    moe = p.get("moe")
    n_experts, experts_per_token = 0, 2
    if moe is not None:
        if not isinstance(moe, dict) or set(moe) != {"num_experts", "num_experts_per_tok"}:
            raise fail(source, f"moe must be {{'num_experts': E, 'num_experts_per_tok': k}}, got {short_repr(moe)}")
        n_experts = positive_int(moe, "num_experts", source)
        experts_per_token = positive_int(moe, "num_experts_per_tok", source)
    return dict(vocab_size=p["vocab_size"], dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                n_kv_heads=p.get("n_kv_heads") or p["n_heads"], head_dim=p.get("head_dim"),
                hidden_dim=p["hidden_dim"], norm_eps=positive_number(p, "norm_eps", source, 1e-5),
                rope_theta=positive_number(p, "rope_theta", source, 10000.0), sliding_window=p.get("sliding_window"),
                max_position_embeddings=p.get("max_position_embeddings") or p.get("max_seq_len") or 32768,
                n_experts=n_experts, experts_per_token=experts_per_token, tie_embeddings=tied)
