"""Quantized GGUF files at real size, in their own bits: peak memory, load time, decode speed (against llama.cpp when
it is installed) and logits against the same file dequantized, computed one layer at a time.

    python scripts/quantized_size_check.py                     # Mistral-7B-v0.1's exact shapes, Q8_0 and Q4_0
    python scripts/quantized_size_check.py --types Q4_0 Q4_K   # other llama.cpp types (Q4_K: the head in Q6_K)
    python scripts/quantized_size_check.py --size small        # the same code on a ~100 MB model (what CI runs)
    python scripts/quantized_size_check.py --plan-only         # only Mixtral-8x7B's memory per type, on `meta`
    python scripts/quantized_size_check.py --files A.gguf ...  # the same measurements on given files (SmolLM2's)

1. Writes (once) a GGUF with the model's exact shapes, llama.cpp's metadata and the Mistral v0.1 tokenizer (so that
   llama.cpp loads it too), as llama.cpp's quantizer lays a file out (the norms F32, the head in Q6_K for a 4-bit
   file), with seeded random blocks (gguf_export.write_random_gguf): nothing ever holds an fp32 copy of the model.
2. In a fresh process each: ours (plain `from_pretrained(file)`, `generate`) and llama.cpp: peak RSS above the
   imports, load seconds, decode tokens/s on a 16-token prompt; ours also saves the prompt's logits.
3. A third process computes the prompt's logits with the dequantized weights, in fp32, one layer at a time (the 7B
   model in fp32 would not fit in 24 GB): ours must be within 1e-4 x max|logit| of it.
4. Prints Mixtral-8x7B's memory in each type from its preset (computed on `meta`, nothing allocated), and what fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

NEW_TOKENS = 16
PROMPT_IDS = [1, 415, 5565, 302, 4843, 349, 264, 1736, 302, 1983, 1237, 28725, 304, 272, 3454, 349]   # 16 ids
HEAD_TYPE = {"Q8_0": "Q8_0", "Q4_0": "Q6_K", "Q4_1": "Q6_K", "Q4_K": "Q6_K", "Q6_K": "Q6_K"}


def config_for(size: str):
    import mistral_tutorial as mt

    if size == "7b":
        return mt.presets.mistral_7b_v0_1()
    return mt.ModelConfig(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=1792,
                          sliding_window=4096)


def gguf_file(size: str, qtype: str) -> Path:
    """The random GGUF of `size` in `qtype`, written once into the cache."""
    from mistral_tutorial.assets import cache_dir
    from mistral_tutorial.gguf_export import write_random_gguf
    from mistral_tutorial.tokenizer import mistral_tokenizer_path

    path = cache_dir() / "bench" / f"mistral-{size}-{qtype}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_random_gguf(path, config_for(size), qtype, head_type=HEAD_TYPE[qtype], seed=0,
                          tokenizer_model=mistral_tokenizer_path())
    return path


def child(kind: str, path: Path, out: Path) -> None:
    """One loader in its own process (see the module docstring); prints its report as one JSON line."""
    import torch
    from bench_load import peak_rss_kib

    ids = torch.tensor([PROMPT_IDS])
    torch.nn.init.normal_(torch.empty(1, device="meta"))
    if kind == "llama.cpp":
        import llama_cpp
        import numpy as np
    else:
        import mistral_tutorial as mt
    Path("/proc/self/clear_refs").write_text("5")
    base = peak_rss_kib()
    start = time.perf_counter()
    report: dict = {"kind": kind}
    if kind == "reference":
        torch.save(reference_logits(path, ids), out)
    elif kind == "llama.cpp":
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)
        report["load_s"] = time.perf_counter() - start
        n_vocab, timings = llm.n_vocab(), []
        for n in (1, NEW_TOKENS):
            begin = time.perf_counter()
            llm.reset()
            llm.eval(PROMPT_IDS)
            for _ in range(n - 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
                llm.eval([int(logits.argmax())])
            timings.append(time.perf_counter() - begin)
        report["decode_tok_s"] = (NEW_TOKENS - 1) / (timings[1] - timings[0])
        torch.save(None, out)                                  # (run_child reads a file from every child)
    else:
        with torch.inference_mode():
            model = mt.Transformer.from_pretrained(path)                                    # the defaults
            report["load_s"] = time.perf_counter() - start
            logits = model(ids)[0].float()
            timings = []
            for n in (1, NEW_TOKENS):
                begin = time.perf_counter()
                mt.generate(model, ids, max_new_tokens=n)
                timings.append(time.perf_counter() - begin)
        report["decode_tok_s"] = (NEW_TOKENS - 1) / (timings[1] - timings[0])
        torch.save(logits.clone(), out)
    report["peak_bytes"] = (peak_rss_kib() - base) * 1024
    print(json.dumps(report))


def reference_logits(path: Path, ids):
    """The prompt's logits with every weight dequantized to fp32, one layer widened at a time (no cache)."""
    import copy

    import torch
    import torch.nn.functional as F

    import mistral_tutorial as mt
    from mistral_tutorial.masks import sequence_attention
    from mistral_tutorial.quantized import QuantLinear, unpack

    def widened(module):
        wide = copy.copy(module)                                # a shallow copy: the blocks stay shared
        wide._modules = dict(module._modules)
        for name, sub in module._modules.items():
            if isinstance(sub, QuantLinear):
                linear = torch.nn.Linear(sub.in_features, sub.out_features, bias=False, device="meta")
                linear.weight = torch.nn.Parameter(unpack(sub.blocks, sub.qtype, sub.in_features), requires_grad=False)
                wide._modules[name] = linear
            elif sub._modules:
                wide._modules[name] = widened(sub)
        return wide

    with torch.inference_mode():
        model = mt.Transformer.from_pretrained(path, fast=False)
        seq_len = ids.shape[1]
        attend = sequence_attention(seq_len, model.config.sliding_window)
        cos, sin = model.rotary(torch.arange(seq_len)[None], dtype=torch.float32)
        x = model.tok_embeddings(ids)                                                  # exactly unpacked rows
        for layer in model.layers:
            x = widened(layer)(x, cos, sin, attend.mask, None, attend.is_causal)
        head = unpack(model.output.blocks, model.output.qtype, model.output.in_features)
        return F.linear(model.norm(x), head)[0]


