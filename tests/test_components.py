"""Each component against the transformers 5.x module holding the same weights (fp32, random weights), and the
sliding-window mask against the paper's rule written as a double loop."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs_diff, randomize_, report, tiny_config
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_causal_mask_function,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralMLP,
    MistralRMSNorm,
    MistralRotaryEmbedding,
    apply_rotary_pos_emb,
)

import mistral_tutorial as mt
from mistral_tutorial.rope import apply_rope_interleaved

ATOL = 1e-5

# (dim, n_heads, n_kv_heads, head_dim): GQA, MQA (n_kv_heads = 1), MHA (n_kv_heads = n_heads), head_dim != dim / n_heads
SHAPES = [(64, 4, 2, 16), (48, 6, 1, 8), (32, 4, 4, 8), (40, 4, 2, 12)]
SHAPE_IDS = ["gqa", "mqa", "mha", "head_dim12"]
SEQ_LEN = 13  # longer than every window below but None


def hf_config(dim, n_heads, n_kv_heads, head_dim, window=None, theta=10000.0):
    cfg = tiny_config(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, sliding_window=window,
                      rope_theta=theta)
    config = cfg.to_hf()
    config._attn_implementation = "eager"
    return config


def hf_additive_mask(config, batch: int, seq_len: int) -> torch.Tensor:
    """transformers' own (B, 1, T, T) additive float mask (0 allowed, dtype-min blocked) for this config."""
    make = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    return make(config=config, inputs_embeds=torch.zeros(batch, seq_len, config.hidden_size), attention_mask=None,
                cache=None, position_ids=torch.arange(seq_len)[None], allow_is_causal_skip=False)


# ---------------------------------------------------------------------------------------------------------------------
# RMSNorm
@pytest.mark.parametrize("dim", [8, 64, 40])
def test_rmsnorm_matches_transformers(dim):
    ref = randomize_(MistralRMSNorm(dim, eps=1e-5))
    torch.nn.init.normal_(ref.weight, 1.0, 0.3)
    ours = mt.RMSNorm(dim, eps=1e-5)
    ours.weight.data.copy_(ref.weight.data)
    x = torch.randn(3, 7, dim) * 4 + 1
    diff = max_abs_diff(ours(x), ref(x))
    report(f"RMSNorm dim={dim}", diff)
    assert diff <= ATOL


def test_rmsnorm_matches_formula():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    g = torch.randn(16, dtype=torch.float64)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * g
    torch.testing.assert_close(mt.rms_norm(x, g, 1e-6), expected)


def test_rmsnorm_bf16_keeps_dtype_and_equals_transformers():
    ref = MistralRMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(ref.weight, 1.0, 0.3)
    ours = mt.RMSNorm(64, eps=1e-5)
    ours.weight.data.copy_(ref.weight.data)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = (torch.randn(2, 9, 64) * 3).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref(x))


# ---------------------------------------------------------------------------------------------------------------------
# Rotary position embedding
@pytest.mark.parametrize("head_dim", [8, 16, 12, 128])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rotary_cos_sin_match_transformers(head_dim, theta):
    config = hf_config(dim=64, n_heads=4, n_kv_heads=2, head_dim=head_dim, theta=theta)
    ref = MistralRotaryEmbedding(config)
    ours = mt.RotaryEmbedding(head_dim, theta)
    position_ids = torch.stack([torch.arange(40), torch.arange(40) + 1000])              # (2, T): two offsets
    x = torch.zeros(2, 40, 64)
    cos_ref, sin_ref = ref(x, position_ids)
    cos, sin = ours(position_ids)
    diff = max(max_abs_diff(cos, cos_ref), max_abs_diff(sin, sin_ref))
    report(f"rotary cos/sin D={head_dim} theta={theta:g}", diff)
    assert cos.shape == cos_ref.shape == (2, 40, head_dim)
    assert diff <= ATOL


