"""Crosstalk between independently trained updates, layer by layer.

Orthogonal Adaptation measures crosstalk "through the norm of the product between two LoRA
weights" and names the interference of concept j's update on concept i's inputs; it gives no
normalisation. lorabench defines, for one layer and an ordered pair (i, j), ``dW = up @ down``:

- ``weight_crosstalk = ||dW_i dW_j^T||_F / (||dW_i||_F ||dW_j||_F)``: the normalised product of the
  two residuals on the input side. 0 when their input (row) spaces are orthogonal, which is what
  OrthA's frozen orthogonal ``down`` guarantees in disjoint mode; at most 1.
- ``basis_overlap = ||down_i down_j^T||_F`` (the paper's measure for the bases, raw), and
  ``subspace_overlap = ||Q_i^T Q_j||_F / sqrt(min(r_i, r_j))`` with ``Q`` orthonormal bases of the
  rows of ``down``: 0 for orthogonal row spaces, 1 when one contains the other.
- ``interference = ||dW_j X_i||_F / ||dW_i X_i||_F`` on concept i's captured inputs
  (``G_i = X_i^T X_i / n``): how strongly concept j's update moves the layer outputs concept i's
  prompts produce, relative to concept i's own update. 0 means j is invisible to i.
- ``output_error = ||(D - dW_i) X_i||_F / ||dW_i X_i||_F`` for a merged update ``D``: how far the
  merged layer's outputs on concept i's inputs are from concept i's own model's.
- ``update_size``: how large one update is against the layer it changes, ``weight = ||dW||_F / ||W0||_F``
  and, on the update's own captured inputs, ``output = ||dW X||_F / ||W0 X||_F``. It places a run on
  the axis the papers' regimes differ on (a world run at lr 3e-3 and an SDXL run at 1e-5).
- ``subspace_interference`` and ``subspace_output_error``: the same on ``P_i X_i``, concept i's inputs
  projected onto the row space of ``down_i`` (the input directions concept i's update reads;
  ``dW_i P_i X_i = dW_i X_i``). This is where orthogonality acts: with disjoint OrthA rows
  ``down_j P_i = 0``, so other concepts' updates are exactly silent there, while on the full inputs
  they still respond to whatever of ``X_i`` falls in their own rows.

All are computed from the factors and the Gram matrices, never from per-token activations.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

import torch

from lorabench.merging.updates import AdapterUpdate, LayerDelta


def _fro_product(up_i, down_i, up_j, down_j) -> float:
    """||up_i down_i down_j^T up_j^T||_F from small matrices."""
    m = down_i @ down_j.T                             # (r_i, r_j)
    a, b = up_i.T @ up_i, up_j.T @ up_j               # (r_i, r_i), (r_j, r_j)
    return math.sqrt(max(0.0, float(torch.trace(a @ m @ b @ m.T))))


def _fro(up, down) -> float:
    return math.sqrt(max(0.0, float(torch.trace((up.T @ up) @ (down @ down.T)))))


def _energy(up, down, gram) -> float:
    """||up down X||_F^2 / n = tr(up down G down^T up^T)."""
    return max(0.0, float(torch.trace((up.T @ up) @ (down @ gram @ down.T))))


def _orthonormal_rows(down: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(down.double().T)
    keep = r.diagonal().abs() > r.diagonal().abs().max() * 1e-8
    return q[:, keep]


def _project(gram: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``P X`` with ``P = Q Q^T``."""
    p = q @ q.T
    return p @ gram @ p


def pair_crosstalk(a: AdapterUpdate, b: AdapterUpdate, grams_a: Mapping[str, torch.Tensor] | None = None
                   ) -> dict[str, dict[str, float]]:
    """``{layer: {weight_crosstalk, basis_overlap, subspace_overlap[, interference]}}`` of b on a."""
    out = {}
    for layer, (up_i, down_i) in a.layers.items():
        up_j, down_j = b.layers[layer]
        ui, di, uj, dj = up_i.double(), down_i.double(), up_j.double(), down_j.double()
        norm = _fro(ui, di) * _fro(uj, dj)
        qi, qj = _orthonormal_rows(di), _orthonormal_rows(dj)
        row = {"weight_crosstalk": _fro_product(ui, di, uj, dj) / norm if norm > 0 else 0.0,
               "basis_overlap": float(torch.linalg.matrix_norm(di @ dj.T)),
               "subspace_overlap": (float(torch.linalg.matrix_norm(qi.T @ qj))
                                    / math.sqrt(min(qi.shape[1], qj.shape[1])))}
        if grams_a is not None:
            g = grams_a[layer].to(ui.device, torch.float64)  # statistics move to the factors' device
            own = _energy(ui, di, g)
            row["interference"] = math.sqrt(_energy(uj, dj, g) / own) if own > 0 else 0.0
            gp = _project(g, qi)
            row["subspace_interference"] = math.sqrt(_energy(uj, dj, gp) / own) if own > 0 else 0.0
        out[layer] = row
    return out


