"""oneDNN-packed weights for fast CPU decoding (used by `Transformer.optimize_for_decode`).

Decoding one token multiplies a vector by every weight matrix, so its speed is the speed at which the CPU streams the
weights. oneDNN reads a weight it has re-laid out ("packed") for its own kernel at close to the memory bandwidth
(about 31 GB/s on this project's 2-core machines, against 16 GB/s for `F.linear` on the row-major matrix; see
benchmarks/). The packed copy costs as much memory again as the weights it packs. It is used only where it is exact
to use it: no gradients wanted, a CPU input of its dtype, and the parameter it was made from unchanged since (same
storage, no in-place update). Anything else takes the plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing exists for fp32/bf16 CPU tensors in builds with mkldnn."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class PackedWeight:
    """A packed copy of `weight` (out, in), guarded by the parameter `guard` it was made from."""

    def __init__(self, weight: torch.Tensor, guard: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)   # layout for batch-1 products
        self.dtype = weight.dtype
        self.guard_ptr, self.guard_version = guard.data_ptr(), guard._version

    def usable(self, x: torch.Tensor, guard: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == self.dtype
                and guard.data_ptr() == self.guard_ptr and guard._version == self.guard_version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x W^T (..., out)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
    """x W^T: through the packed copy when it is usable, else F.linear."""
    if packed is not None and packed.usable(x, weight):
        return packed(x)
    return F.linear(x, weight)
