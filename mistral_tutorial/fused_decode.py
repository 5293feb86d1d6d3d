"""The fused decode layout: one decoding step of the whole model in one C call (kernels/decode.c), on a CPU.

Batch-1 decoding reads every weight once per token; what it costs beyond that is Python and the start of each small
operation (two RMSNorms, RoPE, the cache write, SiLU, the residual adds: about 15 of them per layer). `FusedDecoder`
runs all of a token's layers in C on the model's own tensors: nothing is copied, the weights stay where the model holds
them (memory-mapped, for a checkpoint loaded zero-copy), and the model stays a plain, trainable PyTorch model. Only
steps of one token with a cache go through it (`Transformer.forward`); prefill, training and everything else keep the
PyTorch path. The same maths as block.py; the outputs agree to fp32 round-off (the sums run in another order).

What it takes: a dense model (no MoE) on the CPU, weights in fp32 or bf16, the cache in fp32. The activations are
fp32 whatever the weights are stored in.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .inputs import check_vocabulary
from .native import FORMATS, Matrix
from .quantized import QuantEmbedding, QuantLinear, matrix

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Layer(ctypes.Structure):
    _fields_ = [("attention_norm", _PTR), ("ffn_norm", _PTR)] + [(n, Matrix) for n in
                                                                  ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]


class Model(ctypes.Structure):
    _fields_ = [(n, _I64) for n in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                                    "vocab_size")] + [("norm_eps", ctypes.c_float), ("unused", ctypes.c_int32),
                                                      ("norm", _PTR), ("output", Matrix), ("layers", _PTR)]


class Step(ctypes.Structure):
    _fields_ = [("keys", _PTR), ("values", _PTR), ("batch", _I64), ("size", _I64), ("slot", _I64), ("n_keys", _I64),
                ("slot_time", _PTR), ("pad", _PTR), ("time", _I64), ("cos", _PTR), ("sin", _PTR),
                ("rope_rows", _I64)]


class Scratch(ctypes.Structure):
    _fields_ = [(n, _PTR) for n in ("normed", "q", "k", "v", "attended", "hidden", "scores")]


def fused_unavailable(config, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """None if a model of `config` in `dtype` on `device` can decode through the C step, else why not (one line)."""
    if native.library() is None:
        return native.why_unavailable()
    if config.is_moe:
        return "MoE layers are left to the PyTorch path"
    if torch.device(device).type != "cpu":
        return "the C step runs on the CPU"
    if dtype not in FORMATS:
        return f"the C step reads fp32 or bf16 weights, not {dtype}"
    return None


def _projections(model: nn.Module) -> list[nn.Module]:
    return [model.output] + [lin for layer in model.layers for lin in (
        layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
        layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3)]


def why_not_fused(model: nn.Module) -> str | None:
    """None if `model` itself can decode through the C step, else the reason (one line)."""
    why = fused_unavailable(model.config, model.dtype, model.device)
    if why is not None:
        return why
    if getattr(model, "parallelism", None) is not None:
        return "the C step runs in one process (not under parallel=...)"
    if any(not isinstance(m, (nn.Linear, QuantLinear)) for m in _projections(model)):
        return "the projections are not nn.Linear modules (the packed layout? mt.unpack(model) first)"
    if any(isinstance(m, nn.Linear) and (m.weight.dtype not in FORMATS or not m.weight.is_contiguous())
           for m in _projections(model)):
        return "weights must be contiguous fp32 or bf16, or quantized (quantized.py)"
    return None


def _matrix(linear: nn.Module) -> Matrix:
    """The kernels' mt_matrix of a projection: its weight, or its quantized blocks."""
    if isinstance(linear, QuantLinear):
        return matrix(linear.blocks, linear.qtype, linear.in_features)
    return Matrix.of(linear.weight)


