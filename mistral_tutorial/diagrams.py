"""Block diagrams drawn from a config, so they change with it: the decoder (`draw_architecture`) and grouped-query
attention's head sharing (`draw_head_sharing`). The boxes and arrows they are made of (`box`, `arrow`) serve
diagrams_moe.py too.

Only drawing: every number written on a diagram is read from the config (or the mapping) passed in. Saving is
figure_files.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

PALETTE = ["#3b6fb6", "#d9822b", "#2ca02c", "#c44e52", "#8c6bb1", "#17becf", "#bcbd22", "#7f7f7f"]
NORM, ATTENTION, FFN, EMBED = "#e8eef8", "#fbe3cf", "#dcefd8", "#eeeeee"


def box(ax: Axes, x: float, y: float, width: float, height: float, text: str, color: str = "#ffffff",
        fontsize: float = 9, edge: str = "#333333", **kwargs: Any) -> FancyBboxPatch:
    """A rounded box centred on (x, y) with `text` in it; returns the patch."""
    patch = FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.02,rounding_size=0.05",
                           facecolor=color, edgecolor=edge, linewidth=1.0, **kwargs)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return patch


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], color: str = "#333333",
          width: float = 1.0, style: str = "-|>", **kwargs: Any) -> FancyArrowPatch:
    """An arrow from `start` to `end` (data coordinates)."""
    patch = FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=color, linewidth=width,
                            shrinkA=0, shrinkB=0, **kwargs)
    ax.add_patch(patch)
    return patch


def _canvas(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    ax.set_axis_off()
    return ax


def block_lines(config: Any) -> dict[str, str]:
    """The text of each box of `draw_architecture`, read from a ModelConfig (or anything with its fields)."""
    c = config
    n_rep = c.n_heads // c.n_kv_heads
    window = (f"sliding window W = {c.sliding_window} (rolling cache of W slots)" if c.sliding_window is not None
              else "full causal attention (no window)")
    if c.n_experts:
        ffn = (f"sparse MoE: router W_g ({c.n_experts}, d) picks top-{c.experts_per_token} of {c.n_experts} SwiGLU "
               f"experts\neach d → {c.hidden_dim} → d; y = Σ G(x)_i E_i(x) over the chosen")
    else:
        ffn = f"SwiGLU FFN: w2(silu(w1 x) ⊙ w3 x)\nd → {c.hidden_dim} → d"
    return {
        "tokens": "token ids (B, T)",
        "embedding": f"tok_embeddings: a row of the (V, d) = ({c.vocab_size}, {c.dim}) table",
        "stream": f"x (B, T, d = {c.dim})",
        "repeat": f"× L = {c.n_layers} blocks",
        "attention_norm": f"RMSNorm (d gains, eps {c.norm_eps:g})",
        "attention": (f"attention: {c.n_heads} query heads share {c.n_kv_heads} key/value heads (GQA, n_rep {n_rep}), "
                      f"head_dim {c.head_dim}\nRoPE θ = {c.rope_theta:,.0f} on q, k; {window}\n"
                      f"q (B, {c.n_heads}, T, {c.head_dim}), k and v (B, {c.n_kv_heads}, T, {c.head_dim})"),
        "ffn_norm": "RMSNorm",
        "ffn": ffn,
        "norm": "RMSNorm (final)",
        "head": f"output head d → V{' (tied to tok_embeddings)' if c.tie_embeddings else ''}",
        "logits": f"logits (B, T, V = {c.vocab_size})",
    }


def draw_architecture(config: Any, title: str | None = None, ax: Axes | None = None) -> Axes:
    """The decoder as boxes, top to bottom: embedding, L × (RMSNorm, attention, +, RMSNorm, SwiGLU or MoE, +), the final
    RMSNorm and the head, with the shapes. Every number comes from `config` (`block_lines`)."""
    ax = _canvas(ax, (7.0, 9.0))
    lines = block_lines(config)
    width, x = 8.6, 5.0
    rows = [("tokens", 15.2, 0.6, "#ffffff"), ("embedding", 14.2, 0.6, EMBED), ("stream", 13.3, 0.5, "#ffffff"),
            ("attention_norm", 12.0, 0.55, NORM), ("attention", 10.7, 1.35, ATTENTION),
            ("ffn_norm", 8.85, 0.55, NORM), ("ffn", 7.75, 1.0, FFN),
            ("norm", 5.7, 0.55, NORM), ("head", 4.8, 0.55, EMBED), ("logits", 3.9, 0.5, "#ffffff")]
    centre = {}
    for name, y, height, color in rows:
        box(ax, x, y, width, height, lines[name], color=color, fontsize=8.5)
        centre[name] = (y, height)
    for upper, lower in zip([r[0] for r in rows], [r[0] for r in rows][1:]):
        (y0, h0), (y1, h1) = centre[upper], centre[lower]
        if upper not in ("attention", "ffn"):                     # the residual sums sit between those
            arrow(ax, (x, y0 - h0 / 2), (x, y1 + h1 / 2))
    # the block: pre-norm residual sums h = x + Attention(RMSNorm(x)), out = h + FFN(RMSNorm(h))
    for after, y_sum, before in (("attention", 9.55, "ffn_norm"), ("ffn", 6.75, "norm")):
        ax.text(x, y_sum, "+", ha="center", va="center", fontsize=14, fontweight="bold")
        arrow(ax, (x, centre[after][0] - centre[after][1] / 2), (x, y_sum + 0.15))
        arrow(ax, (x, y_sum - 0.15), (x, centre[before][0] + centre[before][1] / 2))
    for y_from, y_sum in ((12.75, 9.55), (9.3, 6.75)):            # the skip connections, on the left
        ax.plot([x - width / 2 - 0.25, x - width / 2 - 0.25], [y_from, y_sum], color="#777777", lw=1.0)
        ax.plot([x - width / 2 - 0.25, x - width / 2], [y_from, y_from], color="#777777", lw=1.0)
        arrow(ax, (x - width / 2 - 0.25, y_sum), (x - 0.2, y_sum), color="#777777")
    ax.add_patch(FancyBboxPatch((x - width / 2 - 0.45, 6.45), width + 0.9, 6.35, boxstyle="round,pad=0.05",
                                fill=False, linestyle="--", edgecolor="#555555"))
    ax.text(x + width / 2 + 0.4, 12.6, lines["repeat"], ha="right", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xlim(0, 10)
    ax.set_ylim(3.5, 15.7)
    if title:
        ax.set_title(title, fontsize=11)
    return ax


def draw_head_sharing(n_heads: int, kv_head_of: Sequence[int], title: str | None = None, ax: Axes | None = None) -> Axes:
    """Query heads (top row) joined to the key/value head each one reads (bottom row), coloured by group.

    `kv_head_of[h]` is the kv head of query head h: pass the mapping the library computes (repeat_kv), not a formula.
    """
    kv_head_of = list(kv_head_of)
    if len(kv_head_of) != n_heads:
        raise ValueError(f"kv_head_of has {len(kv_head_of)} entries for {n_heads} query heads")
    n_kv_heads = max(kv_head_of) + 1
    ax = _canvas(ax, (max(4.0, 0.35 * n_heads + 1.0), 1.8))
    size = 0.8
    kv_x = [(j + 0.5) * n_heads / n_kv_heads - 0.5 for j in range(n_kv_heads)]   # kv heads centred under their group
    for h, j in enumerate(kv_head_of):
        color = PALETTE[j % len(PALETTE)]
        ax.plot([h, kv_x[j]], [1.6 - size / 2, size / 2], color=color, lw=0.9, alpha=0.8)
        box(ax, h, 1.6, size, size, f"q{h}" if n_heads <= 16 else "", color=color, fontsize=7, alpha=0.85)
    for j, xj in enumerate(kv_x):
        box(ax, xj, 0, max(size, 0.6 * n_heads / n_kv_heads), size, f"kv{j}" if n_kv_heads <= 16 else "",
            color=PALETTE[j % len(PALETTE)], fontsize=7)
    ax.text(-0.9, 1.6, "query\nheads", ha="right", va="center", fontsize=8)
    ax.text(-0.9, 0.0, "key/value\nheads", ha="right", va="center", fontsize=8)
    ax.set_xlim(-2.2, n_heads)
    ax.set_ylim(-0.6, 2.2)
    ax.set_title(title or f"H = {n_heads} query heads, H_kv = {n_kv_heads} key/value heads "
                          f"(each shared by {n_heads // n_kv_heads})", fontsize=9)
    return ax
