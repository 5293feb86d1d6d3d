"""Small matplotlib helpers the notebooks share: masks, attention heatmaps, bar charts, text coloured by expert
(Mixtral Fig 8, `draw_routed_text`), and saving to `figures/`.

Every function takes torch tensors or numpy arrays, draws on a given `ax` (or a new figure when `ax` is None) and returns
the Axes, so panels can be combined with `subplot_grid`. Nothing here computes model quantities: the notebooks do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch, PathPatch, Rectangle
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D


def _figures_dir() -> Path:
    """Where `save_figure` writes: $MISTRAL_TUTORIAL_FIGURES if set; else, in a checkout of the repository, its own
    figures/ folder (the notebooks' pictures, committed); else (an installed package) ./figures."""
    if os.environ.get("MISTRAL_TUTORIAL_FIGURES"):
        return Path(os.environ["MISTRAL_TUTORIAL_FIGURES"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "notebooks").is_dir() and (checkout / "figures").is_dir():
        return checkout / "figures"
    return Path.cwd().resolve() / "figures"


FIGURES_DIR = _figures_dir()
REPO_ROOT = FIGURES_DIR.parent        # the notebooks print figure paths relative to it: figures/<name>.png

MASK_COLORS = ListedColormap(["#f2f2f2", "#3b6fb6"])     # False (blocked) light grey, True (allowed) blue
MASKED_COLOR = "#c8c8c8"                                  # heatmap cells a mask forbids: grey, not the colour of 0


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, any dtype, with grad or not) or array-like -> a numpy array (bool kept, else float)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype.is_floating_point else x.numpy()   # bf16 has no numpy dtype
    return np.asarray(x)


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return ax


def _tick_labels(ax: Axes, n_rows: int, n_cols: int, row_labels: Sequence[str] | None,
                 col_labels: Sequence[str] | None) -> None:
    """Label every row/column with its name, or with indices thinned to a round step that fits the panel's size."""
    width, height = ax.get_position().width * ax.figure.get_figwidth(), ax.get_position().height * ax.figure.get_figheight()
    for axis, n, labels, inches in ((ax.yaxis, n_rows, row_labels, height), (ax.xaxis, n_cols, col_labels, width)):
        max_ticks = max(4, int(inches * 4))                       # about 4 two-digit labels per inch
        step = 1 if labels is not None else next(s for s in (1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, n)
                                                 if n <= s * max_ticks)
        ticks = np.arange(0, n, step)
        axis.set_ticks(ticks)
        if labels is not None:
            axis.set_ticklabels([str(labels[i]) for i in ticks], fontsize=8)
    if col_labels is not None:
        plt.setp(ax.get_xticklabels(), rotation=90)


def plot_mask(mask: Any, ax: Axes | None = None, title: str | None = None, tokens: Sequence[str] | None = None,
              grid: bool = True) -> Axes:
    """Draw a boolean query x key mask (Tq, Tk): blue where query i may attend key j, grey where it may not.

    Rows are queries ("query i"), columns keys ("key j"), both starting at 0 in the top-left corner, as in the Mistral
    7B paper's Fig. 1. `tokens` (length T) labels both axes with token pieces. A (1, 1, Tq, Tk) mask is squeezed.
    """
    m = to_numpy(mask).astype(bool)
    m = m.reshape(m.shape[-2], m.shape[-1])                        # (Tq, Tk)
    n_queries, n_keys = m.shape
    side = min(6.0, 1.0 + 0.25 * max(n_queries, n_keys))
    ax = _axes(ax, (side, side))
    ax.imshow(m, cmap=MASK_COLORS, vmin=0, vmax=1, interpolation="nearest")
    if grid and max(n_queries, n_keys) <= 64:
        ax.set_xticks(np.arange(-0.5, n_keys, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_queries, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    _tick_labels(ax, n_queries, n_keys, tokens, tokens)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title:
        ax.set_title(title)
    return ax


def plot_attention(weights: Any, tokens: Sequence[str] | None = None, ax: Axes | None = None, title: str | None = None,
                   key_tokens: Sequence[str] | None = None, cmap: str = "viridis", colorbar: bool = True,
                   vmax: float | None = None, mask: Any | None = None) -> Axes:
    """Heatmap of attention weights (Tq, Tk): row i is the distribution query i puts over the keys (sums to 1).

    `tokens` labels the queries, and the keys too unless `key_tokens` is given (keys from a cache differ from the
    queries). `mask` (Tq, Tk), True where attention is allowed: forbidden cells are drawn grey (MASKED_COLOR), so
    they cannot be mistaken for allowed keys that got a weight of about 0. Leading singleton dimensions, e.g.
    (1, 1, Tq, Tk), are squeezed; pick a head before calling otherwise. With colorbar=False, add one for a whole grid
    with `shared_colorbar`.
    """
    w = to_numpy(weights).astype(float)
    while w.ndim > 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 2:
        raise ValueError(f"plot_attention expects (Tq, Tk) weights, got shape {w.shape}; select batch and head first")
    n_queries, n_keys = w.shape
    colormap = plt.get_cmap(cmap).copy()
    colormap.set_bad(MASKED_COLOR)
    if mask is not None:
        allowed = to_numpy(mask).astype(bool).reshape(n_queries, n_keys)
        w = np.ma.masked_array(w, mask=~allowed)                      # masked cells take the "bad" colour
    side = min(7.0, 1.5 + 0.25 * max(n_queries, n_keys))
    ax = _axes(ax, (side + 1.0, side))
    image = ax.imshow(w, cmap=colormap, vmin=0.0, vmax=vmax, interpolation="nearest")
    _tick_labels(ax, n_queries, n_keys, tokens, key_tokens if key_tokens is not None else tokens)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if mask is not None and not allowed.all():
        ax.legend(handles=[Patch(facecolor=MASKED_COLOR, edgecolor="none", label="masked")], loc="upper right",
                  fontsize=8, handlelength=1.0, borderpad=0.3, framealpha=0.9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    if title:
        ax.set_title(title)
    return ax


def shared_colorbar(fig: Figure, axes: Any, label: str = "attention weight", **kwargs: Any):
    """One colorbar for a grid of heatmaps drawn with the same colour scale (the first image's), beside all `axes`."""
    axes_list = list(np.ravel(axes))
    image = next(image for ax in axes_list for image in ax.images)
    return fig.colorbar(image, ax=axes_list, label=label, **kwargs)


def plot_bars(values: Any, labels: Sequence[str] | None = None, ax: Axes | None = None, title: str | None = None,
              ylabel: str | None = None, horizontal: bool = False, annotate: bool = False, fmt: str = "{:.3g}",
              color: str = "#3b6fb6") -> Axes:
    """Bar chart of values (N,), e.g. tokens routed to each expert or parameters per component.

    `annotate` writes each value (formatted with `fmt`) at the end of its bar.
    """
    v = to_numpy(values).astype(float).reshape(-1)                 # (N,)
    names = list(labels) if labels is not None else [str(i) for i in range(len(v))]
    ax = _axes(ax, (6.0, 0.4 * len(v) + 1.5) if horizontal else (max(4.0, 0.5 * len(v) + 2.0), 3.5))
    positions = np.arange(len(v))
    bars = ax.barh(positions, v, color=color) if horizontal else ax.bar(positions, v, color=color)
    (ax.set_yticks if horizontal else ax.set_xticks)(positions, names)
    if horizontal:
        ax.invert_yaxis()                                          # first value on top
    if annotate:
        ax.bar_label(bars, labels=[fmt.format(x) for x in v], padding=2, fontsize=8)
    if ylabel:
        (ax.set_xlabel if horizontal else ax.set_ylabel)(ylabel)
    if title:
        ax.set_title(title)
    return ax


def subplot_grid(n_rows: int, n_cols: int, panel_size: float = 2.6, title: str | None = None,
                 **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A figure of n_rows x n_cols panels; the axes come back as a 2-D array (n_rows, n_cols) whatever the counts."""
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel_size * n_cols, panel_size * n_rows), squeeze=False,
                             constrained_layout=True, **kwargs)
    if title:
        fig.suptitle(title)
    return fig, axes


def figure_path(name: str) -> Path:
    """`FIGURES_DIR/<name>.png` (a trailing .png in `name` is kept once)."""
    stem = name[:-4] if name.endswith(".png") else name
    return FIGURES_DIR / f"{stem}.png"


def save_figure(fig: Figure | Axes, name: str, dpi: int = 110) -> Path:
    """Save a figure (or the figure of an Axes) to `FIGURES_DIR/<name>.png`, creating the folder if missing.

    Returns the path, so a notebook can print where the picture went. Metadata is stripped so that re-running a
    notebook leaves an unchanged PNG unchanged in git.
    """
    if isinstance(fig, Axes):
        fig = fig.figure
    path = figure_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


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

    first = to_numpy(experts).reshape(len(tokens), -1)[:, 0].astype(int).tolist()     # (T,) first choices
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
