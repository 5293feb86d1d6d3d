"""Rotary position embedding (Su et al. 2021), in transformers' rotate-half layout, and the q/k weight permutation
between the reference implementation's interleaved layout and transformers'.

Each pair of dimensions (d, d + D/2) of a query or key at position m is rotated by the angle m * theta_d, with
theta_d = base^(-2d/D). A rotation by m then by -n leaves q_m . k_n depending on m - n only.

Two ways of stretching RoPE to longer contexts, as transformers implements them, change the theta_d and nothing else:
"linear" (position interpolation, Chen et al. 2023) and "llama3" (Llama 3.1). Dynamic NTK, YaRN and LongRoPE are left
out: a config asking for them is refused (config.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import ConfigError

# rope_type -> the fields its `rope_scaling` dict must hold (besides "rope_type")
ROPE_SCALING_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_frequencies(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """theta_d = base^(-2d / D) for d = 0 .. D/2 - 1: (D/2,) fp32, computed exactly as transformers does."""
    # RoFormer eq. (15): Theta = {theta_i = 10000^(-2(i-1)/d), i in [1, 2, ..., d/2]}
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def check_rope_scaling(scaling: Any) -> dict[str, Any] | None:
    """None, or a validated copy of a `rope_scaling` dict: {"rope_type": "linear" | "llama3", <its fields>}.

    Raises ConfigError naming the field and its value. Numbers come back as float, original_max_position_embeddings
    as int, so that equal settings compare equal.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be None or a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                          f"got {type(scaling).__name__} {scaling!r}")
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_FIELDS:
        raise ConfigError(f"rope_scaling rope_type={rope_type!r} is not implemented: this library implements "
                          f"{sorted(ROPE_SCALING_FIELDS)} (or None for plain RoPE)")
    fields = ROPE_SCALING_FIELDS[rope_type]
    missing = [f for f in fields if f not in scaling]
    extra = sorted(set(scaling) - set(fields) - {"rope_type"})
    if missing or extra:
        raise ConfigError(f"rope_scaling of rope_type {rope_type!r} needs exactly the fields {list(fields)}; "
                          f"missing {missing}, unknown {extra}: {scaling!r}")
    checked: dict[str, Any] = {"rope_type": rope_type}
    for name in fields:
        value = scaling[name]
        if name == "original_max_position_embeddings":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"rope_scaling {name} must be a positive int, got {value!r}")
            checked[name] = value
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"rope_scaling {name} must be a finite number > 0, got {value!r}")
        checked[name] = float(value)
    if rope_type == "llama3" and not checked["high_freq_factor"] > checked["low_freq_factor"]:
        raise ConfigError(f"rope_scaling high_freq_factor ({checked['high_freq_factor']}) must exceed "
                          f"low_freq_factor ({checked['low_freq_factor']}): they bound the band that is blended")
    return checked


def scale_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    """theta_d (D/2,) -> the theta_d a `rope_scaling` (see `check_rope_scaling`) asks for; unchanged when None."""
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        # Position interpolation (Chen et al. 2023): position m -> m / s, i.e. m (theta_d / s)
        return inv_freq / factor
    # Llama 3.1: with the pre-training context L and wavelengths lambda_d = 2 pi / theta_d,
    #   lambda_d < L / high_freq_factor:  theta_d            (high frequencies: unchanged)
    #   lambda_d > L / low_freq_factor:   theta_d / s        (low frequencies: interpolated, as "linear")
    #   otherwise: (1 - g) theta_d / s + g theta_d, with g = (L / lambda_d - low) / (high - low)   (a smooth blend)
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq                                         # (D/2,)
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)                         # (D/2,) g
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_between, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_d for positions (..., T) -> two (..., T, D) tensors (each half repeated twice)."""
    angles = positions[..., None].float() * inv_freq.float()       # (..., T, D/2)
    angles = torch.cat((angles, angles), dim=-1)                  # (..., T, D): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90° turn of every pair (d, d + D/2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, D) by the angles whose cos and sin are (B or 1, T, D).

    RoFormer eq. (34) in rotate-half form: x' = x * cos(m theta) + rotate_half(x) * sin(m theta).
    """
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)              # (B, 1, T, D): broadcast over heads
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(torch.nn.Module):
    """Returns (cos, sin) for given positions; nothing learned.

    theta_d is computed once on the CPU in fp32 (as transformers does) and kept in fp32 whatever the model's dtype:
    it is a plain attribute, not a buffer, so `model.to(torch.bfloat16)` cannot round it. `scaling`: None for plain
    RoPE, or a `rope_scaling` dict ("linear" or "llama3", see `check_rope_scaling`).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = check_rope_scaling(scaling)
        with torch.device("cpu"):
            inv_freq = rope_frequencies(head_dim, theta, device="cpu")                      # (D/2,) fp32
            self.inv_freq = scale_frequencies(inv_freq, self.scaling)                      # (D/2,) fp32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_cos_sin(positions, self.inv_freq, dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"


# -------------------------------------------------------------------------------------------------------------------
# The two layouts of the q/k projection weights.
#
# The reference implementation (mistral-inference, Meta's llama) views each head's D outputs as D/2 complex numbers
# (x0 + i x1, x2 + i x3, ...): pairs are *interleaved*. transformers pairs dimension d with d + D/2 (rotate-half).
# The same model therefore stores wq/wk with their output rows in a different order. transformers' conversion script
# permutes the rows: within each head, row 2j (real part of pair j) goes to j, row 2j+1 (imaginary part) to j + D/2.

def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reference (interleaved) wq/wk -> transformers (rotate-half) layout. weight: (n_heads * D, dim)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    if head_dim * n_heads != out_features or head_dim % 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not split into {n_heads} heads of even size")
    # (heads, D/2, 2, dim) -> (heads, 2, D/2, dim): real parts first, then imaginary parts
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers (rotate-half) wq/wk -> reference (interleaved) layout; the inverse of `interleaved_to_half`."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    if head_dim * n_heads != out_features or head_dim % 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not split into {n_heads} heads of even size")
    # (heads, 2, D/2, dim) -> (heads, D/2, 2, dim)
    return weight.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def apply_rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """The reference implementation's RoPE: pairs (2j, 2j+1) as complex numbers times e^{i m theta_j}.

    x: (B, heads, T, D), positions: (T,). Used to show that the two layouts agree once the weights are permuted.
    """
    head_dim = x.shape[-1]
    inv_freq = rope_frequencies(head_dim, theta, device=x.device)
    angles = positions.float()[:, None] * inv_freq                  # (T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)          # (T, D/2) complex: e^{i m theta_j}
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], head_dim // 2, 2))  # (B, heads, T, D/2)
    return torch.view_as_real(x_complex * rotation).flatten(-2).to(x.dtype)
