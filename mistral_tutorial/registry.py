"""Where model.py finds its checkpoint readers: loading.py registers `from_hf` and `from_pretrained` here at import.

Readers build models, so model.py cannot import them (STYLE §10); both import this module instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_loader(name: str, loader: Callable[..., Any]) -> None:
    """Make `Transformer.<name>` (from_hf, from_pretrained) call `loader`; loading.py does this at import."""
    _LOADERS[name] = loader


def loader(name: str) -> Callable[..., Any]:
    if name not in _LOADERS:
        raise RuntimeError(f"Transformer.{name} is registered by mistral_tutorial.loading: import mistral_tutorial")
    return _LOADERS[name]
