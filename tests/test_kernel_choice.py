"""Which decode layout a model gets (kernel_choice.py): the fastest measured, remembered per CPU and shape, and
loading pays only for the layout it keeps. The timings are replaced by given ones where the rule itself is tested."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from torch import nn

import mistral_tutorial as mt
from mistral_tutorial import kernel_choice, native
from mistral_tutorial.decode_layout import current_layout
from mistral_tutorial.packed import PackedLinear


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Layouts chosen by measurement (not forced), decisions in a fresh file."""
    monkeypatch.delenv(kernel_choice.LAYOUT_ENV, raising=False)
    monkeypatch.delenv("MISTRAL_TUTORIAL_QUIET", raising=False)
    monkeypatch.setenv(kernel_choice.DECISIONS_ENV, str(tmp_path / "decisions.json"))
    return tmp_path / "decisions.json"


def fake_timings(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Make every timed step of layout L take seconds[L]; returns the list of layouts timed, in order."""
    timed: list[str] = []

    def seconds_per_step(model, tokens):
        layout = current_layout(model)
        timed.append(layout)
        return seconds[layout]

    monkeypatch.setattr(kernel_choice, "_seconds_per_step", seconds_per_step)
    return timed


def test_the_fastest_is_kept_and_remembered(measured, monkeypatch, capsys):
    model = mt.Transformer(tiny_config()).eval()
    found = kernel_choice.candidates(model.config, torch.float32, "cpu")
    assert found[0] == "plain"
    for fastest in found:
        monkeypatch.setenv(kernel_choice.DECISIONS_ENV, str(measured.parent / f"{fastest}.json"))
        timed = fake_timings(monkeypatch, {layout: 1.0 if layout == fastest else 2.0 for layout in found})
        assert kernel_choice.choose_layout(model) == fastest
        assert sorted(set(timed)) == sorted(found) and len(timed) == kernel_choice.ROUNDS * len(found)
        assert "timing the decode layouts" in capsys.readouterr().err
        timed.clear()
        assert kernel_choice.choose_layout(model) == fastest and timed == []       # read back, not measured again
        (key, decision), = json.loads((measured.parent / f"{fastest}.json").read_text()).items()
        assert key == kernel_choice.decision_key(model.config, torch.float32)
        assert decision["layout"] == fastest and set(decision["gb_per_s"]) == set(found)


def test_the_key_names_cpu_torch_threads_shapes_and_dtype():
    config = tiny_config()
    key = kernel_choice.decision_key(config, torch.bfloat16)
    for part in (native.cpu_name(), torch.__version__, f"{torch.get_num_threads()} threads", "bfloat16",
                 f"dim {config.dim}", f"hidden {config.hidden_dim}", f"vocab {config.vocab_size}"):
        assert part in key
    assert key != kernel_choice.decision_key(config.replace(hidden_dim=config.hidden_dim + 8), torch.bfloat16)
    assert key != kernel_choice.decision_key(config, torch.float32)


def test_a_real_measurement_on_a_tiny_model(measured):
    model = mt.Transformer(tiny_config()).eval()
    layout = kernel_choice.choose_layout(model, verbose=False)
    (decision,) = json.loads(measured.read_text()).values()
    assert layout == decision["layout"] == min(decision["seconds"], key=decision["seconds"].get)
    assert all(0 < s < 1 for s in decision["seconds"].values())
    assert decision["bytes_per_step"] > 0 and decision["timed_layers"] == model.config.n_layers


def test_forcing_and_bad_values(monkeypatch):
    model = mt.Transformer(tiny_config()).eval()
    monkeypatch.setenv(kernel_choice.LAYOUT_ENV, "packed")
    assert kernel_choice.choose_layout(model) == "packed"
    monkeypatch.setenv(kernel_choice.LAYOUT_ENV, "fast")
    with pytest.raises(ValueError, match="plain.*packed.*fused"):
        kernel_choice.choose_layout(model)
    monkeypatch.setenv(kernel_choice.LAYOUT_ENV, "fused")
    moe = mt.Transformer(tiny_config(n_experts=4)).eval()
    assert kernel_choice.choose_layout(moe) == "plain"                   # where it cannot run: the plain layout
    with pytest.raises(ValueError, match="layout must be one of"):
        mt.decode_layout.use_layout(model, "fast")


@pytest.mark.parametrize("fastest", ["plain", "packed", "fused"])
def test_loading_pays_only_for_the_layout_it_keeps(measured, monkeypatch, tmp_path, fastest):
    model = mt.Transformer(tiny_config(sliding_window=4)).eval()
    if fastest not in kernel_choice.candidates(model.config, torch.float32, "cpu"):
        pytest.skip(f"{fastest} cannot run here")
    (tmp_path / "params.json").write_text(json.dumps(model.config.to_params()))
    save_file(mt.loading.ours_to_reference(model.state_dict(), model.config), str(tmp_path / "consolidated.safetensors"))
    fake_timings(monkeypatch, {layout: 1.0 if layout == fastest else 2.0 for layout in ("plain", "packed", "fused")})
    packed_groups = []
    monkeypatch.setattr(mt.assemble, "pack_group", lambda *a, **k: packed_groups.append(a) or
                        mt.decode_layout.pack_group(*a, **k))
    loaded = mt.Transformer.from_pretrained(tmp_path)
    assert current_layout(loaded) == fastest
    assert bool(packed_groups) == (fastest == "packed")                  # nothing packed for another layout
    if fastest != "packed":
        assert all(type(m) is nn.Linear for m in (loaded.layers[0].attention.wq, loaded.output))
    else:
        assert isinstance(loaded.layers[0].attention.wq, PackedLinear)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    assert torch.equal(mt.generate(loaded, tokens, max_new_tokens=12), mt.generate(model, tokens, 12, fast=False))
