"""Power from round one: how many replicates each claim needs to be decided (issue 34).

    python -m lorabench.protocols.power experiments      # writes experiments/power_round1.md and .json

For every claim judged in a regime of round one (each paper's committed ``claims.json``, with its
runs under ``experiments/<paper>/runs``), with ``R`` replicates:

- ``h1``: the 95% bootstrap interval's half-width, ``(high - low) / 2``, as round one judged it;
- ``target``: the half-width that decides the claim if the paper's effect is real: half the paper's
  effect measured from the criterion, ``|paper - c| / 2`` (``(t - |paper|) / 2`` for an equivalence
  claim ``|q| <= t``), or the margin :data:`MARGINS` states where the paper gives no number;
- ``R2 = ceil(R * (h1 / target)^2)``: the replicates that bring the half-width to the target when it
  shrinks as ``1 / sqrt(R)`` (replicates are the bootstrap's top level; more units per replicate are
  not an option in these protocols but for identity samples, below);
- ``R_decide``, for a cell round one left inconclusive: the replicates at which an interval of the same
  spread, centred where round one found it, would decide the cell: exclude the criterion,
  ``R * (h1 / |q - c|)^2``, or, for a claim with a smallest effect of interest ``m`` (the target, for
  claims whose criterion is the no-effect value), lie inside ``c +- m``, ``R * (h1 / (m - |q - c|))^2``,
  whichever is fewer. It takes round one's point as the truth: a planning figure that is optimistic
  when the point is far from the truth;
- variance components: ``sd_rep``, the standard deviation over replicates of the statistic computed on
  each replicate alone (between replicates, its units' noise included), and ``sd_unit``, the mean over
  replicates of the within-replicate bootstrap sd (units resampled, the replicate fixed): which of the
  two drives ``h1``;
- for Orthogonal Adaptation's identity claims, ``sd_sample``: the statistic's sd when every unit's
  identity shares are redrawn as ``Binomial(k, p) / k`` (``k`` = the concept's prompts x images per
  prompt) with replicates and units fixed: the part that the finite number of samples alone
  contributes. ``sampling_share = sd_sample^2 / (h1 / 1.96)^2``; above one half, scoring more samples
  narrows the interval more cheaply than training more seeds.

The numbers are estimates from two or three replicates: ``R2`` is a planning figure, rounded up, not a
promise. Round two's pre-registration (``experiments/<paper>/preregistration_2.md``) turns them into runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lorabench.protocols.claims import Claim, Regime, to_decide
from lorabench.protocols.scoreboard import PAPERS
from lorabench.utils.io import write_json, write_text
from lorabench.utils.tables import markdown

Z95 = 1.959963984540054
WITHIN_RESAMPLES = 400
SAMPLE_RESAMPLES = 400
SEED = 0
# Half-widths stated where the paper gives no number (reasons in each preregistration_2.md).
MARGINS = {"O9": 0.1, "O10": 0.1, "O12": 445.0, "L1": 0.05, "T7": 0.0355, "T7m": 0.0355}
IDENTITY_KEYS = ("single_identity_alignment", "merged_identity_alignment")
# Claims whose criterion is the no-effect value (a difference of 0; NFID 1, the base model's) get a smallest
# effect of interest in round two: the target half-width.
NO_EFFECT_VALUES = {">": (0.0,), "<": (0.0, 1.0)}


def paper_value(claim: Claim, regime: str) -> Optional[float]:
    """The paper's number for ``claim`` in ``regime`` (the styles figure of a DINO claim in a styles
    regime), None where the paper gives none; percentages as fractions."""
    text = claim.paper
    if regime.startswith("styles") and "styles" in text:
        text = text.split("styles", 1)[1]
    m = re.search(r"[-+]?\d*\.?\d+%?", text)
    if m is None or claim.id in MARGINS:
        return None
    value = m.group(0)
    return float(value[:-1]) / 100 if value.endswith("%") else float(value)


def target_half_width(claim: Claim, regime: str) -> Optional[float]:
    """Half the paper's effect from the criterion (module docstring), or the stated margin."""
    if claim.id in MARGINS:
        return MARGINS[claim.id]
    p = paper_value(claim, regime)
    if p is None:
        return None
    width = (claim.threshold - abs(p)) if claim.rule == "abs<=" else abs(p - claim.threshold)
    return width / 2 if width > 0 else None


