"""What quantizing on load costs in quality, on real weights (SmolLM2-135M-Instruct), against the float model.

    python benchmarks/quant_quality.py                  # perplexity, top-1 and greedy agreement, bytes
    python benchmarks/quant_quality.py --update-readme

The float model is the fetched GGUF dequantized to fp32 (written once as an F32 GGUF, bench_generate.py's file); each
candidate is `mt.Transformer.from_pretrained(that file, quantize=...)` (quantized_load.py), plus the fetched file's
own Q4_1 bits. Measured on the fixed text of mistral_tutorial.evaluation (pydoc's prose, built here):
perplexity, and the fraction of positions whose most likely next token is the float model's; and on three chat
prompts, how many of the float model's first 48 greedy tokens each reproduces. SmolLM2's only offline weights are
themselves Q4_1, so the float model is a dequantized Q4_1 and re-quantizing it to Q4_1 on the same groups of 32
reproduces most of its grid: that row understates what Q4_1 costs on weights that were never quantized.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]
SCHEMES = ["Q8_0", "Q4_1", "Q4_0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the fixed text")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from bench_generate import weights_file

    import mistral_tutorial as mt
    from mistral_tutorial.assets import require_default_model
    from mistral_tutorial.evaluation import fixed_text, greedy_agreement, perplexity, top1_agreement
    from mistral_tutorial.quantized_moe import quantized_weights

    transformers.logging.set_verbosity_error()
    source, f32 = require_default_model(), weights_file("fp32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    ids = torch.tensor(tokenizer(fixed_text(args.tokens * 6))["input_ids"][:args.tokens])
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"] for p in PROMPTS]
    reference = mt.Transformer.from_pretrained(f32, fast=False)                                # fp32
    models = {"fp32 (the reference)": reference, "the file's own Q4_1": mt.Transformer.from_pretrained(source)}
    models |= {f"quantize={s!r}": mt.Transformer.from_pretrained(f32, quantize=s) for s in SCHEMES}

    def weight_bytes(model) -> int:
        held = {id(p): p for p in model.parameters() if p.dim() > 1}
        held |= {id(m.blocks): m.blocks for m in model.modules() if hasattr(m, "qtype")}
        return sum(t.numel() * t.element_size() for t in held.values())

    rows, result = [], {}
    for name, model in models.items():
        weights = reference.num_parameters() - sum(p.numel() for p in model.parameters() if p.dim() == 1)
        entry = {"perplexity": perplexity(model, ids), "top1": top1_agreement(model, reference, ids),
                 "greedy": [greedy_agreement(model, reference, c, 48) for c in chats],
                 "bits_per_weight": 8 * weight_bytes(model) / weights,
                 "quantized_weights": quantized_weights(list(model.modules()))}
        result[name] = entry
        rows.append(f"| {name} | {entry['bits_per_weight']:.2f} | {entry['perplexity']:.3f} | {entry['top1']:.1%} | "
                    f"{', '.join(str(g) for g in entry['greedy'])} of 48 |")
        print(rows[-1], flush=True)
    table = "\n".join([f"| SmolLM2-135M-Instruct | bits a weight (matrices) | perplexity ({ids.numel()} tokens of "
                       f"pydoc prose) | top-1 = fp32 | greedy tokens = fp32 (3 chat prompts) |",
                       "|---|---:|---:|---:|---:|", *rows, "",
                       "int8 = Q8_0 (groups of 32, fp16 scale); int4 = Q4_1 (groups of 32, fp16 scale and minimum), "
                       "the embedding and head in Q8_0. `python benchmarks/quant_quality.py`"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant-quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "quant-quality.md").write_text(table + "\n")
    print(table)
    if args.update_readme:
        from readme import update_readme

        update_readme("quant-quality", table)


if __name__ == "__main__":
    main()
