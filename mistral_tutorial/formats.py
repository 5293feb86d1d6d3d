"""What a checkpoint on disk is: its format (a GGUF file, a transformers folder, a mistral reference folder), its files
(the shards an index names, checked against their headers) and its ModelConfig (config.json, params.json, or a GGUF
file's `llama.*` metadata). Nothing is read but headers and metadata; assemble.py reads the tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import TensorSource, open_gguf
from .config import ModelConfig
from .errors import CheckpointError


def open_checkpoint(path: str | Path) -> tuple[TensorSource, str, ModelConfig]:
    """(source, format 'gguf' | 'hf' | 'reference', config) of the checkpoint at `path`; headers only."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file() and path.suffix == ".gguf":
        metadata, source = open_gguf(path)
        config, fmt = _gguf_config(metadata, source, path), "gguf"
    elif path.is_dir() and (path / "config.json").is_file():
        config = ModelConfig.from_hf(path / "config.json")                   # its errors name the file
        files, weight_map = _safetensors_files(path)
        source = TensorSource.from_safetensors(files, f"transformers checkpoint {path}")
        if weight_map is not None:
            _check_index(path / "model.safetensors.index.json", weight_map, source)
        fmt = "hf"
    elif path.is_dir() and (path / "params.json").is_file():
        config = ModelConfig.from_params(path / "params.json")
        if files := sorted(path.glob("consolidated*.safetensors")):
            source = TensorSource.from_safetensors(files, f"reference checkpoint {path}")
        elif files := sorted(path.glob("consolidated*.pth")):
            source = TensorSource.from_torch(files, f"reference checkpoint {path}")
        else:
            raise CheckpointError(f"{path} has params.json but no consolidated.safetensors (or consolidated.00.pth)")
        fmt = "reference"
    else:
        raise CheckpointError(
            f"unknown checkpoint format at {path}: expected a .gguf file, a transformers directory (config.json + "
            f"*.safetensors) or a mistral reference folder (params.json + consolidated.safetensors)")
    return source, fmt, config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:        # unreadable, not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shards of a transformers folder and the index's weight_map: those model.safetensors.index.json names, else
    every *.safetensors (and None)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: has no weight_map {{tensor name: shard file name}}")
        outside = sorted(v for v in set(weight_map.values()) if Path(v).name != v or v in ("", ".", ".."))
        if outside:                  # (not resolved: the hub's cache holds the shards as links to its blobs)
            raise CheckpointError(f"{index} names shards outside its folder: {outside}")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not there: {absent}")
        return files, weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has config.json but no *.safetensors weights")
    return files, None


def _check_index(index: Path, weight_map: dict[str, str], source: TensorSource) -> None:
    """The index and the shards' headers must agree tensor for tensor: a tensor the index names in a shard that lacks
    it, or one a shard holds that the index leaves out, means the files do not belong together."""
    problems = []
    for name, shard in weight_map.items():
        info = source.infos.get(name)
        if info is None:
            problems.append(f"{name}: the index puts it in {shard}, which lacks it")
        elif info.file.name != shard:
            problems.append(f"{name}: the index puts it in {shard}, it is in {info.file.name}")
    problems += [f"{name}: in {info.file.name}, but not in the index" for name, info in source.infos.items()
                 if name not in weight_map]
    if problems:
        raise CheckpointError(f"{index} does not match its shards ({len(problems)} problems; write the checkpoint "
                              f"again):\n  " + "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else ""))


def _gguf_config(metadata: dict[str, Any], source: TensorSource, path: Path) -> ModelConfig:
    """ModelConfig from a GGUF file's `llama.*` metadata (llama.cpp writes Llama, Mistral and Mixtral as 'llama')."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (expected 'llama': Llama, Mistral "
                              f"and Mixtral as llama.cpp's converter writes them)")

    def field(name: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{name}")
        return value

    n_heads, dim = field("attention.head_count"), field("embedding_length")
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise CheckpointError(f"{path}: GGUF field llama.attention.head_count = {n_heads!r} is not a positive int")
    head_dim = metadata.get("llama.attention.key_length", dim // n_heads if isinstance(dim, int) else None)
    rotary = metadata.get("llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"{path}: GGUF field llama.rope.dimension_count = {rotary} (partial rotary) is not "
                              f"implemented; head_dim is {head_dim}")
    embedding = source.infos.get("token_embd.weight")
    rope_scaling = _gguf_rope_scaling(metadata, path)
    try:
        return ModelConfig(
            vocab_size=metadata.get("llama.vocab_size") or (embedding.shape[0] if embedding else 0),
            dim=dim, n_layers=field("block_count"), n_heads=n_heads,
            n_kv_heads=field("attention.head_count_kv", n_heads), head_dim=head_dim,
            hidden_dim=field("feed_forward_length"), norm_eps=float(field("attention.layer_norm_rms_epsilon")),
            rope_theta=float(field("rope.freq_base", 10000.0)), sliding_window=None,
            max_position_embeddings=field("context_length"), n_experts=field("expert_count", 0),
            experts_per_token=field("expert_used_count", 2), tie_embeddings="output.weight" not in source.infos,
            rope_scaling=rope_scaling)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: GGUF metadata does not describe a model this library builds: {err}") from None


def _gguf_rope_scaling(metadata: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """ModelConfig.rope_scaling from llama.cpp's `llama.rope.scaling.*` keys, as llama.cpp reads them: a factor
    (`rope.scaling.factor`, or the older `rope.scale_linear`) with type 'linear' or no type is linear scaling (every
    frequency divided by the factor). Any other type, or a factor next to type 'none', is refused naming the field."""
    known = {"llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scale_linear",
             "llama.rope.scaling.original_context_length", "llama.rope.scaling.finetuned"}   # the last two: linear ignores
    other = sorted(k for k in metadata if k.startswith(("llama.rope.scaling.", "llama.rope.scale_")) and k not in known)
    if other:
        raise CheckpointError(f"{path}: GGUF rope scaling field(s) {other} are not implemented")
    kind = metadata.get("llama.rope.scaling.type")
    key = "llama.rope.scaling.factor" if "llama.rope.scaling.factor" in metadata else "llama.rope.scale_linear"
    factor = metadata.get(key)
    if kind not in (None, "none", "linear"):
        raise CheckpointError(f"{path}: GGUF field llama.rope.scaling.type = {kind!r} is not implemented (this library "
                              f"implements 'linear' and 'none')")
    if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool)
                               or not math.isfinite(factor) or factor <= 0):
        raise CheckpointError(f"{path}: GGUF field {key} = {factor!r} is not a finite number > 0")
    if kind == "none":
        if factor not in (None, 1.0):
            raise CheckpointError(f"{path}: GGUF fields llama.rope.scaling.type = 'none' and {key} = {factor} "
                                  f"contradict each other; remove one")
        return None
    if kind == "linear" and factor is None:
        raise CheckpointError(f"{path}: GGUF field llama.rope.scaling.type = 'linear' comes without "
                              f"llama.rope.scaling.factor")
    if factor is None or (kind is None and factor == 1.0):
        return None
    return {"rope_type": "linear", "factor": float(factor)}


def checkpoint_dtype(source: TensorSource) -> torch.dtype:
    """The dtype most of the checkpoint's weights are in (GGUF: bf16 for BF16, else fp32, which the rest is read as)."""
    counts: dict[torch.dtype, int] = {}
    for info in source.infos.values():
        dtype = info.dtype if isinstance(info.dtype, torch.dtype) else torch.float32
        counts[dtype] = counts.get(dtype, 0) + int(torch.Size(info.shape).numel())
    return max(counts, key=counts.get) if counts else torch.float32
