"""Where the notebooks' pictures go: `FIGURES_DIR`, `figure_path(name)` and `save_figure(fig, name)`.

Only files: drawing is viz.py's (generic plots) and viz_routing.py's (Mixtral's routing pictures). viz.py re-exports
these names, so notebooks keep calling `viz.save_figure` and printing paths relative to `viz.REPO_ROOT`.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure


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
