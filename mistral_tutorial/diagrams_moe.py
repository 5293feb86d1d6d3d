"""Diagrams of a mixture-of-experts layer, drawn from a real routing: one token through the layer as in Mixtral's
Fig 1 (`draw_moe_layer`), the grouped dispatch of a few tokens by argsort, bincount and index_add
(`draw_dispatch`, the steps of `MoeLayer.forward`), and the all-to-all of expert parallelism (`draw_all_to_all`, the
steps of `ExpertParallelMoe.forward`).

Only drawing; the routing comes in as tensors. The boxes and arrows are diagrams.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.axes import Axes

from .diagrams import PALETTE, _canvas, arrow, box


def _color(expert: int) -> str:
    return PALETTE[expert % len(PALETTE)]


def draw_moe_layer(experts: Any, weights: Any, n_experts: int, ax: Axes | None = None) -> Axes:
    """Mixtral Fig 1 for one token: x → router → the k chosen of E experts (the rest greyed) → weighted sum → y.

    experts, weights: (k,) the token's chosen experts and routing weights (renormalised, summing to 1)."""
    chosen = [int(e) for e in torch.as_tensor(experts).reshape(-1)]
    gate = [float(w) for w in torch.as_tensor(weights).reshape(-1)]
    ax = _canvas(ax, (5.5, 4.5))
    box(ax, 0.6, 3.5, 0.9, 0.6, "x", color="#ffffff", fontsize=11)
    box(ax, 2.3, 3.5, 1.6, 0.9, f"router\nSoftmax(Top{len(chosen)}\n(x · W_g))", color="#eeeeee", fontsize=8)
    arrow(ax, (1.05, 3.5), (1.5, 3.5))
    rows = [6.6 - 6.2 * e / max(1, n_experts - 1) for e in range(n_experts)]      # expert e's row
    for e, y in enumerate(rows):
        on = e in chosen
        box(ax, 5.0, y, 1.5, 0.62, f"expert {e}" + (f"\nG = {gate[chosen.index(e)]:.2f}" if on else ""),
            color=_color(e) if on else "#f4f4f4", edge="#333333" if on else "#bbbbbb", fontsize=8,
            alpha=0.9 if on else 1.0)
        if on:
            arrow(ax, (3.1, 3.5), (4.25, y), color=_color(e), width=1.6)
            arrow(ax, (5.75, y), (7.05, 3.5), color=_color(e), width=1.6)
    ax.plot([2.3, 2.3, 7.4], [3.95, 7.15, 7.15], ls="--", color="#777777", lw=1.0)
    ax.text(4.8, 7.25, "gating weights G(x)", ha="center", va="bottom", fontsize=8, color="#555555")
    arrow(ax, (7.4, 7.15), (7.4, 3.8), color="#777777", style="-|>", linestyle="--")
    box(ax, 7.4, 3.5, 0.6, 0.6, "Σ", color="#ffffff", fontsize=12)
    box(ax, 8.9, 3.5, 1.4, 0.8, "y = Σ G(x)_i\n· E_i(x)", color="#ffffff", fontsize=8)
    arrow(ax, (7.7, 3.5), (8.2, 3.5))
    ax.set_xlim(0, 9.8)
    ax.set_ylim(0, 7.8)
    ax.set_title(f"one token through the layer: {len(chosen)} of {n_experts} experts run (Mixtral Fig 1)", fontsize=9)
    return ax