def output_error(own: AdapterUpdate, merged: Mapping[str, LayerDelta], grams: Mapping[str, torch.Tensor],
                 subspace: bool = False) -> dict[str, float]:
    """``{layer: ||(D - dW_i) X_i|| / ||dW_i X_i||}``: the merged model's layer outputs on concept i's
    inputs against concept i's own model's (``subspace``: on ``P_i X_i``)."""
    out = {}
    for layer, (up, down) in own.layers.items():
        g = grams[layer].to(up.device, torch.float64)  # statistics and the merge move to the factors' device
        if subspace:
            g = _project(g, _orthonormal_rows(down.double()))
        e = merged[layer].to_dense().to(up.device, torch.float64) - (up.double() @ down.double())
        own_e = _energy(up.double(), down.double(), g)
        out[layer] = math.sqrt(max(0.0, float(((e @ g) * e).sum())) / own_e) if own_e > 0 else 0.0
    return out


def group_crosstalk(updates: Sequence[AdapterUpdate], grams: Sequence[Mapping[str, torch.Tensor]] | None = None
                    ) -> dict[str, dict[str, float]]:
    """Each measure per layer, averaged over all ordered pairs (i, j != i) of the group."""
    sums: dict[str, dict[str, float]] = {}
    n = 0
    for i, a in enumerate(updates):
        for j, b in enumerate(updates):
            if i == j:
                continue
            n += 1
            for layer, row in pair_crosstalk(a, b, None if grams is None else grams[i]).items():
                acc = sums.setdefault(layer, {})
                for k, v in row.items():
                    acc[k] = acc.get(k, 0.0) + v
    return {layer: {k: v / n for k, v in row.items()} for layer, row in sums.items()} if n else {}


def concept_crosstalk(group: Mapping[str, Mapping[str, float]], own: AdapterUpdate, merged: Mapping[str, LayerDelta],
                      grams: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per layer, a group's crosstalk (:func:`group_crosstalk`) with one member's output errors in the
    merged model (:func:`output_error`: on its inputs, and on its own subspace of them)."""
    err, sub = output_error(own, merged, grams), output_error(own, merged, grams, subspace=True)
    return {k: {**v, "output_error": err[k], "subspace_output_error": sub[k]} for k, v in group.items()}


def layer_means(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean of each measure over layers."""
    keys = sorted({k for row in per_layer.values() for k in row})
    return {k: statistics.fmean(row[k] for row in per_layer.values() if k in row) for k in keys}


def update_size(update: AdapterUpdate, weights: Mapping[str, torch.Tensor],
                grams: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """``{layer: {"weight": ||dW|| / ||W0||[, "output": ||dW X|| / ||W0 X||]}}`` (Frobenius norms; the
    output ratio on ``G = X^T X / n`` where ``grams`` has the layer). ``weights``: the base weights W0."""
    out = {}
    for layer, (up, down) in update.layers.items():
        u, d = up.double(), down.double()
        w0 = weights[layer].detach().to(u.device, torch.float64)
        base = float(torch.linalg.matrix_norm(w0))
        row = {"weight": _fro(u, d) / base if base > 0 else 0.0}
        if grams is not None and layer in grams:
            g = grams[layer].to(u.device, torch.float64)
            base_out = float(((w0 @ g) * w0).sum())
            row["output"] = math.sqrt(_energy(u, d, g) / base_out) if base_out > 0 else 0.0
        out[layer] = row
    return out


def size_summary(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{weight_median, weight_max[, output_median, output_max]}`` over the layers of :func:`update_size`."""
    out = {}
    for key in ("weight", "output"):
        values = [row[key] for row in per_layer.values() if key in row]
        if values:
            out[f"{key}_median"], out[f"{key}_max"] = statistics.median(values), max(values)
    return out
