"""The `mistral-tutorial` command: fetch the default model, describe a model, generate text (optionally against
transformers), colour text by expert.

    mistral-tutorial fetch
    mistral-tutorial info mistral-7b-v0.1 --length 32768
    mistral-tutorial generate "What is a sliding window?" --max-new-tokens 64 --compare-hf

Every argument is checked while parsing, before any model loads. Every error is one line on stderr ("error: ...")
with exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import cli_args as check

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CliError(Exception):
    """An error the CLI reports as one line, exit status 2."""


def _fetch(args: argparse.Namespace) -> int:
    from .assets import fetch_default_model

    fetch_default_model(force=args.force)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _resolve_model_path(model: str | None) -> Path:
    from .assets import require_default_model

    if model is None:
        return require_default_model()
    try:
        return Path(check.existing_path(model)).expanduser()
    except argparse.ArgumentTypeError as err:
        raise CliError(str(err)) from None


class _Tokenizer:
    """Text <-> ids for whichever checkpoint was loaded, with a chat template where the model has one."""

    def __init__(self, path: Path) -> None:
        from .resolve import tokenizer_for
        from .tokenizer import MistralTokenizer, SubsetTokenizer

        tokenizer = tokenizer_for(path)                   # the one resolver, shared with `route`
        ours = isinstance(tokenizer, (MistralTokenizer, SubsetTokenizer))
        self.hf = None if ours else tokenizer
        self.mistral = tokenizer if ours else None

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        if self.hf is not None:
            if chat and self.hf.chat_template:
                ids = self.hf.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True)
                ids = ids["input_ids"] if not isinstance(ids, list) else ids
                return list(ids)
            return self.hf.encode(prompt)
        assert self.mistral is not None
        # Mistral-7B-Instruct v0.1 format: <s>[INST] prompt [/INST]
        return self.mistral.encode(f"[INST] {prompt} [/INST]" if chat else prompt, bos=True)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        assert self.mistral is not None
        return self.mistral.decode(ids)

    @property
    def stop_ids(self) -> list[int]:
        if self.hf is not None:
            eos = self.hf.eos_token_id
            return [eos] if isinstance(eos, int) else list(eos or [])
        assert self.mistral is not None
        return [self.mistral.eos_id]


def _generate(args: argparse.Namespace) -> int:
    from .generation import generate
    from .loading import load_pretrained, to_hf

    if args.prompt.strip() == "":
        raise CliError("the prompt is empty")
    if args.temperature == 0:
        given = [f"--{name.replace('_', '-')}" for name in ("top_p", "top_k", "seed") if getattr(args, name) is not None]
        if given:
            raise CliError(f"{', '.join(given)}: no effect with greedy decoding (--temperature 0); "
                           f"add --temperature > 0 to sample")
    dtype = DTYPES[args.dtype]
    path = _resolve_model_path(args.model)
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
                            **overrides)
    tokenizer = _Tokenizer(path)
    print(f"loaded {path.name} ({model.num_parameters() / 1e6:.0f} M parameters, {args.dtype}, {args.device}, "
          f"window={model.config.sliding_window}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    prompt_ids = tokenizer.encode_prompt(args.prompt, chat=not args.no_chat)
    prompt = torch.tensor([prompt_ids], device=args.device)
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
        theirs_ids = theirs[0, prompt.shape[1]:].tolist()
        agree = ours_ids == theirs_ids
        first = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b), None)
        print(f"[transformers] {len(theirs_ids)} tokens in {hf_s:.2f} s = {len(theirs_ids) / hf_s:.1f} tokens/s",
              file=sys.stderr)
        verdict = "identical" if agree else f"DIFFER (first difference at new token {first})"
        if args.temperature > 0:
            verdict += " (sampling: different random streams, agreement not expected)"
        print(f"[compare] tokens {verdict}; speed ours / transformers = {hf_s / ours_s:.2f}x", file=sys.stderr)
        return 0 if agree or args.temperature > 0 else 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .model import Transformer
    from .presets import PRESETS

    name = args.model
    if name is None or name in PRESETS:
        config = PRESETS[name or "mistral-7b-v0.1"]()
        title = name or "mistral-7b-v0.1"
    else:
        path = _resolve_model_path(name)
        if path.suffix == ".gguf":
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            config = ModelConfig.from_hf({**load_gguf_checkpoint(str(path))["config"]})
        elif (path / "params.json").is_file():
            config = ModelConfig.from_params(path / "params.json")
        elif (path / "config.json").is_file():
            config = ModelConfig.from_hf(path / "config.json")
        else:
            raise CliError(f"{path}: not a preset ({', '.join(PRESETS)}), .gguf, reference or transformers folder")
        title = str(path)
    with torch.device("meta"):
        model = Transformer(config)
    bytes_per = torch.finfo(DTYPES[args.dtype]).bits // 8
    total, active = model.num_parameters(), model.num_parameters(active=True)
    slots = min(args.length, config.sliding_window) if config.sliding_window else args.length
    kv_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * slots * bytes_per
    print(f"{title}")
    for key, value in config.to_dict().items():
        print(f"  {key:24s} {value}")
    print(f"  {'parameters (total)':24s} {total:,} ({total / 1e9:.2f} B)")
    print(f"  {'parameters (active)':24s} {active:,} ({active / 1e9:.2f} B per token)")
    print(f"  {'weights in ' + args.dtype:24s} {total * bytes_per / 2**30:.2f} GiB")
    print(f"  {'KV cache':24s} {kv_bytes / 2**30:.3f} GiB for {args.length:,} tokens ({args.dtype}, {slots:,} slots"
          f"{' = the window' if config.sliding_window and args.length > config.sliding_window else ''})")
    return 0


def _route(args: argparse.Namespace) -> int:
    """`mistral-tutorial route TEXT --out FILE.png [--model PATH] [--layer N]`: Fig 8 for one text, one layer."""
    from .resolve import load_model_and_tokenizer
    from .routing import _require_experts, expert_assignments
    from .tokenizer import SubsetTokenizer, token_strings
    from .viz import draw_routed_text

    if not args.text.strip():
        raise ValueError("the text is empty")
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    model, tokenizer, name = load_model_and_tokenizer(args.model, DTYPES[getattr(args, "dtype", "float32")], getattr(args, "device", "cpu"))
    _require_experts(model)
    n_layers = model.config.n_layers
    layer = n_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {args.layer}: the model has layers 0..{n_layers - 1}")
    ids = tokenizer.encode(args.text)
    experts = expert_assignments(model, ids)[layer]                               # (T, k)
    bos = getattr(tokenizer, "bos_id", getattr(tokenizer, "bos_token_id", None))
    shown = [i for i, token_id in enumerate(ids) if token_id != bos]              # <s> is routed, not drawn
    # the tiny model's tokenizer maps pieces it never saw to <unk>; draw the text's own pieces
    strings = (tokenizer.base.pieces(tokenizer.base.encode(args.text)) if isinstance(tokenizer, SubsetTokenizer)
               else token_strings(tokenizer, ids))
    ax = draw_routed_text([strings[i] for i in shown], experts[shown], model.config.n_experts,
                          title=f"{name}, layer {layer} of {n_layers}: tokens coloured by first-choice expert")
    out = Path(args.out).expanduser()                     # the CLI checked it: a .png in a folder that exists
    ax.figure.savefig(out, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(ax.figure)
    print(f"wrote {out} ({len(shown)} tokens, layer {layer})")
    return 0


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
    fetch.set_defaults(func=_fetch)

    info = add("info", help="config, parameter counts and KV-cache memory of a model or preset")
    info.add_argument("model", nargs="?", type=check.preset_or_path,
                      help="a preset (mistral-7b-v0.1, mixtral-8x7b-v0.1) or a model path")
    info.add_argument("--length", type=check.int_at_least(1), default=32768,
                      help="tokens for the KV-cache estimate (default 32768)")
    info.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    info.set_defaults(func=_info)

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
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    gen.add_argument("--plain", action="store_true",
                     help="keep the plain weights (default on a CPU: the fast decode layout, see packed.py)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    gen.add_argument("--compare-hf", action="store_true",
                     help="also run transformers on the same weights; print whether tokens agree and both speeds")
    gen.add_argument("--parallel", choices=["expert", "tensor"], default=None,
                     help="under torchrun --nproc-per-node N: expert or tensor parallelism over the N processes")
    gen.set_defaults(func=_generate)

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
    route.set_defaults(func=_route)
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
