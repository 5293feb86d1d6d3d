"""Quantized weights kept in their own bits: llama.cpp's Q8_0, Q4_0, Q4_1, Q4_K and Q6_K blocks, as a GGUF file holds
them, multiplied into fp32 activations.

Decoding reads every weight once per token, so a 4-bit matrix is read about 7 times faster than an fp32 one, and a
7B model fits in 4 GB instead of 29. The blocks stay exactly as in the file (memory-mapped, not copied); the weights a
layer computes with are exactly the values `gguf.quants.dequantize` gives (kernels/quants.h says why). A short
product (a decoding step, a few rows) goes through the C row products, which unpack each block in registers; a long
one (prefill) unpacks a band of rows at a time into fp32 and multiplies it with torch. Without the C kernels, bands
are unpacked with gguf's numpy code instead (slowly, but the same values). The blocks have no gradients (gradients
flow through the activations only); training the weights needs them in a float dtype (dtype=torch.float32).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .errors import CheckpointError
from .packed import ReadOnlyWeight

# GGML type -> (weights per block, bytes per block, the kernels' enum mt_format)
FORMATS = {"Q8_0": (32, 34, 2), "Q4_0": (32, 18, 3), "Q4_1": (32, 20, 4), "Q4_K": (256, 144, 5), "Q6_K": (256, 210, 6)}
SHORT_ROWS = 16                  # up to this many rows, a product goes through the C row products directly
BAND_BYTES = 4 << 20             # a long product unpacks this much fp32 weight at a time
MAX_COLS = 65536                 # the longest row the kernels take (MT_MAX_BLOCKS in kernels/quants_avx512.h)


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` weights in `qtype`; a row must hold whole blocks."""
    size, nbytes, _ = FORMATS[qtype]
    if cols % size:
        raise CheckpointError(f"a {qtype} row holds whole blocks of {size} weights; {cols} is not a multiple of {size}")
    return cols // size * nbytes


def check_blocks(blocks: torch.Tensor, qtype: str, shape: tuple[int, ...], what: str) -> None:
    """A CheckpointError naming `what` unless `blocks` is a uint8 tensor of exactly `shape`'s rows of `qtype`."""
    if qtype not in FORMATS:
        raise CheckpointError(f"{what}: {qtype} has no kernel here (supported: {', '.join(FORMATS)})")
    if shape[-1] > MAX_COLS:
        raise CheckpointError(f"{what}: rows of {shape[-1]} weights; the kernels take at most {MAX_COLS}")
    want = (*shape[:-1], row_bytes(qtype, shape[-1]))
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
        raise CheckpointError(f"{what}: {qtype} blocks of shape {tuple(blocks.shape)} ({blocks.dtype}) do not hold a "
                              f"{tuple(shape)} matrix, which takes {want} bytes: the tensor is truncated or mis-typed")


def matrix(blocks: torch.Tensor, qtype: str, cols: int) -> native.Matrix:
    """The kernels' mt_matrix of a (rows, row_bytes) block tensor."""
    return native.Matrix(blocks.data_ptr(), blocks.shape[0], cols, blocks.shape[1], FORMATS[qtype][2], 0)


def unpack(blocks: torch.Tensor, qtype: str, cols: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weights (n, cols) of `blocks` (R, row_bytes): every row, or the rows `rows` (n,) int64."""
    blocks = blocks.contiguous()
    if native.library() is None:                                             # gguf's own numpy code
        import gguf

        chosen = blocks if rows is None else blocks[rows]
        values = gguf.quants.dequantize(chosen.numpy(), gguf.GGMLQuantizationType[qtype])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, cols)
    which = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
    n = blocks.shape[0] if which is None else which.numel()
    out = torch.empty(n, cols)
    native.unpack_rows(matrix(blocks, qtype, cols), which, out)
    return out


def product(x: torch.Tensor, blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """x (..., cols) -> x W^T (..., rows) in x's dtype, W the fp32 weights of `blocks` (rows, row_bytes)."""
    flat = x.reshape(-1, cols).float()
    needs_grad = torch.is_grad_enabled() and x.requires_grad        # through x only: the weights are constants
    if flat.shape[0] <= SHORT_ROWS and native.library() is not None and not needs_grad:
        out = native.matvec_of(matrix(blocks, qtype, cols), flat)
    else:                                                                   # a band of rows at a time, in fp32
        band = max(1, BAND_BYTES // (4 * cols))
        out = torch.cat([F.linear(flat, unpack(blocks[start:start + band], qtype, cols))
                         for start in range(0, blocks.shape[0], band)], dim=-1)
    return out.reshape(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


def quantized_weights(modules) -> int:
    """The weights the quantized layers among `modules` hold (blocks shared by a tied head counted once)."""
    return sum({id(m.blocks): m.blocks.shape[0] * m.cols for m in modules
                if isinstance(m, (QuantLinear, QuantEmbedding))}.values())


class QuantizedWeights(nn.Module):
    """What QuantLinear and QuantEmbedding share: `blocks` (rows, row_bytes) of `qtype` holding a (rows, cols) matrix,
    saved unpacked in a state dict, and never loaded from one (the blocks are the file's)."""

    blocks: torch.Tensor
    qtype: str
    cols: int

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = unpack(self.blocks, self.qtype, self.cols)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            error_msgs.append(f"{prefix}weight is {self.qtype}-quantized: load the state dict into a model loaded "
                              f"with dtype=torch.float32")


class QuantLinear(QuantizedWeights):
    """Stands where an nn.Linear (no bias) stood: x (..., in) -> x W^T (..., out), W held as `qtype` blocks.

    `weight` is the unpacked fp32 matrix, to read (a copy: writing to it raises); `state_dict()` holds it too.
    """

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int) -> None:
        super().__init__()
        check_blocks(blocks, qtype, (blocks.shape[0], in_features), "QuantLinear")
        self.blocks, self.qtype = blocks, qtype                  # not a buffer: model.to() must not touch it
        self.in_features, self.out_features, self.cols = in_features, blocks.shape[0], in_features

    @property
    def weight(self) -> torch.Tensor:
        return unpack(self.blocks, self.qtype, self.in_features).as_subclass(ReadOnlyWeight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return product(x, self.blocks, self.qtype, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


class QuantEmbedding(QuantizedWeights):
    """Stands where a TokenEmbedding stood: (B, T) ids -> (B, T, dim) fp32, each row unpacked from its blocks."""

    def __init__(self, blocks: torch.Tensor, qtype: str, embedding_dim: int) -> None:
        super().__init__()
        check_blocks(blocks, qtype, (blocks.shape[0], embedding_dim), "QuantEmbedding")
        self.blocks, self.qtype = blocks, qtype
        self.num_embeddings, self.embedding_dim, self.cols = blocks.shape[0], embedding_dim, embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return unpack(self.blocks, self.qtype, self.embedding_dim).as_subclass(ReadOnlyWeight)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        from .inputs import check_vocabulary

        check_vocabulary(token_ids, self.num_embeddings)
        rows = unpack(self.blocks, self.qtype, self.embedding_dim, token_ids)
        return rows.reshape(*token_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"