def mixtral_memory() -> list[str]:
    """Mixtral-8x7B-v0.1's weights in each type, as llama.cpp lays the file out (computed from the preset)."""
    from mistral_tutorial import presets
    from mistral_tutorial.gguf_export import gguf_bytes

    config = presets.mixtral_8x7b_v0_1()
    lines = ["| Mixtral-8x7B-v0.1 | weights | fits 16 GB | 24 GB | 32 GB |", "|---|---:|:-:|:-:|:-:|"]
    for qtype in ("Q4_0", "Q4_K", "Q8_0"):
        n = gguf_bytes(config, qtype, HEAD_TYPE[qtype]) / 1e9
        lines.append(f"| {qtype} (head {HEAD_TYPE[qtype]}) | {n:.1f} GB | "
                     + " | ".join("yes" if n + 2 < limit else "no" for limit in (16, 24, 32)) + " |")
    return lines + ["(computed from the preset with `gguf_export.gguf_bytes`; 'fits' leaves 2 GB for the system, the "
                    "cache and Python.)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["7b", "small"], default="7b")
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0"], choices=sorted(HEAD_TYPE))
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--files", nargs="+", type=Path, help="measure these GGUF files instead of random ones")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args.child, args.folder, args.out)
        return
    from bench_load import run_child

    lines = []
    if not args.plan_only:
        try:
            import llama_cpp  # noqa: F401
            kinds = ["ours", "llama.cpp", "reference"]
        except ImportError:
            kinds = ["ours", "reference"]
        from mistral_tutorial.native import cpu_name

        title = "GGUF file" if args.files else f"Mistral-7B-v0.1 shapes ({args.size}), random weights"
        lines = [f"| {title} | file | peak RSS above imports | / file | "
                 f"load (s) | decode (tokens/s) | llama.cpp: peak, load, decode | ours / llama.cpp | logits: max-abs "
                 f"error / max abs logit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for qtype, path in ([(p.name, p) for p in args.files] if args.files else
                            [(t, gguf_file(args.size, t)) for t in args.types]):
            results = {kind: run_child(__file__, kind, path) for kind in kinds}
            ours, ours_logits = results["ours"]
            reference = results["reference"][1]
            error = ((ours_logits - reference).abs().max() / reference.abs().max()).item()
            size = path.stat().st_size
            theirs = results.get("llama.cpp", (None,))[0]
            llama = (f"{theirs['peak_bytes'] / 1e9:.2f} GB, {theirs['load_s']:.1f} s, {theirs['decode_tok_s']:.2f}"
                     if theirs else "not installed")
            ratio = f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}×" if theirs else "–"
            label = qtype if args.files else f"{qtype} (head {HEAD_TYPE[qtype]})"
            lines.append(f"| {label} | {size / 1e9:.2f} GB | {ours['peak_bytes'] / 1e9:.2f} GB | "
                         f"{ours['peak_bytes'] / size:.2f}× | {ours['load_s']:.1f} | {ours['decode_tok_s']:.2f} | "
                         f"{llama} | {ratio} | {error:.1e} |")
            print(lines[-1], flush=True)
        lines += ["", f"CPU: {cpu_name()}; each loader in a fresh process, one after the other; decode = (N - 1) / "
                      f"(t(N) - t(1)) for N = {NEW_TOKENS}. `python scripts/quantized_size_check.py`"]
    lines += ["", *mixtral_memory()]
    print("\n".join(lines))
    if args.update_readme:
        from readme import update_readme

        update_readme(f"quantized-size-{args.size}", "\n".join(lines))


if __name__ == "__main__":
    main()
