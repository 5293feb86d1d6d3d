"""Building models from other models and from state dicts: an empty model to fill, a strict copy of a state dict into
it, and sparse upcycling (a dense model -> an MoE one). loading.py reads checkpoints into models built here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import ModelConfig
from .errors import CheckpointError
from .model import Transformer


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


def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """A model of `config` with uninitialised storage in `dtype` on `device`: built on meta, nothing initialised."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)          # storage only: every weight is copied in next
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def upcycle(model: nn.Module, n_experts: int, experts_per_token: int = 2, noise_std: float = 0.0,
            seed: int = 0) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al. 2022): a dense Transformer -> an MoE one with E copies of each FFN.

    Every expert starts as the dense FFN, so whatever the router picks, sum_i G_i(x) FFN(x) = FFN(x) (the weights sum to
    1): the MoE model's logits equal the dense model's until the experts are trained apart. The router is initialised
    at random (seeded); noise_std > 0 perturbs each copy to break the symmetry (then the equality no longer holds).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"upcycle takes a mistral_tutorial.Transformer, got {type(model).__name__}")
    if model.config.is_moe:
        raise ValueError("the model already has experts (n_experts > 0)")
    config = model.config.replace(n_experts=n_experts, experts_per_token=experts_per_token)
    generator = torch.Generator().manual_seed(seed)
    moe_model = empty_model(config, model.dtype, model.device)         # storage only: every tensor is set below
    state = {k: v for k, v in model.state_dict().items() if ".feed_forward." not in k}
    with torch.no_grad():
        for i, (dense, block) in enumerate(zip(model.layers, moe_model.layers)):
            ff = block.feed_forward
            for name in ("w1", "w2", "w3"):
                copies = getattr(dense.feed_forward, name).weight[None].repeat(n_experts, 1, 1)   # (E, out, in)
                if noise_std > 0:
                    copies = copies + noise_std * torch.randn(copies.shape, generator=generator).to(copies)
                state[f"layers.{i}.feed_forward.{name}"] = copies
            gate = torch.randn(ff.gate.weight.shape, generator=generator) * ff.gate.weight.shape[1] ** -0.5
            state[f"layers.{i}.feed_forward.gate.weight"] = gate.to(ff.gate.weight)
    load_state_dict_strict(moe_model, state, "upcycled dense model")
    return moe_model.eval()
