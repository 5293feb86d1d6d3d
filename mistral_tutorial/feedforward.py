"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), (..., dim) -> (..., dim).

    Reference names: w1 = gate (hidden_dim, dim), w3 = up (hidden_dim, dim), w2 = down (dim, hidden_dim).
    On a CPU, packed.py swaps w1 and w3 for two halves of one packed matrix (one product for both), w2 for another.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shazeer 2020, eq. (6): FFN_SwiGLU(x) = (Swish_1(x W) ⊗ x V) W_2, with Swish_1 = SiLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
