"""Solutions to notebook 01's exercises: the embedding lookup, RMSNorm, LayerNorm, pieces back to text."""

from __future__ import annotations

import torch


def embed(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # token id i picks row i of the (V, d) table: (..., T) int -> (..., T, d)
    return table[token_ids]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()                                                    # the mean of squares in fp32
    # Zhang & Sennrich 2019, eq. (4): RMS(x) = sqrt(1/n sum_i x_i^2), eps inside the square root
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)                # (..., 1)
    normed = x32 * torch.rsqrt(mean_square + eps)                      # (..., d)
    return weight * normed.to(x.dtype)                                 # cast back, then the gain g


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # Zhang & Sennrich 2019, eqs. (2)-(3): mu = mean(x), sigma = sqrt(mean((x - mu)^2)), dividing by n
    mu = x.mean(dim=-1, keepdim=True)                                  # (..., 1)
    variance = (x - mu).pow(2).mean(dim=-1, keepdim=True)              # (..., 1)
    return (x - mu) / torch.sqrt(variance + eps) * weight + bias       # (..., d)


def pieces_to_text(pieces: list[str]) -> str:
    text = bytearray()
    for piece in pieces:
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            text.append(int(piece[3:5], 16))                           # a byte-fallback piece: one UTF-8 byte
        else:
            text += piece.replace("▁", " ").encode("utf-8")            # '▁' marks a space
    decoded = text.decode("utf-8", errors="replace")                   # the bytes of a character, decoded together
    return decoded[1:] if decoded.startswith(" ") else decoded         # the space SentencePiece put in front
