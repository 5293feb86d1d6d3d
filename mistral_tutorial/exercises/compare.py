"""How the checker sees values: a short description of an input or an output, and the first difference between what the
reference returned and what the learner's function returned (None when they agree)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

# torch.testing.assert_close's defaults, except bf16/fp16, whose atol allows one rounding of values near 1
TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5), torch.bfloat16: (1.6e-2, 1e-2),
              torch.float16: (1e-3, 1e-3)}
SMALL = {True: 8, False: 16}  # float / other tensors with at most this many entries are shown whole


def describe(value: Any, width: int = 100) -> str:
    """`float32 (2, 4, 8)` for a tensor (its values too when small), repr for a number, a name for a function."""
    if isinstance(value, torch.Tensor):
        text = f"{str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
        if value.numel() <= SMALL[value.is_floating_point()]:
            text += f" {_values(value)}"
        return text
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return f"{type(value).__name__} of {len(value)}: " + ", ".join(describe(v) for v in value[:3]) + (
            ", ..." if len(value) > 3 else "")
    if callable(value) and not isinstance(value, torch.nn.Module):
        return f"a function ({getattr(value, '__name__', type(value).__name__)})"
    if isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _values(tensor: torch.Tensor) -> str:
    values = tensor.detach().cpu()
    if values.is_floating_point():
        values = values.float()
        return str([round(v, 4) if math.isfinite(v) else v for v in values.flatten().tolist()])
    return str(values.flatten().tolist())


def grid(mask: torch.Tensor) -> str:
    """A small boolean (T, T) mask as rows of 1 and . (row i = query i), for the eye."""
    return "\n".join("".join("1" if v else "." for v in row) for row in mask.tolist())


def _as_number(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as a Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if hasattr(value, "item") and not isinstance(value, torch.Tensor) and getattr(value, "shape", None) == ():
        return value.item()
    return value


def difference(expected: Any, got: Any, atol: float | None = None, rtol: float | None = None, where: str = ""
               ) -> str | None:
    """None when `got` matches `expected`, else one line saying how it differs (shape, dtype, values, length...)."""
    at = f" at {where}" if where else ""
    if isinstance(expected, torch.Tensor):
        return _tensor_difference(expected, got, atol, rtol, at)
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"expected a {type(expected).__name__} of {len(expected)}{at}, got {_kind(got)}"
        if len(got) != len(expected):
            return f"expected {len(expected)} items{at}, got {len(got)}: {describe(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = difference(e, g, atol, rtol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"expected a dict with keys {sorted(expected)}{at}, got {describe(got)}"
        for key in expected:
            problem = difference(expected[key], got[key], atol, rtol, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    got = _as_number(got)
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        if got == expected and type(got) is type(expected):
            return None
        return f"expected {expected!r}{at}, got {describe(got)}" + _first_char(expected, got)
    if isinstance(expected, numbers.Integral):
        if not isinstance(got, numbers.Integral) or isinstance(got, bool):
            return f"expected an int ({expected:,}){at}, got {_kind(got)} {describe(got)}"
        return None if got == expected else (
            f"expected {expected:,}{at}, got {got:,} (off by {got - expected:+,})")
    if isinstance(expected, numbers.Real):
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            return f"expected a number ({expected!r}){at}, got {_kind(got)} {describe(got)}"
        if math.isclose(got, expected, rel_tol=rtol or 1e-9, abs_tol=atol or 1e-12):
            return None
        return f"expected {expected!r}{at}, got {got!r} (|diff| = {abs(got - expected):.3g})"
    return None if got == expected else f"expected {describe(expected)}{at}, got {describe(got)}"


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _first_char(expected: Any, got: Any) -> str:
    if not (isinstance(expected, str) and isinstance(got, str)):
        return ""
    i = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"; they part at character {i}: expected {expected[i:i + 12]!r}, got {got[i:i + 12]!r}"


def _tensor_difference(expected: torch.Tensor, got: Any, atol: float | None, rtol: float | None, at: str) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor ({describe(expected)}){at}, got {_kind(got)}: {describe(got)}"
    if got.shape != expected.shape:
        hint = " (transposed?)" if got.dim() >= 2 and expected.dim() >= 2 and got.shape == expected.transpose(-2, -1).shape else ""
        return f"expected shape {tuple(expected.shape)}{at}, got shape {tuple(got.shape)}{hint}"
    if got.dtype != expected.dtype:
        return f"expected dtype {expected.dtype}{at}, got {got.dtype} (same shape {tuple(got.shape)})"
    expected, got = expected.detach().cpu(), got.detach().cpu()
    if not expected.is_floating_point():
        wrong = got != expected
        if not bool(wrong.any()):
            return None
        first = tuple(wrong.nonzero()[0].tolist())
        return (f"{int(wrong.sum())} of {expected.numel()} entries differ{at}, the first at {list(first)}: "
                f"expected {expected[first].item()!r}, got {got[first].item()!r}")
    default_rtol, default_atol = TOLERANCES.get(expected.dtype, (1.3e-6, 1e-5))
    rtol, atol = default_rtol if rtol is None else rtol, default_atol if atol is None else atol
    close = torch.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None
    wrong = ~close
    first = tuple(wrong.nonzero()[0].tolist())
    finite = torch.isfinite(expected) & torch.isfinite(got)
    diff = (got.double() - expected.double()).abs()[finite]
    pattern = (torch.isfinite(expected) != torch.isfinite(got)) | (expected.isnan() != got.isnan())
    largest = f"max-abs-diff {diff.max().item():.3g}" if diff.numel() else "no finite values to compare"
    infinities = ""
    if bool(pattern.any()):
        largest += " where both are finite"
        infinities = f", {int(pattern.sum())} entries finite in one and inf/nan in the other"
    return (f"{int(wrong.sum())} of {expected.numel()} values differ{at} ({largest}{infinities}; tolerance atol "
            f"{atol:g} + rtol {rtol:g}), the first at {list(first)}: expected {expected[first].item():.6g}, "
            f"got {got[first].item():.6g}")
