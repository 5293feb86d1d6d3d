"""A GGUF file's header read the lean way: its metadata values, its tensor infos, and each tensor as a view of one
private (copy-on-write) memory map of the file, nothing copied.

`gguf.GGUFReader` parses every field, the vocabulary's 100 000 strings included, into numpy arrays: seconds, and tens
of MB of small arrays that stay alive as long as the tensors do. The model needs none of the `tokenizer.ggml.*`
fields, so they are skipped here (checkpoint.py reads everything else). The format (llama.cpp's gguf.md, versions 2
and 3, little-endian): magic, version, tensor count, key-value count; each key a string, a value type and a value;
each tensor info a name, its dimensions (fastest-varying first), a GGML type and an offset; then the data, aligned.
Every count and length is checked against the bytes that are left, so a corrupt header is a ValueError, never an
endless loop or a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
SKIPPED = "tokenizer.ggml."                 # the vocabulary: the tokenizer reads it, the model does not
NUMPY_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}
# GGML type id -> (name, weights per block, bytes per block), as gguf.constants has them; here so that reading a file
# does not import the gguf package (51 MB of modules), which only dequantizing a type without a kernel needs
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
              23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
              35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18)}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]          # as numpy and torch order it: slowest-varying first
    type_name: str                  # a GGML type: F32, BF16, Q4_0, ...
    data_offset: int                # from the start of the file
    n_bytes: int
    data: np.ndarray                # a view of the mapped file: typed for plain types, (rows..., row bytes) uint8 else


class GGUFFile:
    """`metadata` {key: value} (tokenizer.ggml.* left out), `tensors` [GGUFTensor], `data_offset`, `alignment`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.map = np.memmap(self.path, mode="c")                           # uint8, private pages
        self.buffer, self.pos = memoryview(self.map), 4                  # after the magic
        if bytes(self.buffer[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader reads versions 2 and 3, little-endian)")
        self.metadata: dict[str, Any] = {}
        for _ in range(self._count(n_kv, 12)):
            key = self._string()
            value = self._value(self._unpack("<I")[0], skip=key.startswith(SKIPPED))
            if not key.startswith(SKIPPED):
                self.metadata[key] = value
        infos = []
        for _ in range(self._count(n_tensors, 24)):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack("<" + "Q" * self._count(n_dims, 8))
            type_id, offset = self._unpack("<IQ")
            if type_id not in GGML_TYPES:
                raise ValueError(f"tensor {name}: unknown GGML type {type_id}")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        self.alignment = int(self.metadata.get("general.alignment", 32))
        self.data_offset = -(-self.pos // self.alignment) * self.alignment
        self.tensors = [self._tensor(*info) for info in infos]

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _count(self, count: int, least_bytes: int) -> int:
        """`count` items of at least `least_bytes` each must fit in what is left of the file."""
        if count * least_bytes > len(self.buffer) - self.pos:
            raise ValueError(f"a count of {count} at byte {self.pos} runs past the end of the file")
        return count

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        self._count(length, 1)
        text = bytes(self.buffer[self.pos:self.pos + length]).decode("utf-8")
        self.pos += length
        return text

    def _value(self, kind: int, skip: bool = False) -> Any:
        if kind in SCALARS:
            return self._unpack("<" + SCALARS[kind])[0]
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")
        item, count = self._unpack("<IQ")
        if skip and item in SCALARS:                                         # jump over it
            self.pos += struct.calcsize(SCALARS[item]) * self._count(count, struct.calcsize(SCALARS[item]))
            return None
        values = [self._value(item, skip) for _ in range(self._count(count, 1))]
        return None if skip else values

    def _tensor(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> GGUFTensor:
        type_name, block, nbytes = GGML_TYPES[type_id]
        n_elements = int(np.prod(shape)) if shape else 1
        if shape and shape[-1] % block:
            raise ValueError(f"tensor {name}: rows of {shape[-1]} {type_name} weights are not whole blocks of {block}")
        n_bytes = n_elements // block * nbytes
        start = self.data_offset + offset
        if start + n_bytes > len(self.map):
            raise ValueError(f"tensor {name} ({type_name}, {n_bytes} bytes at {start}) runs past the end of the file")
        raw = self.map[start:start + n_bytes]
        if type_name in NUMPY_TYPES:
            data = raw.view(NUMPY_TYPES[type_name]).reshape(shape)
        else:                                                               # BF16 and the quantized types: bytes
            data = raw.reshape(*shape[:-1], shape[-1] // block * nbytes) if shape else raw
        return GGUFTensor(name, shape, type_name, start, n_bytes, data)
