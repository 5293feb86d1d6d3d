"""`mistral-tutorial generate`: load a checkpoint, stream our tokens, and with `--compare-hf` run transformers on the
same weights and say whether the tokens agree and how fast each was.

Arguments are checked by the parser (cli.py, cli_args.py) before this runs; the sampling itself is generation.py's,
the chat template resolve.py's (`ChatTokenizer`), the conversion to transformers export.py's (`to_hf`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from .cli_args import DTYPES, CliError, model_path

if TYPE_CHECKING:                                   # the library loads only once a command runs
    from .model import Transformer


def generate_command(args: argparse.Namespace) -> int:
    """Stream the continuation of `args.prompt` to stdout (timings on stderr). 0, or 1 if --compare-hf disagrees."""
    from .generation import generate
    from .loading import load_pretrained
    from .resolve import ChatTokenizer

    if args.prompt.strip() == "":
        raise CliError("the prompt is empty")
    if args.temperature == 0:
        given = [f"--{name.replace('_', '-')}" for name in ("top_p", "top_k", "seed") if getattr(args, name) is not None]
        if given:
            raise CliError(f"{', '.join(given)}: no effect with greedy decoding (--temperature 0); "
                           f"add --temperature > 0 to sample")
    dtype = DTYPES.get(args.dtype, "auto")
    path = model_path(args.model)
    overrides: dict[str, Any] = {}
    if args.sliding_window is not None:
        overrides["sliding_window"] = args.sliding_window if args.sliding_window > 0 else None
    if args.parallel:                        # under torchrun: every rank loads its share and decodes; rank 0 prints
        from .sharding import init_from_torchrun

        if args.compare_hf:
            raise SystemExit("error: --compare-hf runs in one process; drop --parallel to compare with transformers")
        args.device = init_from_torchrun(args.device)
        if torch.distributed.get_rank() != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")   # noqa: SIM115 - for the life of this rank
    t0 = time.perf_counter()
    model = load_pretrained(path, dtype=dtype, device=args.device, fast=not args.plain, parallel=args.parallel,
                            quantize=args.quantize, **overrides)
    tokenizer = ChatTokenizer(path)
    held = sorted({m.qtype for m in model.modules() if hasattr(m, "qtype")}) or [str(model.dtype).split(".")[-1]]
    print(f"loaded {path.name} ({model.num_parameters() / 1e6:.0f} M parameters, {'/'.join(held)}, {args.device}, "
          f"window={model.config.sliding_window}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    prompt_ids = tokenizer.encode_prompt(args.prompt, chat=not args.no_chat)
    prompt = torch.tensor([prompt_ids], device=args.device)                      # (1, T)
    stops = [] if args.ignore_eos else tokenizer.stop_ids
    generated: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):              # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    start = time.perf_counter()
    ours = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_tokens=stops, on_token=stream,
                    fast=not args.plain)
    ours_s = time.perf_counter() - start
    print(flush=True)
    ours_ids = ours[0].tolist()
    print(f"[ours] {len(ours_ids)} tokens in {ours_s:.2f} s = {len(ours_ids) / ours_s:.1f} tokens/s", file=sys.stderr)

    if args.compare_hf:
        return compare_with_transformers(model, prompt, ours_ids, ours_s, stops, args)
    return 0


def compare_with_transformers(model: Transformer, prompt: torch.Tensor, ours_ids: list[int], ours_s: float,
                              stops: list[int], args: argparse.Namespace) -> int:
    """Run transformers' `generate` on our weights from the same (1, T) prompt; print agreement and both speeds.

    0 when the new tokens are identical, 1 when greedy tokens differ; sampling always 0 (the two libraries draw from
    different random streams, so agreement is not expected there).
    """
    from .export import to_hf

    hf_model = to_hf(model, "llama" if model.config.sliding_window is None and not model.config.is_moe else None)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p or 1.0, top_k=args.top_k or 0)
        torch.manual_seed(args.seed or 0)
    kwargs["eos_token_id"] = stops or None
    with torch.inference_mode():
        start = time.perf_counter()
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **kwargs)
        hf_s = time.perf_counter() - start
    theirs_ids = theirs[0, prompt.shape[1]:].tolist()                             # the new tokens only
    agree = ours_ids == theirs_ids
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b), None)
    print(f"[transformers] {len(theirs_ids)} tokens in {hf_s:.2f} s = {len(theirs_ids) / hf_s:.1f} tokens/s",
          file=sys.stderr)
    verdict = "identical" if agree else f"DIFFER (first difference at new token {first})"
    if args.temperature > 0:
        verdict += " (sampling: different random streams, agreement not expected)"
    print(f"[compare] tokens {verdict}; speed ours / transformers = {hf_s / ours_s:.2f}x", file=sys.stderr)
    return 0 if agree or args.temperature > 0 else 1
