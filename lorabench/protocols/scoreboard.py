"""The three papers' claims, judged per regime from the committed runs: ``claims.json`` per paper and
the scoreboard in ``experiments/README.md``.

    python -m lorabench.protocols.scoreboard experiments      # rebuild claims.json x3, the figures, the scoreboard

Each paper's claims, grid, units, gate and regimes are the ones its
``experiments/<paper>/preregistration.md`` fixed before the runs; this module reads the runs' results.json
files (nothing is re-run) and :mod:`lorabench.protocols.claims` judges them. A regime whose runs are not
in the folder yet shows "not run". Each regime's learning rate is checked against its runs' configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from lorabench.continual.tasks import LABELS
from lorabench.errors import ConfigError
from lorabench.protocols import trilora
from lorabench.protocols.claims import (
    NO_EFFECT,
    Claim,
    Regime,
    difference,
    judge_claims,
    ledger_plot,
    mean_of,
    ratio,
    render_ledger,
    to_decide,
)
from lorabench.utils.io import write_json, write_text

START = "<!-- scoreboard: start (python -m lorabench.protocols.scoreboard experiments) -->"
END = "<!-- scoreboard: end -->"


def _load(folder: Path) -> list[dict]:
    """Every results.json under ``folder`` (sorted), each with its path."""
    out = []
    for f in sorted(folder.rglob("results.json")):
        res = json.loads(f.read_text())
        res["_path"] = str(f)
        out.append(res)
    return out


def _check_lr(results: Sequence[dict], lr: float, label: str) -> None:
    for res in results:
        got = (res.get("config") or {}).get("optim", {}).get("lr")
        if got is None or not np.isclose(float(got), lr, rtol=1e-6):
            raise ConfigError(res["_path"], f"was run at optim.lr={got}, but it sits in regime {label!r} (lr {lr:g})")


def _size_stats(values: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per method: the median over its adapters of each ``size_*`` statistic."""
    return {m: {k.removeprefix("size_"): float(np.median(v)) for k, v in stats.items() if v}
            for m, stats in values.items()}


# -- Orthogonal Adaptation --------------------------------------------------------------------------------
OA_REGIMES = {"lr 3e-3": (3e-3, ("runs/world",)),
              "lr 1e-3": (1e-3, ("runs/regime/lr1e-3",)),
              "lr 3e-4": (3e-4, ("runs/regime/lr3e-4",))}
OA_GATE = 0.2  # single identity alignment: below it the single models never learned the identity


def _retention(units, m: str) -> Optional[float]:
    return ratio(mean_of(units, m, "merged_identity_alignment"), mean_of(units, m, "single_identity_alignment"))


def _mean_ratio(key: str, a: str, b: str) -> Callable:
    return lambda u: ratio(mean_of(u, a, key), mean_of(u, b, key))


