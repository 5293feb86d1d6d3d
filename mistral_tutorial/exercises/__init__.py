"""Exercises for notebooks 01-12: write one function, and have it checked against the library (and transformers).

    mt.exercises.names()                              # every exercise id, "01.1-embedding-lookup", ...
    mt.exercises.check("03.2-repeat-kv", repeat_kv)   # your function on seeded inputs and edge cases; True if all match
    mt.exercises.hint("03.2-repeat-kv")               # a further hint
    mt.exercises.solution("03.2-repeat-kv")           # prints a reference solution, only when asked

An id is the notebook's number, the exercise's number in it, and a name. Each notebook's exercises (the reference, the
inputs, the hints, the classic mistakes) are defined in `nbNN.py`; the checker is `checker.py`; the solutions live
apart, in `solutions/`, and are read only by `solution()` (and the tests).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from . import nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09, nb10, nb11, nb12
from .checker import Exercise, run_check

EXERCISES: dict[str, Exercise] = {exercise.name: exercise for module in (nb01, nb02, nb03, nb04, nb05, nb06, nb07,
                                                                          nb08, nb09, nb10, nb11, nb12)
                                  for exercise in module.EXERCISES}

__all__ = ["names", "check", "hint", "solution", "EXERCISES", "Exercise"]


def names() -> list[str]:
    """Every exercise id, in notebook order."""
    return list(EXERCISES)


def get(name: str) -> Exercise:
    """The exercise called `name`; a ValueError naming the closest ids when there is none."""
    if not isinstance(name, str):
        raise TypeError(f"an exercise id is a str such as '03.2-repeat-kv', got {type(name).__name__} {name!r}")
    if name not in EXERCISES:
        close = difflib.get_close_matches(name, EXERCISES, n=3, cutoff=0.4)
        raise ValueError(f"no exercise {name!r}" + (f"; did you mean {close}?" if close else "")
                         + " (mt.exercises.names() lists them all)")
    return EXERCISES[name]


def check(name: str, fn: Callable[..., Any]) -> bool:
    """Run your `fn` on the exercise's seeded inputs and edge cases against the reference; print a short verdict.

    Returns True when every case matches, False otherwise (a wrong value, shape or dtype, an exception inside `fn`, or
    a stub that still raises NotImplementedError). A wrong answer never raises; a wrong id or a non-function does.
    """
    exercise = get(name)
    if not callable(fn):
        raise TypeError(f"check({name!r}, fn) takes your function itself, e.g. check({name!r}, {exercise.function}); "
                        f"got {type(fn).__name__}")
    return run_check(exercise, fn)


def hint(name: str) -> None:
    """Print a further hint for the exercise (beyond the one a failed check shows)."""
    exercise = get(name)
    print(f"{name}: the usual mistake: {exercise.hint}\n\nfurther: {exercise.more}")


def solution_function(name: str) -> Callable[..., Any]:
    """The reference solution of exercise `name`, from `solutions/nbNN.py` (imported only now)."""
    exercise = get(name)
    module = importlib.import_module(f"{__name__}.solutions.nb{name[:2]}")
    return getattr(module, exercise.function)


def solution(name: str) -> None:
    """Print the source of a reference solution of exercise `name`: try the exercise first."""
    fn = solution_function(name)
    where = inspect.getsourcefile(fn) or ""
    print(f"# {name}: a reference solution (mistral_tutorial/exercises/solutions/{where.rsplit('/', 1)[-1]})\n")
    print(inspect.getsource(fn))
