"""Pictures of a Mixtral's routing: text coloured by each token's first-choice expert (Mixtral Fig 8,
`draw_routed_text`) and the tiny Mixtral's training curves (`plot_training_log`).

The counting (which expert each token picks, per domain and layer) is routing.py's; generic heatmaps and bars are
viz.py's, saving is figure_files.py's. viz.py re-exports both functions, so this module imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch, PathPatch, Rectangle
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D


def plot_training_log(log: dict, domains: Sequence[str]) -> Figure:
    """LM loss (per step, smoothed, held-out per domain) and load-balancing loss of a training log written by
    scripts/train_tiny_mixtral.py (`training_log.json`)."""
    steps = [r["step"] for r in log["train"]]
    lm = [r["lm_loss"] for r in log["train"]]
    window = 20
    smooth = [sum(lm[max(0, i - window + 1):i + 1]) / len(lm[max(0, i - window + 1):i + 1]) for i in range(len(lm))]
    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax_lm.plot(steps, lm, color="#bbbbbb", lw=0.8, label="train (per step)")
    ax_lm.plot(steps, smooth, color="black", lw=1.5, label=f"train ({window}-step mean)")
    for domain, color in zip(domains, ("#1f77b4", "#2ca02c", "#d62728")):
        ax_lm.plot([r["step"] for r in log["eval"]], [r["held_out"][domain] for r in log["eval"]], "o-", ms=3,
                   color=color, label=f"held-out {domain}")
    ax_lm.set(xlabel="step", ylabel="cross-entropy (nats / token)", title="LM loss", ylim=(0, None))
    ax_lm.legend(fontsize=8)
    ax_aux.plot(steps, [r["aux_loss"] for r in log["train"]], color="#9467bd", lw=1)
    k = log["config"]["experts_per_token"]
    ax_aux.axhline(k, color="gray", ls="--", lw=1, label=f"uniform routing = k = {k}")
    ax_aux.set(xlabel="step", ylabel="E * sum_i f_i P_i", title="load-balancing loss (Switch eq. 4, layer mean)")
    ax_aux.legend(fontsize=8)
    fig.suptitle(f"tiny Mixtral ({log['parameters'] / 1e6:.1f} M parameters, 8 experts, top-2): "
                 f"{log['args']['steps']} steps of {log['args']['batch_size']} x {log['args']['seq_len']} tokens")
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Mixtral Fig 8: text coloured by expert (the counting is routing.py's)
def _display(piece: str) -> str:
    """A tokenizer piece as it reads: '▁' -> space, the newline and tab bytes -> '\\n' and 4 spaces."""
    return piece.replace("▁", " ").replace("<0x0A>", "\n").replace("<0x09>", "    ")


def draw_routed_text(tokens: list[str], experts: Any, n_experts: int = 8, ax: Any = None, width: int = 80,
                     title: str | None = None, legend: bool = True) -> Any:
    """Fig 8: every token's text on the colour of its first-choice expert, wrapped at `width` characters.

    tokens: T strings (SentencePiece pieces such as '▁def' or '<0x0A>', or decoded text); experts: (T,) or (T, k)
    expert ids (column 0 used). A newline token is drawn as '↵' in its colour, then the line breaks. Returns the Axes.
    """
    mono_font = FontProperties(family="DejaVu Sans Mono")              # ships with matplotlib
    advance = 0.602                                                     # its characters' width, in em

    first = torch.as_tensor(experts).reshape(len(tokens), -1)[:, 0].long().tolist()   # (T,) first choices
    rows: list[list[tuple[int, str, int]]] = [[]]                                # per row: (column, text, expert)
    column = 0
    for token, expert in zip(tokens, first):
        for j, part in enumerate(_display(token).split("\n")):
            if j > 0:                                                            # the token holds a newline
                rows[-1].append((column, "↵", expert))
                rows.append([])
                column = 0
            if part:
                if column + len(part) > width and column > 0:                    # wrap
                    rows.append([])
                    column = 0
                rows[-1].append((column, part, expert))
                column += len(part)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.09 * width + (1.6 if legend else 0.2), 0.24 * len(rows) + 0.6))
    colors = plt.get_cmap("tab10" if n_experts <= 10 else "tab20").colors
    for row, cells in enumerate(rows):
        for column, text, expert in cells:
            ax.add_patch(Rectangle((column, row + 0.06), len(text), 0.88, facecolor=colors[expert % len(colors)],
                                   alpha=0.45, edgecolor="white", linewidth=0.8))
            if text.strip():      # glyphs as paths in data units: a character = a column, whatever the Axes' size
                glyphs = TextPath((0, 0), text.replace("$", r"\$"), size=1, prop=mono_font)   # '$' is no mathtext
                placed = Affine2D().scale(1 / advance, -0.62).translate(column, row + 0.74).transform_path(glyphs)
                ax.add_patch(PathPatch(placed, facecolor="black", linewidth=0))
    ax.set_xlim(0, width)
    ax.set_ylim(max(len(rows), 1), 0)
    ax.axis("off")
    if legend:
        handles = [Patch(facecolor=colors[e % len(colors)], alpha=0.45, label=f"expert {e}") for e in range(n_experts)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
                  title="first choice", title_fontsize=8)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    return ax
