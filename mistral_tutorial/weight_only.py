"""Weights stored narrower than the activations: a bf16 matrix multiplied into fp32 activations.

Decoding reads every weight once per token, so storing weights in bf16 halves what a step reads; the activations
(the residual stream, the norms, RoPE, the softmax, the cache) can stay fp32 at no cost in speed. That is closer to
the exact answer, the same bf16 weights computed in fp32, than computing everything in bf16 (as transformers does):
the only rounding left is in the weights themselves. `WeightOnlyLinear` stands where an nn.Linear stood, holding the
same Parameter: a short product (a decoding step, a few rows) goes through the C row products (native.py), which widen
each weight to fp32 in registers; a long one (prefill) rounds its input to the weight's dtype for torch's fast bf16
product and widens the result again. The fused decode layout (decode_layout.py) swaps it in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# Up to this many rows (tokens times batch) a product is exact in fp32 through the C kernels, at about the cost of
# reading the weights once (each row of W, once read, is reused from the L1 cache for every row of x); above it, its
# input is rounded to bf16 for torch's product (a long prefill, where the exact product would cost several times more).
SHORT_ROWS = 16


class WeightOnlyLinear(nn.Linear):
    """An nn.Linear (no bias) whose weight may be narrower (bf16) than its input (fp32): (..., in) -> (..., out).

    The output has the input's dtype. Gradients flow as through nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == weight.dtype:
            return F.linear(x, weight)
        rows = x.numel() // x.shape[-1]
        exact = (rows <= SHORT_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                 and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                 and native.library() is not None and weight.is_contiguous())
        if exact:
            return native.matvec(weight, x)
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)

    @classmethod
    def replacing(cls, linear: nn.Linear) -> WeightOnlyLinear:
        """A WeightOnlyLinear holding `linear`'s own weight Parameter (shared, not copied; ties stay tied)."""
        if linear.bias is not None:
            raise ValueError("WeightOnlyLinear has no bias")
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        return new

    def plain(self) -> nn.Linear:
        """The nn.Linear back, holding the same weight Parameter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear
