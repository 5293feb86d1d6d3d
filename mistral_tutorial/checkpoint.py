"""Reading checkpoint files tensor by tensor, without loading them whole: safetensors (safetensors_reader.py), torch
.pth, GGUF.

Each reader lists its tensors (name, shape, dtype, file) from the file's header alone, so names and shapes can be
checked before any data is read, and hands out one tensor at a time. safetensors and .pth are memory-mapped: `read`
returns a tensor backed by the file itself (private copy-on-write pages, as transformers does), which the model keeps
as it is where dtype and device allow; one it converts, packs or moves instead is `release`d, which hands its pages
back, so the file's pages never pile up beside the model. A file that is truncated,
corrupt or of the wrong kind raises one CheckpointError naming the file and what is wrong.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .gguf_file import GGUFFile
from .safetensors_reader import SafetensorsFile, TensorInfo

GGUF_INTEGER_TYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
# float GGUF tensors are read as these (F16 and F64 widened or narrowed to fp32, quantized types dequantized to fp32)
GGUF_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float32, "BF16": torch.bfloat16, "F64": torch.float32}


def drop_pages(address: int, n_bytes: int) -> None:
    """Give back to the kernel the whole pages of a memory-mapped file range we are done with (madvise DONTNEED).

    Only for private, unwritten file mappings: their pages are read again from the file if ever touched, so this
    changes no value, only the resident memory. Linux and glibc only; elsewhere it does nothing.
    """
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + n_bytes) // page * page
    if end > start:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)   # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


def trim_heap() -> None:
    """Ask glibc to return freed heap memory to the kernel (malloc_trim). The loader's temporaries (a converted tensor,
    a group about to be packed) are freed between long-lived allocations, and glibc would otherwise keep their pages,
    which counts towards the process's memory. Elsewhere than glibc it does nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _release_mapped(name: str, tensor: torch.Tensor) -> None:
    drop_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


class TensorSource:
    """The tensors of one checkpoint, by name: `infos` (from the headers alone), `read(name)` and `release(name, t)`.

    `mapped`: read() returns tensors backed by the memory-mapped file, which the model may keep as its parameters
    (zero-copy); `release` gives back the pages of one it did not keep. Otherwise read() returns tensors that are not
    the caller's to keep (transformers' own, in memory) or are new (GGUF, dequantized).
    """

    def __init__(self, infos: dict[str, TensorInfo], read: Callable[[str], torch.Tensor], description: str,
                 mapped: bool = False, release: Callable[[str, torch.Tensor], None] | None = None,
                 read_blocks: Callable[[str], torch.Tensor] | None = None) -> None:
        self.infos, self.read, self.description, self.mapped = infos, read, description, mapped
        self.release = release or (lambda name, tensor: None)
        self.read_blocks = read_blocks          # GGUF: a quantized tensor's bytes as the file holds them

    @classmethod
    def from_safetensors(cls, files: list[Path], description: str) -> TensorSource:
        opened = [SafetensorsFile(f) for f in files]
        owner: dict[str, SafetensorsFile] = {}
        for sf in opened:
            for name in sf.infos:
                if name in owner:
                    raise CheckpointError(f"tensor {name} is in both {owner[name].path} and {sf.path}")
                owner[name] = sf
        infos = {name: sf.infos[name] for name, sf in owner.items()}
        return cls(infos, lambda name: owner[name].read(name), description, mapped=True, release=_release_mapped)

    @classmethod
    def from_torch(cls, files: list[Path], description: str) -> TensorSource:
        tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)   # memory-mapped, private
            except Exception as err:   # noqa: BLE001 - torch raises many kinds for a broken file
                raise CheckpointError(f"{f}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{f}: holds a {type(state).__name__}, not a dict of tensors")
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
                if name in tensors:
                    raise CheckpointError(f"tensor {name} appears in two files ({f} and another)")
                tensors[name] = tensor
                infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, f)
        return cls(infos, tensors.__getitem__, description, mapped=True, release=_release_mapped)

    @classmethod
    def from_mapping(cls, state_dict: Mapping[str, torch.Tensor], description: str) -> TensorSource:
        """Tensors already in memory (a transformers model's state dict): never kept as they are, only copied."""
        infos = {name: TensorInfo(name, tuple(t.shape), t.dtype, Path(description)) for name, t in state_dict.items()}
        return cls(infos, lambda name: state_dict[name].detach(), description)


