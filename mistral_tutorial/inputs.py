"""Checking what a user hands to `generate()`: token ids and sampling settings.

Every check raises a TypeError or ValueError that names the argument, the value given and what would work, before any
tensor reaches torch: a float token id is never truncated, a NaN temperature never reaches `torch.multinomial`.
The checks on token ids that the model and generate() share (the vocabulary range, the empty prompt, the position
limit) are written here once, and both call them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 50 else text[:47] + '...'} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (numpy's integers register as numbers.Integral, its bool does not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> int:
    """value as an int >= minimum; TypeError for a non-integer (a float, a bool, a string), ValueError below minimum."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_sampling(temperature: Any, top_k: Any, top_p: Any) -> None:
    """temperature finite and >= 0 (0 = greedy); top_k None or an int >= 0 (0 = off); top_p None or in (0, 1]."""
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number >= 0 (0 = greedy), got {_describe(temperature)}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        check_int("top_k", top_k, 0)
    if top_p is not None:
        if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool):
            raise TypeError(f"top_p must be a number in (0, 1] or None, got {_describe(top_p)}")
        if not 0.0 < top_p <= 1.0:                                         # False for NaN too
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def check_seed(seed: Any) -> int | None:
    """None, or an int a torch.Generator takes (-2**63 <= seed < 2**64)."""
    if seed is None:
        return None
    if not is_int(seed):
        raise TypeError(f"seed must be an int or None, got {_describe(seed)}")
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64) (a 64-bit integer), got {seed}")
    return int(seed)


def _integer_tensor(value: Any, name: str) -> torch.Tensor | None:
    """A torch tensor or numpy array of integers as an int64 tensor; None for anything else. Floats, bools and strings
    are refused: their conversion to ids would be a guess."""
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "ndim"):
        if value.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer token ids, got a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(value.astype("int64", copy=False))
    if not isinstance(value, torch.Tensor):
        return None
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got a {value.dtype} tensor: use a torch.long tensor "
                        f"(convert with .long() only if the values are whole token ids)")
    return value.long()


def _is_scalar(value: Any) -> bool:
    """Not a row: anything but a sequence (a string counts as a row, to be told to tokenize), a tensor or an array."""
    if isinstance(value, (torch.Tensor,)) or (type(value).__module__ == "numpy" and hasattr(value, "ndim")):
        return value.ndim == 0
    return not isinstance(value, Sequence)


def _token_row(row: Any, name: str, index: int | None) -> list[int]:
    """One prompt as a list of ints; names the first entry that is not an integer."""
    where = f"{name}" if index is None else f"{name}[{index}]"
    if isinstance(row, str):
        raise TypeError(f"{where} is the string {row[:40]!r}: tokenize first, e.g. tokenizer.encode(text)")
    tensor = _integer_tensor(row, where)
    if tensor is not None:
        if tensor.dim() != 1:
            raise ValueError(f"{where} must be one row of token ids, got shape {tuple(tensor.shape)}")
        return tensor.tolist()
    if not isinstance(row, Sequence):
        raise TypeError(f"{where} must be a list of token ids, got {_describe(row)}")
    ids = []
    for position, token in enumerate(row):
        if isinstance(token, torch.Tensor) and token.dim() == 0:
            token = _integer_tensor(token, f"{where}[{position}]").item()
        if not is_int(token):
            hint = " (tokenize first)" if isinstance(token, str) else ""
            raise TypeError(f"token ids must be integers: {where}[{position}] is {_describe(token)}{hint}")
        ids.append(int(token))
    return ids


def as_token_batch(input_ids: Any, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(B, T) int64 tokens on `device`, left-padded with 0, and the padding length of each row.

    input_ids: a (B, T) or (T,) integer tensor or numpy array, a list of ints (one prompt) or a list of such lists
    (prompts of different lengths are left-padded). Empty prompts are refused.
    """
    if isinstance(input_ids, str):
        raise TypeError(f"input_ids is the string {input_ids[:40]!r}: tokenize first, e.g. "
                        f"mt.generate(model, tokenizer.encode(text))")
    tensor = _integer_tensor(input_ids, "input_ids")
    if tensor is not None:
        if tensor.dim() == 1:
            tensor = tensor[None]
        if tensor.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(tensor.shape)}")
        check_not_empty(tensor.shape[1])
        return tensor.to(device), [0] * tensor.shape[0]
    if not isinstance(input_ids, Sequence):
        raise TypeError(f"input_ids must be a tensor, a list of token ids or a list of such lists, "
                        f"got {_describe(input_ids)}")
    flat = any(_is_scalar(t) for t in input_ids)              # [1, 2.5, 3] is one row with a bad entry
    rows = [_token_row(input_ids, "input_ids", None)] if flat else [
        _token_row(row, "input_ids", i) for i, row in enumerate(input_ids)]
    check_not_empty(min((len(r) for r in rows), default=0), per_row=len(rows) > 1)
    longest = max(len(r) for r in rows)
    pad = [longest - len(r) for r in rows]
    batch = torch.tensor([[0] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    return batch, pad


def check_tokens(tokens: Any, start: int, max_positions: int, sliding_window: int | None) -> None:
    """Integer (B, T) token ids whose positions start..start+T-1 fit the model; the vocabulary range is the
    embedding's check (check_vocabulary)."""
    if isinstance(tokens, str):
        raise TypeError(f"tokens must be token ids, got the string {tokens[:40]!r}: tokenize first, e.g. "
                        f"torch.tensor([tokenizer.encode(text)])")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape (B, T), got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"tokens must hold integer token ids (torch.long), got a {tokens.dtype} tensor: "
                        f"convert with tokens.long() only if the values are whole token ids")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}; "
                         f"for one sequence use tokens[None]")
    check_not_empty(tokens.shape[1])
    check_positions(start + tokens.shape[1], max_positions, sliding_window)


def check_not_empty(seq_len: int, per_row: bool = False) -> None:
    """An empty prompt (no token, or a row without one) is a ValueError."""
    if seq_len == 0:
        raise ValueError(f"the prompt is empty (seq_len = 0): give at least one token{' per row' if per_row else ''}, "
                         f"e.g. the BOS token")


def check_vocabulary(token_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size), else a ValueError naming up to five of the others (one host-device sync)."""
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size):
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)].unique()[:5].tolist()
        raise ValueError(f"token ids {bad} lie outside the vocabulary [0, {vocab_size}); "
                         f"was the prompt encoded with this model's tokenizer?")


def check_positions(end: int, max_positions: int, sliding_window: int | None, what: str | None = None) -> None:
    """A model without a sliding window has positions 0 .. max_positions - 1 only: `end` tokens must fit them.

    what: how the caller counts the tokens (e.g. "prompt (5) + max_new_tokens (7) = 12"); default "sequence of N tokens".
    """
    if sliding_window is None and end > max_positions:
        raise ValueError(f"{what or f'sequence of {end} tokens'} exceeds max_position_embeddings ({max_positions}) "
                         f"of a model without a sliding window")


def as_stop_tokens(stop_tokens: Any, device: torch.device) -> torch.Tensor:
    """Stop token ids as a 1-D int64 tensor (empty for None); an int, a list of ints or an integer tensor."""
    if stop_tokens is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if is_int(stop_tokens):
        stop_tokens = [stop_tokens]
    tensor = _integer_tensor(stop_tokens, "stop_tokens")
    ids = tensor.flatten().tolist() if tensor is not None else _token_row(stop_tokens, "stop_tokens", None)
    return torch.tensor(ids, dtype=torch.long, device=device)
