"""Autoregressive generation on the rolling-buffer cache: chunked prefill, then one token at a time.

Greedy by default; temperature, top-k and top-p (nucleus, Holtzman et al. 2019) sampling with a seed. Beam search and
repetition penalties are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .inputs import (
    as_stop_tokens,
    as_token_batch,
    check_int,
    check_positions,
    check_sampling,
    check_seed,
    check_vocabulary,
)
from .model import Transformer

# Below this temperature, logits / T can overflow fp32: the logits are shifted by their maximum, in fp64, first.
_TINY_TEMPERATURE = 1e-6


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): argmax when temperature == 0, else a sample. Returns (B,) int64.

    temperature: finite, >= 0; top_k: None or an int >= 0 (0 = off); top_p: None or in (0, 1]. Checked here, so a
    NaN or negative value is a ValueError naming it rather than an error from inside torch.multinomial.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < _TINY_TEMPERATURE:      # softmax is shift-invariant: (z - max z) / T cannot overflow
        logits = logits.double()
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    else:
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

    input_ids: a (B, T) or (T,) integer tensor or numpy array, a list of ints, or a list of such lists (different
    lengths are left-padded); floats, bools and strings are refused with a TypeError. prefill_chunk_size: the
    prompt goes through the model in chunks of this many tokens (default: W with a window, else all at once).
    stop_tokens: a row ends at the first of these; its later positions repeat that stop token, and generation stops
    early once every row has ended. on_token: called with each step's (B,) new tokens, for streaming.
    fast: first put a CPU model in the decode layout measured fastest on this CPU, in place (kernel_choice.py; the
    same tokens, to fp32 round-off; `mt.unpack(model)` undoes it). fast=False leaves the model as it is.
    Every argument is checked before the model runs (inputs.py): a bad one is a TypeError or ValueError naming it.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"generate() takes a mistral_tutorial Transformer as `model`, got {type(model).__name__}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p)
    seed = check_seed(seed)
    if prefill_chunk_size is not None:
        prefill_chunk_size = check_int("prefill_chunk_size", prefill_chunk_size, 1)
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be a function of the step's (B,) tokens, got {type(on_token).__name__}")
    if temperature > 0 and seed is None and getattr(model, "parallelism", None) is not None:
        raise ValueError("sampling on a parallel model needs a seed: every rank samples on its own, and only the same "
                         "seed gives every rank the same token (pass seed=...)")
    config = model.config
    tokens, pad = as_token_batch(input_ids, model.device)
    stops = as_stop_tokens(stop_tokens, model.device)
    batch, prompt_len = tokens.shape
    check_vocabulary(tokens, config.vocab_size)
    total = prompt_len + max_new_tokens
    check_positions(total, config.max_position_embeddings, config.sliding_window,
                    f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total}")
    if max_new_tokens == 0:
        return tokens.new_empty((batch, 0))
    chunk = prefill_chunk_size or config.sliding_window or prompt_len

    if fast:
        model.optimize_for_decode()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    window = config.sliding_window
    cache = model.new_cache(batch, max_len=total if window is None else min(window, total), pad=pad)

    # Mistral §2, Fig 3: prefill the prompt chunk by chunk; only the last position's logits are needed
    for start in range(0, prompt_len, chunk):
        logits = model(tokens[:, start:start + chunk], cache=cache, last_only=True)         # (B, 1, vocab)

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
