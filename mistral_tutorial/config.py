"""The model's hyper-parameters, and converters to and from transformers configs and the reference `params.json`.

Mistral 7B paper, Table 1 (and Mixtral paper, Table 1) list the numbers the presets in `presets.py` carry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_json import hf_fields
from .errors import CheckpointConfigError, ConfigError
from .params_json import params_fields
from .rope import check_rope_scaling

__all__ = ["ConfigError", "ModelConfig"]


@dataclass
class ModelConfig:
    """Everything needed to build a Mistral / Mixtral / Llama-style decoder.

    Symbols of the papers in brackets: dim [d], n_layers [L], n_heads [H], n_kv_heads [Hkv], head_dim [D],
    hidden_dim [the FFN width], sliding_window [W], n_experts [E], experts_per_token [k].
    `sliding_window=None` is full causal attention (Llama, Mixtral); `n_experts=0` is a dense FFN (Mistral, Llama).
    `rope_scaling=None` is plain RoPE; {"rope_type": "linear", "factor": s} or {"rope_type": "llama3", "factor": s,
    "low_freq_factor": .., "high_freq_factor": .., "original_max_position_embeddings": L} stretch it (see rope.py).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    max_position_embeddings: int = 32768
    n_experts: int = 0
    experts_per_token: int = 2
    tie_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work, and what would."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}): "
                f"each key/value head serves a whole group of query heads (GQA). Try n_kv_heads in "
                f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE (pairs of dimensions rotate), "
                              f"got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            raise ConfigError(f"ModelConfig.sliding_window must be None (full attention) or an int >= 1, "
                              f"got {self.sliding_window!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ConfigError(f"ModelConfig.n_experts must be 0 (dense FFN) or a positive int, got {self.n_experts!r}")
        if not isinstance(self.experts_per_token, int) or isinstance(self.experts_per_token, bool) or (
                self.n_experts > 0 and not 1 <= self.experts_per_token <= self.n_experts):
            raise ConfigError(f"ModelConfig.experts_per_token must be an int in 1..n_experts ({self.n_experts}), "
                              f"got {self.experts_per_token!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"ModelConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        except ConfigError as err:
            raise ConfigError(f"ModelConfig.{err}") from None

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (H / Hkv)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again); an unknown field name is a TypeError listing the fields."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"ModelConfig has no field(s) {unknown}; its fields are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------------------------------------------
    # transformers configs
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """From a transformers MistralConfig, MixtralConfig or LlamaConfig, its `to_dict()`, or a config.json path.

        Every field is read, known to be inert, or refused with a CheckpointConfigError (a CheckpointError and a
        ConfigError) naming it and its value: see config_json.py. Missing optional fields take transformers'
        defaults for the model_type.
        """
        source = str(hf_config) if isinstance(hf_config, (str, Path)) else "transformers config"
        return cls._checked(hf_fields(hf_config), source)

    @classmethod
    def _checked(cls, fields: dict[str, Any], source: str) -> ModelConfig:
        """cls(**fields), with a ConfigError turned into a CheckpointConfigError naming the source."""
        try:
            return cls(**fields)
        except CheckpointConfigError:
            raise
        except ConfigError as err:
            raise CheckpointConfigError(f"{source}: {err}") from None

    def to_hf(self, model_type: str | None = None, **extra: Any) -> Any:
        """A transformers config: MixtralConfig when n_experts > 0, else MistralConfig (or LlamaConfig if asked and
        there is no window)."""
        import transformers

        model_type = model_type or ("mixtral" if self.is_moe else "mistral")
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.hidden_dim,
            rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            hidden_act="silu",
        )
        common.update(extra)
        if model_type == "mixtral":
            if not self.is_moe:
                raise ConfigError("to_hf('mixtral') needs n_experts > 0")
            return transformers.MixtralConfig(sliding_window=self.sliding_window, num_local_experts=self.n_experts,
                                              num_experts_per_tok=self.experts_per_token, **common)
        if self.is_moe:
            raise ConfigError(f"to_hf({model_type!r}) cannot hold experts (n_experts={self.n_experts}); use 'mixtral'")
        if model_type == "mistral":
            return transformers.MistralConfig(sliding_window=self.sliding_window, **common)
        if model_type == "llama":
            if self.sliding_window is not None:
                raise ConfigError("LlamaConfig has no sliding window; set sliding_window=None or use 'mistral'")
            return transformers.LlamaConfig(**common)
        raise ConfigError(f"unknown model_type {model_type!r}: expected 'mistral', 'mixtral' or 'llama'")

    # ----------------------------------------------------------------------------------------------------------------
    # mistral reference params.json
    @classmethod
    def from_params(cls, params: dict[str, Any] | str | Path) -> ModelConfig:
        """From a mistral reference `params.json` (a path or the parsed dict); refuses what it cannot load exactly."""
        source = str(params) if isinstance(params, (str, Path)) else "params.json"
        return cls._checked(params_fields(params), source)

    def to_params(self) -> dict[str, Any]:
        """The mistral reference `params.json` dict for this config (which has no way to state a rope scaling)."""
        if self.rope_scaling is not None:
            raise ConfigError(f"a params.json cannot hold rope_scaling {self.rope_scaling}: use to_hf()")
        params: dict[str, Any] = dict(
            dim=self.dim, n_layers=self.n_layers, head_dim=self.head_dim, hidden_dim=self.hidden_dim,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, norm_eps=self.norm_eps, vocab_size=self.vocab_size,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
        )
        if self.sliding_window is not None:
            params["sliding_window"] = self.sliding_window
        if self.tie_embeddings:
            params["tied_embeddings"] = True
        if self.is_moe:
            params["moe"] = {"num_experts": self.n_experts, "num_experts_per_tok": self.experts_per_token}
        return params
