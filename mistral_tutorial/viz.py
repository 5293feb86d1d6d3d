"""Small matplotlib helpers the notebooks share: masks, attention heatmaps, bar charts, panel grids.

Every function takes torch tensors or numpy arrays, draws on a given `ax` (or a new figure when `ax` is None) and returns
the Axes, so panels can be combined with `subplot_grid`. Nothing here computes model quantities: the notebooks do.
Saving to `figures/` is figure_files.py's, the Mixtral routing pictures (Fig 8's coloured text, the tiny Mixtral's
training log) are viz_routing.py's; both are re-exported here, so `viz.save_figure` and `viz.draw_routed_text` work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .figure_files import FIGURES_DIR, REPO_ROOT, figure_path, save_figure  # noqa: F401  (viz.save_figure, as before)
from .viz_routing import draw_routed_text, plot_training_log  # noqa: F401  (viz.draw_routed_text, as before)

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
    colormap = plt.get_cmap(cmap).with_extremes(bad=MASKED_COLOR)   # a copy: the registered colormap stays as it was
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