def oa_claims() -> list[Claim]:
    """Orthogonal Adaptation's claims (its preregistration's table): O1-O12 and lorabench's L1."""
    fed, orth, gf, edf, pp = "dblora_fedavg", "ortha_paper", "edlora_fusion_closed_form", "edlora_fedavg", "pplus"
    ab, cd, gfl = "ortha_random", "custom_diffusion", "edlora_fusion_lbfgs"
    table2 = ("lr 3e-3",)
    return [
        Claim("O1", "DB-LoRA FedAvg identity collapses on merge", "retention(dblora_fedavg)", "0.14", "<", 0.5,
              lambda u: _retention(u, fed), (fed,)),
        Claim("O2", "OrthA holds identity on merge", "retention(ortha_paper)", "1.01", ">", 0.8,
              lambda u: _retention(u, orth), (orth,)),
        Claim("O3", "Mix-of-Show gradient fusion holds identity", "retention(edlora_fusion_closed_form)", "0.98",
              ">", 0.8, lambda u: _retention(u, gf), (gf,)),
        Claim("O4", "Mix-of-Show FedAvg holds identity", "retention(edlora_fedavg)", "0.97", ">", 0.8,
              lambda u: _retention(u, edf), (edf,)),
        Claim("O5", "OrthA keeps more identity than DB-LoRA FedAvg",
              "retention(ortha_paper) - retention(dblora_fedavg)", "+0.87", ">", 0.0,
              lambda u: difference(_retention(u, orth), _retention(u, fed)), (orth, fed)),
        Claim("O6", "P+ is unchanged by merging", "merged - single identity align., pplus", "0", "abs<=", 0.02,
              lambda u: mean_of(u, pp, "delta_identity_alignment"), (pp,)),
        Claim("O7", "DB-LoRA's image alignment drops more than OrthA's",
              "delta image align. dblora_fedavg - ortha_paper", "-0.206", "<", 0.0,
              lambda u: difference(mean_of(u, fed, "delta_image_alignment"), mean_of(u, orth, "delta_image_alignment")),
              (fed, orth)),
        Claim("O8", "DB-LoRA FedAvg's text alignment rises on merge", "delta text align., dblora_fedavg", "+0.069",
              ">", 0.0, lambda u: mean_of(u, fed, "delta_context_text_alignment"), (fed,)),
        Claim("O9", "OrthA's crosstalk is far below LoRA's (weight product)",
              "weight_crosstalk ortha_paper / dblora_fedavg", "(figure)", "<", 0.5,
              _mean_ratio("weight_crosstalk", orth, fed), (orth, fed), gated=False),
        Claim("O10", "OrthA's interference on concept inputs is far below LoRA's",
              "interference ortha_paper / dblora_fedavg", "(text)", "<", 0.5,
              _mean_ratio("interference", orth, fed), (orth, fed), gated=False),
        Claim("O11", "Custom Diffusion loses identity on merge", "delta identity align., custom_diffusion", "-0.096",
              "<", 0.0, lambda u: mean_of(u, cd, "delta_identity_alignment"), (cd,), regimes=table2),
        Claim("O12", "Gradient fusion costs far more merge time than FedAvg",
              "merge_s edlora_fusion_lbfgs / dblora_fedavg", "~900 / <1 s", ">", 10.0,
              _mean_ratio("merge_s", gfl, fed), (gfl, fed), gated=False, regimes=table2),
        Claim("L1", "(lorabench) layer-wise embeddings make OrthA keep more identity",
              "retention(ortha_paper) - retention(ortha_random)", "-", ">", 0.1,
              lambda u: difference(_retention(u, orth), _retention(u, ab)), (orth, ab)),
    ]


def oa_regimes(folder: Path, extra: Mapping[str, Sequence[str]] = MappingProxyType({}),
               notes: Optional[list[str]] = None) -> list[Regime]:
    """Per lr regime: units = (seed, concept), each ``{method: merged row}``; replicates = seeds; learning =
    the single identity alignment; update sizes from the single cells' rows. ``extra``: more folders per
    regime label (round two's)."""
    out = []
    for label, (lr, dirs) in OA_REGIMES.items():
        results = [r for d in (*dirs, *extra.get(label, ())) if (folder / d).is_dir() for r in _load(folder / d)]
        _check_lr(results, lr, label)
        units: dict[tuple, dict[str, dict]] = {}
        learning: dict[str, list[float]] = {}
        size_values: dict[str, dict[str, list[float]]] = {}
        for res in results:
            for row in res["rows"]:
                key = (row["seed"], row["concept"])
                if row["method"] in units.setdefault(key, {}):
                    raise ConfigError(res["_path"], f"method {row['method']!r} of seed {row['seed']}, concept "
                                      f"{row['concept']!r} is in two runs of regime {label!r}")
                units[key][row["method"]] = row
                learning.setdefault(row["method"], []).append(row["single_identity_alignment"])
            adapters = {m: spec["adapter"] for m, spec in res["methods"].items()}
            for row in res.get("single_rows", []):
                for m, a in adapters.items():
                    if a == row["adapter"]:
                        for k, v in row.items():
                            if k.startswith("size_"):
                                size_values.setdefault(m, {}).setdefault(k, []).append(v)
        seeds = sorted({k[0] for k in units})
        replicates = [[units[k] for k in sorted(units) if k[0] == s] for s in seeds]
        out.append(Regime(label, replicates, [r["_path"] for r in results],
                          {m: statistics.fmean(v) for m, v in learning.items()}, _size_stats(size_values),
                          "single identity alignment", OA_GATE - 1e-12))
    return out


# -- Low-rank continual personalization ---------------------------------------------------------------
CL_REGIMES = {"objects, lr 3e-3": (3e-3, ("runs/world_objects",)),
              "objects, lr 1e-3": (1e-3, ("runs/regime/lr1e-3",)),
              "objects, lr 3e-4": (3e-4, ("runs/regime/lr3e-4",)),
              "styles, lr 3e-3": (3e-3, ("runs/world_styles",))}
