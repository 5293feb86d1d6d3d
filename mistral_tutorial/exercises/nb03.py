"""Notebook 03's exercises: the causal mask, repeat_kv, the attention weights, and grouped-query attention by hand."""

from __future__ import annotations

import math

import torch

from ..attention import attention_weights, repeat_kv
from ..masks import sliding_window_mask
from .checker import Case, Exercise


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _causal_reference(seq_len: int) -> torch.Tensor:
    return sliding_window_mask(seq_len, None)


def _repeat_cases() -> list[Case]:
    g = _generator(301)
    return [Case((torch.randn(shape, generator=g).to(dtype), n_rep), label)
            for shape, n_rep, dtype, label in [((2, 2, 5, 4), 4, torch.float32, ""), ((1, 3, 2, 8), 2, torch.float32, ""),
                                               ((1, 1, 3, 8), 8, torch.float32, "n_kv_heads = 1 (MQA)"),
                                               ((2, 4, 3, 2), 1, torch.float32, "n_rep = 1 (MHA)"),
                                               ((1, 2, 4, 4), 3, torch.bfloat16, "bf16")]]


def _weights_cases() -> list[Case]:
    g = _generator(302)
    cases = []
    for batch, heads, q_len, k_len, head_dim, mask, dtype, label in [
            (2, 3, 5, 5, 8, sliding_window_mask(5, None), torch.float32, "causal"),
            (1, 2, 6, 6, 16, sliding_window_mask(6, 2), torch.float32, "a sliding window"),
            (1, 2, 4, 4, 4, None, torch.float32, "mask None: everything allowed"),
            (2, 1, 1, 7, 8, torch.ones(1, 7, dtype=torch.bool), torch.float32, "one query against seven keys"),
            (1, 2, 5, 5, 8, sliding_window_mask(5, None), torch.bfloat16, "bf16")]:
        q = (2.0 * torch.randn(batch, heads, q_len, head_dim, generator=g)).to(dtype)
        k = (2.0 * torch.randn(batch, heads, k_len, head_dim, generator=g)).to(dtype)
        cases.append(Case((q, k, mask), label))
    return cases


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    mask = sliding_window_mask(q.shape[2], window)                             # (T, T)
    return attention_weights(q, repeat_kv(k, n_rep), mask) @ repeat_kv(v, n_rep)


def _attention_cases() -> list[Case]:
    g = _generator(303)
    cases = []
    for batch, heads, kv_heads, seq_len, head_dim, window, label in [
            (2, 4, 2, 6, 8, None, "causal"), (1, 6, 3, 7, 4, 3, "a window shorter than the sequence"),
            (1, 4, 1, 5, 8, 2, "n_kv_heads = 1"), (2, 2, 2, 4, 8, None, "n_kv_heads = n_heads"),
            (1, 2, 1, 5, 4, 1, "W = 1: each token sees only itself"), (1, 4, 2, 3, 8, 8, "W longer than the sequence")]:
        q = torch.randn(batch, heads, seq_len, head_dim, generator=g)
        k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g)
        v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g)
        cases.append(Case((q, k, v, window), label))
    return cases


def _additive(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    return 0.0 if mask is None else torch.zeros(mask.shape, dtype=like.dtype).masked_fill(~mask, float("-inf"))


def _softmax_over_queries(q, k, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + _additive(mask, q)
    return torch.softmax(scores.float(), dim=-2).to(q.dtype)


def _masked_after(q, k, mask):
    weights = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).float(), dim=-1).to(q.dtype)
    return weights if mask is None else weights * mask


def _tiled(q, k, v, window):
    n_rep = q.shape[1] // k.shape[1]
    mask = sliding_window_mask(q.shape[2], window)
    return attention_weights(q, k.repeat(1, n_rep, 1, 1), mask) @ v.repeat(1, n_rep, 1, 1)


def _window_plus_one(q, k, v, window):
    return _attention_reference(q, k, v, None if window is None else window + 1)


