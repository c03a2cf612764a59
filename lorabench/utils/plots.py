"""Figures made without pyplot: no global backend switch (a notebook's backend stays as it is),
nothing to close, and every PNG written atomically."""

from __future__ import annotations

import logging
import os
from typing import Callable, Mapping, Sequence

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


def band(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float], label: str, alpha: float = 0.15):
    """A line of means (markers at the points) in a shaded mean +- std band of its colour; returns the line."""
    mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    line, = ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=alpha)
    return line


def band_panels(path: str | os.PathLike, panels: Mapping[str, Mapping[str, tuple]], xlabel: str, ylabel: str = "",
                title: str = "", alpha: float = 0.15, width: float = 5.5, legend_size: int = 8,
                decorate: Callable | None = None) -> None:
    """One panel per ``{panel title: {series label: (x, mean, std)}}``, each series a :func:`band`; every
    panel has a legend unless ``decorate(ax, i)`` (called per panel after its bands: reference lines, axis
    scales) returns False."""
    fig, axes = figure(len(panels), figsize=(width * len(panels), 3.8))
    for i, (ax, (name, series)) in enumerate(zip(axes[0], panels.items())):
        for label, (x, mean, std) in series.items():
            band(ax, x, mean, std, label, alpha=alpha)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.set_title(name)
        if (decorate(ax, i) if decorate else None) is not False:
            ax.legend(fontsize=legend_size)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def layer_lines(path: str | os.PathLike, series: Mapping[str, Mapping[str, Mapping[str, float]]],
                panels: Sequence[tuple[str, str]], log: bool = False, title: str = "") -> None:
    """Per-layer values, one line per series (``{label: {layer: {key: value}}}``, layers in model order),
    one panel per ``(key, panel title)``; a series without any value of a panel's key is left out of it."""
    fig, axes = figure(len(panels), figsize=(6 * len(panels), 3.6))
    for ax, (key, label) in zip(axes[0], panels):
        for name, layers in series.items():
            values = [layers[n].get(key, float("nan")) for n in layers]
            if any(v == v for v in values):
                ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("adapted layer (model order)")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def paired_bars(path: str | os.PathLike, summary: Mapping[str, Mapping[str, Mapping[str, float]]],
                panels: Sequence[tuple[str, str]], kinds: Sequence[str], labels: Mapping[str, str]) -> None:
    """Bars of ``{series: {"<kind>_<key>": {mean, std}}}``: one panel per ``(key, panel title)``, per series
    (a colour, named by ``labels``) one bar per kind side by side, lighter to darker, with +- std."""
    names, width = list(summary), 0.76 / len(kinds)
    fig, axes = figure(len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for ax, (key, title) in zip(axes[0], panels):
        for i, name in enumerate(names):
            for j, kind in enumerate(kinds):
                v = summary[name].get(f"{kind}_{key}", {})
                ax.bar(i + (j - (len(kinds) - 1) / 2) * width, v.get("mean", float("nan")), width,
                       yerr=v.get("std", 0.0), color=f"C{i}", alpha=0.45 + 0.55 * j / max(len(kinds) - 1, 1),
                       capsize=2, label=kind if i == 0 else None)
        ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, path)
