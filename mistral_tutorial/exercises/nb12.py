"""Notebook 12's exercises: Q8_0 dequantization of raw blocks, absmax int8 in groups, Q4_0 dequantization, and Q4_K's
6-bit scales and mins unpacked from their 12 bytes. The references are the library's unpacking (kernels/quants.h, the
values gguf.quants.dequantize gives) and gguf's own code."""

from __future__ import annotations

import numpy as np
import torch

from ..quantized import unpack
from .checker import Case, Exercise


def _generator(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gguf_blocks(qtype: str, n_blocks: int, seed: int) -> torch.Tensor:
    """(n_blocks, block bytes) uint8: gaussian weights quantized by gguf (llama.cpp's reference quantizer)."""
    import gguf

    values = _generator(seed).normal(0, 0.02, (n_blocks, 32)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])))


def _with_scale(blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """`blocks` with every block's fp16 scale d (its first two bytes) set to `scale`."""
    blocks = blocks.clone()
    blocks[:, :2] = torch.tensor([[scale]], dtype=torch.float16).view(torch.uint8)
    return blocks


# -- 12.1 Q8_0 -------------------------------------------------------------------------------------------------------
def _q8_0_reference(blocks: torch.Tensor) -> torch.Tensor:
    return unpack(blocks, "Q8_0", 32)


def _q8_0_cases() -> list[Case]:
    every_q = torch.arange(-128, 128, dtype=torch.int8).view(torch.uint8).reshape(8, 32)    # every int8, -128 too
    return [Case((_gguf_blocks("Q8_0", 6, 1201),)), Case((_gguf_blocks("Q8_0", 1, 1202),), "one block"),
            Case((torch.zeros(2, 34, dtype=torch.uint8),), "blocks of zeros: d = 0"),
            Case((_with_scale(torch.cat([torch.zeros(8, 2, dtype=torch.uint8), every_q], 1), -0.5),),
                 "every q from -128 to 127, and a negative d"),
            Case((_with_scale(_gguf_blocks("Q8_0", 3, 1203), 3e-7),), "a tiny (subnormal fp16) d")]


# -- 12.2 absmax int8 in groups ----------------------------------------------------------------------------------------
def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, as llama.cpp rounds: halves away from zero (exactly, with no x + 0.5 rounding of its own)."""
    whole = x.abs().floor()
    return torch.sign(x) * (whole + (x.abs() - whole >= 0.5))


def _absmax(weight: torch.Tensor, group_size: int, top: int = 127, rounding=_roundf) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's quantize_row_q8_0_ref with groups of any size and the scale kept in fp32."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group_size, group_size)                  # (rows, G, g)
    scale = groups.abs().amax(dim=-1) / top                                                 # (rows, G)
    inverse = torch.where(scale == 0, 0.0, 1 / scale)
    q = rounding(groups * inverse[..., None]).to(torch.int8)                                # (rows, G, g)
    return q.reshape(rows, cols), scale


def _absmax_reference(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _absmax(weight, group_size)


def _absmax_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1204)
    outlier = 0.02 * torch.randn(3, 96, generator=g)
    outlier[1, 40] = 0.5
    halves = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]])                  # scale 1: q = w
    zeros = torch.cat([torch.zeros(2, 32), torch.randn(2, 32, generator=g)], dim=1)
    return [Case((torch.randn(4, 64, generator=g), 32)), Case((outlier, 32), "an outlier in one group"),
            Case((halves, 8), "halves: 0.5 -> 1, 2.5 -> 3, -2.5 -> -3"),
            Case((zeros, 32), "a group of zeros: scale 0, q 0"),
            Case((torch.randn(2, 48, generator=g), 48), "one group a row: per channel")]


def _absmax_per_row(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = _absmax(weight, weight.shape[1])
    return q, scale.expand(-1, weight.shape[1] // group_size).contiguous()


# -- 12.3 Q4_0 -------------------------------------------------------------------------------------------------------
def _q4_0_reference(blocks: torch.Tensor) -> torch.Tensor:
    return unpack(blocks, "Q4_0", 32)


def _q4_0_cases() -> list[Case]:
    every_byte = torch.cat([torch.zeros(16, 2, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8).reshape(16, 16)], 1)
    return [Case((_gguf_blocks("Q4_0", 6, 1205),)), Case((_gguf_blocks("Q4_0", 1, 1206),), "one block"),
            Case((_with_scale(every_byte, 0.25),), "every byte 0..255: each nibble pair"),
            Case((torch.zeros(2, 18, dtype=torch.uint8),), "blocks of zeros: d = 0"),
            Case((_with_scale(_gguf_blocks("Q4_0", 3, 1207), -0.01),), "a negative d")]


def _q4_0_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return d, (blocks[:, 2:] & 0x0F).float(), (blocks[:, 2:] >> 4).float()


# -- 12.4 Q4_K's scales and mins --------------------------------------------------------------------------------------
def _scales_reference(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import gguf

    sc, mins = gguf.quants.Q4_K.get_scale_min(scales.numpy())
    return torch.from_numpy(np.ascontiguousarray(sc)), torch.from_numpy(np.ascontiguousarray(mins))


def _scales_cases() -> list[Case]:
    one_bit = torch.zeros(96, 12, dtype=torch.uint8)
    for bit in range(96):
        one_bit[bit, bit // 8] = 1 << (bit % 8)
    random = torch.from_numpy(_generator(1208).integers(0, 256, (5, 12), dtype=np.uint8))
    return [Case((random,)), Case((random[:1].clone(),), "one super-block"),
            Case((one_bit,), "each of the 96 bits alone"),
            Case((torch.full((2, 12), 255, dtype=torch.uint8),), "every bit set: every scale and min 63")]


def _scales_without_high_bits(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([scales[:, 0:4] & 63, scales[:, 8:12] & 0x0F], 1),
            torch.cat([scales[:, 4:8] & 63, scales[:, 8:12] >> 4], 1))


def _scales_nibbles_swapped(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([scales[:, 0:4] & 63, (scales[:, 8:12] >> 4) | ((scales[:, 0:4] >> 6) << 4)], 1),
            torch.cat([scales[:, 4:8] & 63, (scales[:, 8:12] & 0x0F) | ((scales[:, 4:8] >> 6) << 4)], 1))


def _scales_unmasked(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sc, mins = _scales_reference(scales)
    return torch.cat([scales[:, 0:4], sc[:, 4:]], 1), torch.cat([scales[:, 4:8], mins[:, 4:]], 1)


EXERCISES = [
    Exercise(
        "12.1-q8-0-dequantize", "dequantize_q8_0", _q8_0_reference, "mt.quantized.unpack (= gguf.quants.dequantize)",
        _q8_0_cases,
        hint="a block is 34 bytes: d, an IEEE half (fp16) in bytes 0-1, then 32 signed int8 quants; w = d * q, in fp32.",
        more="`d = blocks[:, :2].contiguous().view(torch.float16).float()` (n, 1) and "
             "`q = blocks[:, 2:].contiguous().view(torch.int8).float()` (n, 32); return `q * d`.",
        mistakes={"the quants are signed: read as uint8, a negative q becomes q + 256 (view them as torch.int8).":
                  lambda b: b[:, 2:].float() * b[:, :2].contiguous().view(torch.float16).float(),
                  "the scale's two bytes are an fp16 number: read as an integer (int16) it is in the thousands.":
                  lambda b: b[:, 2:].contiguous().view(torch.int8).float() * b[:, :2].contiguous().view(torch.int16).float(),
                  "the scale is missing: Q8_0 stores q, and the weight is d * q.":
                  lambda b: b[:, 2:].contiguous().view(torch.int8).float()},
        atol=0.0, rtol=0.0),
    Exercise(
        "12.2-absmax-int8-groups", "absmax_quantize", _absmax_reference, "llama.cpp's Q8_0 rule, any group size",
        _absmax_cases,
        hint="each group of group_size consecutive weights of a row gets scale = max|w| / 127 and q = round(w / scale) "
             "with halves rounded away from zero (C's roundf); a group of zeros gets scale 0 and q 0.",
        more="reshape to (rows, cols // g, g); `scale = groups.abs().amax(-1) / 127`; multiply by "
             "`torch.where(scale == 0, 0.0, 1 / scale)`; round halves away from zero: sign(x) * floor(|x| + 0.5) is "
             "close, but exact is `whole = x.abs().floor(); sign(x) * (whole + (x.abs() - whole >= 0.5))`.",
        mistakes={"torch.round sends halves to the even neighbour (2.5 -> 2); llama.cpp's roundf sends them away from "
                  "zero (2.5 -> 3).": lambda w, g: _absmax(w, g, rounding=torch.round),
                  "the scale is per row (per channel): each group of group_size weights gets its own max |w|.":
                  _absmax_per_row,
                  "absmax int8 is symmetric: max |w| maps to 127 (the scale is max|w| / 127, not / 128).":
                  lambda w, g: _absmax(w, g, top=128)}),
    Exercise(
        "12.3-q4-0-dequantize", "dequantize_q4_0", _q4_0_reference, "mt.quantized.unpack (= gguf.quants.dequantize)",
        _q4_0_cases,
        hint="18 bytes: d (fp16) and 16 bytes of 4-bit q; byte j holds weight j in its low nibble and weight j + 16 in "
             "its high nibble; w = d * (q - 8).",
        more="`low = blocks[:, 2:] & 0x0F` (weights 0-15), `high = blocks[:, 2:] >> 4` (weights 16-31); "
             "`q = torch.cat([low, high], 1).float()`; return `d * (q - 8)`.",
        mistakes={"the two nibbles of a byte are weights j and j + 16, not two neighbours (j, j + 1).":
                  lambda b: _q4_0_parts(b)[0] * (torch.stack(_q4_0_parts(b)[1:], -1).reshape(-1, 32) - 8),
                  "Q4_0's quants are stored offset by 8: w = d * (q - 8).":
                  lambda b: _q4_0_parts(b)[0] * torch.cat(_q4_0_parts(b)[1:], 1),
                  "the low nibble is the first half (weights 0-15), the high nibble the second.":
                  lambda b: _q4_0_parts(b)[0] * (torch.cat(_q4_0_parts(b)[:0:-1], 1) - 8)},
        atol=0.0, rtol=0.0),
    Exercise(
        "12.4-q4-k-scales", "q4_k_scales_and_mins", _scales_reference, "gguf.quants.Q4_K.get_scale_min",
        _scales_cases,
        hint="sub-blocks 0-3: scale = byte j & 63, min = byte j + 4 & 63; sub-blocks 4-7: the low 4 bits from byte "
             "j + 4 (scale in its low nibble, min in its high), the top 2 from bits 6-7 of byte j - 4 (scale) and of "
             "byte j (min).",
        more="with s the (n, 12) bytes: `sc = cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)])`, "
             "`mins = cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)])`, along dim 1, as uint8.",
        mistakes={"sub-blocks 4-7 have 6-bit values too: their top 2 bits are bits 6-7 of bytes 0-3 (scales) and 4-7 "
                  "(mins).": _scales_without_high_bits,
                  "in bytes 8-11 the low nibble is the scale and the high nibble the min.": _scales_nibbles_swapped,
                  "bytes 0-7 hold a 6-bit value in bits 0-5 only (& 63): bits 6-7 belong to sub-blocks 4-7.":
                  _scales_unmasked}),
]
