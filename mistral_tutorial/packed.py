"""The fast decode layout: oneDNN-packed projection matrices that *replace* the plain weights on a CPU.

Decoding one token multiplies one vector by every weight matrix, so its speed is the speed at which the CPU reads the
weights. oneDNN reads a matrix it has re-laid out ("packed") for its own kernel at close to the memory bandwidth
(about 40 GB/s on this project's 2-core machines, against 20 GB/s for `F.linear` on a row-major matrix;
benchmarks/bench_matvec.py).

A `PackedLinear` holds the packed matrix instead of the plain one, so the weights cost no extra memory;
decode_layout.py's `pack_for_decode(model)` swaps it in for each `nn.Linear` of a Transformer. wq/wk/wv, and w1/w3, share one packed matrix each:
one product instead of three (or two). What stays as it was:
- the outputs, to fp32 round-off (oneDNN sums in another order);
- `state_dict()` keys and values (unpacked on save) and `load_state_dict` (repacked);
- `module.weight`, for reading: an unpacked copy, which refuses to be written to (the model would not see it).
What changes: the packed matrices are not Parameters and have no gradients. Training needs the plain layout back:
`unpack(model)`. `model.train()`, or a forward that needs gradients, says so. Other parameters (embedding, norms,
stacked experts) stay plain, and are frozen (requires_grad=False) while the model is packed.
"""

from __future__ import annotations

import torch
from torch import nn

UNPACK_HINT = ("the model is in the fast decode layout (oneDNN-packed weights, no gradients): call "
               "`mistral_tutorial.unpack(model)` first, or load with `fast=False`")


def can_pack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """oneDNN packing exists for fp32 and bf16 CPU tensors, in builds with mkldnn."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, in-place version) of a tensor: changes when it is replaced or written to. Inference tensors
    (made under torch.inference_mode) keep no version; they can only be written to inside inference mode."""
    return tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version


class PackedMatrix:
    """One oneDNN-packed (out, in) matrix stacking the rows of one or more weights (e.g. wq, wk, wv).

    `part(x, i)` returns x W_i^T. The parts of one input share one product: the first part asked for computes all of
    them, and the others are handed out from it until each has been taken once (same input tensor object).
    `tied_to`: a Parameter this matrix copies (the embedding, for a tied head); it is repacked whenever that
    Parameter changes (new storage or an in-place update), so the copy is never stale.
    """

    def __init__(self, dense: torch.Tensor, sizes: list[int], tied_to: nn.Parameter | None = None) -> None:
        self.sizes, self.tied_to = sizes, tied_to
        self.shape, self.dtype = tuple(dense.shape), dense.dtype
        self._pack(dense)
        self._pending: tuple[torch.Tensor, list[torch.Tensor], set[int]] | None = None

    def _pack(self, dense: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense.detach().contiguous(), 1)   # for batch-1 products
        if self.tied_to is not None:
            self.source_stamp = _stamp(self.tied_to)

    def dense(self) -> torch.Tensor:
        """The plain (out, in) matrix, unpacked (a new tensor)."""
        return self.packed.to_dense()

    def set_rows(self, index: int, weight: torch.Tensor) -> None:
        """Replace part `index` by `weight` (its rows) and pack again."""
        dense = self.dense()
        start = sum(self.sizes[:index])
        dense[start:start + self.sizes[index]] = weight.to(dense.dtype)
        self._pack(dense)
        self._pending = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x (..., in) -> x W_index^T (..., out_index)."""
        if self.tied_to is not None and self.source_stamp != _stamp(self.tied_to):
            self._pack(self.tied_to)
        if len(self.sizes) == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        pending = self._pending
        if pending is None or pending[0] is not x or index in pending[2]:
            product = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")   # (..., out)
            pending = (x, list(product.split(self.sizes, dim=-1)), set())
        pending[2].add(index)
        self._pending = None if len(pending[2]) == len(self.sizes) else pending
        return pending[1][index]


class ReadOnlyWeight(torch.Tensor):
    """An unpacked copy of a packed weight, to read. Writing to it raises: the packed model would not see the change."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__set__") or (
            name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__"))
        if in_place and args and isinstance(args[0], ReadOnlyWeight):
            raise RuntimeError(f"this weight is an unpacked copy: writing to it ({name}) would not change the model. "
                               f"Use model.load_state_dict(...) (it repacks), or {UNPACK_HINT}")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
            storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, ReadOnlyWeight)}
            is_view = (isinstance(result, torch.Tensor) and not isinstance(result, nn.Parameter)
                       and result.untyped_storage().data_ptr() in storages)
        return result.as_subclass(ReadOnlyWeight) if is_view else result   # views (.data, .detach()) stay read-only

    def __repr__(self) -> str:
        return "ReadOnlyWeight(" + torch.Tensor.__repr__(self.as_subclass(torch.Tensor))[len("tensor("):]


class PackedLinear(nn.Module):
    """Stands where an nn.Linear (no bias) stood: x (..., in) -> x W^T (..., out), W part `index` of a PackedMatrix."""

    def __init__(self, matrix: PackedMatrix, index: int = 0) -> None:
        super().__init__()
        self.matrix, self.index = matrix, index
        self.out_features, self.in_features = matrix.sizes[index], matrix.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """(out, in), unpacked: read-only (see ReadOnlyWeight)."""
        start = sum(self.matrix.sizes[:self.index])
        return self.matrix.dense()[start:start + self.out_features].as_subclass(ReadOnlyWeight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"gradients were asked for, but {UNPACK_HINT}")
        return self.matrix.part(x, self.index)

    def train(self, mode: bool = True) -> PackedLinear:
        if mode:
            raise RuntimeError(f"model.train(): {UNPACK_HINT}")
        return super().train(False)

    def _apply(self, fn, recurse=True):   # model.to(...), .cuda(), .half(): the packed layout is CPU-only
        raise RuntimeError(f"cannot move or cast a packed model: {UNPACK_HINT}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.matrix.tied_to is not None:
            destination[prefix + "weight"] = self.matrix.tied_to if keep_vars else self.matrix.tied_to.detach()
        else:
            destination[prefix + "weight"] = self.weight.as_subclass(torch.Tensor)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        for other in state_dict:
            if other.startswith(prefix) and other != key and strict:
                unexpected_keys.append(other)
        if key not in state_dict:
            if strict and self.matrix.tied_to is None:
                missing_keys.append(key)
            return
        weight = state_dict[key]
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                              f"the current model expects {expected}")
        elif self.matrix.tied_to is not None:     # as for a plain tied model: the value goes into the shared embedding
            with torch.no_grad():
                self.matrix.tied_to.copy_(weight)                    # (repacked on next use: see PackedMatrix)
        else:
            self.matrix.set_rows(self.index, weight)

    def extra_repr(self) -> str:
        parts = "" if len(self.matrix.sizes) == 1 else f", part {self.index} of {len(self.matrix.sizes)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed{parts}"
