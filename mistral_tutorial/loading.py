"""Weight loading: from a transformers model instance, a transformers checkpoint directory, a mistral reference folder
(params.json + consolidated.safetensors or .pth) or a GGUF file, streamed tensor by tensor.

Every path goes through `_assemble`: it maps each tensor of the file to the model's name (checkpoint.py reads the
headers), checks names and shapes before reading any data (a missing, unexpected or mis-shaped tensor is a
CheckpointError naming the file, the key and both shapes: nothing is ever initialised at random), then reads one
tensor at a time into a model built on the `meta` device. Memory: a tensor in the checkpoint's dtype stays backed by
the memory-mapped file (zero-copy, as transformers does); any other is read, converted and placed (or packed, see
packed.py) before the next is read. So the peak is about the model's own bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import TensorSource, open_gguf, trim_heap
from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer
from .packed import can_pack, decode_groups, pack_group
from .rope import half_to_interleaved, interleaved_to_half
from .sharding import Parallelism

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
# GGUF (llama.cpp) name -> ours; q/k rows are in llama.cpp's interleaved order, like the reference's
_GGUF_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
_GGUF_BLOCK = {      # blk.N.<name> -> layers.N.<ours>
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight", "ffn_gate_inp.weight": "feed_forward.gate.weight",
    "ffn_gate_exps.weight": "feed_forward.w1", "ffn_up_exps.weight": "feed_forward.w3",
    "ffn_down_exps.weight": "feed_forward.w2",
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")     # a buffer derived from rope_theta, kept by some old checkpoints


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: our state-dict key, the expert slot of a stacked (E, ...) tensor, and a
    transform to apply first (un-permuting q/k rows, splitting transformers' fused gate_up)."""

    key: str
    expert: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def targets(name: str, fmt: str, config: ModelConfig) -> list[Target]:
    """The places in our model of tensor `name` of a checkpoint in format 'hf', 'reference' or 'gguf' ([] if none)."""
    unpermute_q = lambda t: interleaved_to_half(t, config.n_heads)         # noqa: E731
    unpermute_k = lambda t: interleaved_to_half(t, config.n_kv_heads)      # noqa: E731
    if fmt == "hf":
        if name == "lm_head.weight":
            return [Target("output.weight")]
        short = name[len("model."):] if name.startswith("model.") else name
        if m := _DISK_EXPERT.match(short):
            return [Target(f"layers.{m[1]}.feed_forward.{m[3]}", int(m[2]))]
        if m := _FUSED_EXPERT.match(short):                                # in memory: gate_up (E, 2I, H), down
            if m[2] == "down_proj":
                return [Target(f"layers.{m[1]}.feed_forward.w2")]
            return [Target(f"layers.{m[1]}.feed_forward.w1", None, lambda t: t.chunk(2, dim=1)[0]),
                    Target(f"layers.{m[1]}.feed_forward.w3", None, lambda t: t.chunk(2, dim=1)[1])]
        for pattern, target in _HF_PATTERNS:
            if m := pattern.match(short):
                return [Target(target.replace("{i}", m[1]) if m.groups() else target)]
        return []
    if fmt == "reference":
        if m := _REF_EXPERT.match(name):
            return [Target(f"layers.{m[1]}.feed_forward.{m[3]}", int(m[2]))]
        if name.endswith("attention.wq.weight"):
            return [Target(name, None, unpermute_q)]
        if name.endswith("attention.wk.weight"):
            return [Target(name, None, unpermute_k)]
        return [Target(name)]
    if fmt == "gguf":
        if name in _GGUF_GLOBAL:
            return [Target(_GGUF_GLOBAL[name])]
        m = re.match(r"^blk\.(\d+)\.(.+)$", name)
        if m is None or m[2] not in _GGUF_BLOCK:
            return []
        transform = {"attn_q.weight": unpermute_q, "attn_k.weight": unpermute_k}.get(m[2])
        return [Target(f"layers.{m[1]}.{_GGUF_BLOCK[m[2]]}", None, transform)]
    raise ValueError(f"unknown checkpoint format {fmt!r}")