CL_METHODS = ("naive", "merge_init", "ortho_init", "magmax")
# The poster's numbers per claim: objects (CLIP-I, DINO), styles (CSD, DINO)
CL_PAPER = {
    "C1": ("+0.037", "+0.088", "+0.053", "+0.051"), "C2": ("-0.008", "-0.020", "-0.038", "-0.033"),
    "C3": ("-0.032", "-0.049", "-0.096", "-0.045"), "C4": ("+0.009", "+0.018", "+0.020", "+0.005"),
    "C5": ("+0.005", "+0.055", "+0.040", "+0.036"),
    "C6 naive": ("+0.084", "+0.098", "+0.257", "+0.103"), "C6 merge_init": ("+0.089", "+0.153", "+0.297", "+0.139"),
    "C6 ortho_init": ("+0.087", "+0.099", "+0.261", "+0.106"), "C6 magmax": ("+0.057", "+0.104", "+0.201", "+0.094")}
OBJECTS = tuple(r for r in CL_REGIMES if r.startswith("objects"))
STYLES = tuple(r for r in CL_REGIMES if r.startswith("styles"))


def cl_claims() -> list[Claim]:
    """The continual claims C1-C6 per metric (CLIP-I: objects, CSD: styles, DINO: both)."""
    out = []
    for metric in ("clip_i", "dino", "csd"):
        lab = LABELS[metric]
        regimes = {"clip_i": OBJECTS, "dino": (), "csd": STYLES}[metric]
        pick = {"clip_i": lambda v: v[0], "dino": lambda v: f"{v[1]} / styles {v[3]}", "csd": lambda v: v[2]}[metric]
        paper = {k: pick(v) for k, v in CL_PAPER.items()}

        def f(m, metric=metric):
            return lambda u: mean_of(u, m, f"F_{metric}")

        def s(m, metric=metric):
            return lambda u: mean_of(u, m, f"S_{metric}")

        def diff(a, b):
            return lambda u: difference(a(u), b(u))

        out += [
            Claim(f"C1 {lab}", f"Naive forgets more than Merge & Init ({lab})", "F(naive) - F(merge_init)",
                  paper["C1"], ">", 0.0, diff(f("naive"), f("merge_init")), ("naive", "merge_init"), regimes=regimes),
            Claim(f"C2 {lab}", f"MagMax forgets least ({lab})", "F(magmax) - F(merge_init)", paper["C2"], "<", 0.0,
                  diff(f("magmax"), f("merge_init")), ("magmax", "merge_init"), regimes=regimes),
            Claim(f"C3 {lab}", f"MagMax pays in score ({lab})", "S(magmax) - S(merge_init)", paper["C3"], "<", 0.0,
                  diff(s("magmax"), s("merge_init")), ("magmax", "merge_init"), regimes=regimes),
            Claim(f"C4 {lab}", f"Merge & Orthogonal Init forgets no less than naive ({lab})",
                  "F(ortho_init) - F(naive)", paper["C4"], ">", 0.0,
                  diff(f("ortho_init"), f("naive")), ("ortho_init", "naive"), regimes=regimes),
            Claim(f"C5 {lab}", f"Merge & Init scores above naive ({lab})", "S(merge_init) - S(naive)", paper["C5"], ">",
                  0.0, diff(s("merge_init"), s("naive")), ("merge_init", "naive"), regimes=regimes),
        ]
        out += [Claim(f"C6 {m} {lab}", f"{m} scores above the base model ({lab})", f"S({m}) - S(base)",
                      paper[f"C6 {m}"], ">", 0.0, diff(s(m), s("base")), (m,), regimes=regimes) for m in CL_METHODS]
    return out


def _cl_units(res: dict) -> list[dict[str, float]]:
    """Per task position j of one run: ``S_<metric>`` = M[j, T] and ``F_<metric>`` = max_{i >= j} M[j, i] -
    M[j, T] (the mean over j of which is the reference code's F, divided by T), and the base score."""
    units = [{} for _ in range(res["num_tasks"])]
    for metric, m in res["matrices"].items():
        mat = np.array([[np.nan if x is None else x for x in row] for row in m], dtype=float)
        last = mat.shape[1] - 1
        for j in range(mat.shape[0]):
            units[j][f"S_{metric}"] = float(mat[j, last])
            units[j][f"F_{metric}"] = float(np.nanmax(mat[j, j:]) - mat[j, last])
            units[j][f"learn_{metric}"] = float(mat[j, j] - res["base"][metric]["per_task"][j])
    return units