# ---------------------------------------------------------------------------------------------------------------------
def open_gguf(path: Path) -> tuple[dict[str, Any], TensorSource]:
    """A GGUF file's metadata (key -> value) and its tensors, one at a time on read(): BF16 as it is, every other
    float type dequantized to fp32 (with gguf's own code, for the types numpy cannot view)."""
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'), or truncated")
    version = struct.unpack("<I", head[4:])[0]
    version = version if version & 0xFFFF else struct.unpack(">I", head[4:])[0]        # a big-endian file
    if version not in (2, 3) or not version & 0xFFFF:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (this reader reads versions "
                              f"[2, 3], little-endian)")
    try:
        reader = GGUFFile(path)                                   # private copy-on-write pages: never the file
    except Exception as err:   # noqa: BLE001 - a broken file raises struct, numpy, unicode or value errors
        raise CheckpointError(f"{path}: not a readable GGUF file, or truncated ({type(err).__name__}: {err})") from None
    metadata = reader.metadata
    tensors = {t.name: t for t in reader.tensors}
    _check_gguf_layout(path, reader)
    infos = {t.name: TensorInfo(t.name, t.shape, GGUF_INTEGER_TYPES.get(t.type_name) or
                                GGUF_FLOAT_TYPES.get(t.type_name) or t.type_name, path, t.data_offset)
             for t in reader.tensors}

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        if t.type_name == "BF16":                                          # as it is: bf16 stays bf16
            return torch.from_numpy(np.array(t.data)).view(torch.bfloat16).reshape(infos[name].shape)
        if t.data.dtype != np.uint8:                                       # F32, F16, F64, integers: numpy's own
            return torch.from_numpy(np.array(t.data, dtype=np.float32 if t.data.dtype.kind == "f" else t.data.dtype))
        try:
            import gguf

            values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name])   # fp32 numpy
            return torch.from_numpy(np.array(values, dtype=np.float32).reshape(infos[name].shape))
        except Exception as err:   # noqa: BLE001
            raise CheckpointError(f"{path}: tensor {name} ({t.type_name}) cannot be read: {err}") from None

    def release(name: str, tensor: torch.Tensor) -> None:                  # the quantized bytes, memory-mapped
        drop_pages(tensors[name].data.ctypes.data, tensors[name].data.nbytes)

    def read_blocks(name: str) -> torch.Tensor:
        """A quantized tensor's blocks, (rows..., bytes per row) uint8, backed by the mapped file (zero-copy)."""
        return torch.from_numpy(tensors[name].data)

    return metadata, TensorSource(infos, read, f"GGUF file {path}", release=release, read_blocks=read_blocks)


def _check_gguf_layout(path: Path, reader: Any) -> None:
    """The tensors' data as llama.cpp writes it: one after another in the data section, each padded to the file's
    alignment, with no overlap and nothing after the last. A corrupt offset or type in a tensor info would otherwise
    read other bytes (a neighbour's, or a shorter quantisation's) without an error."""
    position, previous, size = int(reader.data_offset), "the start of the data", path.stat().st_size
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        start = int(t.data_offset)
        if not position <= start < position + reader.alignment:
            raise CheckpointError(f"{path}: corrupt tensor info: {t.name} ({t.type_name}) starts at byte "
                                  f"{start}, {'inside' if start < position else 'well after'} {previous} (which "
                                  f"ends at {position}; alignment {reader.alignment})")
        position, previous = start + int(t.n_bytes), f"tensor {t.name}"
    if not position <= size < position + reader.alignment:
        raise CheckpointError(f"{path}: corrupt tensor info or trailing bytes: the tensors end at byte {position}, "
                              f"the file at {size}")
