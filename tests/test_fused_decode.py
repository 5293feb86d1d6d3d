"""The fused decode layout (fused_decode.py, kernels/decode.c, weight_only.py): one C call per decoding step.

References: transformers' greedy decoding (no cache) and the plain PyTorch path on the same weights; for bf16 weights,
the exact answer: the same bf16 weights computed in fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_greedy_matches, build_pair, hf_greedy_no_cache, max_abs_diff, tiny_config

import mistral_tutorial as mt
from mistral_tutorial import native
from mistral_tutorial.decode_layout import current_layout, use_layout
from mistral_tutorial.weight_only import SHORT_ROWS, WeightOnlyLinear

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no C kernels: {native.why_unavailable()}")

CONFIGS = {
    "window-below-prompt": dict(sliding_window=3),
    "window-above-prompt": dict(sliding_window=40),
    "no-window-tied": dict(sliding_window=None, tie_embeddings=True),
    "mqa": dict(n_kv_heads=1, sliding_window=5),
    "head-dim": dict(head_dim=24, n_heads=4, n_kv_heads=2, dim=64, sliding_window=6),
    "odd-widths": dict(dim=72, hidden_dim=100, vocab_size=133, n_heads=6, n_kv_heads=3, sliding_window=4),
}


def plain_copy(model: mt.Transformer) -> mt.Transformer:
    plain = mt.Transformer(model.config).to(model.dtype).eval()
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_equal_transformers(name):
    cfg = tiny_config(**CONFIGS[name])
    hf, ours = build_pair(cfg)
    use_layout(ours, "fused")
    window = cfg.sliding_window or 8
    prompt = torch.randint(0, cfg.vocab_size, (2, 11))
    n = 4 * window + 8
    ref, gaps = hf_greedy_no_cache(hf, prompt, n)
    new = mt.generate(ours, prompt, max_new_tokens=n)
    assert current_layout(ours) == "fused"
    assert_greedy_matches(new, ref, gaps, name)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_step_equals_the_pytorch_path(name):
    """Logits of every step, through the rolling buffer and past W, against the plain modules on their own cache."""
    hf, ours = build_pair(tiny_config(**CONFIGS[name]))
    plain = plain_copy(ours)
    use_layout(ours, "fused")
    tokens = torch.randint(0, ours.config.vocab_size, (3, 30))
    fused_cache, plain_cache = ours.new_cache(3, 30), plain.new_cache(3, 30)
    with torch.no_grad():
        ours(tokens[:, :5], cache=fused_cache)
        plain(tokens[:, :5], cache=plain_cache)
        worst = 0.0
        for t in range(5, 30):
            step = tokens[:, t:t + 1]
            worst = max(worst, max_abs_diff(ours(step, cache=fused_cache), plain(step, cache=plain_cache)))
    assert worst < 1e-5, worst


def test_left_padded_batch_equals_each_prompt_alone():
    hf, ours = build_pair(tiny_config(sliding_window=4))
    use_layout(ours, "fused")
    prompts = [[5, 9, 11, 3, 7, 2, 8], [4, 4], [17, 1, 2, 3, 9]]
    together = mt.generate(ours, prompts, max_new_tokens=20)
    for row, prompt in enumerate(prompts):
        ref, gaps = hf_greedy_no_cache(hf, prompt, 20)
        assert_greedy_matches(together[row:row + 1], ref, gaps, f"row {row}")


def test_bf16_weights_closer_to_the_exact_answer_than_bf16_arithmetic():
    """bf16 weights, fp32 activations: a decoding step, or a prefill of up to SHORT_ROWS tokens, rounds only the
    weights, which the exact reference shares; a longer prefill computes in bf16, exactly as the plain layout does."""
    cfg = tiny_config(sliding_window=4, n_layers=3)
    _, exact = build_pair(cfg)                                    # fp32 weights ...
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.bfloat16().float())                          # ... that are exactly bf16 values
    bf16 = mt.Transformer(cfg).to(torch.bfloat16).eval()
    bf16.load_state_dict({k: v.bfloat16() for k, v in exact.state_dict().items()})
    fused = use_layout(plain_copy(bf16), "fused")
    assert isinstance(fused.layers[0].attention.wq, WeightOnlyLinear) and fused.dtype == torch.bfloat16
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    assert SHORT_ROWS < 20
    with torch.no_grad():
        long = [m(tokens[:, :20]) for m in (exact, bf16, fused)]                    # products' inputs rounded
    assert torch.equal(long[2], long[1])
    caches = [m.new_cache(1, 24) for m in (exact, bf16, fused)]
    assert caches[2].keys.dtype == torch.float32
    step_fused = step_bf16 = 0.0
    with torch.no_grad():
        prefill = [m(tokens[:, :12], cache=c) for m, c in zip((exact, bf16, fused), caches)]
        for t in range(12, 24):
            ref, plain, ours = (m(tokens[:, t:t + 1], cache=c) for m, c in zip((exact, bf16, fused), caches))
            step_bf16, step_fused = max(step_bf16, max_abs_diff(plain, ref)), max(step_fused, max_abs_diff(ours, ref))
        one_by_one = fused.new_cache(1, 24)
        for t in range(24):                                        # every token a decoding step: nothing but weights
            worst = max_abs_diff(fused(tokens[:, t:t + 1], cache=one_by_one), exact(tokens[:, :t + 1])[:, -1:])
            assert worst < 1e-5, (t, worst)
    assert max_abs_diff(prefill[2], prefill[0]) < 1e-5 < max_abs_diff(prefill[1], prefill[0])
    assert step_fused < 1e-5 < step_bf16, (step_fused, step_bf16)


def test_changed_weights_are_seen_and_the_model_stays_trainable():
    model = use_layout(mt.Transformer(tiny_config(sliding_window=4)).eval(), "fused")
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))

    def step_logits(m):
        cache = m.new_cache(1, 10)
        with torch.no_grad():
            m(tokens[:, :8], cache=cache)
            return m(tokens[:, 8:9], cache=cache)

    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(3)                     # in place
        model.layers[0].attention.wq.weight = torch.nn.Parameter(torch.randn_like(model.layers[0].attention.wq.weight))
        model.norm.weight.add_(0.5)                                         # a norm gain (copied to fp32 inside)
    reference = step_logits(use_layout(plain_copy(model), "plain"))
    assert max_abs_diff(step_logits(model), reference) < 1e-5
    model.train()
    loss = F.cross_entropy(model(tokens)[0], tokens[0])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_recording_attention_weights_takes_the_pytorch_path():
    model = use_layout(mt.Transformer(tiny_config(sliding_window=4)).eval(), "fused")
    cache = model.new_cache(1, 8)
    model.layers[0].attention.record_weights = True
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    assert model.layers[0].attention.last_weights.shape == (1, 4, 1, 4)


def test_bad_inputs_are_named():
    model = use_layout(mt.Transformer(tiny_config(sliding_window=4)).eval(), "fused")
    cache = mt.KVCache(2, 1, 2, 16, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.tensor([[3]]), cache=cache)
    with pytest.raises(ValueError, match="vocab"):
        model(torch.tensor([[model.config.vocab_size]]), cache=model.new_cache(1, 4))
    moe = mt.Transformer(tiny_config(n_experts=4)).eval()
    with pytest.raises(ValueError, match="MoE"):
        use_layout(moe, "fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3), (33, 64), (65, 129), (100, 1000)])
def test_matvec_equals_f_linear(dtype, shape):
    weight = torch.randn(shape).to(dtype)
    for rows in (1, 3):
        x = torch.randn(rows, shape[1])
        torch.testing.assert_close(native.matvec(weight, x), F.linear(x, weight.float()), atol=1e-4, rtol=1e-5)


def test_without_a_compiler_the_model_keeps_the_pytorch_path(tmp_path):
    script = ("import mistral_tutorial as mt, torch\n"
              "from mistral_tutorial import native, kernel_choice\n"
              "from mistral_tutorial.decode_layout import use_layout\n"
              "assert native.library() is None and 'MISTRAL_TUTORIAL_NO_NATIVE' in native.why_unavailable()\n"
              "m = mt.Transformer(mt.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,"
              " hidden_dim=48, sliding_window=4)).eval()\n"
              "assert 'fused' not in kernel_choice.candidates(m.config, torch.float32, 'cpu')\n"
              "try:\n    use_layout(m, 'fused')\nexcept ValueError as e:\n    print('refused:', e)\n"
              "print(mt.generate(m, [1, 2, 3], max_new_tokens=3).tolist())\n")
    env = {**os.environ, "MISTRAL_TUTORIAL_NO_NATIVE": "1", "MISTRAL_TUTORIAL_LAYOUT": ""}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the fused decode layout cannot run this model: $MISTRAL_TUTORIAL_NO_NATIVE is set" in out.stdout