def cl_regimes(folder: Path, extra: Mapping[str, Sequence[str]] = MappingProxyType({}),
               notes: Optional[list[str]] = None) -> list[Regime]:
    """Per regime: replicates = runs (order x seed) holding every method, units = task positions
    (:func:`_cl_units`, plus the base model's score); learning = M[j, j] - base, mean over tasks. ``extra``:
    more folders per regime label (round two's); a run (method, order, seed) found twice is an error.
    With ``notes`` (round two), extra folders are pooled only when the check job reproduced round one
    (:func:`cl_check`), else judged alone."""
    pooled = True
    if notes is not None and extra:
        pooled, line = cl_check(folder)
        notes.append(f"continual: {line}; " + ("pooled with round one" if pooled else "new runs judged alone"))
    out = []
    for label, (lr, dirs) in CL_REGIMES.items():
        dirs = (*(dirs if pooled or label not in extra else ()), *extra.get(label, ()))
        results = [r for d in dirs if (folder / d).is_dir() for r in _load(folder / d)
                   if r.get("method") in CL_METHODS]
        _check_lr(results, lr, label)
        runs: dict[tuple, dict[str, dict]] = {}
        for res in results:
            if res["method"] in runs.get((res["order_seed"], res["seed"]), {}):
                raise ConfigError(res["_path"], f"{res['method']} order {res['order_seed']} seed {res['seed']} is "
                                  f"in two runs of regime {label!r}")
            runs.setdefault((res["order_seed"], res["seed"]), {})[res["method"]] = res
        replicates, learning, size_values = [], {}, {}
        for key in sorted(runs):
            per_method = {m: _cl_units(res) for m, res in runs[key].items()}
            any_res = next(iter(runs[key].values()))
            n = any_res["num_tasks"]
            base = [{f"S_{metric}": any_res["base"][metric]["per_task"][j] for metric in any_res["matrices"]}
                    for j in range(n)]
            replicates.append([{**{m: u[j] for m, u in per_method.items()}, "base": base[j]} for j in range(n)])
            for m, res in runs[key].items():
                for metric in res["matrices"]:
                    learning.setdefault(m, []).append(statistics.fmean(u[f"learn_{metric}"] for u in per_method[m]))
                for task in res.get("update_size_per_task") or []:
                    for k, v in task.items():
                        size_values.setdefault(m, {}).setdefault(k, []).append(v)
        out.append(Regime(label, replicates, [r["_path"] for r in results],
                          {m: statistics.fmean(v) for m, v in learning.items()}, _size_stats(size_values),
                          "single-task learning M[j, j] - base (mean over metrics)", 0.0))
    return out


CL_CHECK = ("runs/round2/check/naive/order0-seed0", "runs/world_styles/naive/order0-seed0")
CHECK_TOLERANCE = 1e-6


def cl_check(folder: Path) -> tuple[bool, str]:
    """Round two's check job: a round-one run again (:data:`CL_CHECK`); ``(reproduced, the line saying so)``:
    every score of its matrices within :data:`CHECK_TOLERANCE` of the committed run's."""
    new, old = (folder / d / "results.json" for d in CL_CHECK)
    if not new.is_file():
        return False, f"the check job ({CL_CHECK[0]}) has not run"
    a, b = (json.loads(f.read_text())["matrices"] for f in (new, old))
    diffs = [abs(x - y) for n in b for ra, rb in zip(a.get(n, []), b[n]) for x, y in zip(ra, rb)
             if x is not None and y is not None]
    same_shape = a.keys() == b.keys() and all(
        [x is None for x in ra] == [y is None for y in rb] for n in b for ra, rb in zip(a[n], b[n]))
    worst = max(diffs, default=0.0)
    line = f"check job: largest score difference {worst:.2g} against {CL_CHECK[1]}"
    return same_shape and worst <= CHECK_TOLERANCE, line


# -- TriLoRA ---------------------------------------------------------------------------------------------
TL_REGIMES = {"lr 3e-3": (3e-3, ("runs/world_vango",)),
              "lr 1e-3": (1e-3, ("runs/regime/vango_lr1e-3",)),
              "lr 3e-4": (3e-4, ("runs/regime/vango_lr3e-4",))}
