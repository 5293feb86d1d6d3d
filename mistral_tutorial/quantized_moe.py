"""Mixtral's experts in quantized blocks (quantized.py): the MoE layer of moe.py with its stacked expert matrices
w1, w2, w3 held as (E, rows, row bytes) blocks, so that a quantized Mixtral file stays quantized (93 GB in bf16, about
26 GB in Q4). The routing, the dispatch and the router are moe.py's own; only `expert` changes: each of its three
products goes through `quantized.product` on expert e's blocks. quantized_load.py swaps it in while loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import MoeLayer
from .quantized import check_blocks, product, row_bytes, unpack
from .quantized import quantized_weights as quantized_layer_weights

EXPERT_MATRICES = ("w1", "w2", "w3")


class QuantMoeLayer(MoeLayer):
    """A MoeLayer whose expert matrices are quantized: `quantized[name] = (blocks (E, rows, row bytes), qtype, cols)`.

    A matrix not (yet) quantized stays a Parameter, as in MoeLayer; `state_dict()` holds every one unpacked to fp32.
    """

    @classmethod
    def replacing(cls, moe: MoeLayer) -> QuantMoeLayer:
        """A QuantMoeLayer taking over `moe`'s router module, settings and (still float) expert Parameters."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        for name in ("n_experts", "experts_per_token", "capacity_factor", "jitter_noise", "record_routing",
                     "last_router_logits", "last_experts", "last_weights", "last_dropped"):
            setattr(new, name, getattr(moe, name))
        new.gate = moe.gate
        for name in EXPERT_MATRICES:
            new.register_parameter(name, moe._parameters[name])
        new.quantized = {}
        return new

    def hold(self, name: str, blocks: torch.Tensor, qtype: str, shape: tuple[int, int, int], what: str) -> None:
        """Take expert matrix `name` (E, rows, cols) as `qtype` blocks (E, rows, row bytes)."""
        check_blocks(blocks.reshape(-1, blocks.shape[-1]), qtype, (shape[0] * shape[1], shape[2]), what)
        self._parameters.pop(name, None)
        self.quantized[name] = (blocks.reshape(shape[0], shape[1], row_bytes(qtype, shape[2])), qtype, shape[2])

    def _product(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if name in self.quantized:
            blocks, qtype, cols = self.quantized[name]
            return product(x, blocks[e], qtype, cols)
        return F.linear(x, getattr(self, name)[e])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert e on x (n, dim) -> (n, dim): w2[e] (silu(w1[e] x) * w3[e] x), from the blocks."""
        return self._product("w2", e, F.silu(self._product("w1", e, x)) * self._product("w3", e, x))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, (blocks, qtype, cols) in self.quantized.items():
            destination[prefix + name] = unpack(blocks.reshape(-1, blocks.shape[-1]), qtype, cols).reshape(
                blocks.shape[0], blocks.shape[1], cols)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if any(prefix + name in state_dict for name in self.quantized):
            args[-1].append(f"{prefix}w1/w2/w3 are quantized: load the state dict into a model loaded with "
                            f"dtype=torch.float32")
            state_dict = {k: v for k, v in state_dict.items() if k[len(prefix):] not in self.quantized}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        held = ", ".join(f"{name} {qtype}" for name, (_, qtype, _) in self.quantized.items())
        return f"experts={self.n_experts}, top-{self.experts_per_token}, quantized: {held or 'none'}"


def quantized_weights(modules: list) -> int:
    """The weights the quantized layers among `modules` hold: quantized.py's, and the experts of QuantMoeLayers."""
    return quantized_layer_weights(modules) + sum(blocks.shape[0] * blocks.shape[1] * cols for m in modules
                                                  if isinstance(m, QuantMoeLayer) for blocks, _, cols in m.quantized.values())
