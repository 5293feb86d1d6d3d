"""RoPE's settings in a transformers config: rope_theta and the rope scaling, wherever the config states them.

transformers has moved these around: a top-level `rope_theta`, the older `rope_scaling` dict, and the newer
`rope_parameters` dict may each carry some of them. hf_rope merges the three, refuses any two that disagree, and
hands the scaling to rope.check_rope_scaling. The rest of a config.json is read in config_json.py; what scaling does
to the rotation is in rope.py.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_config import fail, is_neutral, positive_number, short_repr
from .errors import ConfigError
from .rope import check_rope_scaling


def hf_rope(c: dict[str, Any], source: str, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from `rope_parameters`, the older `rope_scaling` and a top-level one."""
    parts = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = c.get(key)
        if value is not None and not isinstance(value, dict):
            raise fail(source, f"{key} must be a dict or null, got {short_repr(value)}")
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
    theta = positive_number({"rope_theta": rope.pop("rope_theta", c.get("rope_theta", default_theta))}, "rope_theta",
                            source, default_theta)
    factor = rope.pop("partial_rotary_factor", None)
    if not is_neutral(factor, (1.0, None)):
        raise fail(source, f"partial_rotary_factor={short_repr(factor)} is not implemented "
                           f"(RoPE on part of each head)")
    original = c.get("original_max_position_embeddings")
    if rope_type == "llama3":
        if original is not None and rope.setdefault("original_max_position_embeddings", original) != original:
            raise fail(source, f"original_max_position_embeddings given twice: {original!r} and "
                               f"{rope['original_max_position_embeddings']!r} in the rope parameters")
        # transformers: without it, the pre-training context is max_position_embeddings
        rope.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    elif original is not None:
        raise fail(source, f"original_max_position_embeddings={short_repr(original)} without llama3 rope scaling: "
                           f"this library does not know what it would change")
    if rope_type in ("default", None):
        if rope:
            raise fail(source, f"rope_type 'default' (plain RoPE) with scaling fields {short_repr(rope)}: "
                               f"give a rope_type ('linear' or 'llama3') or drop them")
        return theta, None
    try:
        return theta, check_rope_scaling({"rope_type": rope_type, **rope})
    except ConfigError as err:
        raise fail(source, str(err)) from None
