"""Which decode layout is fastest on this CPU, for this model's shapes and dtype: measured once, then remembered.

The fastest way to stream weights differs from one CPU to the next (on one machine oneDNN's packed layout read twice
as fast as `F.linear`; on the next it was slower), so nothing is assumed. `choose_layout` times a decoding step in each
candidate layout (decode_layout.py: "plain", "packed", "fused") on a model of the same shapes and dtype with random
weights, cut to the first few layers (at least 256 MB, so the weights stream from memory as the real model's do), and
keeps the fastest. The decision is stored in the cache directory under a key of the CPU (model name and flags), torch,
the thread count, the shapes and the dtype, so a second load does not measure again; `mistral-tutorial info --kernels`
prints it. $MISTRAL_TUTORIAL_LAYOUT=plain|packed|fused forces a layout wherever it can run (and "plain" where it
cannot); $MISTRAL_TUTORIAL_DECISIONS moves the file of decisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import native
from .assets import cache_dir
from .decode_layout import LAYOUTS, use_layout
from .fused_decode import fused_unavailable
from .notices import notice
from .packed import can_pack
from .quantized import QuantEmbedding, QuantLinear

LAYOUT_ENV = "MISTRAL_TUTORIAL_LAYOUT"
DECISIONS_ENV = "MISTRAL_TUTORIAL_DECISIONS"
TIMED_BYTES = 256e6          # weights the measurement streams per step, at least (or the whole model, if smaller)
ROUNDS, STEPS = 3, 8         # alternating rounds of timed decoding steps per layout
_CHOSEN: dict[tuple, str] = {}   # (decisions file, key, candidates) -> layout, for this process


def decisions_path() -> Path:
    """$MISTRAL_TUTORIAL_DECISIONS, else decisions.json in the cache directory's kernels/."""
    if os.environ.get(DECISIONS_ENV):
        return Path(os.environ[DECISIONS_ENV]).expanduser()
    return cache_dir() / "kernels" / "decisions.json"


def candidates(config, dtype: torch.dtype, device: torch.device | str, quantized: bool = False) -> list[str]:
    """The layouts that can run a model of `config` in `dtype` on `device` ("plain" always can).

    A quantized model (quantized.py) has one: "fused" where the C kernels run, which are the products its plain layout
    calls too, one matrix at a time with Python between them; so nothing is timed."""
    if quantized:
        return ["fused"] if fused_unavailable(config, torch.float32, device) is None else ["plain"]
    found = ["plain"]
    if can_pack(dtype, device):
        found.append("packed")
    if fused_unavailable(config, dtype, device) is None:
        found.append("fused")
    return found


def decision_key(config, dtype: torch.dtype) -> str:
    """What a decision depends on: the CPU, torch, the threads, the shapes and the dtype."""
    flags = hashlib.sha256(native.cpu_signature().encode()).hexdigest()[:12]
    c = config
    return (f"{native.cpu_name()} [{flags}] | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{str(dtype).removeprefix('torch.')} | dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}x{c.head_dim}, "
            f"hidden {c.hidden_dim}, vocab {c.vocab_size}, experts {c.n_experts}/{c.experts_per_token}")


def _load_decisions() -> dict:
    try:
        return json.loads(decisions_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, decision: dict) -> None:
    path = decisions_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    decisions = _load_decisions()
    decisions[key] = decision
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(decisions, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)                                  # atomic: a reader never sees half a file


