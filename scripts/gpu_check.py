"""One-GPU check at the real shapes: Mistral-7B-v0.1 and Mixtral-8x7B-v0.1 with random bf16 weights, ours against
transformers on the very same tensors (one copy of the weights), plus decode speed.

    python scripts/gpu_check.py            # on a GPU (an H200 holds both; about 3-5 minutes)
    python scripts/gpu_check.py --tiny     # the whole script on the CPU in fp32 with tiny configs (< 1 minute)

For each preset:

1. transformers' *ForCausalLM is built on the meta device in bf16 and allocated uninitialised on the GPU (`to_empty`),
   then filled there with a seeded init: every matrix normal(0, 0.02), every RMSNorm weight 1. Nothing is initialised
   on the CPU, and nothing in fp32 (Mixtral in fp32 would need 187 GB).
2. Our `mt.Transformer` is built on the meta device and its parameters become *views* of transformers' tensors:
   `loading.hf_to_ours` renames them and splits the fused Mixtral experts (our w1 = gate_up_proj[:, :I], w3 =
   gate_up_proj[:, I:], w2 = down_proj, all views), and `load_state_dict(assign=True)` installs them. One copy of the
   weights: 14.5 GB for Mistral 7B, 93 GB for Mixtral 8x7B (two would not fit an H200). `loading.to_hf` and
   `loading.from_hf` both copy (checked below on a tiny model), so they are not used for the big models.
3. Logits on a random 512-token prompt, no cache. bf16 tolerance: bf16 keeps 8 significant bits (relative rounding
   2^-9); two correct implementations that round in different places drift apart through 32 layers, and in Mixtral a
   router near-tie can send a token to another expert. Random weights make it worse: their logits are flat (the top-2
   gap of 32000 random logits is a few % of the largest, a few bf16 steps), so exact bf16 ties are common, and two
   implementations that differ in the last bit break them differently. A top-1 disagreement is a *near-tie* when
   transformers' top-2 gap there is at most twice the largest |ours - transformers| at that position. We require
       max |ours - transformers| <= 5 % of max |logit|   and   top-1 agreement, near-ties excused, >= 99 %
   of the positions, and report the raw top-1 agreement too. In fp32 (--tiny) the logit tolerance is 1e-4 relative.
4. Greedy decoding, 64 new tokens, ours (`mt.generate`, KV cache) against transformers' `generate(do_sample=False)`
   (no end token: all 64 compared). The first divergence, if any, is reported with transformers' top-2 gap there and
   whether it is a near-tie (same rule); in bf16 a divergence at a near-tie is expected now and then and not a bug.
5. Decode tokens/s, batch 1: (N - 1) / (time(generate N) - time(generate 1)) with N = 128 on a 32-token prompt, after a
   warm-up, `torch.cuda.synchronize()` around every timing, best of `--repeats`; prefill tokens/s =
   512 / time(generate 1) on the 512-token prompt.

Mixtral runs only if `torch.cuda.mem_get_info()` shows room for its weights plus a margin (skipped with a message
otherwise). Prints a markdown table and writes `$OUT/gpu_check.json` if $OUT is set, else
`benchmarks/results/gpu_check.json` (`gpu_check_tiny_<dtype>.json` with --tiny), after each model, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                # run from a checkout without installing

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial.loading import from_hf, hf_to_ours, to_hf  # noqa: E402

INIT_STD = 0.02
LOGIT_REL_TOL = {torch.bfloat16: 0.05, torch.float32: 1e-4}   # max |diff| / max |logit|
TOP1_MIN = 0.99                                               # top-1 agreement over the prompt's positions
MEMORY_MARGIN = 8 * 2**30                                     # activations, KV cache, logits, allocator slack


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tiny_configs() -> dict[str, mt.ModelConfig]:
    """Tiny stand-ins with every feature of the presets (GQA; a window shorter than the prompt; 4 experts, top-2)."""
    common = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                  max_position_embeddings=1024)
    return {"mistral-7b-v0.1 (tiny)": mt.ModelConfig(**common, sliding_window=32),
            "mixtral-8x7b-v0.1 (tiny)": mt.ModelConfig(**common, sliding_window=None, n_experts=4,
                                                         experts_per_token=2, rope_theta=1e6)}


def real_configs() -> dict[str, mt.ModelConfig]:
    return {"mistral-7b-v0.1": mt.presets.mistral_7b_v0_1(), "mixtral-8x7b-v0.1": mt.presets.mixtral_8x7b_v0_1()}


def parameter_count(config: mt.ModelConfig) -> int:
    with torch.device("meta"):
        return mt.Transformer(config).num_parameters()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------------
# Building: transformers owns the tensors, ours are views of them
def build_hf_random(config: mt.ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A transformers Mistral/Mixtral with seeded random weights, allocated and initialised on `device` in `dtype`."""
    import transformers

    hf_config = config.to_hf(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    hf_config._attn_implementation = "sdpa"
    classes = {"mistral": transformers.MistralForCausalLM, "mixtral": transformers.MixtralForCausalLM}
    with torch.device("meta"), default_dtype(dtype):
        hf = classes[hf_config.model_type](hf_config)                       # shapes only, in dtype
    hf = hf.to_empty(device=device)                                         # uninitialised storage, no fp32 detour
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.fill_(1.0)                                            # RMSNorm weights
            else:
                param.normal_(0.0, INIT_STD, generator=generator)           # embeddings, projections, experts, router
    # non-persistent buffers (the rotary inv_freq) were left uninitialised by to_empty: build the module again
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=hf_config).to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def ours_sharing(hf: Any, config: mt.ModelConfig) -> mt.Transformer:
    """Our Transformer whose parameters are views of `hf`'s tensors (no copy): renamed, fused experts split."""
    with torch.device("meta"):
        model = mt.Transformer(config)
    state = hf_to_ours(hf.state_dict(), config)                             # aliases; experts: gate_up.chunk(2, 1)
    if config.tie_embeddings:
        state.pop("output.weight", None)
    model.load_state_dict(state, strict=True, assign=True)                  # parameters := those tensors
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def converters_copy() -> dict[str, bool]:
    """Whether loading.to_hf and loading.from_hf copy the weights (checked on a tiny CPU model)."""
    torch.manual_seed(0)
    tiny = mt.Transformer(mt.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                         sliding_window=8, max_position_embeddings=64)).eval()
    hf = to_hf(tiny)
    back = from_hf(hf)
    return {"to_hf copies": not (storages(tiny) & storages(hf)), "from_hf copies": not (storages(hf) & storages(back))}


