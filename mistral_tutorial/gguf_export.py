"""Writing GGUF files with the `gguf` package: the same model in other tensor types, for comparing loaders and
llama.cpp on the same weights (benchmarks/bench_generate.py).

`rewrite_gguf(src, dst, "F32")` copies a GGUF file's metadata (tokenizer included) and writes every tensor again,
dequantized, in F32 or BF16 (1-D tensors, the norms, stay F32 as llama.cpp's converter leaves them). Reading GGUF is
checkpoint.py's; the other checkpoint layouts are export.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

WIDE_TYPES = ("F32", "BF16")


def _copy_metadata(reader, writer) -> None:
    """Every key-value field of `reader` into `writer`, with its GGUF value type (arrays with their item type)."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):   # written anew
            continue
        value_type = field.types[0]
        item_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=item_type)


def tensor_bytes(values: np.ndarray, tensor_type: str) -> np.ndarray:
    """fp32 values (rows, cols) as the bytes of `tensor_type` ("F32": the values themselves; "BF16": uint8, rounded
    to nearest even as torch rounds)."""
    if tensor_type == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return wide.to(torch.bfloat16).view(torch.uint8).numpy()


def rewrite_gguf(src: str | Path, dst: str | Path, tensor_type: str = "F32") -> Path:
    """Write `src`'s model to `dst` with every matrix in `tensor_type` (F32 or BF16), dequantized from whatever `src`
    holds; returns `dst`. Written to a temporary name first, so `dst` is either complete or absent."""
    import gguf

    if tensor_type not in WIDE_TYPES:
        raise ValueError(f"tensor_type must be one of {WIDE_TYPES}, got {tensor_type!r}")
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(str(src))
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=reader.fields["general.architecture"].contents())
    _copy_metadata(reader, writer)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16}[tensor_type])
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)                     # numpy, shape (..., cols)
        kind = tensor_type if values.ndim > 1 else "F32"
        raw = tensor_bytes(values, kind)
        writer.add_tensor(t.name, raw, raw_shape=raw.shape,
                          raw_dtype=gguf.GGMLQuantizationType[kind] if kind != "F32" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst
