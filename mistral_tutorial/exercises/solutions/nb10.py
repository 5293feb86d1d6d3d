"""Solutions to notebook 10's exercises: the top-k and top-p filters, sampling with a seed, greedy generation."""

from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]      # (B, 1): the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))                      # ties with the k-th stay


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)                 # (B, V), most probable first
    probs = sorted_logits.softmax(dim=-1)
    # Holtzman et al. 2019: the smallest prefix whose mass reaches p; a token is outside when the mass before it does
    outside = probs.cumsum(dim=-1) - probs >= top_p                             # (B, V) in sorted order
    outside = outside.scatter(-1, order, outside)                               # back to vocabulary order
    return logits.masked_fill(outside, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)                                            # greedy: (B,)
    logits = logits.float() / temperature
    if top_k:                                                                   # None or 0: off
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    probs = logits.softmax(dim=-1)                                              # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)         # one draw per row, (B,)


def greedy_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    ids = prompt_ids                                                            # (1, T)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(ids)                                                 # (1, T, V): no cache, the whole sequence
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)                    # (1, 1) from the last position
        ids = torch.cat([ids, next_id], dim=1)
    return ids[:, prompt_ids.shape[1]:]                                         # (1, N): the new tokens only