# ---------------------------------------------------------------------------------------------------------------------
# Checks
@torch.inference_mode()
def compare_logits(ours: mt.Transformer, hf: Any, prompt: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Logits of the whole prompt, no cache: max |diff| relative to the logit scale, top-1 agreement, near-ties."""
    routing_hf: list[torch.Tensor] = []
    handles = []
    if ours.config.is_moe:                                                  # transformers' chosen experts, per layer
        handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: routing_hf.append(out[2]))
                   for layer in hf.model.layers]
    try:
        theirs = hf(prompt, use_cache=False).logits[0].float()              # (T, V)
    finally:
        for handle in handles:
            handle.remove()
    mine = ours(prompt)[0].float()                                          # (T, V)
    diff = (mine - theirs).abs()                                            # (T, V)
    scale = theirs.abs().max().item()
    per_position = diff.max(dim=-1).values                                  # (T,)
    agree = mine.argmax(-1) == theirs.argmax(-1)                            # (T,)
    top2 = theirs.topk(2, dim=-1).values                                    # (T, 2)
    gap = top2[:, 0] - top2[:, 1]                                           # transformers' top-2 gap per position
    disagree = (~agree).nonzero().flatten()
    near_tie = gap <= 2 * per_position                                      # (T,) the order could flip
    near_ties = int(near_tie[disagree].sum())
    result = dict(positions=prompt.shape[1], max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
                  max_abs_logit=scale, rel_max_diff=diff.max().item() / scale,
                  top1_agreement=agree.float().mean().item(),
                  top1_disagreements=len(disagree), disagreements_at_near_ties=near_ties,
                  top1_agreement_near_ties_excused=(agree | near_tie).float().mean().item())
    if ours.config.is_moe:
        same = [(a.sort(-1).values == b.sort(-1).values).all(-1) for a, b in zip(ours.chosen_experts(), routing_hf)]
        result["routing_agreement"] = torch.cat(same).float().mean().item()  # (token, layer) pairs, same expert set
    tolerance = LOGIT_REL_TOL[dtype]
    result["passed"] = (result["rel_max_diff"] <= tolerance
                        and result["top1_agreement_near_ties_excused"] >= TOP1_MIN)
    return result


def hf_generate(hf: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return out[:, ids.shape[1]:]                                            # (1, n)


def ours_generate(ours: mt.Transformer, ids: torch.Tensor, n: int) -> torch.Tensor:
    return mt.generate(ours, ids, max_new_tokens=n)                         # (1, n)


@torch.inference_mode()
def compare_greedy(ours: mt.Transformer, hf: Any, prompt: torch.Tensor, n: int) -> dict[str, Any]:
    """Greedy tokens of both; at the first divergence, transformers' top-2 gap and whether it is a near-tie."""
    mine = ours_generate(ours, prompt, n)
    theirs = hf_generate(hf, prompt, n)
    result: dict[str, Any] = dict(new_tokens=n, identical=torch.equal(mine, theirs),
                                  equal_tokens=int((mine == theirs).sum()), first_divergence=None)
    if not result["identical"]:
        step = int((mine != theirs).nonzero()[0, 1])
        prefix = torch.cat([prompt, theirs[:, :step]], dim=1)               # the common history
        hf_logits = hf(prefix, use_cache=False).logits[0, -1].float()       # (V,)
        our_logits = ours(prefix)[0, -1].float()
        top2 = hf_logits.topk(2).values
        gap = (top2[0] - top2[1]).item()
        noise = (our_logits - hf_logits).abs().max().item()
        result.update(first_divergence=step, ours_token=int(mine[0, step]), hf_token=int(theirs[0, step]),
                      hf_top2_gap=gap, logit_diff_there=noise, near_tie=gap <= 2 * noise)
    return result


def decode_speed(ours: mt.Transformer, hf: Any, short: torch.Tensor, long: torch.Tensor, n: int, repeats: int,
                 device: torch.device) -> dict[str, float]:
    """Decode tokens/s = (n - 1) / (t(n) - t(1)) on `short`; prefill tokens/s = T / t(1) on `long`; best of repeats."""
    runners = {"ours": lambda ids, k: ours_generate(ours, ids, k),
               "transformers": lambda ids, k: hf_generate(hf, ids, k)}
    for run in runners.values():                                            # warm-up: kernels, allocator, caches
        run(short, 8)
        run(long, 1)
    result = {}
    for name, run in runners.items():
        one = min(timed(lambda run=run: run(short, 1), device)[1] for _ in range(repeats))
        full = min(timed(lambda run=run: run(short, n), device)[1] for _ in range(repeats))
        prefill = min(timed(lambda run=run: run(long, 1), device)[1] for _ in range(repeats))
        result[f"{name}_decode_tokens_per_s"] = (n - 1) / max(full - one, 1e-9)
        result[f"{name}_prefill_tokens_per_s"] = long.shape[1] / prefill
    result["decode_ratio_ours_over_transformers"] = (result["ours_decode_tokens_per_s"]
                                                     / result["transformers_decode_tokens_per_s"])
    return result


# ---------------------------------------------------------------------------------------------------------------------
def check_model(name: str, config: mt.ModelConfig, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    n_params = parameter_count(config)
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    result: dict[str, Any] = dict(model=name, parameters=n_params, weight_gib=weight_bytes / 2**30)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        result["gpu_free_gib_before"] = free / 2**30
        if free < weight_bytes + MEMORY_MARGIN:
            result["skipped"] = (f"needs {(weight_bytes + MEMORY_MARGIN) / 2**30:.0f} GiB (weights + margin), "
                                 f"{free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
            log(f"{name}: SKIPPED, {result['skipped']}")
            return result
    log(f"{name}: {billions(n_params)} parameters, {weight_bytes / 2**30:.1f} GiB in {dtype}; building on {device}")
    (hf, build_s) = timed(lambda: build_hf_random(config, device, dtype, args.seed), device)
    ours = ours_sharing(hf, config)
    shared = storages(ours) <= storages(hf)
    result.update(build_s=build_s, weights_shared=shared,
                  hf_experts_implementation=getattr(hf.config, "_experts_implementation", None))
    if device.type == "cuda":
        result["gpu_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    log(f"{name}: built in {build_s:.1f} s; our parameters are views of transformers' tensors (one copy): {shared}"
        + (f"; GPU memory allocated {result['gpu_allocated_gib']:.1f} GiB" if device.type == "cuda" else ""))

    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=generator).to(device)   # (1, 512)
    result["logits"] = compare_logits(ours, hf, prompt, dtype)
    lg = result["logits"]
    log(f"{name}: logits max |diff| {lg['max_abs_diff']:.4g} = {100 * lg['rel_max_diff']:.3g} % of max |logit| "
        f"{lg['max_abs_logit']:.3g}; top-1 agreement {100 * lg['top1_agreement']:.2f} % of {lg['positions']} positions "
        f"({lg['top1_disagreements']} disagreements, {lg['disagreements_at_near_ties']} at near-ties; "
        f"{100 * lg['top1_agreement_near_ties_excused']:.2f} % with near-ties excused)"
        + (f"; same experts for {100 * lg['routing_agreement']:.2f} % of (token, layer)" if "routing_agreement" in lg
           else "") + f" -> {'PASS' if lg['passed'] else 'FAIL'}")

    short = prompt[:, :args.short_prompt_len]                               # (1, 32)
    result["greedy"] = compare_greedy(ours, hf, short, args.greedy_tokens)
    gr = result["greedy"]
    if gr["identical"]:
        log(f"{name}: greedy {gr['new_tokens']} tokens identical")
    else:
        log(f"{name}: greedy tokens differ from new token {gr['first_divergence']} ({gr['equal_tokens']}/"
            f"{gr['new_tokens']} equal): transformers' top-2 gap there {gr['hf_top2_gap']:.4g}, |ours - transformers| "
            f"up to {gr['logit_diff_there']:.4g} -> {'a near-tie' if gr['near_tie'] else 'NOT a near-tie'}")

    result["speed"] = decode_speed(ours, hf, short, prompt, args.new_tokens, args.repeats, device)
    sp = result["speed"]
    log(f"{name}: decode tokens/s ours {sp['ours_decode_tokens_per_s']:.1f}, transformers "
        f"{sp['transformers_decode_tokens_per_s']:.1f}; prefill tokens/s ours {sp['ours_prefill_tokens_per_s']:.0f}, "
        f"transformers {sp['transformers_prefill_tokens_per_s']:.0f}")
    del ours, hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def markdown_table(results: list[dict[str, Any]], dtype: torch.dtype, device_name: str, new_tokens: int) -> str:
    lines = [f"| {device_name}, {str(dtype).removeprefix('torch.')}, batch 1 | parameters | one copy of the weights "
             f"| logits max \\|Δ\\| / max \\|logit\\| | top-1 agreement | greedy tokens identical "
             f"| decode tok/s ours | decode tok/s transformers | ours / transformers | check |",
             "|---|---:|:---:|---:|---:|---|---:|---:|---:|:---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {billions(r['parameters'])} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lg, gr, sp = r["logits"], r["greedy"], r["speed"]
        greedy = "yes" if gr["identical"] else (f"no: from token {gr['first_divergence']}, "
                                                f"{'near-tie' if gr['near_tie'] else 'NOT a near-tie'}")
        lines.append(
            f"| {r['model']} | {billions(r['parameters'])} | {'yes' if r['weights_shared'] else 'no'} "
            f"| {100 * lg['rel_max_diff']:.3g} % | {100 * lg['top1_agreement']:.1f} % "
            f"({lg['disagreements_at_near_ties']}/{lg['top1_disagreements']} misses at near-ties) "
            f"| {greedy} ({gr['new_tokens']}) | {sp['ours_decode_tokens_per_s']:.1f} "
            f"| {sp['transformers_decode_tokens_per_s']:.1f} | {sp['decode_ratio_ours_over_transformers']:.2f}× "
            f"| {'PASS' if lg['passed'] else 'FAIL'} |")
    lines.append("")
    lines.append(f"Tolerance ({str(dtype).removeprefix('torch.')}): max |Δ| ≤ {100 * LOGIT_REL_TOL[dtype]:g} % of "
                 f"max |logit| and top-1 agreement ≥ {100 * TOP1_MIN:g} % of the positions of a random prompt, "
                 f"misses "
                 f"at near-ties excused (transformers' top-2 gap ≤ 2 × the largest |Δ| at that position: random "
                 f"weights give flat logits, and bf16 ties are common). Decode "
                 f"tok/s = (N − 1) / (t(N) − t(1)), N = {new_tokens}, best of the repeats.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs, CPU, fp32: a quick test of this script")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on the GPU, float32 with --tiny (--tiny --dtype bfloat16 tests the bf16 "
                             "tolerances on the CPU)")
    parser.add_argument("--skip-mixtral", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=512, help="random prompt for the logits check")
    parser.add_argument("--short-prompt-len", type=int, default=32, help="prompt for greedy and decode timing")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128, help="N of the decode timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    if args.tiny:
        device, dtype, configs = torch.device("cpu"), torch.float32, tiny_configs()
        device_name = f"CPU ({torch.get_num_threads()} threads), tiny configs"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --tiny to test this script on the CPU", file=sys.stderr)
            return 2
        device, dtype, configs = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, real_configs()
        device_name = torch.cuda.get_device_name(device)
    if args.dtype != "auto":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.skip_mixtral:
        configs = {k: v for k, v in configs.items() if not v.is_moe}
    torch.manual_seed(args.seed)
    log(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}")

    copies = converters_copy()
    log(f"loading.to_hf copies the weights: {copies['to_hf copies']}; loading.from_hf copies: "
        f"{copies['from_hf copies']} -> built transformers first, ours as views of its tensors")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    dtype_name = str(dtype).removeprefix("torch.")
    out_file = out_dir / (f"gpu_check_tiny_{dtype_name}.json" if args.tiny else "gpu_check.json")
    report: dict[str, Any] = dict(
        device=device_name, dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), tiny=args.tiny, converters=copies,
        tolerance=dict(rel_max_diff=LOGIT_REL_TOL[dtype], top1_agreement_min=TOP1_MIN,
                       near_tie="transformers' top-2 gap <= 2 x max |ours - transformers| at that position"),
        settings=dict(prompt_len=args.prompt_len, short_prompt_len=args.short_prompt_len,
                      greedy_tokens=args.greedy_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                      seed=args.seed, init_std=INIT_STD),
        results=[])
    for name, config in configs.items():
        report["results"].append(check_model(name, config, args, device, dtype))
        report["elapsed_s"] = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(markdown_table(report["results"], dtype, device_name, args.new_tokens))
    print()
    log(f"wrote {out_file} ({time.perf_counter() - started:.0f} s in all)")
    ok = all(r.get("skipped") or r["logits"]["passed"] for r in report["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
