"""The contract between a checkpoint's config and ModelConfig, and the readers its two sides share.

A transformers `config.json` (or PretrainedConfig) and a mistral reference `params.json` say how a model computes.
Every field is one of three kinds:
  - read: it becomes a ModelConfig field (hidden_size -> dim, rope_scaling -> rope_scaling, ...);
  - inert: it cannot change a forward pass in eval mode (token ids, dropout, training-only router settings, ...);
  - neutral-only: it names a feature this library does not implement (biases, qk-norm, soft-capping, shared experts,
    ...) and is accepted only at the value that switches the feature off.
Anything else, and any field of the wrong type, raises one CheckpointConfigError naming the field and its value:
a model that differs from its checkpoint never loads in silence.

This module holds only the shared pieces: the error, JSON reading, and the checks of one positive int or number.
The tables of fields and their readers live in config_json.py (transformers, with its RoPE part in
config_json_rope.py) and params_json.py (the reference); config.py builds ModelConfig from what they return.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointConfigError


def fail(source: str, message: str) -> CheckpointConfigError:
    """The error for one problem of one config: `source: message` on one line."""
    return CheckpointConfigError(f"{source}: {message}")


def short_repr(value: Any) -> str:
    """repr(value), cut to 60 characters, for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """value is one of `allowed`, of the same type (so that 0 is not False and "1" is not 1)."""
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


def refuse_unread(c: dict[str, Any], read: set[str], inert: set[str],
                  neutral_only: dict[str, tuple[tuple[Any, ...], str]], source: str) -> None:
    """Refuse a field that is neither read nor inert (unknown), and a neutral-only one set to anything else."""
    unknown = sorted((k for k in c if k not in read | inert | set(neutral_only)), key=str)
    if unknown:
        shown = ", ".join(f"{k}={short_repr(c[k])}" for k in unknown[:6])
        raise fail(source, f"unknown field(s) {shown}{' ...' if len(unknown) > 6 else ''}: this library cannot tell "
                           f"whether they change the model, so it refuses to guess; remove them if they do not")
    for key, (allowed, feature) in neutral_only.items():
        if key in c and not is_neutral(c[key], allowed):
            raise fail(source, f"{key}={short_repr(c[key])} is not implemented ({feature}); "
                               f"this library loads only {' or '.join(map(repr, allowed))}")


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


def positive_int(c: dict[str, Any], key: str, source: str, optional: bool = False) -> int | None:
    """c[key] as a positive int (None allowed when `optional`); anything else is refused naming the key."""
    value = c.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(source, f"{key} must be a positive int{' or null' if optional else ''}, got {short_repr(value)}")
    return value


def positive_number(c: dict[str, Any], key: str, source: str, default: float) -> float:
    """c[key] (or `default`) as a finite float > 0."""
    value = c.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise fail(source, f"{key} must be a finite number > 0, got {short_repr(value)}")
    return float(value)


def as_dict(config: Any, source: str, what: str) -> tuple[dict[str, Any], str]:
    """A config given as a dict, an object with to_dict() (PretrainedConfig) or a JSON path -> (dict, source)."""
    if isinstance(config, (str, Path)):
        source = str(config)
        config = read_json(config, what)
    elif hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise fail(source, f"a {what} must be a JSON object (a dict), got {type(config).__name__} "
                           f"{short_repr(config)}")
    return config, source