def test_rope_frequencies_follow_roformer():
    # RoFormer eq. (15): theta_i = 10000^(-2(i-1)/d), i = 1 .. d/2
    d = 16
    expected = torch.tensor([10000.0 ** (-2 * (i - 1) / d) for i in range(1, d // 2 + 1)])
    torch.testing.assert_close(mt.RotaryEmbedding(d, 10000.0).inv_freq, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_apply_rope_matches_transformers(shape):
    dim, n_heads, n_kv_heads, head_dim = shape
    config = hf_config(dim, n_heads, n_kv_heads, head_dim)
    position_ids = torch.arange(SEQ_LEN)[None] + 3
    cos, sin = MistralRotaryEmbedding(config)(torch.zeros(1, SEQ_LEN, dim), position_ids)
    q = torch.randn(2, n_heads, SEQ_LEN, head_dim)
    k = torch.randn(2, n_kv_heads, SEQ_LEN, head_dim)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = mt.RotaryEmbedding(head_dim)(position_ids)
    diff = max(max_abs_diff(mt.apply_rope(q, ours_cos, ours_sin), q_ref),
               max_abs_diff(mt.apply_rope(k, ours_cos, ours_sin), k_ref))
    report(f"apply_rope {shape}", diff)
    assert diff <= ATOL


def test_rope_scores_depend_on_relative_position_only():
    cos_sin = mt.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        cq, sq = cos_sin(torch.tensor([[m]]))
        ck, sk = cos_sin(torch.tensor([[n]]))
        return (mt.apply_rope(q, cq.double(), sq.double()) * mt.apply_rope(k, ck.double(), sk.double())).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The interleaved (reference) layout vs the rotate-half (transformers) layout
def interleaved_to_half_by_index(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Row h*D + j takes row h*D + 2j (real part of pair j), row h*D + D/2 + j takes row h*D + 2j + 1 (imaginary)."""
    head_dim = weight.shape[0] // n_heads
    rows = []
    for h in range(n_heads):
        rows += [h * head_dim + 2 * j for j in range(head_dim // 2)]
        rows += [h * head_dim + 2 * j + 1 for j in range(head_dim // 2)]
    return weight[rows]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_interleaved_layout_equals_rotate_half_after_permutation(shape):
    dim, n_heads, _, head_dim = shape
    w_ref = torch.randn(n_heads * head_dim, dim)                         # reference (interleaved) q weight
    x = torch.randn(2, SEQ_LEN, dim)
    positions = torch.arange(SEQ_LEN) + 5

    w_half = mt.interleaved_to_half(w_ref, n_heads)
    assert torch.equal(w_half, interleaved_to_half_by_index(w_ref, n_heads))
    assert torch.equal(mt.half_to_interleaved(w_half, n_heads), w_ref)
    assert torch.equal(mt.interleaved_to_half(mt.half_to_interleaved(w_ref, n_heads), n_heads), w_ref)

    q_ref = (x @ w_ref.T).view(2, SEQ_LEN, n_heads, head_dim).transpose(1, 2)          # (B, H, T, D)
    q_half = (x @ w_half.T).view(2, SEQ_LEN, n_heads, head_dim).transpose(1, 2)
    rotated_ref = apply_rope_interleaved(q_ref, positions)
    cos, sin = mt.RotaryEmbedding(head_dim)(positions[None])
    rotated_half = mt.apply_rope(q_half, cos, sin)
    # un-permute: interleaved dimension 2j is rotate-half dimension j, 2j+1 is j + D/2
    unpermuted = torch.empty_like(rotated_half)
    unpermuted[..., 0::2] = rotated_half[..., :head_dim // 2]
    unpermuted[..., 1::2] = rotated_half[..., head_dim // 2:]
    diff = max_abs_diff(unpermuted, rotated_ref)
    report(f"interleaved vs rotate-half {shape}", diff)
    assert diff <= ATOL
    # attention scores do not see the layout at all
    scores_ref = rotated_ref @ rotated_ref.transpose(-1, -2)
    scores_half = rotated_half @ rotated_half.transpose(-1, -2)
    torch.testing.assert_close(scores_half, scores_ref, atol=1e-4, rtol=1e-5)


def test_interleaved_rope_matches_complex_formula():
    # pair (2j, 2j+1) rotated by angle m * theta_j, written out with cos and sin
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    positions = torch.arange(6)
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)                  # (D/2,)
    angle = positions[:, None].double() * theta                                           # (T, D/2)
    a, b = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)
    torch.testing.assert_close(apply_rope_interleaved(x.float(), positions).double(), expected, atol=1e-5, rtol=1e-5)


def test_permutation_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mt.interleaved_to_half(torch.randn(30, 8), 4)
    with pytest.raises(ValueError):
        mt.half_to_interleaved(torch.randn(12, 8), 4)              # head_dim 3 is odd


# ---------------------------------------------------------------------------------------------------------------------
# The sliding-window mask
def mask_by_loop(seq_len: int, window: int | None) -> torch.Tensor:
    """Mistral 7B Fig 1 caption, "at most W tokens": query i sees key j iff i - W < j <= i (W keys, itself included)."""
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            mask[i, j] = j <= i and (window is None or i - window < j)
    return mask


@pytest.mark.parametrize("seq_len, window", [(1, 1), (5, 1), (8, 2), (9, 3), (12, 4), (7, 7), (6, 10), (10, None),
                                             (16, 5)])
def test_sliding_window_mask_matches_the_rule(seq_len, window):
    ours = mt.sliding_window_mask(seq_len, window)
    assert ours.dtype == torch.bool and ours.shape == (seq_len, seq_len)
    assert torch.equal(ours, mask_by_loop(seq_len, window))
    if window is not None:
        assert int(ours.sum(-1).max()) == min(window, seq_len)          # at most W keys per query, itself included


@pytest.mark.parametrize("seq_len, window", [(5, 1), (8, 2), (12, 4), (7, 7), (6, 10), (16, 5)])
def test_sliding_window_mask_matches_transformers(seq_len, window):
    q_idx, kv_idx = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None]
    by_function = sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
    config = hf_config(64, 4, 2, 16, window=window)
    config._attn_implementation = "sdpa"                                   # boolean mask
    built = create_sliding_window_causal_mask(config=config, inputs_embeds=torch.zeros(1, seq_len, 64),
                                              attention_mask=None, cache=None,
                                              position_ids=torch.arange(seq_len)[None], allow_is_causal_skip=False)
    ours = mt.sliding_window_mask(seq_len, window)
    assert torch.equal(ours, by_function)
    assert torch.equal(ours, built[0, 0])


def test_window_mask_with_offsets_matches_the_rule():
    # queries at times 10..13 against keys at arbitrary times (what a cache holds)
    query_pos = torch.arange(10, 14)
    key_pos = torch.tensor([6, 7, 8, 9, 10, 11, 12, 13, 2])
    for window in (1, 3, 4, None):
        ours = mt.window_mask(query_pos, key_pos, window)
        for a, i in enumerate(query_pos.tolist()):
            for b, j in enumerate(key_pos.tolist()):
                assert bool(ours[a, b]) == (j <= i and (window is None or j > i - window)), (window, i, j)


def test_window_mask_rejects_window_below_one():
    with pytest.raises(ValueError, match="window"):
        mt.sliding_window_mask(4, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Attention
def copy_attention(ref: MistralAttention, dim, n_heads, n_kv_heads, head_dim) -> mt.Attention:
    ours = mt.Attention(dim, n_heads, n_kv_heads, head_dim)
    with torch.no_grad():
        ours.wq.weight.copy_(ref.q_proj.weight)
        ours.wk.weight.copy_(ref.k_proj.weight)
        ours.wv.weight.copy_(ref.v_proj.weight)
        ours.wo.weight.copy_(ref.o_proj.weight)
    return ours.eval()


@pytest.mark.parametrize("window", [None, 1, 3, 5], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@torch.no_grad()
def test_attention_matches_transformers(shape, window):
    dim, n_heads, n_kv_heads, head_dim = shape
    config = hf_config(dim, n_heads, n_kv_heads, head_dim, window=window)
    ref = randomize_(MistralAttention(config, layer_idx=0), std=0.3).eval()
    ours = copy_attention(ref, dim, n_heads, n_kv_heads, head_dim)
    batch = 2
    x = torch.randn(batch, SEQ_LEN, dim)
    position_ids = torch.arange(SEQ_LEN)[None]
    cos_ref, sin_ref = MistralRotaryEmbedding(config)(x, position_ids)
    out_ref, weights_ref = ref(x, position_embeddings=(cos_ref, sin_ref),
                               attention_mask=hf_additive_mask(config, batch, SEQ_LEN))

    cos, sin = mt.RotaryEmbedding(head_dim)(position_ids)
    out = ours(x, cos, sin, mt.sliding_window_mask(SEQ_LEN, window))
    diff = max_abs_diff(out, out_ref)
    report(f"Attention {shape} W={window}", diff)
    assert diff <= ATOL

    # the explicit path (attention weights kept for plots) agrees too, weights included
    ours.record_weights = True
    out_explicit = ours(x, cos, sin, mt.sliding_window_mask(SEQ_LEN, window))
    assert max_abs_diff(out_explicit, out_ref) <= ATOL
    assert max_abs_diff(ours.last_weights, weights_ref) <= ATOL

    if window is None:                                      # the mask-free causal fast path
        ours.record_weights = False
        assert max_abs_diff(ours(x, cos, sin, None, is_causal=True), out_ref) <= ATOL


@torch.no_grad()
def test_window_changes_attention():
    # the window matters here: a test with the wrong window would see a different output
    dim, n_heads, n_kv_heads, head_dim = SHAPES[0]
    config = hf_config(dim, n_heads, n_kv_heads, head_dim, window=3)
    ref = randomize_(MistralAttention(config, layer_idx=0), std=0.3).eval()
    ours = copy_attention(ref, dim, n_heads, n_kv_heads, head_dim)
    x = torch.randn(1, SEQ_LEN, dim)
    cos, sin = mt.RotaryEmbedding(head_dim)(torch.arange(SEQ_LEN)[None])
    a = ours(x, cos, sin, mt.sliding_window_mask(SEQ_LEN, 3))
    b = ours(x, cos, sin, mt.sliding_window_mask(SEQ_LEN, 4))
    assert max_abs_diff(a[:, 3:], b[:, 3:]) > 1e-3
    assert max_abs_diff(a[:, :3], b[:, :3]) <= ATOL


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(mt.repeat_kv(x, 4), torch.repeat_interleave(x, 4, dim=1))


# ---------------------------------------------------------------------------------------------------------------------
# SwiGLU feed-forward
@pytest.mark.parametrize("dim, hidden_dim", [(64, 96), (32, 200), (40, 40)])
@torch.no_grad()
def test_feedforward_matches_transformers(dim, hidden_dim):
    config = tiny_config(dim=dim, hidden_dim=hidden_dim, n_heads=4, n_kv_heads=2, head_dim=8).to_hf()
    ref = randomize_(MistralMLP(config), std=0.2)
    ours = mt.FeedForward(dim, hidden_dim)
    ours.w1.weight.copy_(ref.gate_proj.weight)
    ours.w2.weight.copy_(ref.down_proj.weight)
    ours.w3.weight.copy_(ref.up_proj.weight)
    x = torch.randn(3, 11, dim)
    diff = max_abs_diff(ours(x), ref(x))
    report(f"FeedForward {dim}x{hidden_dim}", diff)
    assert diff <= ATOL


def test_token_embedding_is_a_row_lookup():
    emb = mt.TokenEmbedding(10, 4)
    ids = torch.tensor([[3, 0, 9]])
    assert torch.equal(emb(ids)[0], emb.weight[[3, 0, 9]])