def _sd(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else None


def components(claim: Claim, regime: Regime, rng: np.random.Generator) -> dict[str, Optional[float]]:
    """``sd_rep`` and ``sd_unit`` of the claim's statistic in ``regime`` (module docstring)."""
    per_rep = [claim.statistic(rep) for rep in regime.replicates]
    within = []
    for rep in regime.replicates:
        if len(rep) > 1:
            draws = [claim.statistic([rep[j] for j in rng.integers(0, len(rep), len(rep))])
                     for _ in range(WITHIN_RESAMPLES)]
            sd = _sd(draws)
            if sd is not None:
                within.append(sd)
    return {"sd_rep": _sd(per_rep), "sd_unit": statistics.fmean(within) if within else 0.0}


def sampling_sd(claim: Claim, regime: Regime, samples: Mapping[str, int], rng: np.random.Generator
                ) -> Optional[float]:
    """The statistic's sd over binomial redraws of every unit's identity shares (module docstring);
    None when the claim reads no identity share."""
    units = [u for rep in regime.replicates for u in rep]
    reads = [m for m in claim.methods if any(k in (u.get(m) or {}) for u in units for k in IDENTITY_KEYS)]
    if not reads or not ("identity" in claim.quantity or "retention" in claim.quantity):
        return None
    draws = []
    for _ in range(SAMPLE_RESAMPLES):
        redrawn = []
        for u in units:
            new = dict(u)
            for m in reads:
                row = dict(u[m])
                k = samples[row["concept"]]
                same = row["merged_identity_alignment"] == row["single_identity_alignment"]  # the same images (P+)
                for key in IDENTITY_KEYS:
                    row[key] = rng.binomial(k, min(max(row[key], 0.0), 1.0)) / k
                if same:
                    row["merged_identity_alignment"] = row["single_identity_alignment"]
                row["delta_identity_alignment"] = row["merged_identity_alignment"] - row["single_identity_alignment"]
                new[m] = row
            redrawn.append(new)
        draws.append(claim.statistic(redrawn))
    return _sd(draws)


def analyse(experiments: str | Path) -> list[dict[str, Any]]:
    """One row per (paper, claim, regime) that round one judged with an interval."""
    root, rows = Path(experiments), []
    for paper, (_, claims, regimes) in PAPERS.items():
        ledger = json.loads((root / paper / "claims.json").read_text())
        by_label = {r.label: r for r in regimes(root / paper)}
        judged = {c["id"]: c["regimes"] for c in ledger["claims"]}
        samples = _identity_samples(root / paper) if paper == "orthogonal_adaptation" else {}
        for claim in claims():
            for label, entry in judged[claim.id].items():
                if "low" not in entry:
                    continue
                rng = np.random.default_rng(SEED)
                regime = by_label[label]
                n_rep = len(regime.replicates)
                h1 = (entry["high"] - entry["low"]) / 2
                target = target_half_width(claim, label)
                need = max(n_rep, math.ceil(n_rep * (h1 / target) ** 2)) if target and h1 > 0 else n_rep
                sesoi = target if target and claim.threshold in NO_EFFECT_VALUES.get(claim.rule, ()) else None
                row = {"paper": paper, "id": claim.id, "regime": label, "verdict": entry["verdict"],
                       "point": entry["point"], "h1": h1, "replicates": n_rep, "target": target,
                       "paper_value": paper_value(claim, label), "replicates_needed": need, "sesoi": sesoi,
                       "replicates_to_decide": to_decide(entry, claim, n_rep, sesoi),
                       **components(claim, regime, rng)}
                if samples:
                    sd = sampling_sd(claim, regime, samples, rng)
                    if sd is not None:
                        row["sd_sample"] = sd
                        row["sampling_share"] = sd ** 2 / (h1 / Z95) ** 2 if h1 > 0 else None
                rows.append(row)
    return rows


def _identity_samples(folder: Path) -> dict[str, int]:
    """Samples per concept that its identity share is a share of: prompts x images per prompt."""
    out: dict[str, int] = {}
    for f in sorted((folder / "runs").rglob("results.json")):
        res = json.loads(f.read_text())
        for c, prompts in (res.get("prompts") or {}).items():
            out[c] = len(prompts) * int(res["images_per_prompt"])
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render(rows: Sequence[Mapping[str, Any]]) -> str:
    """The analysis as markdown: one table per paper."""
    cols = ["id", "regime", "round 1", "q", "h1", "R", "paper", "target", "R needed", "sesoi", "R to decide",
            "sd_rep", "sd_unit", "sd_sample", "sampling share"]
    keys = ["id", "regime", "verdict", "point", "h1", "replicates", "paper_value", "target", "replicates_needed",
            "sesoi", "replicates_to_decide", "sd_rep", "sd_unit", "sd_sample", "sampling_share"]
    parts = ["# Power from round one", "",
             "Written by `python -m lorabench.protocols.power experiments` from the committed round-one runs and "
             "claims.json files, before any run of round two. Method: `lorabench/protocols/power.py` (docstring). "
             "`R needed` = ceil(R x (h1 / target)^2); `target` = half the paper's effect from the criterion, or "
             "the stated margin; `-` where neither exists (the claim is judged, not planned for)."]
    for paper in dict.fromkeys(r["paper"] for r in rows):
        sel = [r for r in rows if r["paper"] == paper]
        parts += ["", f"## {paper}", "", markdown(cols, [[_fmt(r.get(k)) for k in keys] for r in sel])]
    return "\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lorabench.protocols.power experiments``: the analysis, as markdown and JSON."""
    parser = argparse.ArgumentParser(prog="python -m lorabench.protocols.power", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", help="the experiments folder (experiments/)")
    args = parser.parse_args(argv)
    rows = analyse(args.experiments)
    root = Path(args.experiments)
    write_json(root / "power_round1.json", rows)
    write_text(root / "power_round1.md", render(rows))
    print(f"{len(rows)} judged cells; wrote {root / 'power_round1.md'}")


if __name__ == "__main__":
    main()
