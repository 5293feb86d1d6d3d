"""The model's hyper-parameters, and converters to and from transformers configs and the reference `params.json`.

Mistral 7B paper, Table 1 (and Mixtral paper, Table 1) list the numbers the presets in `presets.py` carry.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A ModelConfig field holds a value the model cannot be built with."""


@dataclass
class ModelConfig:
    """Everything needed to build a Mistral / Mixtral / Llama-style decoder.

    Symbols of the papers in brackets: dim [d], n_layers [L], n_heads [H], n_kv_heads [Hkv], head_dim [D],
    hidden_dim [the FFN width], sliding_window [W], n_experts [E], experts_per_token [k].
    `sliding_window=None` is full causal attention (Llama, Mixtral); `n_experts=0` is a dense FFN (Mistral, Llama).
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
        if not (self.norm_eps > 0):
            raise ConfigError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ConfigError(f"ModelConfig.n_experts must be 0 (dense FFN) or a positive int, got {self.n_experts!r}")
        if self.n_experts > 0 and not (1 <= self.experts_per_token <= self.n_experts):
            raise ConfigError(f"ModelConfig.experts_per_token must lie in 1..n_experts ({self.n_experts}), "
                              f"got {self.experts_per_token!r}")

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (H / Hkv)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------------------------------------------
    # Presets (also in `presets.py`)
    @classmethod
    def mistral_7b_v0_1(cls) -> ModelConfig:
        from .presets import mistral_7b_v0_1

        return mistral_7b_v0_1()

    @classmethod
    def mixtral_8x7b_v0_1(cls) -> ModelConfig:
        from .presets import mixtral_8x7b_v0_1

        return mixtral_8x7b_v0_1()

    # ----------------------------------------------------------------------------------------------------------------
    # transformers configs
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """From a transformers MistralConfig, MixtralConfig or LlamaConfig (or its `to_dict()`)."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = c.get("model_type", "")
        if model_type not in ("mistral", "mixtral", "llama"):
            raise ConfigError(f"unsupported transformers model_type {model_type!r}: expected mistral, mixtral or llama")
        rope = c.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ConfigError(f"rope_type {rope_type!r} is not supported: this library implements plain RoPE only")
        rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ConfigError(f"transformers config has {flag}=True; Mistral-family models have no biases")
        window = c.get("sliding_window") if model_type != "llama" else None
        return cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            norm_eps=float(c["rms_norm_eps"]),
            rope_theta=float(rope_theta),
            sliding_window=window,
            max_position_embeddings=c["max_position_embeddings"],
            n_experts=c.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            experts_per_token=c.get("num_experts_per_tok", 2) if model_type == "mixtral" else 2,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

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
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
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
        """From a mistral reference `params.json` (a path or the parsed dict)."""
        if not isinstance(params, dict):
            params = json.loads(Path(params).read_text())
        moe = params.get("moe") or {}
        missing = [k for k in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size") if k not in params]
        if missing:
            raise ConfigError(f"params.json lacks {missing}: not a mistral reference params.json")
        return cls(
            vocab_size=params["vocab_size"],
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads", params["n_heads"]),
            head_dim=params.get("head_dim"),
            hidden_dim=params["hidden_dim"],
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            sliding_window=params.get("sliding_window"),
            max_position_embeddings=params.get("max_position_embeddings", params.get("max_seq_len", 32768)),
            n_experts=moe.get("num_experts", 0),
            experts_per_token=moe.get("num_experts_per_tok", 2),
            tie_embeddings=bool(params.get("tied_embeddings", False)),
        )

    def to_params(self) -> dict[str, Any]:
        """The mistral reference `params.json` dict for this config."""
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
