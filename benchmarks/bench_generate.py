"""Decode and prefill speed, ours against transformers' `generate`, on the same SmolLM2-135M weights, in one run.

    python benchmarks/bench_generate.py                 # fp32, 128 new tokens, 512-token prefill, 5 repeats
    python benchmarks/bench_generate.py --dtype bf16
    python benchmarks/bench_generate.py --update-readme # also rewrite the table in README.md

"ours" is what a user gets with no options: `mt.Transformer.from_pretrained(path)` (the fast layout is the default)
and a plain `mt.generate(model, ids, max_new_tokens=N)`. transformers loads the same GGUF file.

decode tokens/s = (N - 1) / (time(generate N) - time(generate 1)) on a short chat prompt: the first new token costs a
prefill, the rest are pure decode steps. prefill tokens/s = 512 / time(generate 1) on a 512-token prompt. Both systems
run greedily, fp32, on the same weights (transformers loads the GGUF, ours copies its weights); runs alternate, and
the median of the repeats is reported. The tokens of both are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "Explain, step by step, how a sliding-window attention cache works in a language model."


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table between the README markers")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import mistral_tutorial as mt
    from mistral_tutorial.assets import require_default_model

    transformers.logging.set_verbosity_error()
    path = require_default_model()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # both generate exactly N tokens: transformers neither stops at <|im_end|> nor suppresses it (as min_new_tokens does)
    hf.generation_config.eos_token_id = None
    hf.config.eos_token_id = None
    ours = mt.Transformer.from_pretrained(path, dtype=dtype)                             # the defaults
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         return_tensors="pt")["input_ids"]                # (1, T)
    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(100, ours.config.vocab_size, (1, args.prefill_tokens), generator=generator)

    def run_hf(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        return out[:, ids.shape[1]:]

    def run_ours(ids: torch.Tensor, n: int) -> torch.Tensor:
        return mt.generate(ours, ids, max_new_tokens=n)

    runners = {"ours": run_ours, "transformers": run_hf}
    same = torch.equal(run_ours(chat, args.new_tokens), run_hf(chat, args.new_tokens))   # also warms both up
    times: dict[str, dict[str, list[float]]] = {name: {"n": [], "one": [], "prefill": []} for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name]["one"].append(timed(lambda run=run: run(chat, 1)))
            times[name]["n"].append(timed(lambda run=run: run(chat, args.new_tokens)))
            times[name]["prefill"].append(timed(lambda run=run: run(long_prompt, 1)))

    result: dict = {"model": path.name, "dtype": args.dtype, "device": "cpu", "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "machine": platform.machine(), "prompt_tokens": chat.shape[1], "new_tokens": args.new_tokens,
                    "prefill_tokens": args.prefill_tokens, "repeats": args.repeats, "tokens_identical": same}
    for name in runners:
        t_n, t_one = statistics.median(times[name]["n"]), statistics.median(times[name]["one"])
        result[name] = {"decode_tokens_per_s": (args.new_tokens - 1) / (t_n - t_one),
                        "prefill_tokens_per_s": args.prefill_tokens / statistics.median(times[name]["prefill"]),
                        "raw_seconds": times[name]}
    def per_repeat(name: str, kind: str) -> list[float]:
        t = times[name]
        if kind == "decode":
            return [(args.new_tokens - 1) / (n - one) for n, one in zip(t["n"], t["one"])]
        return [args.prefill_tokens / p for p in t["prefill"]]

    for kind in ("decode", "prefill"):
        key = f"{kind}_tokens_per_s"
        result[f"{kind}_ratio"] = result["ours"][key] / result["transformers"][key]
        ratios = [a / b for a, b in zip(per_repeat("ours", kind), per_repeat("transformers", kind))]
        result[f"{kind}_ratio_range"] = [min(ratios), max(ratios)]

    table = "\n".join([
        f"| SmolLM2-135M {args.dtype}, CPU ({result['threads']} threads) | ours | transformers `generate` | "
        f"ours / transformers (median) | per-repeat range |",
        "|---|---:|---:|---:|---:|",
        f"| decode, tokens/s ({args.new_tokens} new tokens) | {result['ours']['decode_tokens_per_s']:.1f} | "
        f"{result['transformers']['decode_tokens_per_s']:.1f} | **{result['decode_ratio']:.2f}×** | "
        f"{result['decode_ratio_range'][0]:.2f}–{result['decode_ratio_range'][1]:.2f}× |",
        f"| prefill, tokens/s ({args.prefill_tokens}-token prompt) | {result['ours']['prefill_tokens_per_s']:.0f} | "
        f"{result['transformers']['prefill_tokens_per_s']:.0f} | **{result['prefill_ratio']:.2f}×** | "
        f"{result['prefill_ratio_range'][0]:.2f}–{result['prefill_ratio_range'][1]:.2f}× |",
        "",
        f"Greedy tokens identical: {'yes' if same else 'NO'}. torch {torch.__version__}, transformers "
        f"{transformers.__version__}, median of {args.repeats} alternating runs "
        f"(`python benchmarks/bench_generate.py`).",
    ])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"generate-{args.dtype}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"generate-{args.dtype}.md").write_text(table + "\n")
    print(table)
    if args.update_readme:
        from readme import update_readme

        update_readme(f"generate-{args.dtype}", table)

if __name__ == "__main__":
    main()