def _rename(state_dict: Mapping[str, torch.Tensor], fmt: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole in-memory state dict renamed to ours (experts stacked); unknown keys are kept, to be reported."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        places = targets(name, fmt, config) or [Target(name)]
        for t in places:
            value = t.transform(tensor) if t.transform else tensor
            if t.expert is None:
                ours[t.key] = value
            else:
                experts.setdefault(t.key, {})[t.expert] = value
    for key, by_expert in experts.items():
        missing = sorted(set(range(config.n_experts)) - set(by_expert))
        if missing or len(by_expert) != config.n_experts:
            raise CheckpointError(f"{key}: the checkpoint has experts {sorted(by_expert)}, the model needs "
                                  f"0..{config.n_experts - 1}")
        ours[key] = torch.stack([by_expert[e] for e in range(config.n_experts)])
    return ours


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict (in memory or on disk) to ours. Unknown keys are kept, to be reported."""
    return _rename(state_dict, "hf", config)


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
    return _rename(state_dict, "reference", config)


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


# ---------------------------------------------------------------------------------------------------------------------
def _plan(source: TensorSource, fmt: str, config: ModelConfig, expected: dict[str, tuple[int, ...]]
          ) -> dict[str, list[Target]]:
    """Map every tensor of `source` to the model, and check the whole map before any data is read.

    Raises one CheckpointError listing every tensor the model needs and the file lacks, every tensor of the file the
    model has no place for, and every shape that differs (file, key, expected and actual shape).
    """
    plan: dict[str, list[Target]] = {}
    unexpected, problems = [], []
    covered: dict[str, set[int] | None] = {}
    for name, info in source.infos.items():
        places = targets(name, fmt, config)
        if not places and _IGNORED.search(name):
            continue
        if config.tie_embeddings and [t.key for t in places] == ["output.weight"]:
            continue                                      # a tied head stored anyway: the embedding is the head
        if not places or any(t.key not in expected or (t.expert is not None and not 0 <= t.expert < config.n_experts)
                             for t in places):
            unexpected.append(name)
            continue
        if isinstance(info.dtype, torch.dtype) and not info.dtype.is_floating_point:
            problems.append(f"{info.file}: {name} holds {info.dtype}, not floating-point weights")
        for t in places:
            want = expected[t.key][1:] if t.expert is not None else expected[t.key]
            try:
                got = tuple(t.transform(torch.empty(info.shape, device="meta")).shape) if t.transform else info.shape
            except RuntimeError:
                got = None
            if got != want:
                slot = "" if t.expert is None else f"[expert {t.expert}]"
                problems.append(f"{info.file}: {name} has shape {info.shape}; the model's {t.key}{slot} "
                                f"expects {want}")
            if t.expert is None:
                if t.key in covered:
                    problems.append(f"{t.key} is given twice (again by {name})")
                covered[t.key] = None
            else:
                covered.setdefault(t.key, set()).add(t.expert)
        plan[name] = places
    missing = [k for k in expected if k not in covered]
    missing += [f"{k} (experts {sorted(set(range(config.n_experts)) - got)})" for k, got in covered.items()
                if got is not None and len(got) < config.n_experts]
    if missing:
        problems.insert(0, f"missing tensors the model needs ({len(missing)}): {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in unexpected:
        by_file.setdefault(source.infos[name].file, []).append(name)
    for file, names in sorted(by_file.items(), reverse=True):
        problems.insert(0, f"unexpected tensors in {file}, for which the model has no place ({len(names)}): "
                           f"{sorted(names)[:8]}{' ...' if len(names) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source.description} does not fit the model ({config}):\n  " + "\n  ".join(problems))
    return plan


def _assemble(source: TensorSource, fmt: str, config: ModelConfig, dtype: torch.dtype, device: str | torch.device,
              fast: bool, parallel: Parallelism | None = None) -> Transformer:
    """Build the model on `meta`, then read the checkpoint into it one tensor at a time (see the module docstring).

    fast: pack each group of matrices (packed.py) as soon as all of its tensors are in, so the plain copies never
    pile up; the model's other parameters are then frozen, as pack_for_decode leaves them.
    parallel: this rank's share (sharding.py): its modules are swapped in on `meta` once the whole checkpoint is
    checked, and each tensor is cut to this rank's rows or columns (a view of the mapped file) before it is read;
    another rank's experts are not read at all.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    if parallel is not None:
        parallel.check(config)                            # before anything is read: a size N does not divide
    plan = _plan(source, fmt, config, expected)
    if parallel is not None:
        parallel.shard_modules(model)                     # this rank's modules, still on meta

    device = torch.device(device)
    packing = fast and can_pack(dtype, device)
    module_names = {id(m): n for n, m in model.named_modules()}
    groups = {}                                           # our key -> (module, names, keys) of its packed group
    if packing:
        for module, names in decode_groups(model):
            keys = [".".join(filter(None, [module_names[id(module)], n, "weight"])) for n in names]
            groups.update({k: (module, names, keys) for k in keys if k in expected})
    done: set[str] = set()
    slots: dict[str, set[int]] = {}
    waiting: dict[str, list[tuple[str, torch.Tensor]]] = {}   # file tensors a group holds until it is packed
    biggest_first = {"tok_embeddings.weight": 0, "output.weight": 0}  # the largest transient first, then file order
    order = sorted(plan, key=lambda n: (biggest_first.get(plan[n][0].key, 1), str(source.infos[n].file),
                                        source.infos[n].offset))
    with torch.inference_mode(False), torch.no_grad():           # ordinary tensors, even when called in inference mode
        for name in tqdm(order, desc="loading", unit="tensor", disable=None, leave=False):
            places = [t for t in plan[name] if parallel is None or parallel.holds(t.key, t.expert, config)]
            if not places:
                continue                                      # another rank's expert: never read
            tensor = source.read(name)
            in_use = False                                    # is the file's memory now a parameter's?
            for t in places:
                value, expert = t.transform(tensor) if t.transform else tensor, t.expert
                if parallel is not None:                      # this rank's rows or columns: a view, nothing read yet
                    value, expert = parallel.take(t.key, expert, value, config)
                value = value.to(device=device, dtype=dtype).contiguous()   # a block of columns: copied here
                aliased = expert is None and _same_memory(value, tensor)
                if aliased and t.key not in groups and not source.mapped:
                    value, aliased = value.clone(), False     # never keep memory that is not ours (from_hf)
                owner_name, _, param_name = t.key.rpartition(".")
                owner = model.get_submodule(owner_name)
                if expert is None:
                    owner._parameters[param_name] = nn.Parameter(value, requires_grad=not packing)
                    done.add(t.key)
                else:
                    param = owner._parameters[param_name]
                    if param.is_meta:
                        param = owner._parameters[param_name] = nn.Parameter(
                            torch.empty(param.shape, dtype=dtype, device=device), requires_grad=not packing)
                    param[expert].copy_(value)
                    slots.setdefault(t.key, set()).add(expert)
                    if len(slots[t.key]) == param.shape[0]:
                        done.add(t.key)
                in_use |= aliased
                if t.key in groups:                           # a matrix to pack, once its whole group is in
                    module, names, keys = groups[t.key]
                    if aliased:                               # its file pages go back after the packing
                        waiting.setdefault(keys[0], []).append((name, tensor))
                    if all(k in done for k in keys):
                        pack_group(module, names)
                        for held_name, held in waiting.pop(keys[0], []):
                            source.release(held_name, held)
                        trim_heap()                           # the group's dense temporaries, back to the kernel
            if not in_use:
                source.release(name, tensor)
            del tensor
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        if packing:
            pack_group(model, ("output",), tied_to=model.tok_embeddings.weight)
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:                                       # _plan makes this impossible; never hand out garbage
        raise CheckpointError(f"{source.description}: no data for {still_empty[:8]}")
    return model.eval()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Does `a` use `b`'s memory (b itself, or a view of it such as a block of its rows)?"""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def loading_plan(config: ModelConfig, dtype_bytes: int = 2, fast: bool = True
                 ) -> list[tuple[str, tuple[int, ...], int, str]]:
    """(hub name, shape, bytes, where it goes) for each tensor of a hub-layout checkpoint of `config`, in the
    checkpoint's dtype, on a CPU: built on the meta device, nothing read or allocated."""
    with torch.device("meta"):
        model = Transformer(config)
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("output.weight")
    names = {id(m): n for n, m in model.named_modules()}
    group_of = {".".join(filter(None, [names[id(module)], n, "weight"])): "+".join(group)
                for module, group in decode_groups(model) for n in group} if fast else {}
    rows = []
    for name, tensor in ours_to_hf_disk(state, config).items():
        (t,) = targets(name, "hf", config)
        if t.expert is not None:
            where = f"stacked experts: slot {t.expert} of {t.key} (E={config.n_experts}), copied in"
        elif t.key in group_of:
            where = f"packed: with {group_of[t.key]} (oneDNN; replaces the plain matrix)"
        else:
            where = f"zero-copy: {t.key} is the memory-mapped file"
        rows.append((name, tuple(tensor.shape), tensor.numel() * dtype_bytes, where))
    return rows


