"""Mistral end to end: logits, the rolling-buffer cache, chunked prefill and generation, all against transformers'
no-cache forward on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_greedy_matches,
    build_pair,
    hf_greedy_no_cache,
    hf_logits,
    max_abs_diff,
    report,
    tiny_config,
)
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

import mistral_tutorial as mt

ATOL = 1e-4

MODEL_CONFIGS = {
    "gqa-W4": (tiny_config(sliding_window=4), None),
    "mqa-W3": (tiny_config(n_kv_heads=1, sliding_window=3), None),
    "mha-head_dim24-W5": (tiny_config(n_kv_heads=4, head_dim=24, sliding_window=5), None),
    "tied-W4": (tiny_config(tie_embeddings=True, sliding_window=4), None),
    "W1": (tiny_config(sliding_window=1, n_layers=3), None),
    "no-window-mistral": (tiny_config(sliding_window=None), None),
    "llama": (tiny_config(sliding_window=None, n_kv_heads=4, rope_theta=5e5), "llama"),
}


@pytest.fixture(scope="module")
def pair_w4():
    torch.manual_seed(1)
    return build_pair(tiny_config(sliding_window=4))


# ---------------------------------------------------------------------------------------------------------------------
# Logits
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@torch.no_grad()
def test_logits_match_transformers(name):
    cfg, model_type = MODEL_CONFIGS[name]
    hf, ours = build_pair(cfg, model_type)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))                # longer than every window: the window matters
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report(f"logits {name}", diff)
    assert diff <= ATOL
    if cfg.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


@torch.no_grad()
def test_logits_match_transformers_sdpa_backend():
    hf, ours = build_pair(tiny_config(sliding_window=3), attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, 19))
    diff = max_abs_diff(ours(ids), hf_logits(hf, ids))
    report("logits sdpa W3", diff)
    assert diff <= ATOL


@torch.no_grad()
def test_window_shorter_than_sequence_matters(pair_w4):
    # transformers with a different window disagrees with us: the comparison above is sensitive to W
    hf, ours = pair_w4
    ids = torch.randint(0, 128, (1, 20))
    hf.config.sliding_window = 5
    try:
        other = hf_logits(hf, ids)
    finally:
        hf.config.sliding_window = 4
    assert max_abs_diff(ours(ids)[:, :4], other[:, :4]) <= ATOL     # the first W positions see everything anyway
    assert max_abs_diff(ours(ids)[:, 5:], other[:, 5:]) > 1e-3


@torch.no_grad()
def test_last_only_and_hidden_states(pair_w4):
    hf, ours = pair_w4
    ids = torch.randint(0, 128, (2, 11))
    full = ours(ids)
    assert max_abs_diff(ours(ids, last_only=True), full[:, -1:]) <= 1e-6
    logits, hidden = ours(ids, return_hidden_states=True)
    ref = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == ours.config.n_layers + 1
    for i in range(ours.config.n_layers):                    # transformers' last entry is after the final norm
        assert max_abs_diff(hidden[i], ref[i]) <= ATOL


# ---------------------------------------------------------------------------------------------------------------------
# The rolling-buffer cache
@torch.no_grad()
def feed_in_chunks(model: mt.Transformer, ids: torch.Tensor, sizes, max_len: int | None = None) -> torch.Tensor:
    """Logits of every position, computed chunk by chunk through one cache."""
    cache = model.new_cache(ids.shape[0], max_len or ids.shape[1])
    out, start, i = [], 0, 0
    while start < ids.shape[1]:
        size = sizes[i % len(sizes)]
        out.append(model(ids[:, start:start + size], cache=cache))
        start, i = start + size, i + 1
    assert cache.time == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("window, sizes", [(4, [1]), (4, [3, 1, 5, 2, 4, 9]), (3, [2, 7, 1, 1, 3]), (2, [1, 5]),
                                           (1, [1, 2, 3])])
@torch.no_grad()
def test_cached_forward_equals_no_cache_forward(window, sizes):
    cfg = tiny_config(sliding_window=window)
    hf, ours = build_pair(cfg)
    seq_len = 4 * window + 13                                      # > 4 W: the buffer wraps several times
    ids = torch.randint(0, 128, (2, seq_len))
    cached = feed_in_chunks(ours, ids, sizes)
    diff_ours = max_abs_diff(cached, ours(ids))
    diff_hf = max_abs_diff(cached, hf_logits(hf, ids))
    report(f"cached vs no-cache W={window} chunks={sizes}", max(diff_ours, diff_hf))
    assert diff_ours <= ATOL and diff_hf <= ATOL
    # and the discrete outcome: the argmax at every position
    assert torch.equal(cached.argmax(-1), hf_logits(hf, ids).argmax(-1))


@pytest.mark.parametrize("chunk", [1, 4, 5, 6, 7, 11, 27], ids=lambda c: f"chunk{c}")
@torch.no_grad()
def test_chunked_prefill_equals_one_pass(chunk):
    # W = 5: chunk sizes 1, W - 1, W, W + 1, 7 (does not divide 27), 11 (> 2 W), and the whole prompt
    window = 5
    torch.manual_seed(2)
    hf, ours = build_pair(tiny_config(sliding_window=window))
    prompt_len, extra = 27, 6
    ids = torch.randint(0, 128, (2, prompt_len + extra))
    one_pass = hf_logits(hf, ids)

    cache = ours.new_cache(2, prompt_len + extra)
    prefill = [ours(ids[:, s:min(s + chunk, prompt_len)], cache=cache) for s in range(0, prompt_len, chunk)]
    prefill = torch.cat(prefill, dim=1)
    # then decode token by token on the same cache
    decoded = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(prompt_len, prompt_len + extra)], dim=1)
    diff = max(max_abs_diff(prefill, one_pass[:, :prompt_len]), max_abs_diff(decoded, one_pass[:, prompt_len:]))
    report(f"chunked prefill chunk={chunk}", diff)
    assert diff <= ATOL
    assert max_abs_diff(prefill, ours(ids[:, :prompt_len])) <= ATOL


@torch.no_grad()
def test_full_attention_cache_matches():
    cfg = tiny_config(sliding_window=None)
    hf, ours = build_pair(cfg, "llama")
    ids = torch.randint(0, 128, (2, 30))
    cached = feed_in_chunks(ours, ids, [7, 1, 3], max_len=40)
    assert max_abs_diff(cached, hf_logits(hf, ids)) <= ATOL


@pytest.mark.parametrize("window", [1, 3, 4])
@torch.no_grad()
def test_rolling_cache_holds_exactly_w_slots(window):
    cfg = tiny_config(sliding_window=window)
    hf, ours = build_pair(cfg)
    cache = ours.new_cache(2, max_len=1000)
    expected_shape = (cfg.n_layers, 2, cfg.n_kv_heads, window, cfg.head_dim)
    assert tuple(cache.keys.shape) == expected_shape and cache.keys.shape[3] == window
    assert tuple(cache.values.shape) == expected_shape
    nbytes = cache.nbytes()
    seq_len = 4 * window + 7
    ids = torch.randint(0, 128, (2, seq_len))
    for t in range(0, seq_len, 3):
        ours(ids[:, t:t + 3], cache=cache)
        assert tuple(cache.keys.shape) == expected_shape           # memory does not grow
        assert cache.nbytes() == nbytes

    # slot i mod W holds the key and value of position i, for the last W positions (computed with transformers' layers)
    hidden = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    cos, sin = hf.model.rotary_emb(hidden[0], torch.arange(seq_len)[None])
    for layer in range(cfg.n_layers):
        attn = hf.model.layers[layer].self_attn
        h = hf.model.layers[layer].input_layernorm(hidden[layer])
        k = attn.k_proj(h).view(2, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)       # (B, Hkv, T, D)
        v = attn.v_proj(h).view(2, seq_len, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        for t in range(seq_len - window, seq_len):
            assert max_abs_diff(cache.keys[layer, :, :, t % window], k[:, :, t]) <= 1e-5, (layer, t)
            assert max_abs_diff(cache.values[layer, :, :, t % window], v[:, :, t]) <= 1e-5, (layer, t)


def test_cache_sizes():
    ours = mt.Transformer(tiny_config(sliding_window=8))
    assert ours.new_cache(1, max_len=5).keys.shape[3] == 5         # a run shorter than W needs only max_len slots
    assert ours.new_cache(1, max_len=8).keys.shape[3] == 8
    full = mt.Transformer(tiny_config(sliding_window=None))
    assert full.new_cache(1, max_len=33).keys.shape[3] == 33


# ---------------------------------------------------------------------------------------------------------------------
# Generation
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window, prompt_len", [(1, 7), (2, 9), (16, 40), (None, 12)], ids=lambda v: str(v))
def test_greedy_generation_matches_transformers(window, prompt_len, seed):
    n_new = 64
    assert window is None or prompt_len + n_new > 4 * window
    torch.manual_seed(seed)
    hf, ours = build_pair(tiny_config(sliding_window=window))
    prompt = torch.randint(0, 128, (1, prompt_len))
    ref, gaps = hf_greedy_no_cache(hf, prompt, n_new)
    out = mt.generate(ours, prompt, max_new_tokens=n_new)
    assert out.shape == (1, n_new)
    ties = assert_greedy_matches(out, ref, gaps, f"greedy W={window}")
    print(f"[greedy] W={window} seed={seed}: {n_new} tokens, {ties} tie divergences, min top-2 gap {float(gaps.min()):.2e}")


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_greedy_generation_with_prefill_chunks(chunk):
    hf, ours = build_pair(tiny_config(sliding_window=2))
    prompt = torch.randint(0, 128, (1, 13))
    ref, gaps = hf_greedy_no_cache(hf, prompt, 20)
    out = mt.generate(ours, prompt, max_new_tokens=20, prefill_chunk_size=chunk)
    assert_greedy_matches(out, ref, gaps, f"prefill chunk {chunk}")


@pytest.mark.parametrize("window", [1, 3, None])
def test_batch_of_different_lengths_equals_each_alone(window):
    hf, ours = build_pair(tiny_config(sliding_window=window))
    lengths = [5, 12, 1, 8]
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in lengths]
    n_new = 24
    batched = mt.generate(ours, prompts, max_new_tokens=n_new)
    assert batched.shape == (len(prompts), n_new)
    for b, prompt in enumerate(prompts):
        ref, gaps = hf_greedy_no_cache(hf, prompt, n_new)
        alone = mt.generate(ours, prompt, max_new_tokens=n_new)
        assert_greedy_matches(alone, ref, gaps, f"alone {b}")
        assert_greedy_matches(batched[b:b + 1], ref, gaps, f"batched row {b}")


def test_batch_tensor_of_same_length():
    hf, ours = build_pair(tiny_config(sliding_window=3))
    prompts = torch.randint(0, 128, (3, 10))
    ref, gaps = hf_greedy_no_cache(hf, prompts, 30)
    out = mt.generate(ours, prompts, max_new_tokens=30)
    assert out.shape == (3, 30)
    assert_greedy_matches(out, ref, gaps, "tensor batch")


def test_max_new_tokens_zero():
    ours = mt.Transformer(tiny_config())
    assert mt.generate(ours, [[1, 2, 3]], max_new_tokens=0).shape == (1, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
def test_sampling_with_a_seed_is_reproducible(pair_w4):
    _, ours = pair_w4
    prompt = [[1, 5, 9, 20]]
    a = mt.generate(ours, prompt, max_new_tokens=32, temperature=1.0, seed=123)
    b = mt.generate(ours, prompt, max_new_tokens=32, temperature=1.0, seed=123)
    c = mt.generate(ours, prompt, max_new_tokens=32, temperature=1.0, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = mt.generate(ours, prompt, max_new_tokens=32)
    assert not torch.equal(a, greedy)


def test_top_k_one_and_tiny_top_p_are_greedy(pair_w4):
    _, ours = pair_w4
    prompt = [[1, 5, 9, 20, 33, 7]]
    greedy = mt.generate(ours, prompt, max_new_tokens=24)
    assert torch.equal(mt.generate(ours, prompt, max_new_tokens=24, temperature=1.5, top_k=1, seed=0), greedy)
    assert torch.equal(mt.generate(ours, prompt, max_new_tokens=24, temperature=1.5, top_p=1e-6, seed=0), greedy)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
N_DRAWS = 20000


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=LOGITS.numel()).float() / tokens.numel()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(temperature):
    generator = torch.Generator().manual_seed(0)
    tokens = mt.sample_next(LOGITS.expand(N_DRAWS, -1), temperature=temperature, generator=generator)
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    assert max_abs_diff(empirical(tokens), expected) < 0.015


def test_top_k_keeps_the_k_largest():
    generator = torch.Generator().manual_seed(0)
    tokens = mt.sample_next(LOGITS.expand(N_DRAWS, -1), temperature=1.0, top_k=3, generator=generator)
    top3 = [5, 0, 1]
    expected = torch.zeros(6)
    expected[top3] = torch.softmax(LOGITS[top3], dim=-1)
    assert set(tokens.unique().tolist()) == set(top3)
    assert max_abs_diff(empirical(tokens), expected) < 0.015


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_top_p_keeps_the_nucleus(top_p):
    # Holtzman et al. 2019: the smallest set of most likely tokens whose probability reaches p
    probs = torch.softmax(LOGITS, dim=-1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for i in order:
        nucleus.append(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    expected = torch.zeros(6)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    generator = torch.Generator().manual_seed(0)
    tokens = mt.sample_next(LOGITS.expand(N_DRAWS, -1), temperature=1.0, top_p=top_p, generator=generator)
    assert set(tokens.unique().tolist()) == set(nucleus)
    assert max_abs_diff(empirical(tokens), expected) < 0.015


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(mt.sample_next(logits, temperature=0.0), logits.argmax(-1))


# ---------------------------------------------------------------------------------------------------------------------
# Stop tokens and streaming
def test_stop_token_ends_generation(pair_w4):
    _, ours = pair_w4
    prompt = [[1, 17, 42, 99]]
    free = mt.generate(ours, prompt, max_new_tokens=30)[0].tolist()
    stop = free[6]
    first = free.index(stop)
    out = mt.generate(ours, prompt, max_new_tokens=30, stop_tokens=[stop])[0].tolist()
    assert out == free[:first + 1]


def test_stop_tokens_in_a_batch(pair_w4):
    _, ours = pair_w4
    prompts = [[1, 17, 42, 99], [1, 3, 3, 3, 8]]
    free = mt.generate(ours, prompts, max_new_tokens=30)
    stop = int(free[0, 4])
    out = mt.generate(ours, prompts, max_new_tokens=30, stop_tokens=[stop])
    ends = []
    for b in range(2):
        row = free[b].tolist()
        end = row.index(stop) if stop in row else 30 - 1
        ends.append(end)
    assert out.shape[1] == max(ends) + 1                                     # stops once every row has ended
    for b in range(2):
        assert out[b, :ends[b] + 1].tolist() == free[b, :ends[b] + 1].tolist()
        assert (out[b, ends[b]:] == out[b, ends[b]]).all()                    # a finished row repeats its stop token


def test_on_token_streams_every_token(pair_w4):
    _, ours = pair_w4
    seen = []
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = mt.generate(ours, prompts, max_new_tokens=15, on_token=lambda t: seen.append(t.clone()))
    assert len(seen) == 15
    assert torch.equal(torch.stack(seen, dim=1), out)
    # with a stop token, the streamed tokens are exactly those returned
    seen.clear()
    out = mt.generate(ours, prompts[:1], max_new_tokens=15, stop_tokens=[int(out[0, 3])],
                      on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out)


def test_tie_rule_of_the_greedy_comparison():
    # the helper accepts a divergence only where transformers' top-2 logits tie, and fails on any other
    ref = torch.tensor([[5, 6, 7, 8]])
    gaps = torch.tensor([[0.5, 5e-5, 0.5, 0.5]])
    with pytest.warns(UserWarning, match="genuine tie"):
        assert assert_greedy_matches(torch.tensor([[5, 9, 1, 1]]), ref, gaps, "tie") == 1
    with pytest.raises(AssertionError, match="not a tie"):
        assert_greedy_matches(torch.tensor([[5, 6, 9, 8]]), ref, gaps, "no tie")
    assert assert_greedy_matches(ref.clone(), ref, gaps, "equal") == 0
