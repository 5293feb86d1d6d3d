"""Notebook 07's exercises: the parameter count of a dense model, the pre-norm block, and the tied output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block import TransformerBlock
from ..config import ModelConfig
from ..embedding import rms_norm
from ..model import Transformer
from ..presets import mistral_7b_v0_1
from .checker import Case, Exercise


def _count_reference(config: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(config).num_parameters()


SMOLLM2 = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                      sliding_window=None, max_position_embeddings=8192, tie_embeddings=True)


def _count_cases() -> list[Case]:
    small = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    return [Case((mistral_7b_v0_1(),), "Mistral 7B"), Case((small,)), Case((SMOLLM2,), "SmolLM2-135M: tied embeddings"),
            Case((small.replace(head_dim=16),), "head_dim != dim / n_heads"),
            Case((small.replace(n_kv_heads=1, n_layers=3),), "n_kv_heads = 1")]


def _count(config: ModelConfig, kv_heads: int | None = None, head: bool | None = None, norms: bool = True,
           q_width: int | None = None) -> int:
    """The parameter count with one of the classic slips: kv heads, the head counted, norms, the query width."""
    c = config
    kv = (kv_heads or c.n_kv_heads) * c.head_dim
    q = q_width or c.n_heads * c.head_dim
    per_layer = 2 * c.dim * q + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim + (2 * c.dim if norms else 0)
    untied = not c.tie_embeddings if head is None else head
    return c.vocab_size * c.dim * (2 if untied else 1) + c.n_layers * per_layer + (c.dim if norms else 0)


class BoundAttention:
    """A block's attention as a function of its normed input alone (causal, RoPE angles bound), for 07.2's inputs."""

    __name__ = "attention"

    def __init__(self, block: TransformerBlock, seq_len: int) -> None:
        self.block = block
        head_dim = block.attention.head_dim
        angles = torch.arange(seq_len)[:, None].float() * (1e4 ** (-torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.cat((angles, angles), dim=-1)[None]                      # (1, T, D)
        self.cos, self.sin = angles.cos(), angles.sin()

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.attention(h, self.cos, self.sin, None, is_causal=True)


class _Named:
    """A module as a plain function of one tensor, with a name the verdict can show."""

    def __init__(self, fn, name: str) -> None:
        self.fn, self.__name__ = fn, name

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def _block_reference(x, attention, feed_forward, attention_norm, ffn_norm) -> torch.Tensor:
    """mt.TransformerBlock itself, whose attention, FFN and norms the case's functions are."""
    with torch.no_grad():
        return attention.block(x, attention.cos, attention.sin, None, is_causal=True)


def _block_cases() -> list[Case]:
    torch.manual_seed(701)
    cases = []
    for batch, seq_len, label in [(2, 5, ""), (1, 1, "one token"), (1, 7, "")]:
        config = ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=24)
        block = TransformerBlock(config, 0)
        with torch.no_grad():
            block.attention_norm.weight.uniform_(0.5, 1.5)                      # two different gains, so a swap shows
            block.ffn_norm.weight.uniform_(1.5, 2.5)
        cases.append(Case((3.0 * torch.randn(batch, seq_len, 16), BoundAttention(block, seq_len),
                           _Named(block.feed_forward, "feed_forward"), _Named(block.attention_norm, "attention_norm"),
                           _Named(block.ffn_norm, "ffn_norm")), label))
    return cases


def _head_reference(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, embedding: torch.Tensor) -> torch.Tensor:
    return F.linear(rms_norm(hidden, norm_weight, eps), embedding)


def _head_cases() -> list[Case]:
    g = torch.Generator().manual_seed(702)
    cases = []
    for shape, vocab, dtype, label in [((2, 5, 16), 40, torch.float32, ""), ((1, 1, 8), 25, torch.float32, "one token"),
                                       ((3, 2, 8), 11, torch.bfloat16, "bf16")]:
        dim = shape[-1]
        cases.append(Case(((4.0 * torch.randn(shape, generator=g)).to(dtype),
                           (1.0 + 0.2 * torch.randn(dim, generator=g)).to(dtype), 1e-5,
                           torch.randn(vocab, dim, generator=g).to(dtype)), label))
    return cases


EXERCISES = [
    Exercise(
        "07.1-dense-parameters", "count_parameters", _count_reference, "Transformer(config).num_parameters()",
        _count_cases,
        hint="per layer: wq and wo (d x H D each), wk and wv (d x Hkv D each: the kv heads, not the query heads), the "
             "three SwiGLU matrices (d x hidden), two norms (d each); plus the embedding, the final norm, and the "
             "output head unless it is tied to the embedding.",
        more="Use config.head_dim (it need not be dim / n_heads): attention = 2 d (n_heads + n_kv_heads) head_dim; "
             "FFN = 3 d hidden_dim; norms = 2 d; total = V d (1 or 2) + L (attention + FFN + norms) + d.",
        mistakes={"wk and wv were counted with n_heads: with GQA they have n_kv_heads heads.":
                  lambda c: _count(c, kv_heads=c.n_heads),
                  "the output head was counted although it is tied to the embedding (one matrix, counted once).":
                  lambda c: _count(c, head=True),
                  "the norms are missing: two per layer and a final one, d weights each.":
                  lambda c: _count(c, norms=False),
                  "wq and wo were counted as d x d: their width is n_heads x head_dim, which need not equal d.":
                  lambda c: _count(c, q_width=c.dim)}),
    Exercise(
        "07.2-pre-norm-block", "pre_norm_block", _block_reference, "mt.TransformerBlock", _block_cases,
        hint="pre-norm: each sublayer reads a normalised copy, and its output is added to the *un*-normalised "
             "stream: h = x + attention(attention_norm(x)), then h + feed_forward(ffn_norm(h)).",
        more="Two lines. The residual stream x itself is never normalised inside a block (the final norm comes after "
             "the last block).",
        mistakes={"this is post-norm (the original transformer): norm(x + sublayer(x)); Mistral normalises each "
                  "sublayer's input and adds to the raw stream.":
                  lambda x, a, f, an, fn: fn((h := an(x + a(x))) + f(h)),
                  "the residual was taken from the normalised x: h = x + attention(norm(x)), with x itself.":
                  lambda x, a, f, an, fn: (h := an(x) + a(an(x))) + f(fn(h)),
                  "the attention's norm was used before the FFN too: each sublayer has its own norm (own gain).":
                  lambda x, a, f, an, fn: (h := x + a(an(x))) + f(an(h)),
                  "the FFN's residual is missing: out = h + feed_forward(ffn_norm(h)).":
                  lambda x, a, f, an, fn: f(fn(x + a(an(x))))}),
    Exercise(
        "07.3-tied-head", "tied_logits", _head_reference, "mt.rms_norm, then the embedding as the head", _head_cases,
        hint="the last hidden state goes through the final RMSNorm first, then the tied head: the embedding table "
             "(V, d) used as an nn.Linear weight, so logits = normed @ embedding.T, (B, T, V).",
        more="`F.linear(mt.rms_norm(hidden, norm_weight, eps), embedding)`, or your RMSNorm of exercise 01.2 and "
             "`@ embedding.T`.",
        mistakes={"the final norm is missing: the head reads norm(h), not h.":
                  lambda h, w, eps, e: F.linear(h, e),
                  "the norm's gain is missing: norm(h) = h / RMS(h) * g.":
                  lambda h, w, eps, e: F.linear(rms_norm(h, torch.ones_like(w), eps), e)}),
]
