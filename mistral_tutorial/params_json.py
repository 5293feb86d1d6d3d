"""Reading a mistral reference `params.json`: its few fields, sorted into read, inert and neutral-only.

params_fields turns one into ModelConfig keyword arguments. A params.json states no rope scaling: a model that needs
it is loaded from its transformers config.json (config_json.py). The shared checks and the contract are in
checkpoint_config.py; config.py builds the ModelConfig (this module does not import config.py).

Fields left out (or null) that the references do not fill the same way are filled here and said, in one
AssumedDefaultWarning naming each field, the value taken and why (`assumed_defaults`). The references compared:
mistral-src at commit 3dc8aed (one_file_ref.py, moe_one_file_ref.py, mistral/model.py) and mistral-inference 1.6.0.
  - rope_theta: 1e4 here, as one_file_ref.py hard-codes and Mistral-7B-v0.1's params.json (which has none) needs;
    mistral-inference and moe_one_file_ref.py take 1e6, mistral/model.py 1e6 without a window and 1e4 with one.
  - norm_eps, head_dim, n_kv_heads: every reference requires them (a params.json without one does not load there);
    here 1e-5 (Mistral 7B's; the references' RMSNorm class defaults to 1e-6), dim // n_heads, n_heads.
Not warned, because no reference disagrees: sliding_window (absent = full attention in every reference that may omit
it), moe (absent = a dense FFN), tied_embeddings (absent = an output matrix of its own). max_seq_len /
max_position_embeddings bound only how far this library lets positions go (32768 when absent); the references build
their rotary table for 128 000 positions whatever the file says.
"""

from __future__ import annotations

import warnings
from typing import Any

from .checkpoint_config import as_dict, fail, positive_int, positive_number, refuse_unread, short_repr
from .errors import AssumedDefaultWarning

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


ROPE_THETA_DEFAULT = 10000.0
NORM_EPS_DEFAULT = 1e-5


def assumed_defaults(p: dict[str, Any]) -> list[str]:
    """One line per field of params.json `p` that is absent (or null) and that the references do not fill alike: the
    field, the value params_fields takes, and why. [] when the file states them all."""
    notes = []
    if p.get("rope_theta") is None:
        notes.append(f"rope_theta = {ROPE_THETA_DEFAULT:g}, as Mistral-7B-v0.1 (whose params.json has no rope_theta) "
                     f"and mistral-src's one_file_ref.py (commit 3dc8aed, which hard-codes it) use; mistral-inference "
                     f"1.6.0 and mistral-src's moe_one_file_ref.py would take 1e6 (Mixtral's)")
    if p.get("norm_eps") is None:
        notes.append(f"norm_eps = {NORM_EPS_DEFAULT:g}, Mistral 7B's and Mixtral's; every reference requires the field "
                     f"(their RMSNorm class itself defaults to 1e-06)")
    if p.get("head_dim") is None and isinstance(p.get("dim"), int) and isinstance(p.get("n_heads"), int) \
            and p["n_heads"] > 0:
        notes.append(f"head_dim = dim // n_heads = {p['dim'] // p['n_heads']}; every reference requires the field, "
                     f"and not every model has head_dim = dim / n_heads (Mistral NeMo: 5120 / 32 heads, head_dim 128)")
    if p.get("n_kv_heads") is None:
        notes.append(f"n_kv_heads = n_heads = {p.get('n_heads')} (multi-head attention, no key/value sharing); every "
                     f"reference requires the field")
    return notes


def params_fields(params: Any, source: str = "params.json") -> dict[str, Any]:
    """ModelConfig keyword arguments from a mistral reference `params.json` (a dict or its path).

    A field left out that the references do not fill alike (see the module docstring) is filled, and one
    AssumedDefaultWarning lists every such field with the value taken and why.
    """
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
    assumed = assumed_defaults(p)
    p = {k: v for k, v in p.items() if not (v is None and k in ("rope_theta", "norm_eps"))}   # null: as if absent
    norm_eps = positive_number(p, "norm_eps", source, NORM_EPS_DEFAULT)
    rope_theta = positive_number(p, "rope_theta", source, ROPE_THETA_DEFAULT)
    if assumed:
        warnings.warn(f"{source} leaves out field(s) the references do not fill alike; assumed "
                      + "; ".join(assumed) + ". Set them in the file to silence this.", AssumedDefaultWarning,
                      stacklevel=2)
    return dict(vocab_size=p["vocab_size"], dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                n_kv_heads=p.get("n_kv_heads") or p["n_heads"], head_dim=p.get("head_dim"),
                hidden_dim=p["hidden_dim"], norm_eps=norm_eps, rope_theta=rope_theta,
                sliding_window=p.get("sliding_window"),
                max_position_embeddings=p.get("max_position_embeddings") or p.get("max_seq_len") or 32768,
                n_experts=n_experts, experts_per_token=experts_per_token, tie_embeddings=tied)