TL_LRS = {"3e-4": 3e-4, "1e-3": 1e-3, "3e-3": 3e-3}
TL_SELECTION = "runs/regime/monex_lr{lr}"


def tl_claims() -> list[Claim]:
    """TriLoRA's claims T1-T7 and the matched comparison's T3m, T7m."""
    lo, tr = "lora", "trilora"

    def get(m, key):
        return lambda u: mean_of(u, m, key)

    return [
        Claim("T1", "LoRA improves FID over the base model", "NFID(lora)", "0.867 (GAC 0.923)", "<", 1.0,
              get(lo, "nfid"), (lo,), gated=False),
        Claim("T2", "TriLoRA improves FID over the base model", "NFID(trilora)", "0.796 (0.833)", "<", 1.0,
              get(tr, "nfid"), (tr,), gated=False),
        Claim("T3", "TriLoRA's NFID is below LoRA's", "NFID(trilora) - NFID(lora)", "-0.071 (-0.090)", "<", 0.0,
              lambda u: difference(get(tr, "nfid")(u), get(lo, "nfid")(u)), (lo, tr)),
        Claim("T4", "CLIP score about equal", "(CLIP(trilora) - CLIP(lora)) / CLIP(lora)", "-0.7% (0%)", "abs<=",
              0.03, lambda u: ratio(difference(get(tr, "clip_score")(u), get(lo, "clip_score")(u)),
                                    get(lo, "clip_score")(u)), (lo, tr)),
        Claim("T5", "LoRA raises CLIP score over the base", "CLIP(lora) - CLIP(base)", "+1.1 (+0.3)", ">", 0.0,
              lambda u: difference(get(lo, "clip_score")(u), get("base", "clip_score")(u)), (lo,), gated=False),
        Claim("T6", "TriLoRA raises CLIP score over the base", "CLIP(trilora) - CLIP(base)", "+0.9 (+0.3)", ">", 0.0,
              lambda u: difference(get(tr, "clip_score")(u), get("base", "clip_score")(u)), (tr,), gated=False),
        Claim("T7", "TriLoRA resists over-training", "NFID rise (last - table epoch), trilora - lora", "(text)", "<",
              0.0, lambda u: difference(get(tr, "rise")(u), get(lo, "rise")(u)), (lo, tr)),
        Claim("T3m", "TriLoRA's NFID is below LoRA's, each at its own lr", "NFID(trilora) - NFID(lora)", "-0.071", "<",
              0.0, lambda u: difference(get(tr, "nfid")(u), get(lo, "nfid")(u)), (lo, tr), regimes=("matched",)),
        Claim("T7m", "TriLoRA resists over-training, each at its own lr", "NFID(last) - best NFID, trilora - lora",
              "(text)", "<", 0.0, lambda u: difference(get(tr, "rise_best")(u), get(lo, "rise_best")(u)), (lo, tr),
              regimes=("matched",)),
    ]


def _tl_units(res: dict, methods: Mapping[str, str]) -> dict[int, dict[str, dict]]:
    """``{seed: {method: {nfid, clip_score, rise, rise_best}, "base": {clip_score}}}`` of one run;
    ``methods`` maps the ledger's names to the run's (the matched regime takes each from its own run)."""
    te, last = res["table_epoch"], res["checkpoints"][-1]
    base = next(r for r in res["rows"] if r["method"] == "base")
    out: dict[int, dict[str, dict]] = {}
    for name, own in methods.items():
        for seed in res["seeds"]:
            curve = {r["epoch"]: r for r in res["rows"] if r["method"] == own and r["seed"] == seed}
            if te not in curve:
                continue
            at = curve[te]
            unit = {"nfid": at["nfid"], "clip_score": at["clip_score"],
                    **{k: at[k] for k in at if k.startswith("size_")}}
            if last in curve:
                unit["rise"] = curve[last]["nfid"] - at["nfid"]
                unit["rise_best"] = curve[last]["nfid"] - min(r["nfid"] for r in curve.values())
            out.setdefault(seed, {"base": {"clip_score": base["clip_score"]}})[name] = unit
    return out


