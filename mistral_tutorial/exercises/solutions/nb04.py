"""Solutions to notebook 04's exercises: the window mask, the receptive field, the rolling buffer, the prefill plan."""

from __future__ import annotations

import torch


def sliding_window_mask(seq_len: int, window: int | None) -> torch.Tensor:
    i = torch.arange(seq_len)[:, None]                                # query positions (T, 1)
    j = torch.arange(seq_len)[None, :]                                # key positions (1, T)
    allowed = j <= i                                                  # causal
    if window is not None:
        allowed = allowed & (j > i - window)                          # Mistral 7B: i - W < j <= i, W keys
    return allowed                                                    # (T, T) bool


def receptive_field_size(window: int, n_layers: int) -> int:
    # each layer reaches W - 1 positions further back; the token itself counts once
    return n_layers * (window - 1) + 1


def rolling_buffer(keys: torch.Tensor, window: int) -> torch.Tensor:
    buffer = torch.zeros(window, keys.shape[1], dtype=keys.dtype)     # (W, D), one slot per position mod W
    for t in range(keys.shape[0]):
        buffer[t % window] = keys[t]                                  # Mistral 7B §2: position t -> slot t mod W
    return buffer


def read_order(n_seen: int, window: int) -> list[int]:
    # the buffer holds positions max(0, n - W) .. n - 1; position t lives in slot t mod W
    return [t % window for t in range(max(0, n_seen - window), n_seen)]


def prefill_plan(prompt_len: int, chunk_size: int, window: int | None) -> list[tuple[int, int, int]]:
    plan = []
    for start in range(0, prompt_len, chunk_size):
        stop = min(start + chunk_size, prompt_len)                    # the last chunk may be shorter
        # Fig 3: the chunk sees the cache and itself; its first query sees back to start - W + 1
        first_key = 0 if window is None else max(0, start - window + 1)
        plan.append((start, stop, first_key))
    return plan
