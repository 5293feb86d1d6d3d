"""Writing checkpoints in the hub's layout, tensor by tensor: config.json, safetensors shards and their index.

`write_random_checkpoint` makes a seeded random model of any config (Mistral-7B-v0.1 itself, for the real-size check)
without ever holding more than one tensor in memory, so a 14.5 GB checkpoint can be written on a 24 GB machine.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# Mistral-7B-v0.1's config.json as published on the hub (transformers 4.34 era), field for field
MISTRAL_7B_V0_1_CONFIG = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def hub_tensor_names(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the hub layout (Mixtral experts one by one, as on disk), in the hub's order."""
    from .loading import ours_to_hf_disk
    from .model import Transformer

    with torch.device("meta"):
        state = Transformer(config).state_dict()
    if config.tie_embeddings:
        state.pop("output.weight")
    return [(name, tuple(t.shape)) for name, t in ours_to_hf_disk(state, config).items()]


def write_safetensors_shards(folder: Path, tensors: Iterable[tuple[str, tuple[int, ...]]],
                             make: Callable[[str, tuple[int, ...]], torch.Tensor], dtype: torch.dtype,
                             shard_bytes: int = 10 * 10**9, stem: str = "model") -> list[Path]:
    """Write `make(name, shape)` for each (name, shape) into shards of at most ~shard_bytes, plus the index.

    The header of each shard is written first (shapes are known up front), then the tensors one at a time.
    """
    tensors = list(tensors)
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n_bytes = int(torch.Size(shape).numel()) * item
        if shards[-1] and size + n_bytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n_bytes
    folder.mkdir(parents=True, exist_ok=True)
    paths, weight_map, total = [], {}, 0
    progress = tqdm(total=len(tensors), desc=f"writing {folder.name}", unit="tensor", disable=None)
    for i, shard in enumerate(shards):
        path = folder / (f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                         else f"{stem}.safetensors")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n_bytes = int(torch.Size(shape).numel()) * item
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
            offset += n_bytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                                   # the data starts 8-byte aligned
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape in shard:
                tensor = make(name, shape).to(dtype).contiguous()
                f.write(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
                weight_map[name] = path.name
                progress.update(1)
        paths.append(path)
        total += offset
    progress.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def write_random_checkpoint(folder: str | Path, config: ModelConfig | dict, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, std: float = 0.02, shard_bytes: int = 10 * 10**9) -> Path:
    """A transformers-layout checkpoint of `config` (a ModelConfig, or a config.json dict) with seeded random weights.

    Matrices ~ N(0, std), RMSNorm gains 1. Each tensor has its own seed (seed, its index), so a tensor's values do not
    depend on the shard size. Returns the folder.
    """
    folder = Path(folder)
    if isinstance(config, dict):
        config_json, config = dict(config), ModelConfig.from_hf(config)
    else:
        config_json = config.to_hf().to_dict()
        config_json["architectures"] = [type(config.to_hf()).__name__.replace("Config", "ForCausalLM")]
    names = hub_tensor_names(config)
    index = {name: i for i, (name, _) in enumerate(names)}
    generator = torch.Generator()

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        generator.manual_seed(seed * 1_000_003 + index[name])
        return torch.randn(shape, generator=generator).mul_(std)

    write_safetensors_shards(folder, names, make, dtype, shard_bytes)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder
