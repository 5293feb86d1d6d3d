"""The loader's plan: where each tensor of a checkpoint goes in the model, checked whole before any data is read.

`plan_checkpoint` maps every tensor a checkpoint's headers list to the model's parameters (through names.py's table)
and raises one CheckpointError naming the file, the key and both shapes for every missing, unexpected or mis-shaped
tensor, so nothing is ever initialised at random. `loading_plan` lists, on the meta device, what loading a hub-layout
checkpoint of a config does with each tensor and its bytes. Reading the tensors is assemble.py's job; the entry
points (from_hf, load_pretrained) are loading.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import TensorSource
from .config import ModelConfig
from .decode_layout import decode_groups
from .errors import CheckpointError
from .export import ours_to_hf_disk
from .model import Transformer
from .names import IGNORED, Target, targets


def plan_checkpoint(source: TensorSource, fmt: str, config: ModelConfig, expected: dict[str, tuple[int, ...]]
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
