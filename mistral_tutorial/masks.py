"""Mistral's sliding-window mask, the one piece attention and the KV cache both use.

Mistral 7B's Fig 1 caption: "each token can attend to at most W tokens from the previous layer"; its §2 text says h_i
attends to the positions "between i - W and i" (W + 1 of them if both ends count). The mask here is W keys, itself
included: query i sees key j iff i - W < j <= i, as transformers' `sliding_window_causal_mask_function` and the W-slot
rolling buffer (§2, "Rolling Buffer Cache") have it. W = None is full causal attention. attention.py applies the
mask; cache.py builds it for a chunk; `sequence_attention` for a whole sequence without a cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkAttention(NamedTuple):
    """How a chunk attends, as `KVCache.begin` plans it: its boolean mask (or None), and whether it is plain causal."""

    mask: torch.Tensor | None
    is_causal: bool


def sliding_window_mask(seq_len: int, window: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: i - window < j <= i.

    window=None gives the plain causal mask (j <= i). Covers one sequence without a cache; the cached case, where
    queries and keys come from different ranges, is `window_mask` below and `cache.py`.
    """
    positions = torch.arange(seq_len, device=device)
    return window_mask(positions, positions, window)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (..., Tq, Tk) mask for queries at `query_pos` (..., Tq) and keys at `key_pos` (..., Tk).

    True where key_pos <= query_pos and, with a window W, key_pos > query_pos - W.
    """
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1 (or None for full attention), got {window}")
    q = query_pos[..., :, None]                                    # (..., Tq, 1)
    k = key_pos[..., None, :]                                      # (..., 1, Tk)
    # Mistral 7B Fig 1 caption: causal, and at most W keys (itself included)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


def sequence_attention(seq_len: int, window: int | None, device: torch.device | str | None = None) -> ChunkAttention:
    """How a whole sequence of `seq_len` tokens attends without a cache: plain causal while it fits in the window
    (no mask to build), else the (T, T) sliding-window mask."""
    if window is None or seq_len <= window:
        return ChunkAttention(None, True)
    return ChunkAttention(sliding_window_mask(seq_len, window, device=device), False)
