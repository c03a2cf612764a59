"""Figures made without pyplot: no global backend switch (a notebook's backend stays as it is),
nothing to close, and every PNG written atomically."""

from __future__ import annotations

import logging
import os

import numpy as np
from matplotlib.figure import Figure

from lorabench.utils.io import atomic_path

# Log-scale ticks are typeset as math text; where matplotlib's font cache lacks its STIX and Computer
# Modern families it falls back to DejaVu Sans (fine) and logs a warning per family through the root
# logger, i.e. about 20 lines on the console of every run that plots. The fallback is not news.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


def figure(ncols: int = 1, nrows: int = 1, figsize: tuple[float, float] = (6.0, 3.8),
           **kwargs) -> tuple[Figure, np.ndarray]:
    """A figure and its (nrows, ncols) array of axes (``kwargs`` go to ``Figure.subplots``, e.g. sharey)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Lay the figure out and write it as a PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
