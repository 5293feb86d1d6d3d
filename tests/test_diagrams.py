"""The block diagrams are drawn from what they are given: a config's numbers, the library's head mapping, a real routing.
Each test changes the input and checks that the text on the picture follows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_config  # noqa: E402

import mistral_tutorial as mt  # noqa: E402
from mistral_tutorial import diagrams, diagrams_moe  # noqa: E402


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_architecture_follows_the_config():
    mistral = diagrams.draw_architecture(mt.presets.mistral_7b_v0_1())
    mixtral = diagrams.draw_architecture(mt.presets.mixtral_8x7b_v0_1())
    small = diagrams.draw_architecture(tiny_config(n_layers=3, sliding_window=5))
    joined = {name: "\n".join(texts(ax)) for name, ax in [("mistral", mistral), ("mixtral", mixtral), ("small", small)]}
    assert "× L = 32 blocks" in joined["mistral"] and "sliding window W = 4096" in joined["mistral"]
    assert "32 query heads share 8 key/value heads" in joined["mistral"] and "SwiGLU FFN" in joined["mistral"]
    assert "full causal attention" in joined["mixtral"] and "top-2 of 8 SwiGLU experts" in joined["mixtral"]
    assert "RoPE θ = 1,000,000" in joined["mixtral"] and "RoPE θ = 10,000" in joined["mistral"]
    assert "× L = 3 blocks" in joined["small"] and "sliding window W = 5" in joined["small"]
    assert joined["small"] != joined["mistral"]
    plt.close("all")


def test_head_sharing_draws_the_mapping_it_is_given():
    kv_of = mt.repeat_kv(torch.arange(2.0).view(1, 2, 1, 1), 4).flatten().long().tolist()   # [0, 0, 0, 0, 1, 1, 1, 1]
    ax = diagrams.draw_head_sharing(8, kv_of)
    lines = ax.get_lines()
    assert len(lines) == 8
    ends = [round(line.get_xdata()[1], 6) for line in lines]                  # where each query head's line lands
    assert ends[:4] == [ends[0]] * 4 and ends[4:] == [ends[4]] * 4 and ends[0] != ends[4]
    assert [t for t in texts(ax) if t.startswith("kv")] == ["kv0", "kv1"]
    with pytest.raises(ValueError, match="8 query heads"):
        diagrams.draw_head_sharing(8, kv_of[:7])
    plt.close("all")


def test_dispatch_draws_the_layers_own_grouping():
    torch.manual_seed(4)
    layer = mt.MoeLayer(16, 32, 8, 2).eval()
    with torch.no_grad():
        layer(torch.randn(6, 16))
    ax = diagrams_moe.draw_dispatch(layer.last_experts, layer.last_weights, 8)
    counts = torch.bincount(layer.last_experts.reshape(-1), minlength=8).tolist()
    assert any(t.startswith(f"bincount {counts}") for t in texts(ax))
    # the sorted column lists the tokens in MoeLayer.forward's order: argsort(stable) // k
    order = layer.last_experts.reshape(-1).argsort(stable=True)
    sorted_tokens = [t.split(" ")[0] for t in texts(ax) if " · G=" in t]
    assert sorted_tokens == [f"t{int(p) // 2}" for p in order]
    one_token = diagrams_moe.draw_moe_layer(layer.last_experts[0], layer.last_weights[0], 8)
    chosen = [t for t in texts(one_token) if "G = " in t]
    assert len(chosen) == 2 and all(f"expert {int(e)}" in "".join(chosen) for e in layer.last_experts[0])
    plt.close("all")


def test_all_to_all_labels_the_counts_sent():
    sent = torch.tensor([[5, 3], [0, 7]])
    ax = diagrams_moe.draw_all_to_all(sent, [(0, 4), (4, 8)], experts_per_rank=4)
    labels = sorted(int(t) for t in texts(ax) if t.isdigit())
    assert labels == sorted([5, 3, 7] * 2)                                   # dispatch and combine; 0 draws nothing
    plt.close("all")
