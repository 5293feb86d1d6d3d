"""Time our `mt.MoeLayer` against transformers' `MixtralSparseMoeBlock` holding the same weights.

One forward of N tokens through E experts, top-k, fp32 on CPU under `torch.inference_mode()`. The outputs are checked
allclose first; then, after a warm-up, ours and transformers' run alternately (so a slow patch of the machine hits
both) and the median of the repeats is kept. transformers' block is timed with each experts kernel asked for:
`eager` (the per-expert loop of modeling_mixtral.py, what a standalone block runs) and `grouped_mm` (what
`MixtralForCausalLM` picks by default in 5.x).

    python benchmarks/bench_moe.py                 # 4096 tokens, dim 1024, hidden 3584, 8 experts, top-2
    python benchmarks/bench_moe.py --quick         # a smaller shape, a few seconds
    python benchmarks/bench_moe.py --threads 1,2   # time at 1 and at 2 intra-op threads
    python benchmarks/bench_moe.py --profile       # also: where each forward spends its time, by operator

Writes benchmarks/results/moe.json and benchmarks/results/moe.md (moe_quick.* with --quick). ratio = transformers / ours: > 1 means ours is faster.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

import mistral_tutorial as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(dim: int, hidden_dim: int, n_experts: int, k: int, seed: int) -> tuple[mt.MoeLayer, dict[str, torch.nn.Module]]:
    """Our layer, and transformers' block per experts kernel, all holding the same weights."""
    torch.manual_seed(seed)
    ours = mt.MoeLayer(dim, hidden_dim, n_experts, k).eval()
    torch.nn.init.normal_(ours.gate.weight, 0.0, dim ** -0.5)
    theirs: dict[str, torch.nn.Module] = {}
    gate_up = torch.cat([ours.w1.detach(), ours.w3.detach()], dim=1)                 # (E, 2I, dim): gate, then up
    for impl in ("eager", "grouped_mm"):
        cfg = transformers.MixtralConfig(hidden_size=dim, intermediate_size=hidden_dim, num_local_experts=n_experts,
                                         num_experts_per_tok=k, hidden_act="silu")
        cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(cfg).eval()
        with torch.no_grad():
            block.gate.weight.copy_(ours.gate.weight)
            block.experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)  # shared: one copy in memory
            block.experts.down_proj = torch.nn.Parameter(ours.w2.detach(), requires_grad=False)
        theirs[impl] = block
    return ours, theirs


def time_once(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def op_breakdown(fn, x: torch.Tensor, top: int = 6) -> dict[str, float]:
    """Self CPU time (s) of the `top` costliest operators in one forward, from torch.profiler, plus the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    breakdown = {e.key: e.self_cpu_time_total / 1e6 for e in events[:top]}
    breakdown["total"] = sum(e.self_cpu_time_total for e in events) / 1e6
    return breakdown


def bench(runners: dict, x: torch.Tensor, threads: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up, then `repeats` rounds of ours / theirs alternately, at `threads` intra-op threads."""
    torch.set_num_threads(threads)
    for _ in range(warmup):
        for fn in runners.values():
            fn(x.clone())
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            times[name].append(time_once(fn, x.clone()))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden-dim", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=str, default=str(torch.get_num_threads()),
                        help="intra-op thread counts to time, comma-separated, e.g. 1,2 (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, dim 256, hidden 896: a few seconds")
    parser.add_argument("--profile", action="store_true", help="also: where each forward spends its time, by operator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.dim, args.hidden_dim = 1024, 256, 896
    thread_counts = [int(t) for t in args.threads.split(",")]

    ours, theirs = build(args.dim, args.hidden_dim, args.experts, args.top_k, args.seed)
    x = torch.randn(1, args.tokens, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    runners = {"ours": ours, **{f"transformers ({impl})": block for impl, block in theirs.items()}}

    with torch.inference_mode():
        # 1. the same function: outputs allclose, the same experts for every token
        reference = ours(x)
        checks = {}
        for impl, block in theirs.items():
            out = block(x.clone())
            diff = float((out - reference).abs().max())
            _, _, experts = block.gate(x.reshape(-1, args.dim))
            same_experts = bool(torch.equal(experts, ours.last_experts))
            if not torch.allclose(out, reference, atol=1e-4, rtol=1e-4) or not same_experts:
                raise SystemExit(f"outputs differ from transformers ({impl}): max|diff| {diff:.3e}, "
                                 f"same experts {same_experts}; timing a different function would mean nothing")
            checks[impl] = diff

        # 2. per thread count: warm-up, then ours / theirs alternately; the median is kept
        times = {threads: bench(runners, x, threads, args.warmup, args.repeats) for threads in thread_counts}
        profiles = {}
        if args.profile:
            torch.set_num_threads(thread_counts[0])
            profiles = {name: op_breakdown(fn, x.clone()) for name, fn in runners.items()}

    rows = []
    for threads, per_impl in times.items():
        ours_median = statistics.median(per_impl["ours"])
        for name, ts in per_impl.items():
            median = statistics.median(ts)
            rows.append({"impl": name, "threads": threads, "median_s": median, "min_s": min(ts), "max_s": max(ts),
                         "ratio_transformers_over_ours": None if name == "ours" else median / ours_median})

    setup = {"tokens": args.tokens, "dim": args.dim, "hidden_dim": args.hidden_dim, "n_experts": args.experts,
             "experts_per_token": args.top_k, "dtype": "float32", "device": "cpu", "repeats": args.repeats,
             "warmup": args.warmup, "threads": thread_counts, "torch": torch.__version__,
             "transformers": transformers.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
             "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None}
    result = {"setup": setup, "max_abs_diff": checks, "results": rows,
              "times_s": {str(t): v for t, v in times.items()}, "profile_self_cpu_s": profiles}

    header = (f"MoE layer: {args.tokens} tokens, dim {args.dim}, hidden {args.hidden_dim}, {args.experts} experts, "
              f"top-{args.top_k}, fp32 CPU ({os.cpu_count()} cores), median of {args.repeats}")
    lines = [header, "", "| implementation | threads | median (s) | min (s) | max (s) | transformers / ours |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "-" if r["ratio_transformers_over_ours"] is None else f"{r['ratio_transformers_over_ours']:.2f}"
        lines.append(f"| {r['impl']} | {r['threads']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} "
                     f"| {ratio} |")
    lines += ["", "max |ours - transformers|: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()),
              "", f"ratio > 1: ours faster. torch {torch.__version__}, transformers {transformers.__version__}; "
              f"load average after the run "
              f"{', '.join(f'{v:.1f}' for v in setup['load_average_after'] or [])}"]
    if profiles:
        lines += ["", f"Self CPU time by operator, one forward, {thread_counts[0]} thread(s) (s):", ""]
        for name, breakdown in profiles.items():
            lines.append(f"- {name}: " + ", ".join(f"{op} {t:.3f}" for op, t in breakdown.items()))
    table = "\n".join(lines)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "moe_quick" if args.quick else "moe"                 # a quick run leaves the full results alone
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