def _tl_regime(label: str, parts: Sequence[tuple[dict, Mapping[str, str]]], sources: list[str]) -> Regime:
    seeds: dict[int, dict[str, dict]] = {}
    for res, methods in parts:
        for seed, unit in _tl_units(res, methods).items():
            seeds.setdefault(seed, {}).update(unit)
    replicates = [[seeds[s]] for s in sorted(seeds)]
    methods = {m for u in seeds.values() for m in u if m != "base"}
    # the gate of T3, T4, T7 is LoRA's learning (NFID below 1): only LoRA's is kept
    learning = {m: 1.0 - statistics.fmean(u[m]["nfid"] for u in seeds.values() if m in u) for m in methods
                if m == "lora"}
    sizes = {m: {k.removeprefix("size_"): float(np.median([u[m][k] for u in seeds.values() if k in u.get(m, {})]))
                 for k in {k for u in seeds.values() for k in u.get(m, {}) if k.startswith("size_")}}
             for m in methods}
    return Regime(label, replicates, sources, learning, sizes, "1 - NFID(lora) at the table epoch", 0.0)


def _tl_run(folder: Path, d: str, lr: float, label: str, extra: Sequence[str] = (),
            notes: Optional[list[str]] = None) -> Optional[dict]:
    """The TriLoRA run of folder ``d`` (one per folder), joined with those of the ``extra`` folders by the
    protocol's own join (the same setup, the same base model: :func:`lorabench.protocols.trilora.collect`).
    Runs that do not join: an error, or with ``notes`` (round two) the last run alone and a note."""
    found = []
    for name in (d, *extra):
        results = [r for r in (_load(folder / name) if (folder / name).is_dir() else [])
                   if r.get("protocol") == "style_finetune"]
        _check_lr(results, lr, label)
        if len(results) > 1:
            raise ConfigError(str(folder / name), f"holds {len(results)} TriLoRA runs; regime {label!r} reads one")
        found += results
    if len(found) < 2:
        return found[0] if found else None
    try:
        joined = trilora.collect(found)
    except ValueError as err:  # round two's rule: runs that do not join are judged alone
        if notes is None:
            raise ConfigError(found[-1]["_path"], f"cannot join regime {label!r}'s runs: {err}") from err
        notes.append(f"TriLoRA {label}: not pooled ({err}); judged on {found[-1]['_path']} alone")
        return found[-1]
    return {**joined, "_path": found[0]["_path"], "_paths": [r["_path"] for r in found]}


def tl_regimes(folder: Path, extra: Mapping[str, Sequence[str]] = MappingProxyType({}),
               notes: Optional[list[str]] = None) -> list[Regime]:
    """The lr regimes on the reported style (replicates = seeds, one unit each) and the matched one;
    ``extra``: more folders per regime label (round two's), joined with the regime's run."""
    out, runs = [], {}
    for label, (lr, (d,)) in TL_REGIMES.items():
        res = runs[lr] = _tl_run(folder, d, lr, label, extra.get(label, ()), notes)
        regime = _tl_regime(label, [(res, {"lora": "lora", "trilora": "trilora"})] if res else [],
                            res.get("_paths", [res["_path"]]) if res else [])
        out.append(regime)
    out.append(tl_matched(folder, runs))
    return out


def tl_matched(folder: Path, runs: Mapping[float, Optional[dict]]) -> Regime:
    """Each method at the grid lr with the lowest NFID at the table epoch on the held-out style (seed 0;
    ties to the smaller lr), then compared on the reported style's runs at those lrs."""
    chosen, sources = {}, []
    selection = {}
    for text, lr in TL_LRS.items():
        res = _tl_run(folder, TL_SELECTION.format(lr=text), lr, f"selection lr {text}")
        if res is not None:
            selection[lr] = res
            sources.append(res["_path"])
    if len(selection) < len(TL_LRS):
        return Regime("matched", [], sources)
    for m in ("lora", "trilora"):
        scores = {lr: next(r["nfid"] for r in res["rows"] if r["method"] == m and r["seed"] == 0
                           and r["epoch"] == res["table_epoch"]) for lr, res in selection.items()}
        chosen[m] = min(sorted(scores), key=lambda lr: scores[lr])
    parts = [(runs[chosen[m]], {m: m}) for m in ("lora", "trilora") if runs.get(chosen[m])]
    if len(parts) < 2:
        return Regime("matched", [], sources)
    chosen_paths = [p for m in ("lora", "trilora") for p in runs[chosen[m]].get("_paths", [runs[chosen[m]]["_path"]])]
    regime = _tl_regime("matched", parts, sources + chosen_paths)
    regime.learning_label += f"; chosen lr: lora {chosen['lora']:g}, trilora {chosen['trilora']:g}"
    return regime


