"""Streaming a checkpoint into a model: one tensor at a time into a model built on the `meta` device.

`assemble` checks the whole plan first (load_plan.py), then reads each tensor, converts it and puts it in place.
Memory: a tensor in the checkpoint's dtype stays backed by the memory-mapped file (zero-copy, as transformers does); any
other is read, converted and placed (or packed, see packed.py and decode_layout.py) before the next is read, and its
file pages are handed back. So the peak is about the model's own bytes. Finding and opening the checkpoint (formats.py)
and the user-facing entry points (loading.py) are left to the others.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import TensorSource, trim_heap
from .config import ModelConfig
from .decode_layout import decode_groups, pack_group, use_layout
from .errors import CheckpointError
from .kernel_choice import choose_layout
from .load_plan import plan_checkpoint
from .model import Transformer
from .notices import notice
from .quantized_load import load_note, take_quantized, tie_quantized_head
from .sharding import Parallelism


def assemble(source: TensorSource, fmt: str, config: ModelConfig, dtype: torch.dtype, device: str | torch.device,
             fast: bool, parallel: Parallelism | None = None, quantization: str | None = None) -> Transformer:
    """Build the model on `meta`, then read the checkpoint into it one tensor at a time (see the module docstring).

    fast: the decode layout measured fastest for this CPU (kernel_choice.py), decided before any weight is read, so
    loading pays only for the layout it uses. "packed" packs each group of matrices (packed.py) as soon as all of its
    tensors are in, so the plain copies never pile up (the other parameters are then frozen, as pack_for_decode
    leaves them); "plain" and "fused" keep every tensor as read (zero-copy where the dtype matches).
    parallel: this rank's share (sharding.py): its modules are swapped in on `meta` once the whole checkpoint is
    checked, and each tensor is cut to this rank's rows or columns (a view of the mapped file) before it is read;
    another rank's experts are not read at all.
    quantization: "keep" (a GGUF's quantized blocks stay as they are), "int8" or "int4" (quantize on load), or None;
    see quantized_load.py. Everything else is read in `dtype` (fp32 for a quantized model).
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    if parallel is not None:
        parallel.check(config)                            # before anything is read: a size N does not divide
    plan = plan_checkpoint(source, fmt, config, expected)
    if parallel is not None:
        parallel.shard_modules(model)                     # this rank's modules, still on meta

    device = torch.device(device)
    if parallel is not None or device.type != "cpu":
        quantization = None                               # the quantized kernels run in one CPU process
    layout = choose_layout(model, dtype, device, quantized=quantization is not None) if fast else "plain"
    packing = layout == "packed"
    module_names = {id(m): n for n, m in model.named_modules()}
    groups = {}                                           # our key -> (module, names, keys) of its packed group
    if packing:
        for module, names in decode_groups(model):
            keys = [".".join(filter(None, [module_names[id(module)], n, "weight"])) for n in names]
            groups.update({k: (module, names, keys) for k in keys if k in expected})
    done: set[str] = set()
    kept: dict[str, int] = {}                             # quantized type -> tensors kept (or made) quantized
    widened: dict[str, int] = {}                          # quantized type -> tensors dequantized (no kernel)
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
            if take_quantized(model, source, name, places, expected, quantization, kept):
                done.update(t.key for t in places)
                continue
            if isinstance(source.infos[name].dtype, str):     # a quantized type, read dequantized
                widened[source.infos[name].dtype] = widened.get(source.infos[name].dtype, 0) + 1
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
    if config.tie_embeddings and not tie_quantized_head(model):
        model.output.weight = model.tok_embeddings.weight
        if packing:
            pack_group(model, ("output",), tied_to=model.tok_embeddings.weight)
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:                                       # plan_checkpoint makes this impossible; never hand out garbage
        raise CheckpointError(f"{source.description}: no data for {still_empty[:8]}")
    if kept or (quantization is not None and widened):
        notice(f"{source.description}: {load_note(kept, widened, quantization if quantization != 'keep' else None)}")
    if layout == "fused":
        use_layout(model, "fused")
    return model.eval()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Does `a` use `b`'s memory (b itself, or a view of it such as a block of its rows)?"""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
