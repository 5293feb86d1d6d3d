"""Decoding speed against the number of processes N, for expert and tensor parallelism (mistral_tutorial/parallel.py).

Writes a random Mixtral-shaped checkpoint (hub layout, fp32), then for each N and mode starts N processes with
torch.multiprocessing (gloo on the CPU; NCCL, one GPU per rank, with --nccl when N GPUs exist), loads the model with
`parallel=mode`, checks its greedy tokens against one process, and times greedy decoding of a batch, --repeats times.
Prints tokens/s (the median and the range over the runs), milliseconds per step (median), the collectives per step
and the bytes each rank sends per step (parallel_costs.py).

Each process uses --threads threads (default 1), so N processes use N cores: on this project's 2-core machines N = 2
uses both cores and N = 4 oversubscribes them; what the table shows beyond that is the cost of communication, a few
collectives per layer per token, each a fixed latency on gloo. On GPUs with NCCL the
ranks are real devices, and a model too large for one of them fits.

    python benchmarks/bench_parallel.py                  # N = 1, 2, 4 on the CPU (gloo), a ~50 M parameter Mixtral
    python benchmarks/bench_parallel.py --quick          # a tiny model, N = 1, 2: a few seconds
    python benchmarks/bench_parallel.py --update-readme  # also rewrite README.md's table (between its markers)
    python benchmarks/bench_parallel.py --nccl --dim 2048 --hidden 7168   # on a GPU node

Writes benchmarks/results/parallel.json and .md (parallel_quick.* with --quick). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mistral_tutorial as mt
from mistral_tutorial.collectives import TRAFFIC, reset_traffic
from mistral_tutorial.export import write_random_checkpoint
from mistral_tutorial.parallel_costs import collectives_per_step, rank_parameter_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def config_json(args: argparse.Namespace) -> dict:
    return dict(model_type="mixtral", vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=4, intermediate_size=args.hidden,
                num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=1e6)


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def decode(model: mt.Transformer, args: argparse.Namespace) -> tuple[torch.Tensor, list[float]]:
    """(greedy tokens, seconds of each of `args.repeats` timed runs after one warm-up)."""
    ids = prompts(model.config.vocab_size, args.batch, args.prompt)
    mt.generate(model, ids, max_new_tokens=4)
    seconds = []
    for _ in range(args.repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = mt.generate(model, ids, max_new_tokens=args.new_tokens)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return tokens, seconds


def speeds(seconds: list[float], steps: int, new_tokens: int) -> dict:
    """Median tokens/s (and its range over the runs) and median milliseconds per decoding step."""
    median = statistics.median(seconds)
    return dict(tokens_per_s=steps / median, tokens_per_s_range=(steps / max(seconds), steps / min(seconds)),
                ms_per_step=1e3 * median / new_tokens, seconds=seconds)


def rank_main(rank: int, world_size: int, mode: str, folder: str, args: argparse.Namespace, out: str) -> None:
    backend = "nccl" if args.nccl else "gloo"
    device = f"cuda:{rank}" if args.nccl else "cpu"
    if args.nccl:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group(backend, init_method=f"file://{out}.rendezvous", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    model = mt.Transformer.from_pretrained(folder, device=device, parallel=mode)
    tokens, seconds = decode(model, args)
    with torch.inference_mode():                                  # the bytes of one decoding step
        cache = model.new_cache(args.batch, 2)
        model(tokens[:, :1], cache=cache)
        reset_traffic()
        model(tokens[:, 1:2], cache=cache)
    if rank == 0:
        torch.save({"tokens": tokens.cpu(), "seconds": seconds, "traffic": dict(TRAFFIC)}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated N (default 1,2,4)")
    parser.add_argument("--modes", default="expert,tensor")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (default 1: on a busy machine OpenMP threads spin-wait)")
    parser.add_argument("--nccl", action="store_true", help="NCCL, one GPU per rank (needs N GPUs)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, N = 1, 2")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is shown (default 5)")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.hidden, args.layers, args.vocab, args.new_tokens, args.ranks = 64, 128, 2, 256, 8, "1,2"
    if args.nccl and not torch.cuda.is_available():
        raise SystemExit("--nccl: torch sees no CUDA device; run without it for gloo on the CPU")
    ranks = [int(n) for n in args.ranks.split(",")]
    if args.nccl and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--nccl with N = {max(ranks)} needs {max(ranks)} GPUs, torch sees "
                         f"{torch.cuda.device_count()}; pass --ranks up to that")
    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(write_random_checkpoint(Path(tmp) / "mixtral", config_json(args), dtype=torch.float32, std=0.05))
        config = mt.ModelConfig.from_hf(config_json(args))
        device = "cuda:0" if args.nccl else "cpu"
        torch.set_num_threads(args.threads)
        reference, seconds = decode(mt.Transformer.from_pretrained(folder, device=device), args)
        steps = args.batch * args.new_tokens
        rows.append(dict(mode="one process", N=1, **speeds(seconds, steps, args.new_tokens), collectives=0,
                         sent_bytes=0, rank_mb=rank_parameter_bytes(config, None, 1, 4)["rank"] / 1e6,
                         same_tokens=True))
        for mode in modes:
            for n in (n for n in ranks if n > 1):
                out = str(Path(tmp) / f"{mode}{n}.pt")
                mp.spawn(rank_main, args=(n, mode, folder, args, out), nprocs=n, join=True)
                result = torch.load(out)
                rows.append(dict(mode=mode, N=n, **speeds(result["seconds"], steps, args.new_tokens),
                                 collectives=collectives_per_step(config, mode, n),
                                 sent_bytes=sum(result["traffic"].values()),
                                 rank_mb=rank_parameter_bytes(config, mode, n, 4)["rank"] / 1e6,
                                 same_tokens=bool(torch.equal(result["tokens"], reference.cpu()))))
    backend = "nccl" if args.nccl else "gloo"
    header = (f"Mixtral-shaped, dim {args.dim}, hidden {args.hidden}, {args.layers} layers, 8 experts top-2, "
              f"vocab {args.vocab}, fp32; batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens; "
              f"{backend} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
              f"{args.threads} thread(s) per process; median of {args.repeats} timed runs (range)")
    lines = [header, "", "| mode | N | tokens/s | ms/step | collectives/step | bytes sent/step (rank 0) | "
             "MB of weights per rank | tokens = one process |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["tokens_per_s_range"]
        lines.append(f"| {r['mode']} | {r['N']} | {r['tokens_per_s']:.1f} ({low:.1f}–{high:.1f}) | "
                     f"{r['ms_per_step']:.1f} | {r['collectives']} | {r['sent_bytes']:,.0f} | {r['rank_mb']:.1f} | "
                     f"{r['same_tokens']} |")
    print("\n".join(lines))
    if args.update_readme and not args.quick:
        from readme import update_readme

        update_readme("parallel", "\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stem = "parallel_quick" if args.quick else "parallel"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
