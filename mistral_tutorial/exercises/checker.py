"""The checker: run a learner's function on an exercise's seeded cases, next to the reference, and say how it went.

Never raises on a wrong answer: a wrong output, a wrong shape or dtype, an exception inside the learner's function or a
stub that still raises NotImplementedError all print a short verdict and return False. On a failure it names the first
case that differs (its inputs, small), expected against got, and a hint: the one written for the classic mistake the
wrong output matches, if any, else the exercise's own hint about the usual mistake.
"""

from __future__ import annotations

import copy
import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compare import describe, difference, grid

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Fresh:
    """An argument made anew for every call (a seeded torch.Generator): the reference and the learner each get one."""

    make: Callable[[], Any]


@dataclass(frozen=True)
class Case:
    """One input: positional arguments, and a label when it is an edge case worth naming ("W = 1", "n_kv_heads = 1")."""

    args: tuple
    label: str = ""


@dataclass(frozen=True)
class Exercise:
    """One exercise: a function to write, the reference it must match, the inputs to try, and what to say."""

    name: str                                   # "03.2-repeat-kv": notebook 03, exercise 2
    function: str                               # the name of the stub's function (and of the solution's)
    reference: Callable[..., Any]               # the library's (or transformers') function, same arguments
    reference_name: str                         # how the verdict names it: "mt.repeat_kv"
    cases: Callable[[], list[Case]]             # seeded: the same inputs on every call
    hint: str                                   # the usual mistake, shown with every failure no mistake below explains
    more: str                                   # a further hint, for mt.exercises.hint(name)
    mistakes: dict[str, Callable[..., Any]] = field(default_factory=dict)   # hint naming a mistake -> a function making it
    atol: float | None = None                   # None: by dtype (compare.TOLERANCES)
    rtol: float | None = None


def _copy(value: Any) -> Any:
    """A copy the callee may change freely: tensors cloned, containers copied, Fresh made, modules and functions shared."""
    if isinstance(value, Fresh):
        return value.make()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (torch.nn.Module, torch.Generator)) or callable(value):
        return value
    return copy.deepcopy(value)


def _parameter_names(fn: Callable[..., Any], n: int) -> list[str]:
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        names = []
    return (names + [f"argument {i + 1}" for i in range(len(names), n)])[:n]


def _inputs(fn: Callable[..., Any], case: Case) -> str:
    names = _parameter_names(fn, len(case.args))
    lines = []
    for name, value in zip(names, case.args):
        value = value.make() if isinstance(value, Fresh) else value
        if isinstance(value, torch.Generator):
            lines.append(f"{name} = torch.Generator().manual_seed({value.initial_seed()})")
        else:
            lines.append(f"{name} = {describe(value)}")
    return "; ".join(lines)


def _learner_traceback(error: BaseException) -> str:
    """The frames of the learner's own code (and what it called), not the checker's; at most the last six."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not Path(f.filename).resolve().is_relative_to(HERE)]
    lines = traceback.format_list(frames[-6:])
    lines += traceback.format_exception_only(type(error), error)
    return "".join(lines).rstrip()


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 2 and max(value.shape) <= 12:
        return f"bool {tuple(value.shape)}, row i = query i:\n{_indent(grid(value), '      ')}"
    return describe(value)


def _diagnosis(exercise: Exercise, case: Case, got: Any) -> str:
    """The hint of the classic mistake whose output equals the learner's on this case, else the exercise's hint."""
    for hint, mistake in exercise.mistakes.items():
        try:
            if difference(mistake(*_copy(case.args)), got, exercise.atol, exercise.rtol) is None:
                return f"this looks like a classic mistake: {hint}"
        except Exception:                                         # noqa: BLE001 - a mistake that cannot run here
            continue
    return exercise.hint


def _footer(name: str) -> str:
    return f"  more help: mt.exercises.hint({name!r}); the answer: mt.exercises.solution({name!r})"


def run_check(exercise: Exercise, fn: Callable[..., Any]) -> bool:
    """Run `fn` on every case of `exercise` against its reference; print one verdict; True when every case matches."""
    cases = exercise.cases()
    name = exercise.name
    for number, case in enumerate(cases, 1):
        expected = exercise.reference(*_copy(case.args))
        where = f"case {number} of {len(cases)}" + (f" ({case.label})" if case.label else "")
        try:
            got = fn(*_copy(case.args))
        except NotImplementedError:
            print(f"· {name}: not attempted yet: `{getattr(fn, '__name__', 'your function')}` still raises "
                  f"NotImplementedError. Write its body, run its cell, then run this check again.")
            return False
        except Exception as error:                                # noqa: BLE001 - the learner's error, shown to them
            print(f"✗ {name}: your function raised {type(error).__name__} on {where}")
            print(f"  input:    {_inputs(fn, case)}")
            print(_indent(_learner_traceback(error)))
            print(f"  hint:     {exercise.hint}")
            print(_footer(name))
            return False
        problem = difference(expected, got, exercise.atol, exercise.rtol)
        if problem is None:
            continue
        print(f"✗ {name}: wrong on {where}")
        print(f"  input:    {_inputs(fn, case)}")
        print(f"  expected: {_shown(expected)}   ({exercise.reference_name})")
        print(f"  got:      {_shown(got)}")
        print(f"  how:      {problem}")
        print(f"  hint:     {_diagnosis(exercise, case, got)}")
        print(_footer(name))
        return False
    edges = [case.label for case in cases if case.label]
    print(f"✓ {name}: passed all {len(cases)} cases against {exercise.reference_name}"
          + (f", edge cases included: {'; '.join(edges)}" if edges else ""))
    return True
