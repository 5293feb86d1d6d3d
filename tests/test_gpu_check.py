"""scripts/gpu_check.py, the walkthrough's one-GPU finale, kept alive without a GPU: `--tiny` runs the whole script on
the CPU (tiny fp32 stand-ins of both presets, a few seconds), and its JSON report must say what a passing run says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_on_the_cpu_and_reports_a_pass(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check_tiny_float32.json"]      # $OUT, not benchmarks/
    report = json.loads((tmp_path / "gpu_check_tiny_float32.json").read_text())
    assert report["tiny"] is True and report["dtype"] == "torch.float32"
    assert report["converters"] == {"to_hf copies": True, "from_hf copies": True}
    assert [r["model"] for r in report["results"]] == ["mistral-7b-v0.1 (tiny)", "mixtral-8x7b-v0.1 (tiny)"]
    for result in report["results"]:
        assert "skipped" not in result, result["model"]
        assert result["weights_shared"] is True, result["model"]                  # ours are views of transformers'
        logits, greedy, speed = result["logits"], result["greedy"], result["speed"]
        assert logits["passed"] and logits["rel_max_diff"] <= report["tolerance"]["rel_max_diff"], result["model"]
        assert logits["positions"] == report["settings"]["prompt_len"] and logits["top1_agreement"] == 1.0
        assert greedy == {"new_tokens": report["settings"]["greedy_tokens"], "identical": True,
                          "equal_tokens": report["settings"]["greedy_tokens"], "first_divergence": None}
        assert speed["ours_decode_tokens_per_s"] > 0 and speed["transformers_decode_tokens_per_s"] > 0
    assert report["results"][1]["logits"]["routing_agreement"] == 1.0              # the same experts, every token
    assert report["elapsed_s"] < 60
    assert "| PASS |" in done.stdout and "FAIL" not in done.stdout
