"""Solutions to notebook 12's exercises: Q8_0 and Q4_0 dequantization, absmax int8 in groups, Q4_K's 6-bit scales."""

from __future__ import annotations

import torch


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks[:, :2].contiguous().view(torch.float16).float()        # (n, 1) the scale, an fp16 in bytes 0-1
    q = blocks[:, 2:].contiguous().view(torch.int8).float()           # (n, 32) signed quants
    # llama.cpp's dequantize_row_q8_0: y = d * q
    return q * d                                                      # (n, 32)


def absmax_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group_size, group_size)      # (rows, G, g)
    # absmax: s = max |w| / 127 for each group, q = round(w / s), computed as w * (1 / s) as llama.cpp does
    scale = groups.abs().amax(dim=-1) / 127                                    # (rows, G)
    inverse = torch.where(scale == 0, 0.0, 1 / scale)                          # a group of zeros: q = 0
    x = groups * inverse[..., None]                                            # (rows, G, g) in [-127, 127]
    magnitude = x.abs()
    rounded = magnitude.floor() + (magnitude - magnitude.floor() >= 0.5)       # roundf: halves away from zero
    q = torch.sign(x) * rounded
    return q.to(torch.int8).reshape(rows, cols), scale


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks[:, :2].contiguous().view(torch.float16).float()        # (n, 1)
    packed = blocks[:, 2:]                                            # (n, 16): byte j holds weights j and j + 16
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()        # (n, 32) in 0..15
    # llama.cpp's dequantize_row_q4_0: y = d * (q - 8)
    return d * (q - 8)


def q4_k_scales_and_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    first, second, third = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]   # (n, 4) uint8 each
    # sub-blocks 0-3: bits 0-5 of bytes 0-3 (scales) and 4-7 (mins)
    # sub-blocks 4-7: low 4 bits from bytes 8-11 (scale: low nibble, min: high nibble), top 2 bits from bits 6-7
    # of bytes 0-3 (scales) and 4-7 (mins)
    sub_scales = torch.cat([first & 63, (third & 0x0F) | ((first >> 6) << 4)], dim=1)    # (n, 8)
    sub_mins = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)     # (n, 8)
    return sub_scales, sub_mins
