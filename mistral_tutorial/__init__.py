"""mistral_tutorial: Mistral 7B and Mixtral 8x7B from scratch, one module per idea, checked against transformers."""

from . import loading, presets
from .attention import Attention, attention_weights, repeat_kv
from .build import upcycle
from .cache import KVCache
from .config import ModelConfig
from .decode_layout import pack_for_decode, unpack
from .embedding import RMSNorm, TokenEmbedding, rms_norm
from .errors import AssumedDefaultWarning, CheckpointConfigError, CheckpointError, ConfigError
from .feedforward import FeedForward
from .gating import NoisyTopKGate, load_balancing_loss
from .generation import generate, sample_next
from .masks import sliding_window_mask, window_mask
from .model import Transformer, TransformerBlock
from .moe import MoeLayer, route, route_paper
from .rope import RotaryEmbedding, apply_rope, half_to_interleaved, interleaved_to_half, rotate_half
from .tokenizer import MistralTokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    """`mt.exercises` (the notebooks' exercises and their checker) is imported on first use, not with the library."""
    if name == "exercises":
        import importlib

        return importlib.import_module(f"{__name__}.exercises")       # binds mt.exercises for later lookups
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "exercises",
    "loading",
    "presets",
    "Attention",
    "attention_weights",
    "repeat_kv",
    "sliding_window_mask",
    "window_mask",
    "KVCache",
    "ConfigError",
    "ModelConfig",
    "RMSNorm",
    "TokenEmbedding",
    "rms_norm",
    "FeedForward",
    "NoisyTopKGate",
    "load_balancing_loss",
    "generate",
    "sample_next",
    "CheckpointError",
    "CheckpointConfigError",
    "AssumedDefaultWarning",
    "Transformer",
    "pack_for_decode",
    "unpack",
    "TransformerBlock",
    "MoeLayer",
    "route",
    "route_paper",
    "upcycle",
    "RotaryEmbedding",
    "apply_rope",
    "half_to_interleaved",
    "interleaved_to_half",
    "rotate_half",
    "MistralTokenizer",
]
