"""The CLI's argument types: each checks one argument while argparse parses, so that a mistake is reported before
any model loads, naming the argument, the value and what would work. And argparse's own errors, on one line.

Also the few pieces every command shares: the `--dtype` names (`DTYPES`), the error a command reports as one line
(`CliError`) and the `--model` path a command loads (`model_path`). The commands themselves are in cli_commands.py and
cli_generate.py; cli.py builds the parser and runs one command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CliError(Exception):
    """An error the CLI reports as one line, exit status 2."""


def int_at_least(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argparse type: an int >= minimum (`meaning` explains the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}{meaning}")
        return value

    return parse


def float_in(low: float, high: float, low_open: bool, what: str) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] ((low, high] when `low_open`); `what` says so in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a seed torch.manual_seed takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**63 - 1")
    return value


def device(text: str) -> str:
    """An argparse type: a torch device that is there (cpu; cuda or mps only when torch sees one)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no MPS device; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: expected cpu, cuda or mps")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a checkpoint path that exists (its format is checked when it loads)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory (a transformers dir, a reference folder "
                                         f"with params.json, or a .gguf file)")
    return text


def png_out(text: str) -> str:
    """A .png path that can be written exactly as given: not a directory, its folder already there."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name such as {path / 'routing.png'}")
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text} does not end in .png; the figure is a PNG, e.g. {text}.png")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {parent} is not writable")
    return text


def preset_or_path(text: str) -> str:
    """An argparse type: a preset name, or a path that exists."""
    from .presets import PRESETS

    if text in PRESETS:
        return text
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): `error: <command>: <problem>`."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def model_path(model: str | None) -> Path:
    """The checkpoint a command loads: `--model` as given, or (None) the fetched default model, which must be there."""
    from .assets import require_default_model

    if model is None:
        return require_default_model()
    try:
        return Path(existing_path(model)).expanduser()
    except argparse.ArgumentTypeError as err:
        raise CliError(str(err)) from None
