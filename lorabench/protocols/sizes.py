"""Update-size diagnostics that every protocol reports for every adapter it trains.

Per adapted layer, ``||dW||_F / ||W0||_F`` and, on the adapter's own inputs, ``||dW X||_F / ||W0 X||_F``
(:func:`lorabench.merging.crosstalk.update_size`), with their median and max over layers. The inputs
are captured while the adapted model samples its first evaluation prompt from ``CAPTURE_IMAGES``
seeded latents for ``CAPTURE_STEPS`` steps (the Orthogonal Adaptation protocol passes the statistics
it captured for its merges instead). ``W0`` is the weight the adapter was trained on: the base model,
or in a continual sequence the model the task started from.

The numbers place a run on one axis with others: a world run at lr 3e-3 and an SDXL run at lr 1e-5
differ in how large their updates are against the weights, and that is what the papers' regimes differ
in. Every protocol's results.json carries ``update_size`` (:meth:`SizeLog.results`), its rows carry
``size_*`` fields, and its run folder ``update_size.png`` (:func:`size_plot`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from lorabench.merging import capture_stats, size_summary, update_size, updates_from_adapters
from lorabench.protocols.base import mean_std
from lorabench.utils.plots import layer_lines
from lorabench.utils.seeding import derive_seed_list

CAPTURE_IMAGES = 2
CAPTURE_STEPS = 10
SIZE_KEYS = ("weight_median", "weight_max", "output_median", "output_max")
SIZE_FIELDS = tuple(f"size_{k}" for k in SIZE_KEYS)  # the fields result rows carry


def measure(components, adapters, prompts: Sequence[str] = (), sampler: Optional[Mapping] = None,
            device: torch.device = torch.device("cpu"), grams: Optional[Mapping[str, torch.Tensor]] = None,
            seed: int = 0) -> dict:
    """``{"layers": {layer: {"weight", "output"}}, **summary}`` of injected, unmerged ``adapters``
    (None, e.g. new tokens alone: ``{}``). Without ``grams`` the inputs are captured from ``prompts[0]``;
    without either only the weight ratio is measured."""
    if adapters is None or not adapters.layers:
        return {}
    if grams is None and prompts and sampler is not None:
        grams, _ = capture_stats(components, adapters, list(prompts)[:1], capture_seeds(seed),
                                 capture_sampler(sampler), device)
    return measure_update(updates_from_adapters(adapters, "update"), adapters.base_weights(), grams)


def capture_seeds(seed: int) -> list[int]:
    """The ``CAPTURE_IMAGES`` initial-latent seeds an update size is measured from, for replicate ``seed``."""
    return derive_seed_list("update-size", seed, CAPTURE_IMAGES)


def capture_sampler(sampler: Mapping) -> dict:
    """``sampler`` (the evaluation's) cut to the ``CAPTURE_STEPS`` steps an update size is measured over."""
    return {**dict(sampler), "num_inference_steps": CAPTURE_STEPS}


def measure_update(update, base_weights: Mapping[str, torch.Tensor],
                   grams: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """:func:`measure` of an :class:`~lorabench.merging.AdapterUpdate` on its layers' base weights (an
    adapter's ``base_weights()``), e.g. once its input statistics arrive after the adapter left the model."""
    per_layer = update_size(update, base_weights, grams)
    return {"layers": per_layer, **size_summary(per_layer)}


def row_fields(measured: Mapping) -> dict[str, float]:
    """The ``size_<stat>`` fields a result row carries."""
    return {f"size_{k}": measured[k] for k in SIZE_KEYS if k in measured}


class SizeLog:
    """Measurements grouped by method (or adapter type): their summary and per-layer means, and the plot."""

    def __init__(self):
        self.groups: dict[str, list[dict]] = {}

    def add(self, group: str, measured: Mapping) -> None:
        """Record one adapter's :func:`measure` under ``group`` (an empty one, no layers, is skipped)."""
        if measured:
            self.groups.setdefault(group, []).append(dict(measured))

    def results(self) -> dict[str, dict]:
        """``{group: {"adapters": n, <stat>: {mean, std, n}, "layers": {layer: {"weight", "output"}}}}``:
        each stat over the group's adapters, each layer's ratios averaged over them."""
        out = {}
        for group, items in self.groups.items():
            entry: dict = {"adapters": len(items)}
            for k in SIZE_KEYS:
                values = [m[k] for m in items if k in m]
                if values:
                    entry[k] = mean_std(values)
            layers: dict[str, dict[str, float]] = {}
            for name in items[0]["layers"]:
                row = {}
                for key in ("weight", "output"):
                    values = [m["layers"][name][key] for m in items if key in m["layers"].get(name, {})]
                    if values:
                        row[key] = statistics.fmean(values)
                layers[name] = row
            entry["layers"] = layers
            out[group] = entry
        return out


def size_plot(path: Path, results: Mapping[str, Mapping], title: str = "") -> Optional[Path]:
    """The figure of :meth:`SizeLog.results` (also from a results.json's ``update_size``): per layer (model
    order), each group's mean ratio, weight and output panels, log scale; None when there is nothing."""
    if not results:
        return None
    layer_lines(path, {f"{g} ({e['adapters']})": e["layers"] for g, e in results.items()},
                [("weight", "||dW|| / ||W0|| per layer"),
                 ("output", "||dW X|| / ||W0 X|| per layer (captured inputs)")], log=True, title=title)
    return Path(path)
