"""Weight loading: from a transformers model instance, a transformers checkpoint directory, a mistral reference folder
(params.json + consolidated.safetensors) or a GGUF file.

Every path ends in `load_state_dict_strict`, which names a missing key, an unexpected key or a shape mismatch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer
from .rope import half_to_interleaved, interleaved_to_half

# transformers name (after `model.`) -> our name. {i} is the layer index.
_HF_TO_OURS = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    # Mixtral router: transformers 5.x in memory (`mlp.gate`) and on disk (`block_sparse_moe.gate`)
    "layers.{i}.mlp.gate.weight": "layers.{i}.feed_forward.gate.weight",
    "layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.feed_forward.gate.weight",
}
_HF_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in _HF_TO_OURS.items()]
_DISK_EXPERT = re.compile(r"^layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_REF_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")


def _stack_experts(per_expert: dict[tuple[int, str], dict[int, torch.Tensor]], n_experts: int, source: str
                   ) -> dict[str, torch.Tensor]:
    """{(layer, 'w1'): {expert: (I, H)}} -> {'layers.N.feed_forward.w1': (E, I, H)}."""
    out = {}
    for (layer, name), experts in per_expert.items():
        missing = sorted(set(range(n_experts)) - set(experts))
        if missing:
            raise CheckpointError(f"{source}: layer {layer} lacks {name} of experts {missing} (expected {n_experts})")
        out[f"layers.{layer}.feed_forward.{name}"] = torch.stack([experts[e] for e in range(n_experts)])
    return out


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict (in memory or on disk) to ours. Unknown keys are kept, to be reported."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight":
            ours["output.weight"] = tensor
            continue
        short = key[len("model."):] if key.startswith("model.") else key
        if m := _DISK_EXPERT.match(short):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensor
            continue
        if m := _FUSED_EXPERT.match(short):
            layer = int(m[1])
            if m[2] == "gate_up_proj":                                    # (E, 2I, H): gate rows, then up rows
                gate, up = tensor.chunk(2, dim=1)
                ours[f"layers.{layer}.feed_forward.w1"] = gate
                ours[f"layers.{layer}.feed_forward.w3"] = up
            else:                                                         # (E, H, I)
                ours[f"layers.{layer}.feed_forward.w2"] = tensor
            continue
        for pattern, target in _HF_PATTERNS:
            if m := pattern.match(short):
                ours[target.replace("{i}", m[1]) if m.groups() else target] = tensor
                break
        else:
            ours[key] = tensor
    ours.update(_stack_experts(experts, config.n_experts, "transformers checkpoint"))
    return ours


def ours_to_hf_disk(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' on-disk names (Mixtral experts as block_sparse_moe.experts.N.w1...)."""
    reverse = {v: k for k, v in _HF_TO_OURS.items() if "block_sparse_moe" not in k}
    if config.is_moe:
        reverse["layers.{i}.feed_forward.gate.weight"] = "layers.{i}.block_sparse_moe.gate.weight"
    out = {}
    for key, tensor in state_dict.items():
        if key == "output.weight":
            out["lm_head.weight"] = tensor
            continue
        m = re.match(r"^layers\.(\d+)\.feed_forward\.(w[123])$", key)
        if m:
            for e in range(tensor.shape[0]):
                out[f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{m[2]}.weight"] = tensor[e]
            continue
        generic = re.sub(r"^layers\.(\d+)\.", "layers.{i}.", key)
        layer = re.match(r"^layers\.(\d+)\.", key)
        name = reverse[generic]
        out["model." + (name.replace("{i}", layer[1]) if layer else name)] = tensor
    return out


def reference_to_ours(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A mistral reference state dict (interleaved q/k rows, experts one by one) -> ours."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if m := _REF_EXPERT.match(key):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensor
        elif key.endswith("attention.wq.weight"):
            ours[key] = interleaved_to_half(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            ours[key] = interleaved_to_half(tensor, config.n_kv_heads)
        else:
            ours[key] = tensor
    ours.update(_stack_experts(experts, config.n_experts, "reference checkpoint"))
    return ours


def ours_to_reference(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the mistral reference layout (inverse permutation of wq/wk, experts one by one)."""
    out = {}
    for key, tensor in state_dict.items():
        m = re.match(r"^layers\.(\d+)\.feed_forward\.(w[123])$", key)
        if m:
            for e in range(tensor.shape[0]):
                out[f"layers.{m[1]}.feed_forward.experts.{e}.{m[2]}.weight"] = tensor[e]
        elif key.endswith("attention.wq.weight"):
            out[key] = half_to_interleaved(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            out[key] = half_to_interleaved(tensor, config.n_kv_heads)
        else:
            out[key] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------------
def load_state_dict_strict(model: Transformer, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
                           ) -> None:
    """Copy tensors into the model; raise CheckpointError naming every missing/unexpected key or shape mismatch."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("output.weight", None)
        state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(expected[key].shape) != tuple(state_dict[key].shape):
            problems.append(f"shape mismatch for {key}: the model expects {tuple(expected[key].shape)}, "
                            f"the {source} has {tuple(state_dict[key].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({model.config}):\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for key, param in model.state_dict().items():
            if key in state_dict:
                param.copy_(state_dict[key])


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)          # storage only: every weight is copied in next
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def from_hf(hf_model: Any) -> Transformer:
    """Our Transformer holding the weights of a transformers Mistral/Mixtral/Llama *ForCausalLM instance."""
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"from_hf takes a transformers *ForCausalLM instance, got {type(hf_model).__name__}")
    config = ModelConfig.from_hf(hf_model.config)
    param = next(hf_model.parameters())
    model = _empty_model(config, param.dtype, param.device)
    load_state_dict_strict(model, hf_to_ours(hf_model.state_dict(), config), f"transformers {type(hf_model).__name__}")
    return model.eval()


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    **overrides: Any) -> Transformer:
    """Detect the checkpoint format at `path` and load it. `overrides` change config fields (e.g. sliding_window)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, **overrides)
    if path.is_dir() and (path / "config.json").is_file():
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text())).replace(**overrides)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has config.json but no *.safetensors weights")
        model = _empty_model(config, dtype, device)
        load_state_dict_strict(model, hf_to_ours(_read_safetensors(files), config), f"transformers checkpoint {path}")
        return model.eval()
    if path.is_dir() and (path / "params.json").is_file():
        config = ModelConfig.from_params(path / "params.json").replace(**overrides)
        files = sorted(path.glob("consolidated*.safetensors"))
        if files:
            tensors = _read_safetensors(files)
        elif pth := sorted(path.glob("consolidated*.pth")):
            tensors = {}
            for f in pth:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        else:
            raise CheckpointError(f"{path} has params.json but no consolidated.safetensors (or consolidated.00.pth)")
        model = _empty_model(config, dtype, device)
        load_state_dict_strict(model, reference_to_ours(tensors, config), f"reference checkpoint {path}")
        return model.eval()
    raise CheckpointError(
        f"unknown checkpoint format at {path}: expected a .gguf file, a transformers directory (config.json + "
        f"*.safetensors) or a mistral reference folder (params.json + consolidated.safetensors)")


def _load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device, **overrides: Any) -> Transformer:
    """GGUF through transformers' reader (it dequantizes and undoes llama.cpp's q/k permutation)."""
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = ModelConfig.from_hf(hf_model.config).replace(**overrides)
    model = _empty_model(config, dtype, device)
    load_state_dict_strict(model, hf_to_ours(hf_model.state_dict(), config), f"GGUF file {path}")
    return model.eval()


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
    for key, tensor in ours_to_hf_disk({k: v for k, v in ours.items() if not re.match(
            r"^layers\.\d+\.feed_forward\.w[123]$", k) or not config.is_moe}, config).items():
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
