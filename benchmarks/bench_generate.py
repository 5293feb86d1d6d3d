"""Decode and prefill speed of ours against transformers (and llama.cpp, when installed) on the same SmolLM2-135M
weights, in one run; and, for bf16, how far each is from the exact answer.

    python benchmarks/bench_generate.py                       # fp32: ours (defaults), ours fast=False, transformers
    python benchmarks/bench_generate.py --dtype bf16
    python benchmarks/bench_generate.py --llama-cpp           # llama-cpp-python beside them (if installed)
    python benchmarks/bench_generate.py --runs 3 --update-readme
    python benchmarks/bench_generate.py --dtype Q4_0 --llama-cpp   # a Q4_0 file made by llama.cpp's own quantizer

The weights are the fetched SmolLM2 GGUF's, written once as an F32 or BF16 GGUF (mistral_tutorial.gguf_export), or
quantized from that F32 file by llama.cpp's own quantizer (llama_model_quantize: Q8_0, Q4_0, Q4_K_M; needs
llama-cpp-python), and every system loads that one file: ours with plain `mt.Transformer.from_pretrained(file)` (its own dtype, the decode
layout measured fastest on this CPU) and a plain `mt.generate`, transformers with `gguf_file=` and its `generate`,
llama.cpp with `llama_cpp.Llama(file)` and its own decoding loop (greedy, from its logits).

decode tokens/s = (N - 1) / (time(generate N) - time(generate 1)) on a chat prompt: the first new token costs a
prefill, the rest are decoding steps. prefill tokens/s = 512 / time(generate 1) on a 512-token prompt. The runs of
the systems alternate; each run reports the median of its repeats, and the range of the per-repeat ratios.
The bandwidth limit is this machine's measured read speed (a sum over 1 GB, the threads torch uses) over the bytes a
decoding step reads (every weight once: the tied embedding is the head). Not a test: nothing here asserts a speed.

llama.cpp is not a dependency of the project. `pip install llama-cpp-python` compiles it (about 6 minutes on 2
cores); on this project's machines the default build crashed on quantized types, and
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python runs them all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["Explain, step by step, how a sliding-window attention cache works in a language model.",
           "What is the capital of France?", "Write a haiku about the sea."]
GGUF_TYPE = {"fp32": "F32", "bf16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K_M"}
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}                     # llama.h's LLAMA_FTYPE_MOSTLY_*


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth(gigabytes: float = 1.0) -> float:
    """GB/s of a sum over a buffer far larger than the caches: the speed weights can stream at, at best."""
    buffer = torch.ones(int(gigabytes * 1e9 / 4))
    buffer.sum()
    return gigabytes / min(timed(buffer.sum) for _ in range(5))


def weights_file(dtype: str) -> Path:
    """The fetched SmolLM2 GGUF written again in F32 or BF16 (once), in the cache directory."""
    from mistral_tutorial.assets import cache_dir, require_default_model
    from mistral_tutorial.gguf_export import rewrite_gguf

    path = cache_dir() / "bench" / f"SmolLM2-135M-Instruct.{GGUF_TYPE[dtype]}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype not in LLAMA_FTYPES:
        return rewrite_gguf(require_default_model(), path, GGUF_TYPE[dtype])
    import llama_cpp  # llama.cpp's quantizer, from the F32 file

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[dtype], torch.get_num_threads()
    tmp = path.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(weights_file("fp32")).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {dtype}")
    tmp.rename(path)
    return path


def llama_cpp_runner(path: Path):
    """(greedy decoding with llama.cpp on `path`, or None if llama-cpp-python is not installed, and why)."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None, "llama-cpp-python is not installed (see this script's docstring)"
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
    n_vocab = llm.n_vocab()

    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        llm.reset()
        llm.eval(ids[0].tolist())
        out = []
        for i in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            if i + 1 < n:
                llm.eval([out[-1]])
        return torch.tensor([out])

    return run, f"llama-cpp-python {llama_cpp.__version__}"


def accuracy(ours, hf, exact, chats: list[torch.Tensor], steps: int = 32) -> dict:
    """Max-abs logit error and top-1 agreement of ours and transformers against the exact model over the prompts, and
    the max-abs logit error of `steps` decoding steps fed the exact model's own greedy tokens (ours through its
    cache, one token a step; transformers' logits at the same positions)."""
    import mistral_tutorial as mt

    report = {name: {"max_abs_error": 0.0, "top1": 0, "positions": 0, "decode_error": 0.0}
              for name in ("ours", "transformers")}
    largest = 0.0
    with torch.inference_mode():
        for ids in chats:
            reference = exact(ids)[0].float()
            largest = max(largest, reference.abs().max().item())
            for name, logits in (("ours", ours(ids)[0]), ("transformers", hf(ids).logits[0])):
                r = report[name]
                r["max_abs_error"] = max(r["max_abs_error"], (logits.float() - reference).abs().max().item())
                r["top1"] += int((logits.float().argmax(-1) == reference.argmax(-1)).sum())
                r["positions"] += reference.shape[0]
            seq = torch.cat([ids, mt.generate(exact, ids, max_new_tokens=steps, fast=False)], dim=1)
            later = exact(seq)[0, ids.shape[1]:].float()
            cache = ours.new_cache(1, seq.shape[1])
            ours(ids, cache=cache)
            stepped = torch.cat([ours(seq[:, t:t + 1], cache=cache)[0] for t in range(ids.shape[1], seq.shape[1])])
            for name, logits in (("ours", stepped), ("transformers", hf(seq).logits[0, ids.shape[1]:])):
                report[name]["decode_error"] = max(report[name]["decode_error"],
                                                   (logits.float() - later).abs().max().item())
    report["largest_logit"] = largest
    report["steps"] = steps
    return report


def greedy_verdict(exact, chat: torch.Tensor, exact_tokens: torch.Tensor, tokens: torch.Tensor) -> str:
    """'yes' if `tokens` (1, N) are the exact model's greedy tokens; else where they first part and by how much the
    exact answer's own top two logits differ there (a near-tie is the one place a divergence is acceptable)."""
    n = min(tokens.shape[1], exact_tokens.shape[1])
    differ = (tokens[0, :n] != exact_tokens[0, :n]).nonzero()
    if len(differ) == 0:
        return "yes" if tokens.shape[1] == exact_tokens.shape[1] else f"no: stopped after {tokens.shape[1]}"
    step = int(differ[0, 0])
    with torch.inference_mode():
        logits = exact(torch.cat([chat, exact_tokens[:, :step]], dim=1))[0, -1].float()   # (V,) the exact next logits
    top2 = logits.topk(2).values
    return f"no, from new token {step}, where the exact top two differ by {(top2[0] - top2[1]).item():.3g}"


def one_run(runners: dict, chat: torch.Tensor, long_prompt: torch.Tensor, args) -> dict:
    """Median tokens/s of each runner over args.repeats alternating repeats, and the per-repeat values."""
    times = {name: {"n": [], "one": [], "prefill": []} for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name]["one"].append(timed(lambda run=run: run(chat, 1)))
            times[name]["n"].append(timed(lambda run=run: run(chat, args.new_tokens)))
            times[name]["prefill"].append(timed(lambda run=run: run(long_prompt, 1)))
    result = {}
    for name, t in times.items():
        decode = [(args.new_tokens - 1) / (n - one) for n, one in zip(t["n"], t["one"])]
        prefill = [args.prefill_tokens / p for p in t["prefill"]]
        result[name] = {"decode": statistics.median(decode), "prefill": statistics.median(prefill),
                        "decode_each": decode, "prefill_each": prefill}
    return result


def ratio_text(runs: list[dict], a: str, b: str, kind: str) -> str:
    """'1.52×, 1.50× (range 1.44–1.58×)': the ratio of the runs' medians, and the range of the per-repeat ratios."""
    medians = [r[a][kind] / r[b][kind] for r in runs]
    each = [x / y for r in runs for x, y in zip(r[a][f"{kind}_each"], r[b][f"{kind}_each"])]
    return f"**{', '.join(f'{m:.2f}×' for m in medians)}** ({min(each):.2f}–{max(each):.2f}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1, help="whole measurements, one after the other")
    parser.add_argument("--dtype", choices=list(GGUF_TYPE), default="fp32",
                        help="the file's type: fp32, bf16, or a llama.cpp quantization (transformers dequantizes it)")
    parser.add_argument("--llama-cpp", action="store_true", help="add llama-cpp-python on the same file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table between the README markers")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import mistral_tutorial as mt
    from mistral_tutorial.decode_layout import current_layout
    from mistral_tutorial.native import cpu_name, cpu_signature

    transformers.logging.set_verbosity_error()
    path = weights_file(args.dtype)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)   # quantized: fp32 rest
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.generation_config.eos_token_id = None          # both generate exactly N tokens
    hf.config.eos_token_id = None
    ours = mt.Transformer.from_pretrained(path)                                              # the defaults
    plain = mt.Transformer.from_pretrained(path, fast=False)
    assert ours.dtype == dtype, (ours.dtype, dtype)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"] for p in PROMPTS]   # (1, T) each
    chat = chats[0]
    long_prompt = torch.randint(100, ours.config.vocab_size, (1, args.prefill_tokens),
                                generator=torch.Generator().manual_seed(0))

    def run_hf(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        return out[:, ids.shape[1]:]

    runners = {"ours": lambda ids, n: mt.generate(ours, ids, max_new_tokens=n),
               "ours, fast=False": lambda ids, n: mt.generate(plain, ids, max_new_tokens=n, fast=False),
               "transformers": run_hf}
    llama_note = None
    if args.llama_cpp:
        run_llama, llama_note = llama_cpp_runner(path)
        if run_llama is not None:
            runners["llama.cpp"] = run_llama
    tokens = {name: run(chat, args.new_tokens) for name, run in runners.items()}          # also warms up
    exact = mt.Transformer.from_pretrained(path, dtype=torch.float32, fast=False)        # the same weights in fp32
    exact_tokens = mt.generate(exact, chat, max_new_tokens=args.new_tokens, fast=False)
    accuracy_report = accuracy(ours, hf, exact, chats)
    verdicts = {name: greedy_verdict(exact, chat, exact_tokens, t) for name, t in tokens.items()}
    del exact
    bandwidth = read_bandwidth()
    held = {id(p): p for p in plain.parameters()} | {id(m.blocks): m.blocks for m in plain.modules() if hasattr(m, "qtype")}
    step_bytes = sum(t.numel() * t.element_size() for t in held.values())           # every weight, as held
    file_bytes = path.stat().st_size
    runs = [one_run(runners, chat, long_prompt, args) for _ in range(args.runs)]

    flags = sorted({f for f in cpu_signature().split(" | ")[-1].split() if f.startswith(("avx512f", "avx512_bf16",
                                                                                         "amx", "avx2", "avx512_vnni"))})
    names = list(runners)
    lines = [f"| SmolLM2-135M {args.dtype}, {torch.get_num_threads()} threads, {args.runs} run(s) | "
             + " | ".join(names) + " | ours / transformers | " + (" ours / llama.cpp |" if "llama.cpp" in names else "")
             + " ours / ours fast=False |", "|---|" + "---:|" * (len(names) + 2 + ("llama.cpp" in names))]
    for kind, label in (("decode", f"decode, tokens/s ({args.new_tokens} new)"),
                        ("prefill", f"prefill, tokens/s ({args.prefill_tokens}-token prompt)")):
        cells = [", ".join(f"{r[name][kind]:.1f}" if kind == "decode" else f"{r[name][kind]:.0f}" for r in runs)
                 for name in names]
        cells.append(ratio_text(runs, "ours", "transformers", kind))
        if "llama.cpp" in names:
            cells.append(ratio_text(runs, "ours", "llama.cpp", kind))
        cells.append(ratio_text(runs, "ours", "ours, fast=False", kind))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    limit = bandwidth * 1e9 / step_bytes
    fractions = ", ".join(f"{name} {statistics.median(r[name]['decode'] for r in runs) / limit:.0%}" for name in names)
    same = {name: bool(torch.equal(t, exact_tokens)) for name, t in tokens.items()}
    acc = accuracy_report
    lines += ["", f"CPU: {cpu_name()} ({' '.join(flags)}); torch {torch.__version__}, transformers "
                  f"{transformers.__version__}{', ' + llama_note if llama_note else ''}. Our layout: "
                  f"{current_layout(ours)}. Each run: the median of {args.repeats} alternating repeats "
                  f"(ratios: the runs' medians, and the range over every repeat).  ",
              f"Bandwidth limit: {bandwidth:.1f} GB/s read (a sum over 1 GB) over {step_bytes / 1e6:.0f} MB a step = "
              f"{limit:.0f} tokens/s; decode reaches {fractions} of it.  ",
              f"Against the exact answer (the same weights computed in fp32), over the {len(PROMPTS)} chat prompts' "
              f"{acc['ours']['positions']} positions (largest |logit| {acc['largest_logit']:.3g}): max-abs logit error "
              f"ours {acc['ours']['max_abs_error']:.3g}, transformers {acc['transformers']['max_abs_error']:.3g}; "
              f"top-1 agreement ours {acc['ours']['top1']}, transformers {acc['transformers']['top1']}; "
              f"{acc['steps']} decoding steps fed the exact answer's tokens: max-abs logit error ours "
              f"{acc['ours']['decode_error']:.3g}, transformers {acc['transformers']['decode_error']:.3g}.  ",
              f"Greedy tokens ({args.new_tokens}) equal to the exact answer's: "
              + "; ".join(f"{name} {verdicts[name]}" for name in same)
              + f". `python benchmarks/bench_generate.py --dtype {args.dtype}"
              + (" --llama-cpp" if args.llama_cpp else "") + (f" --runs {args.runs}" if args.runs > 1 else "") + "`"]
    table = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"generate-{args.dtype}.json").write_text(json.dumps(
        {"runs": runs, "tokens_equal_exact": same, "accuracy": acc, "bandwidth_gb_s": bandwidth,
         "step_bytes": step_bytes, "file_bytes": file_bytes, "cpu": cpu_signature(), "cpu_name": cpu_name(),
         "layout": current_layout(ours)}, indent=1) + "\n")
    (RESULTS / f"generate-{args.dtype}.md").write_text(table + "\n")
    print(table)
    if args.update_readme:
        from readme import update_readme

        update_readme(f"generate-{args.dtype}", table)


if __name__ == "__main__":
    main()