# -- the scoreboard ---------------------------------------------------------------------------------------
PAPERS = {
    "orthogonal_adaptation": ("Orthogonal Adaptation (Po et al. 2024), Table 2", oa_claims, oa_regimes),
    "continual": ("Low-rank continual personalization (Staniszewski et al. 2024), Tables 1-2", cl_claims, cl_regimes),
    "trilora": ("TriLoRA (Feng et al. 2024), Table 1", tl_claims, tl_regimes),
}


# Round two (issue 34; each paper's preregistration_2.md): the folders its runs add to each regime.
ROUND2 = {
    "orthogonal_adaptation": {},
    "continual": {"objects, lr 3e-4": ("runs/round2/objects_lr3e-4",),
                  "styles, lr 3e-3": ("runs/round2/styles_lr3e-3",)},
    "trilora": {"lr 3e-4": ("runs/round2/vango_lr3e-4",), "lr 1e-3": ("runs/round2/vango_lr1e-3",),
                "lr 3e-3": ("runs/round2/vango_lr3e-3",)},
}
START2 = "<!-- scoreboard round 2: start (python -m lorabench.protocols.scoreboard experiments) -->"
END2 = "<!-- scoreboard round 2: end -->"
COUNTED = ("reproduced", "not reproduced", "inconclusive", "not run")


def _judge(root: Path, paper: str, claims: Sequence[Claim], regimes: Sequence[Regime]) -> dict:
    ledger = judge_claims(paper, claims, regimes)
    ledger["regimes"] = [{**r, "sources": [os.path.relpath(s, root) for s in r["sources"]]} for r in ledger["regimes"]]
    return ledger


def _total(ledgers: Mapping[str, Mapping], verdicts: Sequence[str]) -> dict[str, int]:
    return {v: sum(led["counts"][r].get(v, 0) for led in ledgers.values() for r in led["counts"]) for v in verdicts}


def build(experiments: str | Path) -> dict[str, dict]:
    """Judge every paper's claims from ``experiments/<paper>/runs`` and write ``claims.json`` and
    ``claims.png`` per paper and the scoreboard into ``experiments/README.md``; then round two
    (:func:`build_round2`) when the power analysis it was planned from is there. Returns round one's ledgers."""
    root = Path(experiments)
    if not (root / "README.md").is_file():
        raise ConfigError(str(root), "is not the experiments folder (it has no README.md)")
    ledgers, parts = {}, []
    for paper, (title, claims, regimes) in PAPERS.items():
        folder = root / paper
        ledger = ledgers[paper] = _judge(root, paper, claims(), regimes(folder))
        write_json(folder / "claims.json", ledger)
        plot = ledger_plot(ledger, folder / "claims.png", title)
        parts.append(render_ledger(ledger, title, f"{paper}/claims.json")
                     + (f"\n\n![{paper} claims against update size]({paper}/claims.png)" if plot else ""))
    total = _total(ledgers, COUNTED)
    board = "\n\n".join([
        "## Scoreboard: every claim, per regime",
        "Rules, grids and gates: each paper's `preregistration.md`. Cells: **verdict** (yes = reproduced, "
        "no = not reproduced, ? = inconclusive) then the quantity q and its 95% bootstrap interval; "
        "'not run': the regime's runs are not committed yet; '-': the claim is judged in another regime only.",
        "All cells: " + ", ".join(f"{k} {v}" for k, v in total.items()) + ".", *parts])
    write_text(root / "README.md", place_board((root / "README.md").read_text(), board))
    if (root / "power_round1.json").is_file():
        build_round2(root, ledgers)
    return ledgers


def round2_claims(paper: str, claims: Sequence[Claim], power: Sequence[Mapping]) -> list[Claim]:
    """The claims with round two's smallest effects of interest: the ``sesoi`` of the power analysis per
    (claim, regime), which each preregistration_2.md makes binding."""
    margins = {(r["id"], r["regime"]): r["sesoi"] for r in power if r["paper"] == paper and r["sesoi"] is not None}
    return [dataclasses.replace(c, sesoi={reg: m for (i, reg), m in margins.items() if i == c.id} or None)
            for c in claims]


