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


# ---------------------------------------------------------------------------------------------------------------------
# A model written from scratch: llama.cpp's names and metadata, any tensor in any of the kernels' quantized types.

def gguf_shapes(config) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names of a Llama/Mistral/Mixtral `config`, and each tensor's shape as ours ((rows, cols),
    (E, rows, cols) for stacked experts)."""
    c, q, kv = config, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (c.dim,), f"blk.{i}.attn_q.weight": (q, c.dim),
                   f"blk.{i}.attn_k.weight": (kv, c.dim), f"blk.{i}.attn_v.weight": (kv, c.dim),
                   f"blk.{i}.attn_output.weight": (c.dim, q), f"blk.{i}.ffn_norm.weight": (c.dim,)}
        if c.is_moe:                           # Mixtral: the router, and each matrix of the E experts stacked
            e = c.n_experts
            shapes |= {f"blk.{i}.ffn_gate_inp.weight": (e, c.dim), f"blk.{i}.ffn_gate_exps.weight": (e, c.hidden_dim, c.dim),
                       f"blk.{i}.ffn_up_exps.weight": (e, c.hidden_dim, c.dim),
                       f"blk.{i}.ffn_down_exps.weight": (e, c.dim, c.hidden_dim)}
        else:
            shapes |= {f"blk.{i}.ffn_gate.weight": (c.hidden_dim, c.dim),
                       f"blk.{i}.ffn_up.weight": (c.hidden_dim, c.dim), f"blk.{i}.ffn_down.weight": (c.dim, c.hidden_dim)}
    return shapes


def random_blocks(qtype: str, shape: tuple[int, ...], std: float, generator: np.random.Generator) -> np.ndarray:
    """Seeded random `qtype` blocks of a `shape` matrix (or stack of them) whose weights have about `std`: random
    quants, and every block's fp16 scale (and minimum) set to what gives that spread. (..., rows, row bytes) uint8."""
    from .quantized import FORMATS, row_bytes

    size, nbytes, _ = FORMATS[qtype]
    blocks = generator.integers(0, 256, (*shape[:-1], row_bytes(qtype, shape[-1])), dtype=np.uint8)
    per_block = blocks.reshape(*shape[:-1], -1, nbytes)
    spread = {"Q8_0": 73.9, "Q4_0": 4.6, "Q4_1": 4.6, "Q4_K": 4.6 * 32, "Q6_K": 18.5 * 64}[qtype]  # std of d = 1
    half = np.frombuffer(np.float16(std / spread).tobytes(), np.uint8)
    if qtype == "Q6_K":
        per_block[..., 208:210] = half                                  # d; the int8 scales stay random
        per_block[..., 192:208] = generator.integers(0, 128, per_block[..., 192:208].shape, dtype=np.uint8)
    elif qtype == "Q4_K":                                               # every sub-block's scale and min 32
        per_block[..., 0:2] = half
        per_block[..., 2:4] = np.frombuffer(np.float16(7.5 * std / spread).tobytes(), np.uint8)    # dmin: centred
        per_block[..., 4:12], per_block[..., 12:16] = 160, 0
    else:
        per_block[..., 0:2] = half                                      # d
        if qtype == "Q4_1":
            per_block[..., 2:4] = np.frombuffer(np.float16(-8 * std / spread).tobytes(), np.uint8)  # m: centred
    return blocks


def write_gguf(path: str | Path, config, tensors: dict[str, tuple[np.ndarray, str]],
               tokenizer_model: str | Path | None = None) -> Path:
    """A GGUF with llama.cpp's `llama.*` metadata for `config` and `tensors` {name: (array, type)}: fp32 values for
    "F32", uint8 blocks (rows, row bytes) for a quantized type. With `tokenizer_model` (a sentencepiece .model), its
    vocabulary too, which llama.cpp needs to load the file."""
    import gguf

    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    c = config
    for add, value in ((writer.add_context_length, c.max_position_embeddings), (writer.add_embedding_length, c.dim),
                       (writer.add_block_count, c.n_layers), (writer.add_feed_forward_length, c.hidden_dim),
                       (writer.add_head_count, c.n_heads), (writer.add_head_count_kv, c.n_kv_heads),
                       (writer.add_rope_dimension_count, c.head_dim), (writer.add_rope_freq_base, c.rope_theta),
                       (writer.add_layer_norm_rms_eps, c.norm_eps), (writer.add_vocab_size, c.vocab_size)):
        add(value)
    if c.is_moe:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.experts_per_token)
    if tokenizer_model is not None:
        _add_sentencepiece_vocab(writer, Path(tokenizer_model))
    for name, (array, kind) in tensors.items():
        writer.add_tensor(name, array, raw_shape=array.shape,
                          raw_dtype=None if kind == "F32" else gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _add_sentencepiece_vocab(writer, model_file: Path) -> None:
    """tokenizer.ggml.* as llama.cpp's converter writes a sentencepiece vocabulary."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.vocab_size())]                           # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())


def write_random_gguf(path: str | Path, config, qtype: str, head_type: str = "Q6_K", std: float = 0.02,
                      seed: int = 0, tokenizer_model: str | Path | None = None) -> Path:
    """A dense `config` as llama.cpp's quantizer lays out a `qtype` file (the head in `head_type`, the norms F32),
    with seeded random weights made directly as blocks (no fp32 copy of the model is ever held)."""
    generator = np.random.default_rng(seed)
    tensors = {}
    for name, shape in gguf_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = (np.ones(shape, dtype=np.float32), "F32")
        elif name.endswith("ffn_gate_inp.weight"):                      # the router stays F32, as llama.cpp's does
            tensors[name] = (generator.normal(0, std, shape).astype(np.float32), "F32")
        else:
            kind = head_type if name == "output.weight" else qtype
            tensors[name] = (random_blocks(kind, shape, std, generator), kind)
    return write_gguf(path, config, tensors, tokenizer_model)


def gguf_bytes(config, qtype: str, head_type: str) -> int:
    """The tensor bytes of `config` laid out as write_random_gguf writes it (what our loader then holds, zero-copy)."""
    from .quantized import row_bytes

    total = 0
    for name, shape in gguf_shapes(config).items():
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            total += 4 * int(np.prod(shape))                                      # F32
        else:
            kind = head_type if name == "output.weight" else qtype
            total += int(np.prod(shape[:-1])) * row_bytes(kind, shape[-1])
    return total