def _random_model(model_type: type[nn.Module], config, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """A model of `config`'s shapes cut to the first layers (>= TIMED_BYTES of weights), random, on the CPU."""
    per_layer = 2 * config.dim * (config.n_heads + config.n_kv_heads) * config.head_dim
    per_layer += 3 * config.dim * config.hidden_dim * max(config.n_experts, 1)
    size = torch.tensor([], dtype=dtype).element_size()
    head = config.vocab_size * config.dim * size
    n_layers = min(config.n_layers, max(1, -int(-(TIMED_BYTES - head) // (per_layer * size))))
    with torch.device("meta"):
        model = model_type(config.replace(n_layers=n_layers)).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5)
    # the bytes one decoding step reads (with k of E experts for a MoE model)
    active = config.experts_per_token if config.is_moe else 1
    read = n_layers * (per_layer - 3 * config.dim * config.hidden_dim * (max(config.n_experts, 1) - active)) * size
    return model.eval(), read + head


def _seconds_per_step(model: nn.Module, tokens: torch.Tensor) -> float:
    cache = model.new_cache(1, tokens.shape[1] + 2 + STEPS)
    with torch.inference_mode():
        logits = model(tokens, cache=cache, last_only=True)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):                                                          # warm-up
            next_token = model(next_token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(STEPS):
            next_token = model(next_token, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / STEPS


def measure(model_type: type[nn.Module], config, dtype: torch.dtype, layouts: list[str]) -> dict:
    """Time a decoding step in each of `layouts`; returns {"layout": fastest, "seconds": {...}, "gb_per_s": {...}}."""
    model, read = _random_model(model_type, config, dtype)
    tokens = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {layout: [] for layout in layouts}
    for _ in range(ROUNDS):                                     # alternate, so drift hits every layout alike
        for layout in layouts:
            use_layout(model, layout)
            times[layout].append(_seconds_per_step(model, tokens))
    seconds = {layout: min(t) for layout, t in times.items()}        # the least disturbed round of each
    return {"layout": min(seconds, key=seconds.get), "seconds": seconds,
            "gb_per_s": {layout: read / s / 1e9 for layout, s in seconds.items()},
            "timed_layers": len(model.layers), "bytes_per_step": read}


def choose_layout(model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  verbose: bool = True, remeasure: bool = False, quantized: bool | None = None) -> str:
    """The fastest decode layout for `model`'s config in `dtype` on `device` (default: the model's own).

    `model` may still be on the meta device (assemble.py decides before reading any weight). Measured once per CPU,
    torch, thread count, shapes and dtype (a few seconds), then read from the cache directory; `remeasure` times
    again (a measurement taken while other work loaded the CPU can be wrong: `mistral-tutorial info --kernels
    --remeasure`).
    """
    config = model.config
    dtype = dtype or model.dtype
    device = torch.device(device or model.device)
    if quantized is None:
        quantized = any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    found = candidates(config, dtype, device, quantized)
    if getattr(model, "parallelism", None) is not None and "fused" in found:
        found.remove("fused")
    forced = os.environ.get(LAYOUT_ENV, "")
    if forced and forced not in LAYOUTS:
        raise ValueError(f"${LAYOUT_ENV} must be one of {LAYOUTS}, got {forced!r}")
    if forced:
        return forced if forced in found else "plain"
    if len(found) == 1:
        return found[0]
    key = decision_key(config, dtype)
    memo = (decisions_path(), key, tuple(found))
    if memo in _CHOSEN and not remeasure:                 # decided in this process already: no file to read
        return _CHOSEN[memo]
    decision = _load_decisions().get(key)
    if (remeasure or decision is None or decision.get("layout") not in found
            or set(decision.get("seconds", {})) != set(found)):
        if verbose:
            notice(f"timing the decode layouts {found} for this CPU, once (remembered in {decisions_path()})")
        decision = measure(type(model), config, dtype, found)
        _store(key, decision)
    _CHOSEN[memo] = decision["layout"]
    return decision["layout"]


def use_best_layout(model: nn.Module) -> nn.Module:
    """Put `model` in the fastest decode layout for its shapes, dtype and this CPU (`choose_layout`), in place."""
    return use_layout(model, choose_layout(model))


def report() -> list[tuple[str, dict]]:
    """(key, decision) for every decision stored on this machine."""
    return sorted(_load_decisions().items())
