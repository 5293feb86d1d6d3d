"""Notebook 04's exercises: the sliding-window mask, the receptive field, the rolling buffer's write and read order,
and the plan of a chunked prefill (Mistral 7B §2, Figs 1-3)."""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..masks import sliding_window_mask
from .checker import Case, Exercise


def _mask_cases() -> list[Case]:
    cases = [Case((7, 3)), Case((10, 4)), Case((6, 2)), Case((5, 1), "W = 1: each token sees only itself"),
             Case((4, 4), "W = T"), Case((4, 6), "W longer than the sequence"), Case((6, None), "window None: causal"),
             Case((1, 3), "one token")]
    return cases


def _reach_reference(window: int, n_layers: int) -> int:
    """Propagate the last token's dependence through n_layers masks, on a sequence long enough never to cut it."""
    seq_len = n_layers * window + 2
    mask = sliding_window_mask(seq_len, window).long()                        # (T, T)
    reached = torch.zeros(seq_len, dtype=torch.long)
    reached[-1] = 1
    for _ in range(n_layers):
        reached = ((reached @ mask) > 0).long()                               # j reached if some reached i sees j
    return int(reached.sum())


def _fed_cache(n_tokens: int, window: int, keys: torch.Tensor | None = None) -> KVCache:
    """A one-layer, one-head rolling cache of W slots that has taken n_tokens keys, one token at a time."""
    head_dim = 1 if keys is None else keys.shape[-1]
    cache = KVCache(1, 1, 1, head_dim, window, max_len=max(n_tokens, window),
                    dtype=torch.float32 if keys is None else keys.dtype)
    for t in range(n_tokens):
        key = torch.zeros(1, 1, 1, head_dim) if keys is None else keys[None, None, t:t + 1]      # (B, Hkv, 1, D)
        cache.begin(1)
        cache.update(0, key, key)
        cache.commit()
    return cache


def _buffer_reference(keys: torch.Tensor, window: int) -> torch.Tensor:
    return _fed_cache(keys.shape[0], window, keys).keys[0, 0, 0].clone()      # (W, D)


def _buffer_cases() -> list[Case]:
    g = torch.Generator().manual_seed(401)
    return [Case((torch.randn(n, dim, generator=g), window), label)
            for n, window, dim, label in [(10, 4, 3, ""), (7, 3, 2, ""), (3, 5, 2, "fewer tokens than slots"),
                                          (4, 4, 3, "exactly W tokens"), (5, 4, 3, "W + 1 tokens: the first wrap"),
                                          (6, 1, 2, "W = 1: one slot")]]


def _read_reference(n_seen: int, window: int) -> list[int]:
    times = _fed_cache(n_seen, window).slot_time                              # (W,) the time each slot holds, or -1
    return [int(slot) for slot in times.argsort() if times[slot] >= 0]        # slots, oldest first


def _read_cases() -> list[Case]:
    return [Case((10, 4)), Case((7, 3)), Case((2, 4), "the buffer not yet full"), Case((4, 4), "just full"),
            Case((5, 4), "one past full"), Case((8, 4), "a multiple of W"), Case((0, 3), "nothing written yet"),
            Case((5, 1), "W = 1")]


def _plan_reference(prompt_len: int, chunk_size: int, window: int | None) -> list[tuple[int, int, int]]:
    mask = sliding_window_mask(prompt_len, window)                            # (T, T)
    plan = []
    for start in range(0, prompt_len, chunk_size):
        stop = min(start + chunk_size, prompt_len)
        keys = mask[start:stop].any(dim=0).nonzero().flatten()                # keys some query of the chunk sees
        plan.append((start, stop, int(keys.min())))
    return plan


def _plan_cases() -> list[Case]:
    return [Case((10, 4, 4), "chunks of W, as Mistral's prefill"), Case((10, 3, 4), "chunks shorter than W"),
            Case((12, 5, 3), "chunks longer than W"), Case((9, 9, None), "one chunk, no window"),
            Case((7, 10, 3), "a chunk longer than the prompt"), Case((5, 1, 1), "W = 1, one token a chunk"),
            Case((16, 4, 8), "")]


def _last_window(keys: torch.Tensor, window: int) -> torch.Tensor:
    buffer = torch.zeros(window, keys.shape[1], dtype=keys.dtype)
    last = keys[-window:]
    buffer[:len(last)] = last
    return buffer


def _shifted_slots(keys: torch.Tensor, window: int) -> torch.Tensor:
    buffer = torch.zeros(window, keys.shape[1], dtype=keys.dtype)
    for t in range(keys.shape[0]):
        buffer[(t + 1) % window] = keys[t]
    return buffer


