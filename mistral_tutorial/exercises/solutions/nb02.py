"""Solutions to notebook 02's exercises: RoPE's frequencies, rotate-half, RoPE at given positions, the q/k permutation."""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    # RoFormer eq. (15): theta_d = base^(-2d / D) for d = 0 .. D/2 - 1, (D/2,) fp32
    two_d = torch.arange(0, head_dim, 2).float()                      # 0, 2, 4, ..., D - 2
    return 1.0 / base ** (two_d / head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # pairs (d, d + D/2) turned by 90°: (x1, x2) -> (-x2, x1)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    head_dim = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)   # (D/2,) theta_d
    angles = positions[:, None].float() * inv_freq                    # (T, D/2): m * theta_d
    angles = torch.cat((angles, angles), dim=-1)                      # (T, D): pair d with d + D/2
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)     # broadcast over (B, H, T, D)
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)      # rotate_half(x)
    # RoFormer eq. (34), rotate-half form: x' = x * cos(m theta) + rotate_half(x) * sin(m theta)
    return x * cos + rotated * sin


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, dim = weight.shape
    head_dim = out_features // n_heads
    # within each head, row 2j (real part of pair j) -> row j, row 2j + 1 (imaginary part) -> row j + D/2
    per_pair = weight.view(n_heads, head_dim // 2, 2, dim)            # (H, D/2, 2, dim)
    return per_pair.transpose(1, 2).reshape(out_features, dim)        # (H, 2, D/2, dim) -> (H*D, dim)
