"""The rolling-buffer KV cache and chunked prefill (Mistral 7B §2, Figs 2 and 3).

With a sliding window W, a layer never looks further back than W keys, so the cache keeps exactly W slots per layer:
the key and value of (time) position i live in slot i mod W, and memory stops growing at W tokens. Without a window
(Llama, Mixtral) the cache is preallocated to `max_len` slots and slot i holds position i.

A chunk of T new tokens at times t0 .. t0+T-1 attends to what the cache holds (through the window) and causally to
itself (Fig 3). When T = 1 (decoding) the new key is written first and the whole buffer is attended, mask-free once it is
full; a longer chunk attends to the buffer concatenated with itself, and only then overwrites the slots it needs.

Batches of prompts of different lengths are left-padded: row b has `pad[b]` padding tokens in front, which no real
token may attend to, and its RoPE positions start at 0 on its first real token.
"""

from __future__ import annotations

import torch

from .masks import ChunkAttention, window_mask


class CacheFullError(RuntimeError):
    """A full-attention cache was asked to hold more tokens than it was allocated for."""


class KVCache:
    """Keys and values of every layer: (n_layers, B, Hkv, S, D) with S = W (rolling) or max_len (full attention).

    Use: `plan = cache.begin(T)` once per forward, then `cache.update(layer, k, v)` in every layer, then
    `cache.commit()`. The model does this; see `Transformer.forward`.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | list[int] | None = None,
    ) -> None:
        self.window = sliding_window
        # Mistral §2 "Rolling buffer cache": a fixed cache of size W; full attention needs every position kept.
        # A run known to stay shorter than W (max_len < W) needs only max_len slots, and never wraps.
        self.size = min(sliding_window, max_len) if sliding_window is not None else max_len  # S
        self.max_len = max_len
        shape = (n_layers, batch_size, n_kv_heads, self.size, head_dim)                     # (L, B, Hkv, S, D)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_time = torch.full((self.size,), -1, dtype=torch.long, device=device)      # time held in each slot
        self.pad = None
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=device)
            if pad.shape != (batch_size,):
                raise ValueError(f"pad must have shape ({batch_size},), got {tuple(pad.shape)}")
            self.pad = pad if bool((pad > 0).any()) else None
        self.time = 0                       # tokens (padding included) seen so far: the next token's time index
        self.device = torch.device(device)
        self._plan: _ChunkPlan | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        """Bytes held by keys and values together."""
        return self.keys.numel() * self.keys.element_size() * 2

    # -----------------------------------------------------------------------------------------------------------------
    def positions(self, seq_len: int) -> torch.Tensor:
        """RoPE positions of the next `seq_len` tokens: (1 or B, T) = time - pad (clamped at 0 on padding)."""
        times = torch.arange(self.time, self.time + seq_len, device=self.device)           # (T,)
        if self.pad is None:
            return times[None]                                                              # (1, T)
        return (times[None] - self.pad[:, None]).clamp(min=0)                               # (B, T)

    def begin(self, seq_len: int) -> ChunkAttention:
        """Plan the next chunk of `seq_len` tokens; returns how it attends: (mask, is_causal).

        mask: boolean (1 or B, 1, T, Tk), True where attention is allowed, or None (nothing to mask). is_causal: that
        mask is exactly the plain causal one over the chunk (the first chunk, no padding, no window cut), so the model
        can use the faster is_causal attention instead.
        """
        t0, size = self.time, self.size
        causal = (t0 == 0 and self.pad is None and seq_len > 1
                  and (self.window is None or seq_len <= self.window) and seq_len <= size)
        if (self.window is None or size < self.window) and t0 + seq_len > size:
            raise CacheFullError(f"the cache was allocated for {size} positions (max_len) and cannot roll over "
                                 f"without a window of that size: {t0} + {seq_len} new tokens do not fit. "
                                 f"Allocate a larger max_len.")
        new_times = torch.arange(t0, t0 + seq_len, device=self.device)                     # (T,)
        write_first = self.window is None or seq_len == 1 or t0 + seq_len <= size  # nothing needed is overwritten
        # Slots the new tokens go to: the last min(T, S) of them survive
        kept = min(seq_len, size)
        first_slot = (t0 + seq_len - kept) % size
        contiguous = first_slot + kept <= size
        slots = torch.arange(t0 + seq_len - kept, t0 + seq_len, device=self.device) % size
        slot_time_after = self.slot_time.clone()
        slot_time_after[slots] = new_times[seq_len - kept:]

        if write_first:
            # Attend to the buffer after writing: slots [0, n_keys) hold everything a query may need
            n_keys = min(t0 + seq_len, size)
            key_times = slot_time_after[:n_keys]                                            # (Tk,)
        else:
            # Attend to [buffer as it was, new chunk]: nothing a query needs has been overwritten yet
            n_keys = min(t0, size)
            key_times = torch.cat([self.slot_time[:n_keys], new_times])                     # (Tk,)

        # one query sees every key the buffer holds (S = W keeps exactly its window): no mask unless there is padding
        mask = self._mask(new_times, key_times, needs_mask=seq_len > 1)
        self._plan = _ChunkPlan(seq_len, write_first, n_keys, kept, first_slot, contiguous, slots, slot_time_after)
        return ChunkAttention(mask, causal)

    def _mask(self, query_times: torch.Tensor, key_times: torch.Tensor, needs_mask: bool) -> torch.Tensor | None:
        if not needs_mask and self.pad is None:
            return None                       # one query, every held key inside its window: nothing to mask
        allowed = window_mask(query_times, key_times, self.window) & (key_times >= 0)      # (T, Tk)
        if self.pad is None:
            return allowed[None, None]                                                      # (1, 1, T, Tk)
        # padding keys are invisible; a token always sees itself, so padded rows stay finite
        real = key_times[None, :] >= self.pad[:, None]                                      # (B, Tk)
        itself = key_times[None, :] == query_times[:, None]                                 # (T, Tk)
        return (allowed[None] & (real[:, None, :] | itself[None]))[:, None]                 # (B, 1, T, Tk)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's keys and values (B, Hkv, T, D) of `layer`; return the ones to attend (B, Hkv, Tk, D).

        Those come back in the chunk's dtype: a bf16 chunk of a model whose cache is fp32 (the fused layout's long
        prefill) attends in bf16, as the plain layout does, and its keys and values are kept in fp32."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("KVCache.update() called outside a forward: call begin(T) first")
        keys, values = self.keys[layer], self.values[layer]                                # (B, Hkv, S, D)
        if plan.write_first:
            self._write(keys, values, k, v, plan)
            return keys[:, :, :plan.n_keys].to(k.dtype), values[:, :, :plan.n_keys].to(v.dtype)
        attend_k = torch.cat([keys[:, :, :plan.n_keys].to(k.dtype), k], dim=2)             # (B, Hkv, Tk, D)
        attend_v = torch.cat([values[:, :, :plan.n_keys].to(v.dtype), v], dim=2)
        self._write(keys, values, k, v, plan)
        return attend_k, attend_v

    @staticmethod
    def _write(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan) -> None:
        k, v = k[:, :, k.shape[2] - plan.kept:], v[:, :, v.shape[2] - plan.kept:]          # the last min(T, S)
        k, v = k.to(keys.dtype), v.to(values.dtype)
        if plan.contiguous:
            keys[:, :, plan.first_slot:plan.first_slot + plan.kept] = k
            values[:, :, plan.first_slot:plan.first_slot + plan.kept] = v
        else:  # the chunk wraps around the end of the buffer: slot i mod W
            keys.index_copy_(2, plan.slots, k)
            values.index_copy_(2, plan.slots, v)

    def commit(self) -> None:
        """Close the chunk: its tokens are now part of the cache."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("KVCache.commit() without begin()")
        self.slot_time = plan.slot_time_after
        self.time += plan.seq_len
        self._plan = None


class _ChunkPlan:
    __slots__ = ("seq_len", "write_first", "n_keys", "kept", "first_slot", "contiguous", "slots", "slot_time_after")

    def __init__(self, seq_len, write_first, n_keys, kept, first_slot, contiguous, slots, slot_time_after):
        self.seq_len, self.write_first, self.n_keys, self.kept = seq_len, write_first, n_keys, kept
        self.first_slot, self.contiguous, self.slots, self.slot_time_after = first_slot, contiguous, slots, slot_time_after
