"""Mistral 7B at real size on a 24 GB, 2-core CPU: ours against transformers on the same hub-layout files.

    python scripts/real_size_check.py                 # Mistral-7B-v0.1's exact shapes: 14.5 GB bf16, 2 shards
    python scripts/real_size_check.py --size small    # the same code on a ~120 MB model (what CI runs)
    python scripts/real_size_check.py --plan-only     # only the Mixtral-8x7B loading plan, on the meta device

1. Writes (once) a checkpoint in exactly the hub layout of Mistral-7B-v0.1: its published config.json, bf16
   safetensors shards and model.safetensors.index.json, with seeded random weights (benchmarks/bench_load.py's).
2. In a fresh process each, one after the other (so each has the machine's memory to itself): loads it in bf16 with
   ours (the defaults) and with transformers, takes the logits of a 16-token prompt, and generates 16 greedy
   tokens. Reports peak RSS above the imports, load seconds, decode tokens/s, and each as a fraction of the
   memory-bandwidth limit (--bandwidth GB/s over the bytes one decode step reads).
3. Judges both against the exact answer: the same bf16 weights computed in fp32 (a third process; the fp32 model
   would not fit in 24 GB, so each layer is widened to fp32 in turn, then dropped): the prompt logits' max-abs error,
   top-1 agreement at every prompt position, and the greedy tokens, where a divergence from the reference counts as
   legitimate only at a near-tie of the reference's own top-2 logits: closer than twice the error that loader's
   prompt logits showed (its round-off could flip them).
4. Prints the Mixtral-8x7B loading plan from its preset on the meta device: where each tensor goes, nothing read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NEW_TOKENS = 16
PROMPT_IDS = [1, 415, 5565, 302, 4843, 349, 264, 1736, 302, 1983, 1237, 28725, 304, 272, 3454, 349]   # 16 ids


def exact_logits(model, ids, cache=None):
    """Logits (B, T, vocab) of a plain bf16 Transformer computed in fp32, one layer widened at a time; with `cache`
    (an fp32 KVCache of the model's shapes) the next chunk of a sequence, as Transformer.forward does."""
    import copy

    import torch
    import torch.nn.functional as F

    from mistral_tutorial.masks import sequence_attention

    seq_len = ids.shape[1]
    if cache is None:
        attend, positions = sequence_attention(seq_len, model.config.sliding_window), torch.arange(seq_len)[None]
    else:
        positions, attend = cache.positions(seq_len), cache.begin(seq_len)
    mask, is_causal = (None, True) if attend.is_causal else (attend.mask, False)
    cos, sin = model.rotary(positions, dtype=torch.float32)
    x = model.tok_embeddings(ids).float()                                          # (B, T, dim), exact widening
    for layer in model.layers:
        wide = copy.deepcopy(layer).float()                                        # this layer's weights in fp32
        x = wide(x, cos, sin, mask, cache, is_causal)
        del wide
    if cache is not None:
        cache.commit()
    return F.linear(copy.deepcopy(model.norm).float()(x), model.output.weight.float())


def reference(folder: Path, out: Path) -> None:
    """The exact answer in its own process: prompt logits and NEW_TOKENS greedy tokens (on an fp32 cache), with the
    top-2 gap of every greedy step."""
    import torch

    import mistral_tutorial as mt

    ids = torch.tensor([PROMPT_IDS])
    with torch.inference_mode():
        model = mt.Transformer.from_pretrained(folder, dtype=torch.bfloat16, fast=False)
        c = model.config
        cache = mt.KVCache(c.n_layers, 1, c.n_kv_heads, c.head_dim, c.sliding_window, len(PROMPT_IDS) + NEW_TOKENS)
        logits = exact_logits(model, ids, cache)[0]
        last, tokens, gaps = logits[-1], [], []
        for _ in range(NEW_TOKENS):
            top2 = last.topk(2).values
            tokens.append(int(last.argmax()))
            gaps.append(float(top2[0] - top2[1]))
            last = exact_logits(model, torch.tensor([[tokens[-1]]]), cache)[0, -1]
    torch.save({"logits": logits.clone(), "tokens": torch.tensor(tokens), "gaps": torch.tensor(gaps)}, out)
    print(json.dumps({"kind": "reference"}))


def child(kind: str, folder: Path, out: Path) -> None:
    """One loader in its own process: load in bf16, prompt logits, 16 greedy tokens."""
    if kind == "reference":
        reference(folder, out)
        return
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from bench_load import peak_rss_kib

    import mistral_tutorial as mt

    transformers.logging.set_verbosity_error()
    ids = torch.tensor([PROMPT_IDS])
    torch.nn.init.normal_(torch.empty(1, device="meta"))        # torch's one-time meta-device set-up, for both
    Path("/proc/self/clear_refs").write_text("5")
    base = peak_rss_kib()
    start = time.perf_counter()
    with torch.inference_mode():
        if kind == "transformers":
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        else:
            model = mt.Transformer.from_pretrained(folder)                     # the defaults: bf16, as the file
        load_s = time.perf_counter() - start
        logits = (model(ids).logits if kind == "transformers" else model(ids))[0].float()
        timings = []
        for n in (1, NEW_TOKENS):                                  # decode rate = (N - 1) / (t(N) - t(1))
            begin = time.perf_counter()
            if kind == "transformers":
                tokens = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
            else:
                tokens = mt.generate(model, ids, max_new_tokens=n)[0]
            timings.append(time.perf_counter() - begin)
    torch.save({"logits": logits.clone(), "tokens": tokens.clone()}, out)
    config = mt.ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        n_params = mt.Transformer(config).num_parameters()
    # a decode step reads every weight once, but of an untied embedding only one row
    step_bytes = (n_params - (0 if config.tie_embeddings else config.vocab_size * config.dim)) * 2
    print(json.dumps({"kind": kind, "peak_bytes": (peak_rss_kib() - base) * 1024, "load_s": load_s,
                      "decode_tok_s": (NEW_TOKENS - 1) / (timings[1] - timings[0]), "step_bytes": step_bytes}))


def greedy_verdict(tokens, exact: dict, tie: float) -> str:
    """'yes', or where the tokens leave the reference's and whether that is a near-tie of the reference's top-2."""
    differ = (tokens != exact["tokens"]).nonzero()
    if differ.numel() == 0:
        return "yes"
    step = int(differ[0])
    gap = float(exact["gaps"][step])
    return f"no: from step {step}, {'a near-tie' if gap < tie else 'NOT a near-tie'} (reference top-2 gap {gap:.2g})"


def cpu_name() -> str:
    from mistral_tutorial.native import cpu_name as name

    return name()


def mixtral_plan() -> None:
    """The loading plan of Mixtral-8x7B-v0.1 from its preset, on the meta device: nothing is read or allocated."""
    from mistral_tutorial import presets
    from mistral_tutorial.loading import loading_plan

    rows = loading_plan(presets.mixtral_8x7b_v0_1(), dtype_bytes=2)
    print("\nMixtral-8x7B-v0.1, bf16, hub layout: where each tensor goes (fast layout, on the meta device)\n")
    print("| hub tensor (layer 0, and totals over all layers) | shape | MB | goes to |")
    print("|---|---|---:|---|")
    for name, shape, n_bytes, where in rows:
        if ".layers." not in name or (".layers.0." in name and (".experts." not in name or ".experts.0." in name)):
            print(f"| {name} | {tuple(shape)} | {n_bytes / 1e6:.1f} | {where} |")
    by_where: dict[str, list[int]] = {}
    for _, _, n_bytes, where in rows:
        kind = where.split(":")[0]
        by_where.setdefault(kind, [0, 0])
        by_where[kind][0] += 1
        by_where[kind][1] += n_bytes
    print()
    for kind, (count, n_bytes) in by_where.items():
        print(f"- {kind}: {count} tensors, {n_bytes / 1e9:.2f} GB")
    print(f"- total: {len(rows)} tensors, {sum(r[2] for r in rows) / 1e9:.2f} GB: needs that much RAM (or GPU memory) "
          f"for the weights alone; see the README's table for what fits where")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["7b", "small"], default="7b")
    parser.add_argument("--bandwidth", type=float, default=29.0, help="memory bandwidth, GB/s (this machine: ~29)")
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.out)
        return
    if not args.plan_only:
        from bench_load import checkpoint, checkpoint_bytes, run_child

        folder = checkpoint(args.size)
        n_bytes = checkpoint_bytes(folder)
        print(f"checkpoint: {folder} ({n_bytes / 1e9:.2f} GB bf16, {len(list(folder.glob('*.safetensors')))} "
              f"shards + index)\n")
        results = {kind: run_child(__file__, kind, folder) for kind in ("ours", "transformers", "reference")}
        exact = results.pop("reference")[1]
        lines = [f"| Mistral-7B-v0.1 shapes, bf16, {n_bytes / 1e9:.2f} GB | peak RSS above imports (GB) | / checkpoint | "
                 f"load (s) | decode (tokens/s) | of the bandwidth limit | prompt logits: max-abs error | top-1 = exact "
                 f"| {NEW_TOKENS} greedy tokens = exact |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        errors = {}
        for kind, (report, got) in results.items():
            limit = args.bandwidth * 1e9 / report["step_bytes"]
            errors[kind] = (got["logits"] - exact["logits"]).abs().max().item()
            top1 = int((got["logits"].argmax(-1) == exact["logits"].argmax(-1)).sum())
            lines.append(f"| {kind} | {report['peak_bytes'] / 1e9:.2f} | {report['peak_bytes'] / n_bytes:.2f}× | "
                         f"{report['load_s']:.1f} | {report['decode_tok_s']:.2f} | {report['decode_tok_s'] / limit:.0%} | "
                         f"{errors[kind]:.3g} | {top1}/{len(PROMPT_IDS)} | {greedy_verdict(got['tokens'], exact, 2 * errors[kind])} |")
        ratio = results["ours"][0]["decode_tok_s"] / results["transformers"][0]["decode_tok_s"]
        lines += ["", f"exact answer: the same bf16 weights computed in fp32 (largest |logit| "
                      f"{exact['logits'].abs().max().item():.3g}); ours no farther from it than transformers: "
                      f"{errors['ours'] <= errors['transformers']}  ",
                  f"decode, ours / transformers: {ratio:.2f}×; CPU: {cpu_name()}  ",
                  f"bandwidth limit: {args.bandwidth:g} GB/s over the {results['ours'][0]['step_bytes'] / 1e9:.1f} GB a "
                  f"decode step reads. `python scripts/real_size_check.py`"]
        print("\n".join(lines))
        if args.update_readme:
            from readme import update_readme

            update_readme("real-size", "\n".join(lines))
    mixtral_plan()


if __name__ == "__main__":
    main()
