"""Weight loading: from a transformers model instance, a transformers checkpoint directory, a mistral reference folder
(params.json + consolidated.safetensors or .pth) or a GGUF file, streamed tensor by tensor.

This module holds the entry points (`from_hf`, `load_pretrained`) and hands them to model.py's `Transformer.from_hf`
and `.from_pretrained`; the work is the others'. formats.py says what is at a path (format, files, config); names.py
maps each tensor of the file to the model's name; load_plan.py checks names and shapes before reading any data (a
missing, unexpected or mis-shaped tensor is a CheckpointError naming the file, the key and both shapes: nothing is
ever initialised at random); assemble.py then reads one tensor at a time into a model built on the `meta` device,
zero-copy where the dtype matches, so the peak is about the model's own bytes. The other direction, our model in
those layouts, is export.py. The renames, the plan and the export side are re-exported here (mt.loading.to_hf,
mt.loading.hf_to_ours, mt.loading.loading_plan as before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .assemble import assemble
from .checkpoint import TensorSource
from .config import ModelConfig
from .export import ours_to_hf_disk, ours_to_reference, to_hf  # noqa: F401  (the export side, mt.loading.to_hf as before)
from .formats import checkpoint_dtype, open_checkpoint
from .load_plan import loading_plan  # noqa: F401  (mt.loading.loading_plan as before)
from .model import Transformer
from .names import hf_to_ours, reference_to_ours  # noqa: F401  (mt.loading.hf_to_ours as before)
from .notices import notice
from .quantized import FORMATS
from .quantized_load import SCHEMES
from .registry import register_loader
from .sharding import Parallelism


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
    return assemble(source, "hf", config, param.dtype, param.device, fast, share)


def load_pretrained(path: str | Path, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
                    fast: bool = True, parallel: str | None = None, quantize: str | None = None,
                    **overrides: Any) -> Transformer:
    """Detect the checkpoint format at `path` and stream it into a model (see the module docstring).

    dtype: "auto" (default) for the checkpoint's own: a bf16 file stays bf16, and a GGUF's quantized weights stay in
    their own bits (quantized.py; the rest in fp32); one line on stderr says what was used. Or the model's dtype:
    then everything is read (dequantized) into it, e.g. torch.float32 for the exact comparison with transformers,
    which dequantizes. quantize: "int8" or "int4" quantizes the projections on load (quantized_load.py).
    fast: the decode layout measured fastest on this CPU (kernel_choice.py; no effect on a GPU); fast=False keeps
    the plain PyTorch modules. `overrides` change config fields (e.g. sliding_window=32) before the weights are
    loaded. parallel: 'expert' or 'tensor' to load only this rank's share of the model (sharding.py;
    torch.distributed must be initialised).
    """
    share = Parallelism.current(parallel) if parallel is not None else None
    source, fmt, config = open_checkpoint(path)
    quantization = quantize
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize must be one of {sorted(SCHEMES)} or None, got {quantize!r}")
    if dtype == "auto":
        dtype = checkpoint_dtype(source)
        if quantize is None and any(info.dtype in FORMATS for info in source.infos.values()):
            quantization = "keep"
        what = "its quantized weights as they are, the rest in float32" if quantization == "keep" else \
            f"{str(dtype).removeprefix('torch.')}, the checkpoint's own dtype"
        if quantize is None:
            notice(f"loading {Path(path).name}: {what} (dtype=... for another)")
    if quantization is not None:
        dtype = torch.float32                              # activations, norms and the router of a quantized model
    return assemble(source, fmt, config.replace(**overrides), dtype, device, fast, share, quantization)


register_loader("from_hf", from_hf)                    # Transformer.from_hf and .from_pretrained hand over to these
register_loader("from_pretrained", load_pretrained)
