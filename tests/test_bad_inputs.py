"""Wrong inputs fail early with a message that names the problem, not deep inside torch."""

from __future__ import annotations

import pytest
import torch
from conftest import build_pair, hf_logits, max_abs_diff, tiny_config

import mistral_tutorial as mt
from mistral_tutorial.cache import CacheFullError


@pytest.fixture(scope="module")
def model():
    return mt.Transformer(tiny_config(sliding_window=4)).eval()


@pytest.fixture(scope="module")
def full_attention_model():
    return mt.Transformer(tiny_config(sliding_window=None, max_position_embeddings=16)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Empty prompts
def test_empty_prompt_to_the_model(model):
    with pytest.raises(ValueError, match="empty"):
        model(torch.empty(1, 0, dtype=torch.long))


@pytest.mark.parametrize("prompt", [[], [[]], [[1, 2], []], torch.empty(1, 0, dtype=torch.long),
                                    torch.empty(0, dtype=torch.long)], ids=["list", "nested", "one-row-empty",
                                                                           "tensor-2d", "tensor-1d"])
def test_empty_prompt_to_generate(model, prompt):
    with pytest.raises(ValueError, match="empty"):
        mt.generate(model, prompt, max_new_tokens=3)


# ---------------------------------------------------------------------------------------------------------------------
# Token ids outside the vocabulary
@pytest.mark.parametrize("bad", [128, 1000, -1])
def test_token_ids_outside_vocabulary_to_the_model(model, bad):
    tokens = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match="vocabulary") as err:
        model(tokens)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("bad", [128, -5])
def test_token_ids_outside_vocabulary_to_generate(model, bad):
    with pytest.raises(ValueError, match="vocabulary"):
        mt.generate(model, [[1, 2, bad]], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        mt.generate(model, torch.tensor([[1, bad]]), max_new_tokens=2)


def test_float_tokens(model):
    with pytest.raises(TypeError, match="int"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="int"):
        mt.generate(model, torch.zeros(1, 3), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes
def test_one_dimensional_tokens_to_the_model(model):
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)") as err:
        model(torch.tensor([1, 2, 3]))
    assert "tokens[None]" in str(err.value)                   # and says how to fix it


def test_three_dimensional_tokens(model):
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        mt.generate(model, torch.zeros(1, 2, 3, dtype=torch.long))


def test_tokens_not_a_tensor(model):
    with pytest.raises(TypeError, match="Tensor"):
        model([[1, 2, 3]])


def test_one_dimensional_prompt_is_fine_for_generate(model):
    # generate() takes one prompt as a 1-D tensor or a flat list: it is a single row
    a = mt.generate(model, torch.tensor([1, 2, 3]), max_new_tokens=4)
    b = mt.generate(model, [1, 2, 3], max_new_tokens=4)
    c = mt.generate(model, [[1, 2, 3]], max_new_tokens=4)
    assert a.shape == (1, 4) and torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------------
# Length limits
def test_prompt_longer_than_max_positions_without_window(full_attention_model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        full_attention_model(torch.ones(1, 17, dtype=torch.long))
    full_attention_model(torch.ones(1, 16, dtype=torch.long))            # exactly the limit is fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mt.generate(full_attention_model, [[1] * 10], max_new_tokens=7)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mt.generate(full_attention_model, [[1] * 20], max_new_tokens=1)


def test_cached_run_past_max_positions_without_window(full_attention_model):
    cache = full_attention_model.new_cache(1, max_len=16)
    full_attention_model(torch.ones(1, 12, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        full_attention_model(torch.ones(1, 5, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_long_prompt_is_fine_with_a_window():
    # with a sliding window, positions past max_position_embeddings are allowed (and still match transformers)
    cfg = tiny_config(sliding_window=4, max_position_embeddings=16)
    hf, ours = build_pair(cfg)
    tokens = torch.randint(0, 128, (1, 40))
    assert max_abs_diff(ours(tokens), hf_logits(hf, tokens)) <= 1e-4
    out = mt.generate(ours, tokens, max_new_tokens=5)
    assert out.shape == (1, 5)


def test_full_attention_cache_overflow(full_attention_model):
    cache = full_attention_model.new_cache(1, max_len=8)
    full_attention_model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(CacheFullError, match="max_len"):
        full_attention_model(torch.ones(1, 3, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------------------------------------------------
# Caches and generation settings
def test_cache_of_the_wrong_batch_size(model):
    cache = model.new_cache(2, max_len=32)
    with pytest.raises(ValueError, match="batch size") as err:
        model(torch.ones(3, 5, dtype=torch.long), cache=cache)
    assert "2" in str(err.value) and "3" in str(err.value)


def test_cache_pad_of_the_wrong_shape(model):
    with pytest.raises(ValueError, match="pad"):
        model.new_cache(2, max_len=8, pad=[0, 1, 2])


@pytest.mark.parametrize("kwargs, word", [(dict(max_new_tokens=-1), "max_new_tokens"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                          (dict(prefill_chunk_size=-2), "prefill_chunk_size")])
def test_bad_generation_settings(model, kwargs, word):
    with pytest.raises(ValueError, match=word):
        mt.generate(model, [[1, 2, 3]], **kwargs)


def test_wrong_last_dimension_to_rmsnorm():
    with pytest.raises(ValueError, match="last dimension"):
        mt.RMSNorm(8)(torch.randn(2, 7))


def test_prefill_chunk_size_zero_is_rejected():
    model = mt.Transformer(mt.ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=48,
                                          sliding_window=4, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        mt.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, prefill_chunk_size=0)


def test_stop_tokens_may_be_a_tensor():
    model = mt.Transformer(mt.ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=48,
                                          sliding_window=4, max_position_embeddings=64)).eval()
    free = mt.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=6)
    stopped = mt.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=6, stop_tokens=free[0, :1])
    assert stopped.shape == (1, 1) and stopped[0, 0] == free[0, 0]
