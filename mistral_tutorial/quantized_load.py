"""Loading into quantized layers (quantized.py): GGUF blocks kept as the file holds them, or float weights quantized
on load (`quantize="int8"` or `"int4"`).

Which tensors: the projections (wq, wk, wv, wo, w1, w2, w3), the embedding, the head, and a MoE layer's stacked
experts (quantized_moe.py). The norms and the MoE router stay floats. The schemes, llama.cpp's formats so that the
same kernels run them:
- "int8": Q8_0, absmax int8 in groups of 32 with an fp16 scale (8.5 bits a weight);
- "int4": Q4_1, 4 bits in groups of 32 with an fp16 scale and minimum (5 bits a weight); the embedding and the head
  (which the embedding is, when tied) in Q8_0, where 4 bits cost the most;
- or a type by name: "Q8_0", "Q4_0" or "Q4_1" (the embedding and head in Q8_0).
Quantizing uses gguf's own code (`gguf.quants.quantize`), bit for bit llama.cpp's reference quantizer.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from .quantized import FORMATS, QuantEmbedding, QuantLinear, check_blocks, row_bytes
from .quantized_moe import QuantMoeLayer

# scheme -> (the projections' type, the embedding's and head's); a GGML type name asks for that type by name
SCHEMES = {"int8": ("Q8_0", "Q8_0"), "int4": ("Q4_1", "Q8_0"), "Q8_0": ("Q8_0", "Q8_0"), "Q4_0": ("Q4_0", "Q8_0"),
           "Q4_1": ("Q4_1", "Q8_0")}
MATRIX_KEY = re.compile(r"^(tok_embeddings|output|layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]))\.weight$")
EXPERTS_KEY = re.compile(r"^layers\.\d+\.feed_forward\.w[123]$")     # a MoE layer's stacked (E, rows, cols) experts


def takes_blocks(key: str, expert: int | None) -> bool:
    """Can tensor `key` be held quantized? The 2-D projections, the embedding, the head, and stacked experts (all
    of them at once, from a GGUF, or one expert at a time, when quantizing on load)."""
    return (expert is None and MATRIX_KEY.match(key) is not None) or EXPERTS_KEY.match(key) is not None


def experts_layer(model: nn.Module, key: str) -> QuantMoeLayer:
    """The QuantMoeLayer that holds expert matrix `key`, swapped in for the MoeLayer there at its first matrix."""
    layer = model.get_submodule(key.rpartition(".")[0].rpartition(".")[0])             # layers.N
    if not isinstance(layer.feed_forward, QuantMoeLayer):
        layer.feed_forward = QuantMoeLayer.replacing(layer.feed_forward)
    return layer.feed_forward


def place_experts(model: nn.Module, key: str, expert: int | None, blocks: torch.Tensor, qtype: str,
                  shape: tuple[int, ...], what: str) -> None:
    """Expert matrices `key` (all E of them, or expert `expert`) as `qtype` blocks; shape is (E, rows, cols)."""
    moe, name = experts_layer(model, key), key.rpartition(".")[2]
    if expert is None:
        moe.hold(name, blocks, qtype, shape, what)
        return
    if name not in moe.quantized:                       # the first expert of this matrix: room for all E
        moe.hold(name, torch.zeros(shape[0], shape[1], row_bytes(qtype, shape[2]), dtype=torch.uint8), qtype, shape,
                 what)
    moe.quantized[name][0][expert].copy_(blocks.reshape(shape[1], -1))


def quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """(rows, cols) float -> (rows, row bytes) uint8 blocks of `qtype` (Q8_0, Q4_0 or Q4_1), as llama.cpp makes them."""
    import gguf

    values = weight.detach().float().contiguous().numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])))


def scheme_type(scheme: str, key: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {sorted(SCHEMES)} (or None), got {scheme!r}")
    projections, ends = SCHEMES[scheme]
    return ends if key in ("tok_embeddings.weight", "output.weight") else projections


def place(model: nn.Module, key: str, blocks: torch.Tensor, qtype: str, shape: tuple[int, int], what: str) -> None:
    """Put `blocks` (a `shape` matrix in `qtype`) where our tensor `key` goes, as a QuantLinear or QuantEmbedding."""
    check_blocks(blocks, qtype, shape, what)
    owner_name, _, _ = key.rpartition(".")                     # "layers.0.attention.wq"
    parent_name, _, attribute = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = QuantEmbedding(blocks, qtype, shape[1]) if key == "tok_embeddings.weight" else QuantLinear(blocks, qtype,
                                                                                                     shape[1])
    setattr(parent, attribute, layer)


def tie_quantized_head(model: nn.Module) -> bool:
    """A tied head on a quantized embedding: the same blocks, as a QuantLinear. False if the embedding is not one."""
    embedding = model.tok_embeddings
    if not isinstance(embedding, QuantEmbedding):
        return False
    model.output = QuantLinear(embedding.blocks, embedding.qtype, embedding.embedding_dim)
    return True


def take_quantized(model: nn.Module, source, name: str, places: list, expected: dict, quantization: str | None,
                   kept: dict[str, int]) -> bool:
    """Put checkpoint tensor `name` in quantized layers if it goes there (see the module docstring); True if it did.

    quantization: "keep" (a GGUF's blocks, zero-copy from the mapped file: transforms such as the q/k row order
    move whole rows, which blocks allow), "int8" or "int4" (quantized here), or None (nothing is).
    """
    info = source.infos[name]
    if quantization is None or not places or not all(takes_blocks(t.key, t.expert) for t in places):
        return False
    what = f"{source.description}: {name}"
    if quantization == "keep":
        if info.dtype not in FORMATS or source.read_blocks is None:
            return False
        blocks = source.read_blocks(name)
        for t in places:
            value = t.transform(blocks) if t.transform else blocks
            if EXPERTS_KEY.match(t.key):
                place_experts(model, t.key, t.expert, value, info.dtype, expected[t.key], what)
            else:
                place(model, t.key, value, info.dtype, expected[t.key], what)
            kept[info.dtype] = kept.get(info.dtype, 0) + 1
        if any(t.transform for t in places):             # rows reordered into a copy: the file's pages go back
            source.release(name, blocks)
        return True
    tensor = source.read(name)
    for t in places:
        qtype = scheme_type(quantization, t.key)
        value = t.transform(tensor) if t.transform else tensor
        if EXPERTS_KEY.match(t.key):
            value = value.reshape(-1, value.shape[-1])                  # one expert's (rows, cols), or all stacked
            place_experts(model, t.key, t.expert, quantize(value, qtype), qtype, expected[t.key], what)
        else:
            place(model, t.key, quantize(value, qtype), qtype, expected[t.key], what)
        kept[qtype] = kept.get(qtype, 0) + 1
    source.release(name, tensor)
    return True


def load_note(kept: dict[str, int], dequantized: dict[str, int], scheme: str | None) -> str:
    """The one line that says what stayed quantized and what was widened (and why)."""
    made = "quantized on load" if scheme else "kept as the file holds them"
    parts = [f"{made}: " + ", ".join(f"{n} {q}" for q, n in sorted(kept.items()))] if kept else []
    if dequantized:
        parts.append("dequantized to fp32 (no kernel for them here): " +
                     ", ".join(f"{n} {q}" for q, n in sorted(dequantized.items())))
    return "; ".join(parts) + f" (the kernels run {', '.join(FORMATS)})"