def build_round2(root: Path, first: Mapping[str, Mapping]) -> dict[str, dict]:
    """Round two: each regime's round-one runs pooled with :data:`ROUND2`'s (behind each paper's check),
    judged with the no-effect verdict; ``claims_2.json`` and ``claims_2.png`` per paper, and the round-two
    board in ``experiments/README.md`` beside round one's (``first``), which stays as it is. Every cell
    still inconclusive carries the replicates it would need (:func:`~lorabench.protocols.claims.to_decide`)."""
    power = json.loads((root / "power_round1.json").read_text())
    ledgers, parts, notes, run_s = {}, [], [], 0.0
    for paper, (title, claims, regimes) in PAPERS.items():
        folder, extra, before = root / paper, ROUND2[paper], len(notes)
        judged = round2_claims(paper, claims(), power)
        ledger = ledgers[paper] = _judge(root, paper, judged, regimes(folder, extra, notes))
        replicates = {r["label"]: r["replicates"] for r in ledger["regimes"]}
        for entry, claim in zip(ledger["claims"], judged):
            for label, e in entry["regimes"].items():
                need = to_decide(e, claim, replicates[label], e.get("sesoi")) if "point" in e else None
                if need:
                    e["replicates_to_decide"] = need
        ledger["notes"] = [n.replace(str(root) + os.sep, "") for n in notes[before:]]  # paths as in the sources
        runs = _load(folder / "runs" / "round2") if (folder / "runs" / "round2").is_dir() else []
        ledger["round2_runs"] = [os.path.relpath(r["_path"], root) for r in runs]
        ledger["round2_run_s"] = sum(float(r.get("total_s") or r.get("timings", {}).get("total_s") or 0) for r in runs)
        run_s += ledger["round2_run_s"]
        write_json(folder / "claims_2.json", ledger)
        plot = ledger_plot(ledger, folder / "claims_2.png", title + ", round two")
        parts.append(render_ledger(ledger, title + ", round two", f"{paper}/claims_2.json")
                     + "".join(f"\n- {n}" for n in ledger["notes"])
                     + (f"\n\n![{paper} round two]({paper}/claims_2.png)" if plot else ""))
    n_runs = sum(len(v["round2_runs"]) for v in ledgers.values())
    one, two = _total(first, COUNTED), _total(ledgers, ("reproduced", "not reproduced", "inconclusive", NO_EFFECT,
                                                         "not run"))
    board = "\n\n".join([
        "## Round two: more replicates and the no-effect verdict (issue 34)",
        "Planned from round one's power analysis ([power_round1.md](power_round1.md)) and fixed before its runs "
        "by each paper's `preregistration_2.md`. Each regime pools round one's runs with round two's (behind a "
        "check that the code reproduces round one); a claim whose criterion is the no-effect value reads **none** "
        "(no effect) when its interval lies inside its smallest effect of interest. A cell still inconclusive "
        "shows `(R n)`: the replicates at which an interval of its spread, centred on its point, would decide it; "
        "one without it is gated (a method it reads learned nothing: replicates cannot decide it) or no number "
        "of replicates decides it.",
        "All cells, round one: " + ", ".join(f"{k} {v}" for k, v in one.items()) + ". Round two: "
        + ", ".join(f"{k} {v}" for k, v in two.items())
        + f". Round two's runs: {n_runs}, {run_s / 3600:.2f} h of run time summed over runs "
        "(continual runs went two at a time, one thread each).",
        *parts])
    write_text(root / "README.md", place_board((root / "README.md").read_text(), board, START2, END2))
    return ledgers


def place_board(readme: str, board: str, start: str = START, end: str = END) -> str:
    """``readme`` with ``board`` between the markers ``start`` and ``end`` (replacing what was there), or
    appended with the markers when it has none: placing the same board twice gives the same text."""
    if start in readme and end in readme:
        return readme[:readme.index(start)] + start + "\n" + board + "\n" + readme[readme.index(end):]
    return readme.rstrip("\n") + "\n\n" + start + "\n" + board + "\n" + end + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lorabench.protocols.scoreboard experiments``: :func:`build`, one line per paper."""
    parser = argparse.ArgumentParser(prog="python -m lorabench.protocols.scoreboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", help="the experiments folder (experiments/)")
    args = parser.parse_args(argv)
    try:
        ledgers = build(args.experiments)
    except (ConfigError, ValueError) as err:
        print(f"lorabench: error: {err}", file=sys.stderr)
        sys.exit(2)
    for paper, led in ledgers.items():
        print(f"{paper}: " + "; ".join(f"{r}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                                       for r, c in led["counts"].items()))


if __name__ == "__main__":
    main()
