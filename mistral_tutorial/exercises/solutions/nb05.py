"""Solutions to notebook 05's exercises: SiLU, SwiGLU, its parameter count, the equal-parameter width."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu(x: torch.Tensor) -> torch.Tensor:
    # Shazeer 2020, eq. (3): Swish_beta(x) = x sigma(beta x); SiLU is Swish_1
    return x * torch.sigmoid(x)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    gate = F.silu(x @ w1.T)                                           # (..., hidden): Swish_1(x W)
    up = x @ w3.T                                                     # (..., hidden): x V
    # Shazeer 2020, eq. (6): FFN_SwiGLU(x) = (Swish_1(x W) * x V) W_2
    return (gate * up) @ w2.T                                         # (..., d)


def ffn_parameters(dim: int, hidden_dim: int) -> int:
    return 3 * dim * hidden_dim                                       # w1 and w3 (hidden, d), w2 (d, hidden)


def llama_hidden_dim(dim: int, multiple_of: int) -> int:
    # equal parameters: 3 d h = 2 d (4d)  =>  h = 2/3 * 4d (Shazeer 2020, §2)
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)  # rounded up to a multiple
