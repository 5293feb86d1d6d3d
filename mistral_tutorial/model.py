"""The decoder: embedding -> L x (RMSNorm -> attention -> residual -> RMSNorm -> FFN or MoE -> residual) -> RMSNorm -> head.

Parameter names follow the reference implementation (mistral-inference): `tok_embeddings`, `layers.N.attention.wq`,
`layers.N.feed_forward.w1`, `norm`, `output`. names.py maps transformers' names onto these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .block import TransformerBlock
from .cache import KVCache
from .config import ModelConfig
from .decode_layout import is_packed
from .embedding import RMSNorm, TokenEmbedding
from .inputs import check_tokens
from .kernel_choice import use_best_layout
from .masks import sequence_attention
from .packed import PackedLinear
from .quantized_moe import quantized_weights
from .registry import loader
from .rope import RotaryEmbedding
from .weight_only import SHORT_ROWS


class Transformer(nn.Module):
    """Mistral 7B (sliding window, dense), Mixtral 8x7B (full attention, MoE) or Llama (no window) from a ModelConfig.

    `model(tokens)`: (B, T) int64 -> logits (B, T, vocab), no cache, the sliding window applied.
    `model(tokens, cache=cache)`: the same for the next chunk of a sequence held in a `KVCache` (see generation.py).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Transformer takes a mt.ModelConfig, got {type(config).__name__}: build one with "
                            f"mt.ModelConfig(...), ModelConfig.from_hf(config.json or a transformers config) or "
                            f"ModelConfig.from_params(params.json)")
        config.validate()
        self.config = config
        self.tok_embeddings = TokenEmbedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.parallelism = None       # this rank's share when loaded with parallel=... (see sharding.py)
        self.fused_decoder = None     # the C decoding step, in the fused layout (decode_layout.py)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (fp32 for a quantized model: its norms, router and activations)."""
        return self.norm.weight.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The cache's and short steps' dtype: fp32 in the fused layout (bf16 weights, fp32 activations), else `dtype`.
        A chunk of over weight_only.SHORT_ROWS tokens computes in `dtype`, as the plain layout does."""
        return torch.float32 if self.fused_decoder is not None else self.dtype

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (tied weights once); active=True: only k of the E experts of each MoE layer. On one rank
        of a parallel model (sharding.py): that rank's share; active=True is refused there."""
        if active and self.parallelism is not None:
            raise ValueError("num_parameters(active=True) counts a whole model; one rank holds a share of it "
                             "(see parallel_costs.rank_parameter_bytes)")
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        total += sum(m.in_features * m.out_features for m in self.modules()             # the packed layout's
                     if isinstance(m, PackedLinear) and m.matrix.tied_to is None)      # matrices (packed.py)
        total += quantized_weights(list(self.modules()))                               # quantized layers
        if active and self.config.is_moe:
            c = self.config
            expert_params = 3 * c.dim * c.hidden_dim
            total -= c.n_layers * (c.n_experts - c.experts_per_token) * expert_params
        return total

    def optimize_for_decode(self) -> Transformer:
        """Swap in the fastest decode layout for this CPU, in place (kernel_choice.py measures it once); returns self.
        `mt.unpack(model)` undoes it. The default in `from_pretrained` and `generate`; nothing changes on a GPU."""
        return use_best_layout(self)

    def to(self, *args: Any, **kwargs: Any) -> Transformer:
        """nn.Module.to; on a packed model (packed.py) a move to where it already is, in its own dtype, is a no-op."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        here = (device is None or torch.device(device).type == self.device.type) and dtype in (None, self.dtype)
        if here and is_packed(self):
            return self
        return super().to(*args, **kwargs)

    def _apply(self, fn, recurse=True):   # .to(), .float(), .cuda(): refused up front for a packed model
        if recurse and is_packed(self):
            return next(m for m in self.modules() if isinstance(m, PackedLinear))._apply(fn)
        return super()._apply(fn, recurse)

    def router_logits(self) -> list[torch.Tensor]:
        """Per-layer router logits (N, E), N = B*T, of the last forward; MoE models only (see moe.py)."""
        return self._routing("last_router_logits", "router_logits()")

    def chosen_experts(self) -> list[torch.Tensor]:
        """Per-layer chosen experts (N, k) of the last forward, best first; MoE models only."""
        return self._routing("last_experts", "chosen_experts()")

    def _routing(self, record: str, what: str) -> list[torch.Tensor]:
        if not self.config.is_moe:
            raise ValueError(f"{what} needs an MoE model (n_experts > 0)")
        return [getattr(layer.feed_forward, record) for layer in self.layers]

    def new_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | list[int] | None = None) -> KVCache:
        """An empty KV cache for this model: W slots per layer with a window, else `max_len`.

        It holds the kv heads the attention layers hold: all of them, or this rank's under tensor parallelism.
        """
        c = self.config
        n_kv_heads = self.layers[0].attention.n_kv_heads if len(self.layers) else c.n_kv_heads
        return KVCache(c.n_layers, batch_size, n_kv_heads, c.head_dim, c.sliding_window, max_len,
                       dtype=self.activation_dtype, device=self.device, pad=pad)

    # -----------------------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                return_hidden_states: bool = False, check_ids: bool = True) -> Any:
        """Logits (B, T, vocab) for tokens (B, T); (B, 1, vocab) when `last_only`.

        check_ids=False skips the vocabulary range check (a host-device sync on a GPU), for tokens known to be valid.
        In the fused layout a step of one token with a cache is one C call (fused_decode.py), logits in fp32.

        With `return_hidden_states`, returns (logits, hidden) where hidden[0] is the embedding output and hidden[i] the
        residual stream after layer i (before the final norm).
        """
        check_tokens(tokens, cache.time if cache is not None else 0, self.config.max_position_embeddings,
                     self.config.sliding_window)
        batch, seq_len = tokens.shape
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, tokens have {batch} rows")
        fused = self.fused_decoder                                       # one C call a token (fused_decode.py)
        if fused is not None and cache is not None and seq_len == 1 and not return_hidden_states and fused.ready():
            return fused(tokens, cache, check_ids)                                         # (B, 1, vocab)
        if check_ids or not isinstance(self.tok_embeddings, nn.Embedding):                 # (quantized.py's too)
            x = self.tok_embeddings(tokens)                                                # (B, T, dim)
        else:
            x = F.embedding(tokens, self.tok_embeddings.weight)                            # (B, T, dim)
        x = x.to(self.activation_dtype if batch * seq_len <= SHORT_ROWS else self.dtype)

        if cache is None:
            positions = torch.arange(seq_len, device=tokens.device)[None]                  # (1, T)
            attend = sequence_attention(seq_len, self.config.sliding_window, tokens.device)
        else:
            positions = cache.positions(seq_len)                                           # (1 or B, T)
            attend = cache.begin(seq_len)                                                  # the cache's plan
        mask, is_causal = (None, True) if attend.is_causal else (attend.mask, False)       # (1|B, 1, T, Tk) or None
        cos, sin = self.rotary(positions, dtype=x.dtype)                                   # (1|B, T, D)

        hidden = [x] if return_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, is_causal)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.commit()
        if last_only:
            x = x[:, -1:]
        logits = self.output(self.norm(x))                                                  # (B, T, vocab)
        return (logits, hidden) if return_hidden_states else logits

    # -----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, fast: bool = False, parallel: str | None = None) -> Transformer:
        """Build from a transformers Mistral/Mixtral/Llama *ForCausalLM instance, copying its weights.

        fast=True puts the copy in the fastest decode layout at once; `generate` does so anyway by default.
        parallel: 'expert' or 'tensor' copies only this rank's share (see from_pretrained).
        """
        return loader("from_hf")(hf_model, fast=fast, parallel=parallel)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = "auto", device: str = "cpu",
                        fast: bool = True, parallel: str | None = None, quantize: str | None = None,
                        **overrides: Any) -> Transformer:
        """Stream a transformers checkpoint dir, a mistral reference folder or a .gguf file into a model.

        dtype: "auto" (default) for the checkpoint's own (bf16 stays bf16, a GGUF's quantized blocks stay quantized),
        or the model's (a GGUF then dequantized into it). quantize: "int8" or "int4" on load (quantized_load.py).
        fast (default): the decode layout measured fastest on this CPU (kernel_choice.py); fast=False: the plain
        PyTorch modules.
        `overrides` change config fields (e.g. sliding_window=32) before the weights are loaded.
        parallel: with torch.distributed initialised (e.g. under torchrun), 'expert' (E/N experts per rank, MoE
        models) or 'tensor' (heads, FFN width and vocabulary split over the ranks): each rank reads and holds only
        its share, and every rank computes the same logits as one process (see sharding.py).
        """
        return loader("from_pretrained")(path, dtype=dtype, device=device, fast=fast, parallel=parallel,
                                         quantize=quantize, **overrides)