def _no_mask(q, k, v, window):
    n_rep = q.shape[1] // k.shape[1]
    return attention_weights(q, repeat_kv(k, n_rep), None) @ repeat_kv(v, n_rep)


EXERCISES = [
    Exercise(
        "03.1-causal-mask", "make_causal_mask", _causal_reference, "mt.sliding_window_mask(T, None)",
        lambda: [Case((5,)), Case((9,)), Case((1,), "one token"), Case((2,))],
        hint="row i is the query, column j the key: True where j <= i (the diagonal included), a bool tensor.",
        more="`torch.ones(seq_len, seq_len, dtype=torch.bool).tril()`, or compare `torch.arange` as a column with a row.",
        mistakes={"upper triangle: that lets every query see the future and not its past (the mask transposed).":
                  lambda t: torch.ones(t, t, dtype=torch.bool).triu(),
                  "the diagonal is missing: a token must see itself (j <= i, not j < i).":
                  lambda t: torch.ones(t, t, dtype=torch.bool).tril(-1)}),
    Exercise(
        "03.2-repeat-kv", "repeat_kv", repeat_kv, "mt.repeat_kv", _repeat_cases,
        hint="query head h uses key/value head h // n_rep: each kv head is copied n_rep times *next to itself* "
             "(repeat_interleave), not the whole set of heads tiled n_rep times.",
        more="`x.repeat_interleave(n_rep, dim=1)` does it; so does `x[:, :, None].expand(B, Hkv, n_rep, T, D)` "
             "reshaped to (B, Hkv * n_rep, T, D), without copying until the reshape.",
        mistakes={"the heads were tiled (x.repeat(1, n_rep, 1, 1)): head h then gets kv head h % Hkv, but GQA groups "
                  "consecutive query heads, h // n_rep (repeat_interleave).": lambda x, n: x.repeat(1, n, 1, 1)}),
    Exercise(
        "03.3-attention-weights", "attention_weights", attention_weights, "mt.attention_weights", _weights_cases,
        hint="softmax over the keys (the last axis) of q k^T / sqrt(D), with -inf where the mask is False, so that "
             "every row still sums to 1 over the allowed keys.",
        more="`scores = q @ k.transpose(-2, -1) / math.sqrt(D)`; `scores.masked_fill(~mask, float('-inf'))` when a "
             "mask is given; `torch.softmax(scores.float(), dim=-1).to(q.dtype)`.",
        mistakes={"the scores are not scaled by 1 / sqrt(D) (Vaswani et al. eq. 1).":
                  lambda q, k, m: attention_weights(q * math.sqrt(q.shape[-1]), k, m),
                  "the scores were divided by D instead of sqrt(D).":
                  lambda q, k, m: attention_weights(q / math.sqrt(q.shape[-1]), k, m),
                  "the softmax ran over the queries (dim -2): each query's weights over its keys must sum to 1.":
                  _softmax_over_queries,
                  "the mask was applied after the softmax: masked weights are zero, but the rows no longer sum to 1; "
                  "put -inf in the scores instead.": _masked_after}),
    Exercise(
        "03.4-grouped-attention", "grouped_attention", _attention_reference,
        "mt.attention_weights with mt.repeat_kv and mt.sliding_window_mask", _attention_cases,
        hint="three pieces, in order: share each kv head with its n_rep query heads (h // n_rep), mask the scores with "
             "i - W < j <= i (W None: j <= i), softmax over the keys, then weigh v.",
        more="n_rep = H // Hkv; `k = k.repeat_interleave(n_rep, dim=1)` and the same for v; the mask is "
             "section 3's rule, (T, T), broadcast over batch and heads; out = weights @ v.",
        mistakes={"the kv heads were tiled (repeat), not interleaved: query head h must meet kv head h // n_rep.": _tiled,
                  "the window holds W + 1 keys: query i sees key j iff i - W < j <= i, W keys, itself included.":
                  _window_plus_one,
                  "nothing is masked: a query must not see later keys (and, with a window, keys W or more back).":
                  _no_mask}),
]
