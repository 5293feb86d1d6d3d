"""The safetensors format, read from its header alone: an 8-byte header length, a JSON header naming each tensor's dtype,
shape and byte range, then the tensors' bytes. Every field of the header is checked (a truncated, corrupt or foreign
file is one CheckpointError naming the file), and a tensor is handed out backed by the memory-mapped file.
checkpoint.py puts the files of a checkpoint together.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}

MAX_HEADER_BYTES = 100_000_000                    # the safetensors library's own limit

@dataclass(frozen=True)
class TensorInfo:
    """What a file's header says of one tensor: enough to plan the load without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str          # a torch dtype, or the name of a GGUF quantisation ("Q4_1")
    file: Path
    offset: int = 0                   # byte offset in the file, to read in file order


class SafetensorsFile:
    """One .safetensors file: an 8-byte header length, a JSON header, then the tensors' bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (its length reads {header_len} bytes; the "
                                      f"format allows {MAX_HEADER_BYTES})")
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or not safetensors (header of {header_len} bytes, "
                                      f"file of {size})")
            try:
                header = json.loads(f.read(header_len))
            except (ValueError, RecursionError) as err:       # not UTF-8, not JSON, or nested to blow the stack
                raise CheckpointError(f"{path}: corrupt safetensors header ({type(err).__name__}: "
                                      f"{str(err)[:200]})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.data_start, data_len = 8 + header_len, size - 8 - header_len
        self.infos: dict[str, TensorInfo] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _header_entry(path, name, entry)
            n_bytes = math.prod(shape) * dtype.itemsize
            if end - begin != n_bytes:
                raise CheckpointError(f"{path}: corrupt header: tensor {name} {shape} {entry['dtype']} takes "
                                      f"{n_bytes} bytes, the header gives [{begin}, {end})")
            if end > data_len:
                raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes up to {end} of the data, the "
                                      f"file holds {data_len}. Download or write it again.")
            self.infos[name] = TensorInfo(name, shape, dtype, path, self.data_start + begin)
            ranges.append((begin, end, name))
        # as the safetensors library requires: the tensors tile the data exactly, in some order, with no gap, no
        # overlap and nothing after them (a header length off by a few bytes would otherwise shift every tensor)
        position, previous = 0, "the header"
        for begin, end, name in sorted(ranges):
            if begin != position:
                raise CheckpointError(f"{path}: corrupt header: tensor {name} starts at byte {begin} of the data, "
                                      f"{'inside' if begin < position else 'after a gap after'} {previous} "
                                      f"(which ends at {position})")
            position, previous = end, f"tensor {name}"
        if position != data_len:
            raise CheckpointError(f"{path}: corrupt header or trailing bytes: the tensors take {position} bytes, the "
                                  f"data after the header holds {data_len}")
        self._map: mmap.mmap | None = None

    def read(self, name: str) -> torch.Tensor:
        """The tensor, backed by the memory-mapped file where its offset allows (else a private copy)."""
        info = self.infos[name]
        n_bytes = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
        if n_bytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.offset % info.dtype.itemsize == 0:
            if self._map is None:
                with self.path.open("rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # private: writes stay in memory
            flat = torch.frombuffer(self._map, dtype=info.dtype, count=n_bytes // info.dtype.itemsize,
                                    offset=info.offset)
            return flat.view(info.shape)
        data = torch.empty(n_bytes, dtype=torch.uint8)
        with self.path.open("rb") as f:
            f.seek(info.offset)
            if f.readinto(data.numpy()) != n_bytes:
                raise CheckpointError(f"{self.path} is truncated: tensor {name} could not be read whole")
        return data.view(info.dtype).view(info.shape)


def _header_entry(path: Path, name: str, entry: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one safetensors header entry, every field checked for its type."""
    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {str(entry)[:100]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {str(dtype)[:40]!r}, which this loader does not read "
                              f"(it reads {sorted(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        raise CheckpointError(f"{path}: corrupt header: tensor {name} has shape {str(shape)[:100]}, not a list of "
                              f"non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: corrupt header: tensor {name} has data_offsets {str(offsets)[:100]}, not "
                              f"[begin, end] with 0 <= begin <= end")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1]
