"""Notebook 05's exercises: SiLU, the SwiGLU block, its parameter count, and the equal-parameter hidden width."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..feedforward import FeedForward
from .checker import Case, Exercise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _silu_cases() -> list[Case]:
    g = _generator(501)
    return [Case((3.0 * torch.randn(4, 9, generator=g),)), Case((torch.linspace(-6, 6, 25),), "a grid through the dip"),
            Case((torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0]),), "large |x|"),
            Case((torch.randn(2, 8, generator=g).bfloat16(),), "bf16")]


def _swiglu_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    block = FeedForward(w1.shape[1], w1.shape[0]).to(x.dtype)
    with torch.no_grad():
        for name, weight in (("w1", w1), ("w2", w2), ("w3", w3)):
            getattr(block, name).weight.copy_(weight)
        return block(x)


def _swiglu_cases() -> list[Case]:
    g = _generator(502)
    cases = []
    for shape, hidden, dtype, label in [((2, 3, 8), 12, torch.float32, ""), ((5, 16), 40, torch.float32, "tokens (N, d)"),
                                        ((1, 1, 4), 6, torch.float32, "one token"), ((2, 4, 8), 20, torch.bfloat16, "bf16")]:
        dim = shape[-1]
        w1, w3 = (torch.randn(hidden, dim, generator=g) / dim ** 0.5 for _ in range(2))
        w2 = torch.randn(dim, hidden, generator=g) / hidden ** 0.5
        cases.append(Case((torch.randn(shape, generator=g).to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype)), label))
    return cases


def _count_reference(dim: int, hidden_dim: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in FeedForward(dim, hidden_dim).parameters())


def _llama_width_reference(dim: int, multiple_of: int) -> int:
    """Meta's LLaMA rule (llama/model.py FeedForward): 2/3 of 4d, rounded up to a multiple of `multiple_of`."""
    hidden_dim = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


EXERCISES = [
    Exercise(
        "05.1-silu", "silu", F.silu, "F.silu", _silu_cases,
        hint="SiLU(x) = x * sigmoid(x) (Swish with beta = 1), elementwise, in x's dtype.",
        more="`x * torch.sigmoid(x)`; `x / (1 + torch.exp(-x))` is the same and still fine at large |x| in fp32.",
        mistakes={"this is the sigmoid alone: SiLU multiplies it by x.": lambda x: torch.sigmoid(x),
                  "the sigmoid's argument has the wrong sign: x * sigmoid(x), not x * sigmoid(-x).":
                  lambda x: x * torch.sigmoid(-x)}),
    Exercise(
        "05.2-swiglu", "swiglu", _swiglu_reference, "mt.FeedForward", _swiglu_cases,
        hint="down(silu(gate(x)) * up(x)) with gate = w1 and up = w3; the weights are in nn.Linear's (out, in) layout, "
             "so x @ w1.T (or F.linear(x, w1)).",
        more="`F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)`: Shazeer's eq. (6) with W = w1^T, "
             "V = w3^T, W2 = w2^T.",
        mistakes={"w1 and w3 are swapped: the SiLU goes on the gate w1; w3 is the up projection it multiplies.":
                  lambda x, w1, w2, w3: F.linear(F.silu(F.linear(x, w3)) * F.linear(x, w1), w2),
                  "the SiLU was applied to the product: it gates only x w1, silu(x w1) * (x w3).":
                  lambda x, w1, w2, w3: F.linear(F.silu(F.linear(x, w1) * F.linear(x, w3)), w2)}),
    Exercise(
        "05.3-ffn-parameters", "ffn_parameters", _count_reference, "the parameters of mt.FeedForward",
        lambda: [Case((4096, 14336), "Mistral 7B"), Case((8, 12)), Case((576, 1536), "SmolLM2-135M"), Case((1, 1))],
        hint="three matrices of d x hidden (gate w1, up w3, down w2), no biases.",
        more="3 * dim * hidden_dim.",
        mistakes={"2 d x hidden is the classic two-matrix FFN; SwiGLU's gate adds a third matrix.":
                  lambda d, h: 2 * d * h}),
    Exercise(
        "05.4-llama-hidden-dim", "llama_hidden_dim", _llama_width_reference, "Meta's LLaMA rule",
        lambda: [Case((4096, 256), "LLaMA-7B"), Case((5120, 256), "LLaMA-13B"), Case((64, 32)), Case((576, 64)),
                 Case((8192, 256), "LLaMA-65B"), Case((3, 1), "multiple_of = 1: no rounding")],
        hint="keep the parameters of a two-matrix FFN of width 4d: 3 d h = 2 d (4d), so h = 2/3 x 4d (Shazeer 2020); "
             "take int() of that, then round *up* to a multiple of `multiple_of`.",
        more="`hidden = int(2 * 4 * dim / 3)`, then `multiple_of * ((hidden + multiple_of - 1) // multiple_of)`; "
             "LLaMA-7B (d = 4096, multiple_of = 256) gets 11008. Mistral 7B does not follow this rule.",
        mistakes={"the width was rounded down: LLaMA rounds up to the next multiple.":
                  lambda d, m: m * (int(8 * d / 3) // m),
                  "the 2/3 is missing: three matrices of width 4d have 1.5 times the parameters of two.":
                  lambda d, m: m * ((4 * d + m - 1) // m)}),
]
