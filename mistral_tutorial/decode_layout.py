"""Swapping a whole Transformer between its decode layouts, in place; kernel_choice.py says which one is fastest.

- "plain": the PyTorch modules as written (nn.Linear, F.linear on row-major weights), in the model's dtype.
- "packed": `pack_for_decode(model)` replaces each projection `nn.Linear` by a `PackedLinear` part of one
  oneDNN-packed matrix per group (packed.py): wq/wk/wv share one, w1/w3 another; wo, w2, the router and the head get
  one each. The packed matrices replace the plain ones (no extra memory) and have no gradients.
- "fused": the plain modules, plus one C call per decoding step through all layers (fused_decode.py); bf16 weights
  are multiplied into fp32 activations (weight_only.py). Nothing is copied; the model stays trainable.

`unpack(model)` puts the plain layout back. No swap copies the model: the peak is the model plus one group's matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_decode import FusedDecoder, why_not_fused
from .packed import PackedLinear, PackedMatrix, can_pack
from .weight_only import WeightOnlyLinear

LAYOUTS = ("plain", "packed", "fused")


def decode_groups(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """The (module, names) groups that share one packed matrix: (attention, (wq, wk, wv)), (attention, (wo,)), ...

    The head is last; with tied embeddings it is packed from the embedding (see PackedMatrix.tied_to).
    """
    groups: list[tuple[nn.Module, tuple[str, ...]]] = []
    for layer in model.layers:
        groups += [(layer.attention, ("wq", "wk", "wv")), (layer.attention, ("wo",))]
        if hasattr(layer.feed_forward, "w1") and isinstance(layer.feed_forward.w1, nn.Module):   # dense SwiGLU
            groups += [(layer.feed_forward, ("w1", "w3")), (layer.feed_forward, ("w2",))]
        else:                                                                                  # MoE: the router
            groups += [(layer.feed_forward, ("gate",))]
    groups.append((model, ("output",)))
    # only plain nn.Linear (or already packed) parts: a subclass with a forward of its own (parallel.py's
    # vocabulary-parallel head) keeps it
    return [(module, names) for module, names in groups
            if all(type(getattr(module, name)) in (nn.Linear, PackedLinear, WeightOnlyLinear) for name in names)]


def pack_group(module: nn.Module, names: tuple[str, ...], tied_to: nn.Parameter | None = None) -> None:
    """Replace the nn.Linear submodules `names` of `module` by PackedLinear parts of one packed matrix."""
    linears = [getattr(module, name) for name in names]
    if any(isinstance(linear, (PackedLinear, WeightOnlyLinear)) for linear in linears):
        return
    with torch.no_grad():
        dense = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
        matrix = PackedMatrix(dense, [linear.out_features for linear in linears], tied_to)
    del dense
    for i, name in enumerate(names):
        setattr(module, name, PackedLinear(matrix, i))


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_for_decode(model: nn.Module) -> nn.Module:
    """Swap in the packed layout, in place (no-op where oneDNN cannot pack: a GPU, fp16); returns the model.

    Peak memory: the model plus one group's matrix (e.g. one layer's w1 and w3).
    """
    if getattr(model, "fused_decoder", None) is not None:
        unpack(model)
    if is_packed(model) or not can_pack(model.dtype, model.device):
        return model
    model.eval()
    tied = model.output.weight is model.tok_embeddings.weight
    for module, names in decode_groups(model):
        pack_group(module, names, tied_to=model.tok_embeddings.weight if tied and names == ("output",) else None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def current_layout(model: nn.Module) -> str:
    """"plain", "packed" or "fused": the layout `model` decodes in now."""
    if is_packed(model):
        return "packed"
    return "fused" if getattr(model, "fused_decoder", None) is not None else "plain"


def use_layout(model: nn.Module, layout: str) -> nn.Module:
    """Put `model` in `layout` ("plain", "packed" or "fused"; see the module docstring), in place; returns it.

    "packed" is a no-op where oneDNN cannot pack (a GPU, fp16). "fused" raises where the C step cannot run, naming why.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if current_layout(model) == layout:
        return model
    unpack(model)
    if layout == "packed":
        return pack_for_decode(model)
    if layout == "fused":
        why = why_not_fused(model)
        if why is not None:
            raise ValueError(f"the fused decode layout cannot run this model: {why}")
        if model.dtype != torch.float32:                      # bf16 weights into fp32 activations
            for module, names in decode_groups(model):
                for name in names:
                    setattr(module, name, WeightOnlyLinear.replacing(getattr(module, name)))
        model.fused_decoder = FusedDecoder(model)
    return model


def unpack(model: nn.Module) -> nn.Module:
    """The plain layout back (nn.Linear modules, gradients on), in place; returns the model."""
    model.fused_decoder = None
    was_packed = is_packed(model)
    for module, names in decode_groups(model):
        for name in names:
            part = getattr(module, name)
            if isinstance(part, WeightOnlyLinear):
                setattr(module, name, part.plain())
            if isinstance(part, PackedLinear):
                linear = nn.Linear(part.in_features, part.out_features, bias=False, device="meta")
                if part.matrix.tied_to is not None:
                    linear.weight = part.matrix.tied_to
                else:
                    linear.weight = nn.Parameter(part.weight.as_subclass(torch.Tensor).clone())
                setattr(module, name, linear)
    if was_packed:                                  # pack_for_decode froze them
        for p in model.parameters():
            p.requires_grad_(True)
    return model