def draw_dispatch(experts: Any, weights: Any, n_experts: int, ax: Axes | None = None) -> Axes:
    """The dispatch of N tokens, column by column: each token's k choices → the N·k (token, expert) pairs →
    argsort(stable) groups them by expert → each expert runs once on its block (bincount gives the block sizes) →
    index_add_ sums each token's k weighted outputs. experts, weights: (N, k)."""
    experts, weights = torch.as_tensor(experts), torch.as_tensor(weights)
    n_tokens, k = experts.shape
    flat = experts.reshape(-1)                                          # (N*k,) pair p = token * k + slot
    order = flat.argsort(stable=True)                                   # as MoeLayer.forward
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows = n_tokens * k
    ax = _canvas(ax, (11.0, 0.45 * rows + 1.6))

    def y_of(row: float) -> float:
        return rows - 1 - row

    columns = [0.9, 3.3, 5.9, 8.4, 10.8]
    for t in range(n_tokens):
        y = y_of(t * k + (k - 1) / 2)
        choice = ", ".join(f"e{int(e)}" for e in experts[t])
        box(ax, columns[0], y, 1.6, 0.8 * k - 0.1, f"token {t}\n→ {choice}", color="#ffffff", fontsize=8)
        box(ax, columns[4], y, 1.5, 0.8 * k - 0.1, f"y{t} = Σ over\nits {k} experts", color="#ffffff", fontsize=8)
    for p in range(rows):
        e, t = int(flat[p]), p // k
        box(ax, columns[1], y_of(p), 1.5, 0.7, f"pair {p}: t{t}, e{e}", color=_color(e), fontsize=7.5, alpha=0.35)
        arrow(ax, (columns[0] + 0.8, y_of(t * k + (k - 1) / 2)), (columns[1] - 0.75, y_of(p)), color="#999999",
              width=0.7)
    for position, p in enumerate(order.tolist()):
        e, t = int(flat[p]), p // k
        w = float(weights.reshape(-1)[p])
        box(ax, columns[2], y_of(position), 1.6, 0.7, f"t{t} · G={w:.2f}", color=_color(e), fontsize=7.5, alpha=0.6)
        arrow(ax, (columns[1] + 0.75, y_of(p)), (columns[2] - 0.8, y_of(position)), color=_color(e), width=0.8)
        arrow(ax, (columns[3] + 0.85, y_of(position)), (columns[4] - 0.75, y_of(t * k + (k - 1) / 2)),
              color=_color(e), width=0.8)
    start = 0
    for e, count in enumerate(counts):
        if count:
            middle = y_of(start + (count - 1) / 2)
            text = f"expert {e}: 1 token" if count == 1 else f"expert {e}\n{count} tokens,\none call"
            box(ax, columns[3], middle, 1.7, 0.8 * count - 0.1, text, color=_color(e), fontsize=8)
        start += count
    idle = [str(e) for e, count in enumerate(counts) if count == 0]
    for x, label in zip(columns, ["chosen experts", "flatten: N·k pairs", "argsort (stable)\nby expert",
                                  "bincount: block sizes\nsend each block once", "index_add_\nback to its token"]):
        ax.text(x, rows - 0.2, label, ha="center", va="bottom", fontsize=8.5, fontweight="bold")
    ax.text(columns[3], -1.0, f"bincount {counts}" + (f"; idle: expert {', '.join(idle)}" if idle else ""),
            ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.1, 11.8)
    ax.set_ylim(-1.6, rows + 0.9)
    return ax


def draw_all_to_all(sent: Any, token_shares: Sequence[tuple[int, int]], experts_per_rank: int,
                    title: str | None = None, ax: Axes | None = None) -> Axes:
    """Expert parallelism over N ranks for one layer: each rank routes its share of the tokens, the first all-to-all
    sends every (token, expert) pair to the rank holding the expert, the experts run, the second all-to-all returns
    the results, and an all-gather hands every rank the whole sequence. sent: (N, N) pairs from rank i to rank j."""
    sent = torch.as_tensor(sent)
    n = sent.shape[0]
    ax = _canvas(ax, (10.0, 1.3 * n + 1.6))
    most = max(1, int(sent.max()))
    xs = [1.0, 5.0, 9.0]
    y_of = [1.3 * (n - 1 - r) for r in range(n)]
    for r in range(n):
        start, stop = token_shares[r]
        experts = f"e{r * experts_per_rank}..e{(r + 1) * experts_per_rank - 1}"
        box(ax, xs[0], y_of[r], 2.0, 0.8, f"rank {r}: routes\ntokens {start}..{stop - 1}", color=_color(r), alpha=0.4,
            fontsize=8)
        box(ax, xs[1], y_of[r], 2.0, 0.8, f"rank {r}: experts\n{experts} run", color=_color(r), alpha=0.7, fontsize=8)
        box(ax, xs[2], y_of[r], 2.0, 0.8, f"rank {r}: weights and\nsums its tokens", color=_color(r), alpha=0.4,
            fontsize=8)
    for src in range(n):
        for dst in range(n):
            count = int(sent[src, dst])
            if not count:
                continue
            stays = src == dst
            style = dict(color="#888888" if stays else _color(dst), width=0.8 + 3.0 * count / most,
                         linestyle="--" if stays else "-")
            arrow(ax, (xs[0] + 1.0, y_of[src]), (xs[1] - 1.0, y_of[dst]), **style)
            arrow(ax, (xs[1] + 1.0, y_of[dst]), (xs[2] - 1.0, y_of[src]), **style)
            frac = 0.3 if src <= dst else 0.7
            for x0, ya, yb in ((xs[0] + 1.0, y_of[src], y_of[dst]), (xs[1] + 1.0, y_of[dst], y_of[src])):
                ax.text(x0 + 2.0 * frac, ya + (yb - ya) * frac + 0.12, str(count), fontsize=8, ha="center",
                        color="#333333", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"))
    top = y_of[0] + 0.75
    ax.text((xs[0] + xs[1]) / 2, top, "all-to-all 1: dispatch\n(pairs to the expert's rank)", ha="center",
            va="bottom", fontsize=8.5, fontweight="bold")
    ax.text((xs[1] + xs[2]) / 2, top, "all-to-all 2: combine\n(results back, same counts)", ha="center",
            va="bottom", fontsize=8.5, fontweight="bold")
    ax.text(xs[2], -0.9, "then all-gather: every rank gets every token", ha="center", va="top", fontsize=8)
    ax.text(xs[0], -0.9, "dashed: pairs whose expert is on their own rank (nothing moves)", ha="center", va="top",
            fontsize=7.5, color="#666666")
    ax.set_xlim(-0.2, 10.2)
    ax.set_ylim(-1.5, top + 1.0)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
