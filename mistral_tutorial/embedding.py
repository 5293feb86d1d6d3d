"""Token embedding and RMSNorm (Zhang & Sennrich 2019), with transformers' numerics."""

from __future__ import annotations

import torch
from torch import nn

from .inputs import check_vocabulary


class TokenEmbedding(nn.Embedding):
    """Row `i` of a (vocab_size, dim) table is the vector of token `i`: (B, T) int64 -> (B, T, dim).

    Unlike a bare nn.Embedding it says which ids are out of range instead of failing deep inside torch.
    """

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {token_ids.dtype}")
        check_vocabulary(token_ids, self.num_embeddings)          # ids in [0, vocab_size), else which are not
        return super().forward(token_ids)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * g.

    As transformers does it: the mean of squares in fp32, the normalised x cast back to the input dtype, and only then
    multiplied by the weight g (so bf16 models round where transformers rounds).
    """
    input_dtype = x.dtype
    x32 = x.float()
    # Zhang & Sennrich 2019, eq. (4): RMS(x) = sqrt(1/n sum_i x_i^2)
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)          # (..., 1)
    normed = x32 * torch.rsqrt(mean_square + eps)                # (..., dim)
    return weight * normed.to(input_dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain g of shape (dim,); no mean subtraction and no bias (unlike LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expects a last dimension of {self.weight.shape[0]}, got shape {tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
