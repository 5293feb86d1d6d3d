"""`mistral-tutorial fetch`, `info` and `route`: download the default model, describe a model or preset (config,
parameter counts, KV-cache memory), draw a text coloured by expert (Mixtral Fig 8).

Arguments are checked by the parser (cli.py, cli_args.py) before these run; `generate` is in cli_generate.py. The
work itself is the library's: assets.py downloads, routing.py routes, viz_routing.py draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cli_args import DTYPES, CliError, model_path


def fetch_command(args: argparse.Namespace) -> int:
    """Download and verify the default model (SmolLM2-135M-Instruct GGUF); again only with --force."""
    from .assets import fetch_default_model

    fetch_default_model(force=args.force)
    return 0


def info_command(args: argparse.Namespace) -> int:
    """Print a preset's or a checkpoint's config, its parameters (total, active) and the memory of weights and KV cache.

    Reads only the config: the model is built on the meta device, so no weights load and nothing is allocated.
    """
    from .config import ModelConfig
    from .model import Transformer
    from .presets import PRESETS

    name = args.model
    if name is None or name in PRESETS:
        config = PRESETS[name or "mistral-7b-v0.1"]()
        title = name or "mistral-7b-v0.1"
    else:
        path = model_path(name)
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
    # K and V: 2 x layers x kv heads x head_dim x slots
    kv_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * slots * bytes_per
    print(f"{title}")
    for key, value in config.to_dict().items():
        print(f"  {key:24s} {value}")
    print(f"  {'parameters (total)':24s} {total:,} ({total / 1e9:.2f} B)")
    print(f"  {'parameters (active)':24s} {active:,} ({active / 1e9:.2f} B per token)")
    print(f"  {'weights in ' + args.dtype:24s} {total * bytes_per / 2**30:.2f} GiB")
    print(f"  {'KV cache':24s} {kv_bytes / 2**30:.3f} GiB for {args.length:,} tokens ({args.dtype}, {slots:,} slots"
          f"{' = the window' if config.sliding_window and args.length > config.sliding_window else ''})")
    if getattr(args, "kernels", False):
        print_kernels(model, DTYPES[args.dtype], args.remeasure)
    return 0


def print_kernels(model, dtype: torch.dtype, remeasure: bool = False) -> None:
    """The decode layout kernel_choice.py picks for `model`'s shapes in `dtype` on this CPU (timing the candidates
    once, if this CPU has not yet), with each candidate's time per step and the GB/s of weights it streamed."""
    from . import kernel_choice, native

    layout = kernel_choice.choose_layout(model, dtype, "cpu", remeasure=remeasure)
    decision = kernel_choice._load_decisions().get(kernel_choice.decision_key(model.config, dtype))
    print(f"decode kernels on this CPU ({native.cpu_name()}, {torch.get_num_threads()} threads, {dtype}):")
    print(f"  {'C kernels':24s} {native.why_unavailable() or 'compiled for this CPU (native.py)'}")
    if decision is None:                                 # forced, or only one candidate: nothing was timed
        print(f"  {'chosen':24s} {layout} (not timed: ${kernel_choice.LAYOUT_ENV} or the only candidate)")
        return
    print(f"  {'timed':24s} {decision['timed_layers']} layers and the head, "
          f"{decision['bytes_per_step'] / 1e6:.0f} MB of weights a step")
    for name, seconds in sorted(decision["seconds"].items(), key=lambda item: item[1]):
        mark = "  <- chosen" if name == layout else ""
        print(f"  {name:24s} {seconds * 1e3:7.2f} ms a step, {decision['gb_per_s'][name]:5.1f} GB/s{mark}")
    print(f"  {'remembered in':24s} {kernel_choice.decisions_path()}")


def route_command(args: argparse.Namespace) -> int:
    """`mistral-tutorial route TEXT --out FILE.png [--model PATH] [--layer N]`: Fig 8 for one text, one layer."""
    from .resolve import load_model_and_tokenizer
    from .routing import _require_experts, expert_assignments
    from .tokenizer import SubsetTokenizer, token_strings
    from .viz_routing import draw_routed_text

    if not args.text.strip():
        raise ValueError("the text is empty")
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    model, tokenizer, name = load_model_and_tokenizer(args.model, DTYPES[getattr(args, "dtype", "float32")],
                                                      getattr(args, "device", "cpu"))
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
