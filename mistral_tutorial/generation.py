"""Autoregressive generation on the rolling-buffer cache: chunked prefill, then one token at a time.

Greedy by default; temperature, top-k and top-p (nucleus, Holtzman et al. 2019) sampling with a seed. Beam search and
repetition penalties are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .model import Transformer
from .packed import pack_for_decode


def _as_batch(input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int], device: torch.device
              ) -> tuple[torch.Tensor, list[int]]:
    """(B, T) int64 tokens, left-padded with 0, and the padding length of each row."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token, e.g. the BOS token")
        return input_ids.to(device=device, dtype=torch.long), [0] * input_ids.shape[0]
    rows = list(input_ids)
    if rows and all(isinstance(t, int) for t in rows):
        rows = [rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("the prompt is empty: give at least one token per row, e.g. the BOS token")
    longest = max(len(r) for r in rows)
    pad = [longest - len(r) for r in rows]
    batch = torch.tensor([[0] * p + list(r) for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    return batch, pad


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): argmax when temperature == 0, else a sample. Returns (B,) int64."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                      # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Holtzman et al. 2019: keep the smallest prefix whose mass reaches p (the top token always stays)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Transformer,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    prefill_chunk_size: int | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens after each prompt: (B, N) int64 new tokens.

    input_ids: (B, T) tensor, or a list of token lists (different lengths are left-padded). prefill_chunk_size: the
    prompt goes through the model in chunks of this many tokens (default: W with a window, else all at once).
    stop_tokens: a row ends at the first of these; its later positions repeat that stop token, and generation stops
    early once every row has ended. on_token: called with each step's (B,) new tokens, for streaming.
    fast: first lay a CPU model out for fast decoding, in place (packed.py; the same tokens, to fp32 round-off, at
    about twice the speed, and no gradients afterwards: `mt.unpack(model)` undoes it). fast=False leaves it as it is.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature > 0 and seed is None and getattr(model, "parallelism", None) is not None:
        raise ValueError("sampling on a parallel model needs a seed: every rank samples on its own, and only the same "
                         "seed gives every rank the same token (pass seed=...)")
    config = model.config
    tokens, pad = _as_batch(input_ids, model.device)
    batch, prompt_len = tokens.shape
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        bad = tokens[(tokens < 0) | (tokens >= config.vocab_size)].unique()[:5].tolist()
        raise ValueError(f"token ids {bad} lie outside the vocabulary [0, {config.vocab_size})")
    total = prompt_len + max_new_tokens
    if config.sliding_window is None and total > config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_position_embeddings ({config.max_position_embeddings}) of a model without a window")
    if max_new_tokens == 0:
        return tokens.new_empty((batch, 0))
    if prefill_chunk_size is not None and prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be >= 1 (or None for the default), got {prefill_chunk_size}")
    chunk = prefill_chunk_size or config.sliding_window or prompt_len

    if fast:
        pack_for_decode(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    window = config.sliding_window
    cache = model.new_cache(batch, max_len=total if window is None else min(window, total), pad=pad)

    # Mistral §2, Fig 3: prefill the prompt chunk by chunk; only the last position's logits are needed
    for start in range(0, prompt_len, chunk):
        logits = model(tokens[:, start:start + chunk], cache=cache, last_only=True)         # (B, 1, vocab)

    stops = torch.as_tensor([] if stop_tokens is None else stop_tokens, dtype=torch.long, device=model.device).flatten()
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=model.device)
    for step in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)       # (B,)
        if stops.numel():
            next_token = torch.where(finished, out[:, step - 1] if step else next_token, next_token)
            finished |= torch.isin(next_token, stops)
        out[:, step] = next_token
        if on_token is not None:
            on_token(next_token)
        if step + 1 == max_new_tokens or (stops.numel() and bool(finished.all())):
            return out[:, :step + 1]
        logits = model(next_token[:, None], cache=cache, check_ids=False)                    # (B, 1, vocab)
    return out
