"""Figure helpers: masked attention cells are drawn apart from zero weights, and grids get one colorbar."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from mistral_tutorial import viz  # noqa: E402


def test_plot_attention_draws_masked_cells_in_the_masked_colour():
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                   # an allowed key with weight exactly 0 at (1, 0)
    mask = torch.tensor([[True, False], [True, True]])
    ax = viz.plot_attention(weights, mask=mask)
    image = ax.images[0]
    data = image.get_array()
    assert np.ma.getmaskarray(data).tolist() == [[False, True], [False, False]]
    assert tuple(image.cmap.get_bad()) == to_rgba(viz.MASKED_COLOR)
    assert to_rgba(viz.MASKED_COLOR) != tuple(image.cmap(0.0))                # grey, not the colour of weight 0
    plt.close(ax.figure)


def test_shared_colorbar_spans_a_grid():
    fig, axes = viz.subplot_grid(2, 2)
    for ax in axes.flat:
        viz.plot_attention(torch.eye(3), ax=ax, colorbar=False, vmax=1.0)
    colorbar = viz.shared_colorbar(fig, axes)
    assert colorbar.mappable is axes[0, 0].images[0] and colorbar.vmax == 1.0
    plt.close(fig)
