"""Weight loading: from a transformers model instance, a transformers checkpoint directory, a mistral reference folder
(params.json + consolidated.safetensors or .pth) or a GGUF file, streamed tensor by tensor.

formats.py says what is at a path (format, files, config); names.py maps each tensor of the file to the model's name.
Every path goes through `_assemble`: it checks names and shapes before reading any data (a missing, unexpected or
mis-shaped tensor is a CheckpointError naming the file, the key and both shapes: nothing is ever initialised at
random), then reads one tensor at a time into a model built on the `meta` device. Memory: a tensor in the checkpoint's
dtype stays backed by the memory-mapped file (zero-copy, as transformers does); any other is read, converted and placed
(or packed, see packed.py) before the next is read. So the peak is about the model's own bytes. The other direction,
our model in those layouts, is export.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import TensorSource, trim_heap
from .config import ModelConfig
from .decode_layout import decode_groups, pack_group
from .errors import CheckpointError
from .export import ours_to_hf_disk, ours_to_reference, to_hf  # noqa: F401  (the export side, mt.loading.to_hf as before)
from .formats import checkpoint_dtype, open_checkpoint
from .model import Transformer, register_loader
from .names import IGNORED, Target, targets
from .packed import can_pack
from .sharding import Parallelism


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


def reference_to_ours(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A mistral reference state dict (interleaved q/k rows, experts one by one) -> ours."""
    return _rename(state_dict, "reference", config)


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
        if not places and IGNORED.search(name):
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


def load_pretrained(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    fast: bool = True, parallel: str | None = None, **overrides: Any) -> Transformer:
    """Detect the checkpoint format at `path` and stream it into a model (see the module docstring).

    dtype: the model's dtype, or "auto" for the checkpoint's own. fast: lay the weights out for fast CPU decoding
    (packed.py; no effect on a GPU); fast=False keeps plain nn.Linear weights, as training needs. `overrides`
    change config fields (e.g. sliding_window=32) before the weights are loaded. parallel: 'expert' or 'tensor'
    to load only this rank's share of the model (sharding.py; torch.distributed must be initialised).
    """
    share = Parallelism.current(parallel) if parallel is not None else None
    source, fmt, config = open_checkpoint(path)
    if dtype == "auto":
        dtype = checkpoint_dtype(source)
    return _assemble(source, fmt, config.replace(**overrides), dtype, device, fast, share)


register_loader("from_hf", from_hf)                    # Transformer.from_hf and .from_pretrained hand over to these
register_loader("from_pretrained", load_pretrained)
