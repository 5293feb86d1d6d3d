"""Export: our model in transformers' layout (in memory, `to_hf`, or on disk) and in the mistral reference layout,
named through the same table that loading reads (names.py); and writing checkpoints in the hub's layout, tensor by
tensor: config.json, safetensors shards and their index.

`write_random_checkpoint` makes a seeded random model of any config (Mistral-7B-v0.1 itself, for the real-size check)
without ever holding more than one tensor in memory, so a 14.5 GB checkpoint can be written on a 24 GB machine.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer
from .names import OUR_EXPERTS, hf_name, reference_name
from .rope import half_to_interleaved

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# Mistral-7B-v0.1's config.json as published on the hub (transformers 4.34 era), field for field
MISTRAL_7B_V0_1_CONFIG = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def ours_to_hf_disk(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' on-disk names (Mixtral experts as block_sparse_moe.experts.N.w1...)."""
    out = {}
    for key, tensor in state_dict.items():
        if OUR_EXPERTS.match(key):                                        # (E, out, in): one matrix per expert
            out.update((hf_name(key, e), tensor[e]) for e in range(tensor.shape[0]))
        else:
            out[hf_name(key)] = tensor
    return out


def ours_to_reference(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the mistral reference layout (inverse permutation of wq/wk, experts one by one)."""
    out = {}
    for key, tensor in state_dict.items():
        if OUR_EXPERTS.match(key):
            out.update((reference_name(key, e), tensor[e]) for e in range(tensor.shape[0]))
        elif key.endswith("attention.wq.weight"):
            out[reference_name(key)] = half_to_interleaved(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            out[reference_name(key)] = half_to_interleaved(tensor, config.n_kv_heads)
        else:
            out[reference_name(key)] = tensor
    return out


def to_hf(model: Transformer, model_type: str | None = None) -> Any:
    """A transformers *ForCausalLM holding a copy of this model's weights (Mixtral experts fused, as transformers 5.x keeps them).

    model_type: 'mistral' (default for dense models, window or not), 'llama' (no window) or 'mixtral' (MoE).
    """
    import transformers

    config = model.config
    hf_config = config.to_hf(model_type)
    hf_config._attn_implementation = "sdpa"
    classes = {"mistral": transformers.MistralForCausalLM, "mixtral": transformers.MixtralForCausalLM,
               "llama": transformers.LlamaForCausalLM}
    with torch.device("meta"):
        hf_model = classes[hf_config.model_type](hf_config)
    hf_model = hf_model.to_empty(device=model.device).to(model.dtype)
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in ours_to_hf_disk({k: v for k, v in ours.items() if not OUR_EXPERTS.match(k)}, config).items():
        state[key.replace("block_sparse_moe.gate", "mlp.gate")] = tensor
    if config.is_moe:
        for i in range(config.n_layers):
            w1, w2, w3 = (ours[f"layers.{i}.feed_forward.{n}"] for n in ("w1", "w2", "w3"))
            state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)   # (E, 2I, H)
            state[f"model.layers.{i}.mlp.experts.down_proj"] = w2                              # (E, H, I)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"to_hf: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:
        hf_model.tie_weights()
    # non-persistent buffers (the rotary inv_freq) were left uninitialised by to_empty: build the module again
    rotary = hf_model.model.rotary_emb
    hf_model.model.rotary_emb = type(rotary)(config=hf_config).to(model.device)
    return hf_model.eval()


def hub_tensor_names(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the hub layout (Mixtral experts one by one, as on disk), in the hub's order."""
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
