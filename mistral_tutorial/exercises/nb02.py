"""Notebook 02's exercises: RoPE's frequencies, rotate-half, RoPE applied at given positions, and the permutation of
the q/k weights from the reference code's interleaved layout to transformers' rotate-half layout."""

from __future__ import annotations

import torch

from ..rope import RotaryEmbedding, apply_rope, half_to_interleaved, interleaved_to_half, rope_frequencies, rotate_half
from .checker import Case, Exercise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frequency_cases() -> list[Case]:
    return [Case((128, 10000.0)), Case((64, 1e6), "Mixtral's base"), Case((8, 10000.0)), Case((2, 500000.0), "D = 2: one pair")]


def _rotate_cases() -> list[Case]:
    g = _generator(201)
    return [Case((torch.randn(shape, generator=g).to(dtype),), label)
            for shape, dtype, label in [((2, 3, 5, 8), torch.float32, ""), ((1, 1, 4, 2), torch.float32, "D = 2"),
                                        ((6, 16), torch.float32, "any leading shape"),
                                        ((1, 2, 3, 8), torch.bfloat16, "bf16")]]


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    cos, sin = RotaryEmbedding(x.shape[-1], base)(positions[None], dtype=x.dtype)   # (1, T, D) each
    return apply_rope(x, cos, sin)


def _rope_cases() -> list[Case]:
    g = _generator(202)
    cases = []
    for shape, positions, base, dtype, label in [
            ((2, 4, 6, 16), torch.arange(6), 10000.0, torch.float32, ""),
            ((1, 2, 5, 8), torch.tensor([7, 8, 9, 10, 11]), 10000.0, torch.float32, "positions that do not start at 0"),
            ((1, 1, 3, 32), torch.tensor([0, 1000, 4095]), 1e6, torch.float32, "far-apart positions, Mixtral's base"),
            ((3, 2, 1, 4), torch.tensor([12]), 10000.0, torch.float32, "one token (decoding)"),
            ((1, 2, 4, 16), torch.arange(4) + 30, 10000.0, torch.bfloat16, "bf16")]:
        cases.append(Case((torch.randn(shape, generator=g).to(dtype), positions, base), label))
    return cases


def _weight_cases() -> list[Case]:
    g = _generator(203)
    return [Case((torch.randn(n_heads * head_dim, dim, generator=g), n_heads), label)
            for n_heads, head_dim, dim, label in [(4, 8, 12, ""), (2, 16, 5, ""), (1, 8, 3, "one head"),
                                                  (3, 2, 4, "D = 2: one pair per head"), (8, 4, 6, "")]]


def _interleaved_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    angles = (positions[:, None].float() * rope_frequencies(head_dim, base)).repeat_interleave(2, dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def _rope_interleaved_angles(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    cos, sin = _interleaved_angles(positions, x.shape[-1], base)
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def _rope_backwards(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    cos, sin = RotaryEmbedding(x.shape[-1], base)(positions[None], dtype=x.dtype)
    return apply_rope(x, cos, -sin)


def _rope_from_zero(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    return _rope_reference(x, torch.arange(x.shape[-2]), base)


def _one_block(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    return interleaved_to_half(weight, 1)


EXERCISES = [
    Exercise(
        "02.1-rope-frequencies", "rope_frequencies", rope_frequencies, "mt.rope.rope_frequencies", _frequency_cases,
        hint="theta_d = base^(-2d/D) for d = 0 .. D/2 - 1: D/2 frequencies, the first one 1, fp32.",
        more="`torch.arange(0, head_dim, 2)` gives 2d directly; `1.0 / base ** (that.float() / head_dim)`.",
        mistakes={"the exponent is -d/D: with d = 0 .. D/2 - 1 it must be -2d/D (or take 2d = 0, 2, 4, ...).":
                  lambda d, base: 1.0 / base ** (torch.arange(d // 2).float() / d),
                  "the exponent's sign is flipped: theta_d shrinks with d, base^(-2d/D).":
                  lambda d, base: base ** (torch.arange(0, d, 2).float() / d)}),
    Exercise(
        "02.2-rotate-half", "rotate_half", rotate_half, "mt.rotate_half", _rotate_cases,
        hint="pairs are (d, d + D/2): the output's first half is minus the input's second half, its second half the "
             "input's first half.",
        more="`half = x.shape[-1] // 2`, then `torch.cat((-x[..., half:], x[..., :half]), dim=-1)`.",
        mistakes={"the minus sign is on the wrong half: (x2, -x1) turns every pair by -90°, not +90°.":
                  lambda x: torch.cat((x[..., x.shape[-1] // 2:], -x[..., :x.shape[-1] // 2]), dim=-1),
                  "the pairs are (2j, 2j + 1): that is the interleaved layout of the reference code, not rotate-half.":
                  lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)}),
    Exercise(
        "02.3-apply-rope", "apply_rope", _rope_reference, "mt.apply_rope with mt.RotaryEmbedding", _rope_cases,
        hint="the angles m * theta_d are (T, D/2); rotate-half pairs d with d + D/2, so they go to (T, D) as "
             "cat([angles, angles]), not repeat_interleave; then x * cos + rotate_half(x) * sin, in x's dtype.",
        more="`angles = positions[:, None].float() * inv_freq` (T, D/2), `angles = torch.cat((angles, angles), -1)`; "
             "cos and sin broadcast over batch and heads; cast them to x.dtype before multiplying, as the library does.",
        mistakes={"the angles were repeated pairwise (repeat_interleave): that pairs (2j, 2j + 1), the interleaved "
                  "layout; rotate-half needs cat([angles, angles]).": _rope_interleaved_angles,
                  "the rotation goes backwards: x * cos + rotate_half(x) * sin, with a plus.": _rope_backwards,
                  "the positions were taken as 0 .. T - 1: use the `positions` given (a later chunk starts further on).":
                  _rope_from_zero}),
    Exercise(
        "02.4-interleaved-to-half", "interleaved_to_half", interleaved_to_half, "mt.rope.interleaved_to_half",
        _weight_cases,
        hint="within each head separately, row 2j (the real part of pair j) goes to row j and row 2j + 1 to row "
             "j + D/2; the columns stay.",
        more="`weight.view(n_heads, head_dim // 2, 2, dim)`: swap the two middle axes, `.transpose(1, 2)`, then "
             "`.reshape(n_heads * head_dim, dim)`.",
        mistakes={"the whole matrix was permuted as one head: each head has its own D rows to permute.": _one_block,
                  "this is the inverse permutation (rotate-half to interleaved).": half_to_interleaved}),
]
