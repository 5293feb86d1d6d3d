"""Run a model on N processes (expert or tensor parallelism) and check it against one process, token for token.

    torchrun --standalone --nproc-per-node 2 scripts/parallel_check.py --reference      # tiny Mixtral, 2 CPU processes
    torchrun --standalone --nproc-per-node 4 scripts/parallel_check.py --mode tensor --reference
    torchrun --standalone --nproc-per-node 8 scripts/parallel_check.py --mode expert \
        --model /path/to/Mixtral-8x7B-v0.1 --device cuda --dtype bfloat16              # 8 GPUs, NCCL

Every rank loads its share (`Transformer.from_pretrained(..., parallel=mode)`), runs one forward over the prompt (to
record the routing) and greedy `generate`. Rank 0 prints; with --reference it also loads the whole model in its own
process and compares. --out: rank 0 saves the run (tokens, per layer the chosen experts and the (token, expert) pairs
each rank sent to each rank) for notebook 11.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial.collectives import TRAFFIC, reset_traffic  # noqa: E402
from mistral_tutorial.parallel_costs import parameter_bytes  # noqa: E402
from mistral_tutorial.routing import TINY_MIXTRAL_DIR  # noqa: E402
from mistral_tutorial.sharding import init_from_torchrun  # noqa: E402
from mistral_tutorial.tokenizer import SubsetTokenizer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT = "The experts of a mixture share the work:"


def prompt_ids(model_dir: Path, text: str, vocab_size: int) -> list[int]:
    """The prompt's ids: with the tiny Mixtral's own vocabulary when there is one, else seeded random ids."""
    if (model_dir / "vocab.json").is_file():
        return SubsetTokenizer.load(model_dir / "vocab.json").encode(text)
    return torch.randint(3, vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()


def run_mode(mode: str, args: argparse.Namespace, device: str) -> dict:
    """Load this rank's share for `mode`, route the prompt once, generate; rank 0 prints and gets the whole run."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    model = mt.Transformer.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device, parallel=mode)
    loaded = time.perf_counter() - start
    ids = prompt_ids(Path(args.model), args.prompt, model.config.vocab_size)
    with torch.inference_mode():                             # one forward over the prompt: routing and traffic
        reset_traffic()
        model(torch.tensor([ids], device=device))
        traffic = dict(TRAFFIC)
    routing = [e.cpu() for e in model.chosen_experts()] if model.config.is_moe else None
    sent = [layer.feed_forward.last_sent for layer in model.layers] if mode == "expert" else None
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, {"sent": sent, "bytes": parameter_bytes(model), "traffic": traffic})
    tokens = mt.generate(model, [ids], max_new_tokens=args.new_tokens)[0].tolist()
    run = {"mode": mode, "world_size": world_size, "prompt": ids, "tokens": tokens, "routing": routing,
           "ranks": everyone}
    if rank == 0:
        print(f"{mode}-parallel on {world_size} processes ({dist.get_backend()}): "
              f"{everyone[0]['bytes'] / 1e6:.1f} MB of weights on rank 0, loaded in {loaded:.1f} s")
        print(f"  tokens: {tokens}")
        if args.reference:
            whole = mt.Transformer.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device)
            run["reference"] = mt.generate(whole, [ids], max_new_tokens=args.new_tokens)[0].tolist()
            same = run["reference"] == tokens
            print(f"  one process: {'identical' if same else 'DIFFERENT: ' + str(run['reference'])}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="expert,tensor", help="expert, tensor, or both (default: expert,tensor)")
    parser.add_argument("--model", default=str(TINY_MIXTRAL_DIR))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--reference", action="store_true", help="rank 0 also runs the whole model and compares")
    parser.add_argument("--out", help="rank 0 saves the runs here (.pt): {mode: run}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = init_from_torchrun(args.device)
    runs = {mode: run_mode(mode, args, device) for mode in args.mode.split(",")}
    if dist.get_rank() == 0 and args.out:
        torch.save(runs, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
