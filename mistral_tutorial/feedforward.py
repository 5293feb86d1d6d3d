"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import PackedWeight, linear


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), (..., dim) -> (..., dim).

    Reference names: w1 = gate (hidden_dim, dim), w3 = up (hidden_dim, dim), w2 = down (dim, hidden_dim).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # up
        self.fused_w13: torch.Tensor | None = None          # set by fuse_projections(): (dim, 2 * hidden_dim)
        self.packed_w13: PackedWeight | None = None         # set by pack(): oneDNN copies for fast CPU decoding
        self.packed_w2: PackedWeight | None = None

    def fuse_projections(self) -> None:
        """Lay w1 and w3 out as the two column halves of one contiguous (dim, 2 hidden_dim) matrix, in place.

        Same values, shapes and state-dict keys, no extra memory; gate and up then run as one matrix product.
        """
        fused = torch.cat([self.w1.weight.detach().t(), self.w3.weight.detach().t()], dim=1).contiguous()
        hidden = self.w1.weight.shape[0]
        self.w1.weight.data, self.w3.weight.data = fused[:, :hidden].t(), fused[:, hidden:].t()
        self.fused_w13 = fused

    def pack(self) -> None:
        """oneDNN-packed copies of the fused gate/up matrix and of w2 (see packed.py); call after fuse_projections."""
        if self.fused_w13 is None:
            raise RuntimeError("pack() needs fuse_projections() first")
        self.packed_w13 = PackedWeight(self.fused_w13.t(), guard=self.w1.weight)
        self.packed_w2 = PackedWeight(self.w2.weight, guard=self.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_w13
        if self.packed_w13 is not None and self.packed_w13.usable(x, self.w1.weight):
            gate, up = self.packed_w13(x).chunk(2, dim=-1)   # one product for both: (..., hidden_dim) each
        elif fused is not None and fused.data_ptr() == self.w1.weight.data_ptr() and not torch.is_grad_enabled():
            gate, up = (x @ fused).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        # Shazeer 2020, eq. (6): FFN_SwiGLU(x) = (Swish_1(x W) ⊗ x V) W_2, with Swish_1 = SiLU
        return linear(F.silu(gate) * up, self.w2.weight, self.packed_w2)