def from_hf(hf_model: Any, fast: bool = False, parallel: str | None = None) -> Transformer:
    """Our Transformer holding a copy of the weights of a transformers Mistral/Mixtral/Llama *ForCausalLM instance.

    fast=True lays it out for fast CPU decoding at once (packed.py); `generate` does that anyway by default.
    parallel: 'expert' or 'tensor' to copy only this rank's share (sharding.py; torch.distributed initialised).
    """
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"from_hf takes a transformers *ForCausalLM instance, got {type(hf_model).__name__}")
    config = ModelConfig.from_hf(hf_model.config)
    param = next(hf_model.parameters())
    source = TensorSource.from_mapping(hf_model.state_dict(), f"transformers {type(hf_model).__name__}")
    share = Parallelism.current(parallel) if parallel is not None else None
    return _assemble(source, "hf", config, param.dtype, param.device, fast, share)


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


def _checkpoint_dtype(source: TensorSource) -> torch.dtype:
    """The dtype most of the checkpoint's bytes are in (fp32 for GGUF, which is dequantized)."""
    counts: dict[torch.dtype, int] = {}
    for info in source.infos.values():
        dtype = info.dtype if isinstance(info.dtype, torch.dtype) else torch.float32
        counts[dtype] = counts.get(dtype, 0) + int(torch.Size(info.shape).numel())
    return max(counts, key=counts.get) if counts else torch.float32


def load_pretrained(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    fast: bool = True, parallel: str | None = None, **overrides: Any) -> Transformer:
    """Detect the checkpoint format at `path` and stream it into a model (see the module docstring).

    dtype: the model's dtype, or "auto" for the checkpoint's own. fast: lay the weights out for fast CPU decoding
    (packed.py; no effect on a GPU); fast=False keeps plain nn.Linear weights, as training needs. `overrides`
    change config fields (e.g. sliding_window=32) before the weights are loaded. parallel: 'expert' or 'tensor'
    to load only this rank's share of the model (sharding.py; torch.distributed must be initialised).
    """
    share = Parallelism.current(parallel) if parallel is not None else None
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
    if dtype == "auto":
        dtype = _checkpoint_dtype(source)
    return _assemble(source, fmt, config.replace(**overrides), dtype, device, fast, share)


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
