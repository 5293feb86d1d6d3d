"""`Transformer.optimize_for_decode`: a pure re-layout. Same values, keys and memory; same logits and tokens as before
and as transformers; the fused projections are really the parameters' storage."""

from __future__ import annotations

import pytest
import torch
from conftest import build_pair, tiny_config

import mistral_tutorial as mt


@pytest.mark.parametrize("overrides", [dict(sliding_window=4), dict(sliding_window=None, tie_embeddings=True),
                                       dict(sliding_window=6, n_experts=4, experts_per_token=2)])
def test_layout_changes_nothing_but_speed(overrides):
    config = tiny_config(**overrides)
    model = mt.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokens = torch.randint(0, config.vocab_size, (2, 19))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bytes = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(tokens)
    greedy = mt.generate(model, tokens, max_new_tokens=24)

    model.optimize_for_decode()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == n_bytes
    for layer in model.layers:
        attention = layer.attention
        assert attention.fused_wqkv.data_ptr() == attention.wq.weight.data_ptr()      # views, not copies
        assert attention.wq.weight.stride() == (1, attention.fused_wqkv.shape[1])     # column-major
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, atol=1e-5, rtol=0)
    assert torch.equal(mt.generate(model, tokens, max_new_tokens=24), greedy)


def test_layout_against_transformers_and_training_still_works():
    hf, ours = build_pair(tiny_config(sliding_window=5))
    ours.optimize_for_decode()
    tokens = torch.randint(0, ours.config.vocab_size, (1, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    # with gradients on, the separate projections run and gradients reach every parameter
    ours.train()
    ours(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_moving_the_model_falls_back_to_the_plain_path():
    config = tiny_config(sliding_window=None)
    model = mt.Transformer(config).eval().optimize_for_decode()
    tokens = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        reference = model(tokens)
        moved = model.to(torch.float64)                  # new storage: the fused matrices are stale and must not be used
        torch.testing.assert_close(moved(tokens).float(), reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing needs an mkldnn build")
def test_packed_copies_are_used_and_never_stale():
    config = tiny_config(sliding_window=4)
    model = mt.Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 11))
    with torch.no_grad():
        reference = model(tokens)
    model.optimize_for_decode(pack=True)
    attention = model.layers[0].attention
    assert attention.packed_wqkv is not None and model.packed_output is not None
    with torch.no_grad():
        assert attention.packed_wqkv.usable(tokens.float(), attention.wq.weight)
        torch.testing.assert_close(model(tokens), reference, atol=1e-5, rtol=0)
        # an in-place change of a weight makes its packed copy stale: the plain path must see the new value
        model.layers[1].feed_forward.w2.weight.mul_(2.0)
        plain = mt.Transformer(config).eval()
        plain.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
        torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=0)
        assert not model.layers[1].feed_forward.packed_w2.usable(tokens.float(), model.layers[1].feed_forward.w2.weight)
