"""Peak memory and seconds to load a hub-layout checkpoint and run one forward pass: ours against transformers.

    python benchmarks/bench_load.py                    # a 1B Mistral-shaped bf16 checkpoint, 5 shards + index
    python benchmarks/bench_load.py --size small       # ~120 MB, 2 shards (what the CI test holds to the ratio)
    python benchmarks/bench_load.py --size 7b          # exactly Mistral-7B-v0.1's shapes: 14.5 GB, 2 shards

The checkpoint is generated once (seeded random bf16 weights, `mistral_tutorial.export.write_random_checkpoint`) into
$MISTRAL_TUTORIAL_CACHE/bench (default ~/.cache/mistral-tutorial/bench). Each loader runs in a fresh subprocess, one
after the other: it imports its libraries, resets the kernel's peak-RSS counter (/proc/self/clear_refs), loads the
checkpoint in its own dtype (bf16), runs one forward pass on a 16-token prompt, and reports the peak resident memory
(VmHWM, file-backed pages of memory-mapped weights included) above what the imports and torch's one-time meta-device
set-up (which both loaders use to build the model empty) had taken, and the seconds.
The last-position logits of all runs are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {   # name: (config.json fields over Mistral-7B-v0.1's, shard bytes)
    "small": (dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000), 70 * 10**6),
    "1b": (dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4), 450 * 10**6),
    "7b": ({}, 10 * 10**9),
}
KINDS = {"ours": "mistral_tutorial, fast layout (default)", "ours-plain": "mistral_tutorial, fast=False",
         "transformers": "transformers AutoModelForCausalLM",
         "ours-fp32": "mistral_tutorial into fp32 (twice the bytes)"}


def checkpoint(size: str) -> Path:
    """The benchmark checkpoint of this size, written once."""
    from mistral_tutorial.assets import cache_dir
    from mistral_tutorial.export import MISTRAL_7B_V0_1_CONFIG, write_random_checkpoint

    fields, shard_bytes = SIZES[size]
    folder = cache_dir() / "bench" / f"mistral-{size}-bf16-shards-of-{shard_bytes // 10**6}MB"
    if not (folder / "config.json").is_file():
        write_random_checkpoint(folder.with_suffix(".tmp"), {**MISTRAL_7B_V0_1_CONFIG, **fields},
                                shard_bytes=shard_bytes)
        folder.with_suffix(".tmp").rename(folder)
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def peak_rss_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def child(kind: str, folder: Path, logits_out: Path) -> dict:
    """Runs in its own process: load, one forward, report peak RSS above the imports and seconds."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    import mistral_tutorial as mt

    transformers.logging.set_verbosity_error()
    ids = torch.arange(1, 17)[None]
    torch.nn.init.normal_(torch.empty(1, device="meta"))        # torch's one-time meta-device set-up (~70 MB of
    Path("/proc/self/clear_refs").write_text("5")               # Python modules), then reset VmHWM to the RSS now
    base = peak_rss_kib()
    start = time.perf_counter()
    with torch.inference_mode():
        if kind == "transformers":
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
            load_s = time.perf_counter() - start
            logits = model(ids).logits[0, -1]
        else:
            dtype = torch.float32 if kind == "ours-fp32" else "auto"
            model = mt.Transformer.from_pretrained(folder, dtype=dtype, fast=kind != "ours-plain")
            load_s = time.perf_counter() - start
            logits = model(ids)[0, -1]
    total_s = time.perf_counter() - start
    torch.save(logits.float().clone(), logits_out)
    return {"kind": kind, "peak_bytes": (peak_rss_kib() - base) * 1024, "load_s": load_s, "total_s": total_s}


def run_child(script: str | Path, kind: str, folder: Path) -> tuple[dict, Any]:
    """Run `script --child kind --folder folder --out FILE` in a fresh interpreter: its last stdout line (JSON) and
    what it saved to FILE with torch.save."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        done = subprocess.run([sys.executable, str(script), "--child", kind, "--folder", str(folder), "--out", str(out)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)


def measure(kind: str, folder: Path) -> tuple[dict, Any]:
    """`child` in a fresh interpreter: its report and its last-position logits."""
    return run_child(__file__, kind, folder)


def main() -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["ours", "ours-plain", "transformers"])
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.out)))
        return

    folder = checkpoint(args.size)
    n_bytes = checkpoint_bytes(folder)
    shards = len(list(folder.glob("*.safetensors")))
    lines = [f"| {args.size} Mistral-shaped, bf16, {n_bytes / 1e9:.2f} GB in {shards} shard(s) + index | peak RSS above "
             f"imports (GB) | / checkpoint bytes | load (s) | load + forward (s) |", "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    logits = {}
    for kind in args.kinds:
        report, logits[kind] = measure(kind, folder)
        lines.append(f"| {KINDS[kind]} | {report['peak_bytes'] / 1e9:.2f} | {report['peak_bytes'] / n_bytes:.2f}× | "
                     f"{report['load_s']:.1f} | {report['total_s']:.1f} |")
        print(lines[-1], flush=True)
    if "transformers" in logits:
        lines.append("")
        for kind, value in logits.items():
            if kind not in ("transformers", "ours-fp32"):
                diff = (value - logits["transformers"]).abs().max().item()
                same = int(value.argmax()) == int(logits["transformers"].argmax())
                lines.append(f"{kind} vs transformers, last-position logits (bf16): max-abs-diff {diff:.3g}, argmax "
                             f"{'identical' if same else 'DIFFERENT'}.  ")
                print(lines[-1])
    lines.append(f"`python benchmarks/bench_load.py --size {args.size}`, torch {torch.__version__}, transformers "
                 f"{transformers.__version__}.")
    if args.update_readme:
        from readme import update_readme

        update_readme("load", "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
