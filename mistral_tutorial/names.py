"""The one table of tensor names: transformers', the mistral reference's and llama.cpp's GGUF names against ours.

Import reads it through `targets`: where a checkpoint's tensor goes in our model, and what to do to it on the way
(un-permute q/k rows, split a fused gate_up, put an expert in its slot); `hf_to_ours` and `reference_to_ours` apply it
to a whole in-memory state dict, the streaming loader (load_plan.py, assemble.py) one file tensor at a time. Export
(export.py) reads the same table backwards through `hf_name` and `reference_name`, so the two directions cannot
disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .rope import interleaved_to_half

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
IGNORED = re.compile(r"rotary_emb\.inv_freq$")     # a buffer derived from rope_theta, kept by some old checkpoints


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


def reference_to_ours(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A mistral reference state dict (interleaved q/k rows, experts one by one) -> ours."""
    return _rename(state_dict, "reference", config)


# Our stacked experts (E, out, in): one matrix per expert on disk, in both the hub's and the reference's layout
OUR_EXPERTS = re.compile(r"^layers\.(\d+)\.feed_forward\.(w[123])$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# our name -> transformers' (after `model.`), {i} the layer: the table above read backwards. Its router entry is the
# on-disk one (`block_sparse_moe.gate`); transformers 5.x keeps it in memory as `mlp.gate` (see export.to_hf).
_OURS_TO_HF = {ours: hf for hf, ours in _HF_TO_OURS.items() if "mlp.gate." not in hf}


def hf_name(key: str, expert: int | None = None) -> str:
    """Transformers' on-disk name of our tensor `key` (of expert `expert` of a stacked (E, ...) tensor)."""
    if key == "output.weight":
        return "lm_head.weight"
    if m := OUR_EXPERTS.match(key):
        return f"model.layers.{m[1]}.block_sparse_moe.experts.{expert}.{m[2]}.weight"
    layer = _LAYER.match(key)
    generic = _LAYER.sub("layers.{i}.", key)
    if generic not in _OURS_TO_HF:
        raise KeyError(f"{key} has no transformers name")
    name = _OURS_TO_HF[generic]
    return "model." + (name.replace("{i}", layer[1]) if layer else name)


def reference_name(key: str, expert: int | None = None) -> str:
    """The mistral reference's name of our tensor `key` (experts one by one, as `feed_forward.experts.N.w1.weight`)."""
    if m := OUR_EXPERTS.match(key):
        return f"layers.{m[1]}.feed_forward.experts.{expert}.{m[2]}.weight"
    return key
