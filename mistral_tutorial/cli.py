"""The `mistral-tutorial` command: fetch the default model, describe a model, generate text (optionally against
transformers), colour text by expert.

    mistral-tutorial fetch
    mistral-tutorial info mistral-7b-v0.1 --length 32768
    mistral-tutorial generate "What is a sliding window?" --max-new-tokens 64 --compare-hf

Every argument is checked while parsing, before any model loads. Every error is one line on stderr ("error: ...")
with exit status 2; `--debug` shows the traceback instead.

This module is the parser and `main` only: the argument checks are in cli_args.py, the commands in cli_commands.py
(fetch, info, route) and cli_generate.py (generate, --compare-hf).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from . import cli_args as check
from .cli_args import DTYPES, CliError
from .cli_commands import fetch_command, info_command, route_command
from .cli_generate import generate_command


# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error instead of one line")
    parser = check.OneLineParser(prog="mistral-tutorial", parents=[common],
                                 description="Mistral / Mixtral from scratch: fetch, info, generate, route.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    fetch = add("fetch", help="download the default model (SmolLM2-135M-Instruct GGUF) into the cache")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.set_defaults(func=fetch_command)

    info = add("info", help="config, parameter counts and KV-cache memory of a model or preset")
    info.add_argument("model", nargs="?", type=check.preset_or_path,
                      help="a preset (mistral-7b-v0.1, mixtral-8x7b-v0.1) or a model path")
    info.add_argument("--length", type=check.int_at_least(1), default=32768,
                      help="tokens for the KV-cache estimate (default 32768)")
    info.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    info.add_argument("--kernels", action="store_true",
                      help="also the decode layout chosen for this CPU and the GB/s each candidate reached (timed once)")
    info.add_argument("--remeasure", action="store_true", help="with --kernels: time the candidates again")
    info.set_defaults(func=info_command)

    gen = add("generate", help="generate text (greedy by default), streamed")
    gen.add_argument("prompt")
    gen.add_argument("--model", type=check.existing_path,
                     help="transformers dir, reference folder or .gguf (default: the fetched SmolLM2)")
    gen.add_argument("--max-new-tokens", type=check.int_at_least(1), default=128)
    gen.add_argument("--temperature", type=check.float_in(0.0, math.inf, False, "a finite number >= 0"), default=0.0,
                     help="0 = greedy (default)")
    gen.add_argument("--top-p", type=check.float_in(0.0, 1.0, True, "in (0, 1]"), default=None)
    gen.add_argument("--top-k", type=check.int_at_least(0, " (0 = off)"), default=None)
    gen.add_argument("--seed", type=check.seed, default=None)
    gen.add_argument("--sliding-window", type=check.int_at_least(0, " (0 = full attention, else a window >= 1)"),
                     default=None, help="override the window (0 = full attention)")
    gen.add_argument("--device", type=check.device, default="cpu")
    gen.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                     help="auto (default): the checkpoint's own (a GGUF's quantized weights stay quantized)")
    gen.add_argument("--quantize", choices=["int8", "int4", "Q8_0", "Q4_0", "Q4_1"], default=None,
                     help="quantize the weights on load (int8 = Q8_0, int4 = Q4_1; see quantized_load.py)")
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    gen.add_argument("--plain", action="store_true",
                     help="the plain PyTorch modules (default on a CPU: the decode layout measured fastest, see "
                          "kernel_choice.py)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    gen.add_argument("--compare-hf", action="store_true",
                     help="also run transformers on the same weights; print whether tokens agree and both speeds")
    gen.add_argument("--parallel", choices=["expert", "tensor"], default=None,
                     help="under torchrun --nproc-per-node N: expert or tensor parallelism over the N processes")
    gen.set_defaults(func=generate_command)

    route = add("route", help="draw text coloured by first-choice expert (Mixtral Fig 8)")
    route.add_argument("text")
    route.add_argument("--out", type=check.png_out, required=True,
                       help="PNG file to write, exactly this path (its folder must exist)")
    route.add_argument("--model", type=check.existing_path,
                       help="an MoE checkpoint (default: the tiny Mixtral the package ships, data/tiny-mixtral)")
    route.add_argument("--layer", type=check.int_at_least(0), default=None,
                       help="layer to colour by (default: the middle one)")
    route.add_argument("--device", type=check.device, default="cpu", help="e.g. cuda for real Mixtral weights")
    route.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bfloat16 for real Mixtral weights")
    route.set_defaults(func=route_command)
    return parser


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message, e.g. a list of missing keys, joined with ' | ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " | ".join(lines) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Errors: one line on stderr, status 2 (130 for Ctrl-C)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        return args.func(args)
    from .errors import CheckpointError, ConfigError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CliError, CheckpointError, ConfigError, OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is still one line, with the way to see more
        print(f"error: {type(err).__name__}: {_one_line(err)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
