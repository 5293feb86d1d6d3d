"""Streaming loading at scale: hub-layout shards and index, zero-copy, dtype conversion, peak memory against the
checkpoint's bytes and against transformers on the same files (each measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config

import mistral_tutorial as mt
from mistral_tutorial.decode_layout import current_layout
from mistral_tutorial.export import write_random_checkpoint
from mistral_tutorial.kernel_choice import choose_layout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Mistral in the hub layout: 3+ bf16 shards and model.safetensors.index.json."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-mistral"
    write_random_checkpoint(folder, tiny_config(), dtype=torch.bfloat16, std=0.1, shard_bytes=20_000)
    return folder


def test_writer_makes_shards_with_an_index(sharded):
    shards = sorted(sharded.glob("*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoint_equals_transformers(sharded, dtype, fast):
    """fp32, and bf16 in the plain layout: transformers' arithmetic. bf16 in the fast (fused) layout computes in fp32:
    then the reference is the exact answer, the same bf16 weights in fp32, and ours must be no farther from it."""
    ids = torch.randint(0, 128, (2, 11))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sharded), dtype=dtype).eval()
    ours = mt.Transformer.from_pretrained(sharded, dtype=dtype, fast=fast)
    assert current_layout(ours) == (choose_layout(ours) if fast else "plain")
    hf_new = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    with torch.no_grad():
        diff = (ours(ids).float() - hf(ids).logits.float()).abs().max().item()
        if ours.activation_dtype != dtype:
            exact = mt.Transformer.from_pretrained(sharded, dtype=torch.float32, fast=False)
            reference = exact(ids)
            ours_error = (ours(ids) - reference).abs().max().item()
            assert ours_error <= (hf(ids).logits.float() - reference).abs().max().item(), ours_error
            hf_new = mt.generate(exact, ids, max_new_tokens=8, fast=False)
        else:
            assert diff <= (1e-4 if dtype == torch.float32 else 2e-2), diff
    assert torch.equal(mt.generate(ours, ids, max_new_tokens=8), hf_new)


def test_same_dtype_is_zero_copy_and_auto_dtype(sharded):
    plain = mt.Transformer.from_pretrained(sharded, dtype="auto", fast=False)
    assert plain.dtype == torch.bfloat16
    # backed by the memory-mapped file: a storage torch did not allocate (and so cannot resize)
    assert not plain.tok_embeddings.weight.untyped_storage().resizable()
    assert not plain.layers[0].attention.wq.weight.untyped_storage().resizable()
    converted = mt.Transformer.from_pretrained(sharded, dtype=torch.float32, fast=False)
    assert converted.tok_embeddings.weight.untyped_storage().resizable()       # converted: its own memory
    with torch.no_grad():
        plain.layers[0].attention.wq.weight.mul_(0)                            # private pages: the file is untouched
    again = mt.Transformer.from_pretrained(sharded, dtype="auto", fast=False)
    assert again.layers[0].attention.wq.weight.abs().sum() > 0


def test_loading_inside_inference_mode_gives_ordinary_parameters(sharded):
    with torch.inference_mode():
        model = mt.Transformer.from_pretrained(sharded, fast=False)
    assert not model.norm.weight.is_inference()
    model.train()
    model(torch.randint(0, 128, (1, 5))).sum().backward()                    # trainable as loaded


def test_peak_memory_against_the_checkpoint_and_transformers():
    """bench_load.py's own measurement, on its ~120 MB bf16 hub-layout checkpoint (4 shards + index)."""
    from bench_load import checkpoint, checkpoint_bytes, measure

    folder = checkpoint("small")
    n_bytes = checkpoint_bytes(folder)
    reports = {kind: measure(kind, folder) for kind in ("ours", "ours-plain", "transformers", "ours-fp32")}
    theirs = reports["transformers"][0]["peak_bytes"]
    for kind in ("ours", "ours-plain"):
        peak = reports[kind][0]["peak_bytes"]
        print(f"{kind}: peak {peak / n_bytes:.2f}x the checkpoint, transformers {theirs / n_bytes:.2f}x")
        assert peak <= 1.15 * n_bytes, (kind, peak / n_bytes)
        assert peak <= theirs + 0.02 * n_bytes, (kind, peak / n_bytes, theirs / n_bytes)
    assert torch.equal(reports["ours-plain"][1], reports["transformers"][1])     # the same bf16 arithmetic
    # the fast layout computes bf16 weights in fp32: no farther than transformers from the exact answer (ours-fp32)
    exact = reports["ours-fp32"][1]
    assert (reports["ours"][1] - exact).abs().max() <= (reports["transformers"][1] - exact).abs().max()
    # into another dtype: the final model's bytes (fp32: twice the bf16 file) plus at most one shard
    largest_shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert reports["ours-fp32"][0]["peak_bytes"] <= 2 * n_bytes + largest_shard, reports["ours-fp32"][0]


def test_real_size_check_on_a_small_model():
    """scripts/real_size_check.py, the code the 7B run uses, on the ~120 MB model: tokens identical, plan printed."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_size_check.py"), "--size", "small"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = next(line for line in done.stdout.splitlines() if line.startswith("| ours |")).split(" | ")
    assert ours[-2] == "16/16" and ours[-1] == "yes |", ours           # top-1 and greedy tokens: the exact answer's
    assert "ours no farther from it than transformers: True" in done.stdout
    assert "stacked experts: 768 tensors, 90.19 GB" in done.stdout and "total: 995 tensors, 93.41 GB" in done.stdout
