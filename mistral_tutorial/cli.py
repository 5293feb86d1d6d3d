"""The `mistral-tutorial` command: fetch, info, generate, route."""

from __future__ import annotations

import argparse
import sys


def _fetch(args: argparse.Namespace) -> int:
    from .assets import fetch_default_model

    fetch_default_model(force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-tutorial", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the default model (SmolLM2-135M-Instruct GGUF) into the cache")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.set_defaults(func=_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
