"""PNG figures without global state: `matplotlib.figure.Figure` with its own Agg canvas.

No pyplot and no `matplotlib.use`, so a notebook user's backend and open figures are untouched.
matplotlib is optional: `new_figure` raises ImportError saying how to install it.
"""

from __future__ import annotations

import os


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=(7, 4.5), squeeze: bool = True, **subplot_kw):
    """(figure, axes) like `pyplot.subplots`, but the figure belongs to no global figure manager."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)
    return fig, axes


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Lay out and write `fig` as a PNG (creating the folder); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


__all__ = ["new_figure", "save_figure"]
