"""How good a model's predictions are, and how close two models' are: perplexity on a fixed text, top-1 agreement,
greedy agreement. For measuring what quantization costs (quantized.py, notebook 12, benchmarks/quant_quality.py).

The fixed text is built here, offline and deterministically: the reference prose that Python's `pydoc` ships
(corpus.py's `prose_documents`), so it is the same on every machine with the same Python version.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .corpus import prose_documents
from .generation import generate


def fixed_text(n_chars: int = 20_000) -> str:
    """English prose from pydoc's topics, the first `n_chars` characters of it."""
    return "\n\n".join(prose_documents(n_chars))[:n_chars]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, chunk: int = 512) -> float:
    """exp(mean next-token cross-entropy) of `model` on ids (T,), in independent chunks of `chunk` tokens."""
    ids = ids.reshape(-1)
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, chunk):
        piece = ids[start:start + chunk + 1][None]                                   # (1, <= chunk + 1)
        if piece.shape[1] < 2:
            break
        logits = model(piece[:, :-1]).float()                                        # (1, T, vocab)
        # the next-token loss: -log softmax(logits_t)[token_{t+1}], summed over the chunk
        total += F.cross_entropy(logits[0], piece[0, 1:], reduction="sum").item()
        count += piece.shape[1] - 1
    return math.exp(total / count)


@torch.inference_mode()
def top1_agreement(model, reference, ids: torch.Tensor, chunk: int = 512) -> float:
    """The fraction of positions of ids (T,) where `model`'s most likely next token is `reference`'s."""
    ids = ids.reshape(-1)
    same = count = 0
    for start in range(0, ids.numel(), chunk):
        piece = ids[start:start + chunk][None]
        same += int((model(piece).argmax(-1) == reference(piece).argmax(-1)).sum())
        count += piece.shape[1]
    return same / count


def greedy_agreement(model, reference, prompt: torch.Tensor, n: int) -> int:
    """How many of `reference`'s first n greedy tokens after `prompt` (1, T) `model` reproduces before it departs."""
    ours = generate(model, prompt, max_new_tokens=n)[0]
    theirs = generate(reference, prompt, max_new_tokens=n, fast=False)[0]
    differ = (ours != theirs).nonzero()
    return n if differ.numel() == 0 else int(differ[0])