EXERCISES = [
    Exercise(
        "04.1-window-mask", "sliding_window_mask", sliding_window_mask, "mt.sliding_window_mask", _mask_cases,
        hint="query i sees key j iff i - W < j <= i: W keys, itself included (W = 1: only itself); window None is the "
             "plain causal mask j <= i.",
        more="With i = torch.arange(T)[:, None] and j = torch.arange(T)[None, :]: `(j <= i) & (j > i - window)`; "
             "skip the second part when window is None.",
        mistakes={"the window holds W + 1 keys (j >= i - W): that is §2's 'between i - W and i' read with both ends "
                  "included; the model (reference code, transformers, Fig 1's 'at most W tokens') keeps W keys, "
                  "i - W < j <= i.": lambda t, w: sliding_window_mask(t, None if w is None else w + 1),
                  "the window holds W - 1 keys: W keys counting the token itself, i - W < j <= i.":
                  lambda t, w: sliding_window_mask(t, None if w is None or w == 1 else w - 1),
                  "the mask is a band |i - j| < W: it lets queries see the future; the causal half j <= i is missing.":
                  lambda t, w: (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs() < (w or t)}),
    Exercise(
        "04.2-receptive-field", "receptive_field_size", _reach_reference, "the mask propagated layer by layer",
        lambda: [Case((4, 3)), Case((3, 4)), Case((4, 1), "one layer"), Case((1, 5), "W = 1"),
                 Case((5, 0), "no layers: the token itself"), Case((2, 6))],
        hint="each layer reaches W - 1 positions further back (the window includes the token itself), and the token "
             "itself counts once: n_layers (W - 1) + 1.",
        more="Count one layer first: W tokens (itself and W - 1 before it). Each further layer adds W - 1 new ones. "
             "The paper's 'k x W' counts W per layer.",
        mistakes={"n_layers x W: the paper's rounded span counts W per layer, but the window includes the token itself, "
                  "so each layer reaches W - 1 further back.": lambda w, n: n * w,
                  "the token itself is not counted: n_layers (W - 1) positions back, plus itself.":
                  lambda w, n: n * (w - 1)}),
    Exercise(
        "04.3-rolling-buffer", "rolling_buffer", _buffer_reference, "mt.KVCache's keys after one token at a time",
        _buffer_cases,
        hint="position t is written to slot t mod W, overwriting position t - W; entries never move, and slots not "
             "yet written stay zero.",
        more="Start from `torch.zeros(window, D)`; for t in range(T): `buffer[t % window] = keys[t]`.",
        mistakes={"the last W keys were kept in time order: a rolling buffer never moves its entries; position t stays "
                  "in slot t mod W until position t + W overwrites it.": _last_window,
                  "position t went to slot (t + 1) mod W: slots count from 0, so it is t mod W.": _shifted_slots}),
    Exercise(
        "04.4-read-order", "read_order", _read_reference, "mt.KVCache.slot_time", _read_cases,
        hint="before the buffer fills, slots 0, 1, ... hold times 0, 1, ...; once n > W, the oldest position n - W "
             "sits in slot n mod W: read from there to the end, then from slot 0.",
        more="The slots hold positions max(0, n - W) .. n - 1; position t is in slot t mod W: "
             "`[t % window for t in range(max(0, n_seen - window), n_seen)]`.",
        mistakes={"the slots were read in slot order: that is time order only until the buffer wraps around.":
                  lambda n, w: list(range(min(n, w))),
                  "the slots are listed newest first: read them oldest first.":
                  lambda n, w: [t % w for t in range(n - 1, max(0, n - w) - 1, -1)]}),
    Exercise(
        "04.5-prefill-plan", "prefill_plan", _plan_reference, "the rows of mt.sliding_window_mask", _plan_cases,
        hint="a chunk [start, stop) attends to the cache and to itself (Fig 3): its first query, at start, sees back "
             "to start - W + 1 (never below 0); window None: back to 0. The last chunk stops at the prompt's end.",
        more="`for start in range(0, prompt_len, chunk_size)`: stop = min(start + chunk_size, prompt_len), first_key = "
             "0 if window is None else max(0, start - window + 1).",
        mistakes={"the first key is start - W: that gives the chunk's first query W + 1 keys; i - W < j, so start - W + 1.":
                  lambda t, c, w: [(s, min(s + c, t), 0 if w is None else max(0, s - w)) for s in range(0, t, c)],
                  "each chunk attends only to itself: after the first chunk, the cache holds W - 1 earlier keys it must "
                  "see (Fig 3).": lambda t, c, w: [(s, min(s + c, t), s) for s in range(0, t, c)],
                  "the last chunk runs past the prompt: stop = min(start + chunk_size, prompt_len).":
                  lambda t, c, w: [(s, s + c, 0 if w is None else max(0, s - w + 1)) for s in range(0, t, c)]}),
]