class FusedDecoder:
    """Decodes one token per row through all layers in one C call, on the tensors of `model` (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        why = why_not_fused(model)
        if why is not None:
            raise RuntimeError(f"the fused decode step is not available: {why}")
        self.model = model
        self.lib = native.library()
        self._build()

    def _watch(self) -> list[tuple[dict, str, object]]:
        """(dict, key, object) for every module and tensor the C structs were built from: the structs are stale as soon
        as one of them is replaced (a dict lookup each, cheap enough to check at every step)."""
        m, watch = self.model, [(self.model._modules, "output", self.model.output)]
        for layer in m.layers:
            watch += [(layer._modules, name, layer._modules[name]) for name in ("attention", "feed_forward")]
            for parent, names in ((layer.attention, ("wq", "wk", "wv", "wo")), (layer.feed_forward, ("w1", "w2", "w3"))):
                watch += [(parent._modules, name, parent._modules[name]) for name in names]
        for linear in _projections(m):
            watch += [(linear.__dict__, "blocks", linear.blocks)] if isinstance(linear, QuantLinear) else [
                (linear._parameters, "weight", linear._parameters["weight"])]
        for norm in [m.norm] + [n for layer in m.layers for n in (layer.attention_norm, layer.ffn_norm)]:
            watch += [(norm._parameters, "weight", norm._parameters["weight"])]
        return watch

    def _build(self) -> None:
        """The C structs, pointing at the model's tensors (norm gains as fp32 copies: (dim,) each)."""
        m, c = self.model, self.model.config
        self.watch = self._watch()
        self.norm_weights = [m.norm.weight] + [n.weight for layer in m.layers for n in (layer.attention_norm,
                                                                                           layer.ffn_norm)]
        self.versions = self._versions()
        self.norms = [layer.attention_norm.weight.detach().float().contiguous() for layer in m.layers]
        self.norms += [layer.ffn_norm.weight.detach().float().contiguous() for layer in m.layers]
        self.norms.append(m.norm.weight.detach().float().contiguous())
        n = c.n_layers
        layers = (Layer * n)()
        for i, layer in enumerate(m.layers):
            a, f = layer.attention, layer.feed_forward
            layers[i] = Layer(self.norms[i].data_ptr(), self.norms[n + i].data_ptr(),
                              *(_matrix(lin) for lin in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3)))
        self.layers = layers
        self.struct = Model(n, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size,
                            c.norm_eps, 0, self.norms[-1].data_ptr(), _matrix(m.output),
                            ctypes.addressof(layers))
        self.scratch: dict[tuple[int, int], tuple[Scratch, list[torch.Tensor]]] = {}

    def _versions(self) -> list[int]:
        """The in-place versions of the norm gains, the only tensors the structs hold copies of (the weights are read
        where they lie, so writing to one in place needs nothing)."""
        return [0 if w.is_inference() else w._version for w in self.norm_weights]

    def _check_fresh(self) -> None:
        """Rebuild if a module or tensor was replaced, or a norm gain written to, since the structs were made."""
        if any(d.get(key) is not held for d, key, held in self.watch) or self._versions() != self.versions:
            self._build()

    def _buffers(self, batch: int, size: int) -> Scratch:
        key = (batch, size)
        if key not in self.scratch:
            c = self.model.config
            shapes = [c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                      c.n_heads * c.head_dim, c.hidden_dim, c.n_heads * size]
            tensors = [torch.empty(batch, s) for s in shapes]
            self.scratch[key] = (Scratch(*(t.data_ptr() for t in tensors)), tensors)
        return self.scratch[key][0]

    def ready(self) -> bool:
        """Can the C step stand in for the PyTorch modules now? Not in training, nor while attention weights are
        recorded for a plot (attention.py's record_weights), nor once the weights left fp32/bf16 on the CPU."""
        m = self.model
        return (not m.training and m.device.type == "cpu" and m.dtype in FORMATS
                and not any(layer.attention.record_weights for layer in m.layers))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache, check_ids: bool = True) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, 1, vocab) fp32, the cache advanced by one token (as Transformer.forward)."""
        self._check_fresh()
        m, c = self.model, self.model.config
        if cache.keys.dtype != torch.float32:
            raise ValueError(f"this model computes in fp32 (the fused decode layout), its cache holds "
                             f"{cache.keys.dtype}: make the cache with model.new_cache(...)")
        if check_ids:
            check_vocabulary(tokens, c.vocab_size)
        batch = tokens.shape[0]
        positions = cache.positions(1)                                                    # (1 or B, 1)
        cos, sin = m.rotary(positions, dtype=torch.float32)                               # (1|B, 1, D)
        cos, sin = cos.contiguous(), sin.contiguous()
        cache.begin(1)
        plan = cache._plan
        if isinstance(m.tok_embeddings, QuantEmbedding):
            x = m.tok_embeddings(tokens[:, 0]).contiguous()                               # (B, dim), unpacked
        else:
            x = F.embedding(tokens[:, 0], m.tok_embeddings.weight).float().contiguous()   # (B, dim)
        logits = torch.empty(batch, c.vocab_size)                                         # (B, vocab)
        pad = cache.pad
        step = Step(cache.keys.data_ptr(), cache.values.data_ptr(), batch, cache.size, plan.first_slot,
                    plan.n_keys, plan.slot_time_after.data_ptr(), pad.data_ptr() if pad is not None else None,
                    cache.time, cos.data_ptr(), sin.data_ptr(), cos.shape[0])
        self.lib.mt_decode_step(ctypes.byref(self.struct), ctypes.byref(step),
                                ctypes.byref(self._buffers(batch, cache.size)), _PTR(x.data_ptr()),
                                _PTR(logits.data_ptr()), ctypes.c_int(torch.get_num_threads()))
        cache.commit()
        return logits[:, None]
