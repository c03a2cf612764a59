"""The claims ledger: each paper's directional claims, judged per regime with bootstrap intervals.

A :class:`Claim` names a quantity computed from *units* (a concept of one seed, a task of one run, a
seed), the paper's side of a criterion, and the methods it involves. The data of one regime are
*replicates* (seeds, or runs = order x training seed), each a list of units; a unit is a mapping
``{method: values}`` that holds every method measured on it, so one resample draws the same units for
every method a claim compares (paired differences).

- :func:`bootstrap`: the hierarchical percentile interval (replicates with replacement, then units
  within each drawn replicate), ``n`` resamples from ``numpy.random.default_rng(seed)``;
- :func:`judge`: *reproduced* when the interval lies on the paper's side of the criterion, *not
  reproduced* when it lies on the other side, *inconclusive* when it straddles it; for a claim with a
  smallest effect of interest ``m`` (round two on), *no effect* when the interval lies inside
  ``[c - m, c + m]`` around the criterion ``c`` (the no-effect value of the claims that carry one);
- :func:`judge_claims`: every claim of a paper in every regime, with the gate ("nothing learned"), the
  single-task learning and the update size beside each verdict: the paper's ``claims.json``;
- :func:`render_ledger` and :func:`ledger_plot`: its scoreboard table and figure.

The rules are fixed in each paper's ``experiments/<paper>/preregistration.md`` before the runs they
judge; :mod:`lorabench.protocols.scoreboard` holds the papers' claim lists (each paper's protocol file keeps
the run-level verdicts under its own table) and builds the three ledgers from the committed runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lorabench.utils.plots import figure, save_figure
from lorabench.utils.tables import markdown

Unit = Mapping[str, Any]
Replicates = Sequence[Sequence[Unit]]
RULES = (">", "<", "abs<=")
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
NO_EFFECT = "no effect"  # the fourth verdict, only for claims with a smallest effect of interest
N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Claim:
    """One directional claim: ``statistic(units)`` against ``threshold`` by ``rule`` (``>``, ``<``, or
    ``abs<=`` for "about equal"). ``methods``: the methods it reads; ``gated``: judged only where those
    methods learned (the paper's gate, see its preregistration); ``regimes``: the only regimes it is
    judged in (empty: all); ``sesoi``: the smallest effect of interest, for claims whose criterion is the
    no-effect value, one number or one per regime label (None, or a regime it does not name: no
    equivalence verdict). ``statistic`` returns None when a unit set lacks what it needs."""

    id: str
    text: str
    quantity: str
    paper: str
    rule: str
    threshold: float
    statistic: Callable[[Sequence[Unit]], Optional[float]]
    methods: tuple[str, ...] = ()
    gated: bool = True
    regimes: tuple[str, ...] = ()
    sesoi: Optional[float | Mapping[str, float]] = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"claim {self.id}: rule {self.rule!r} is not one of {RULES}")

    @property
    def criterion(self) -> str:
        """The rule as text, on the quantity q: ``q > 0.5``, ``abs(q) <= 0.02`` (no ``|``: it sits in tables)."""
        return f"abs(q) <= {self.threshold:g}" if self.rule == "abs<=" else f"q {self.rule} {self.threshold:g}"


@dataclass
class Regime:
    """One regime's data: its replicates, where they came from, and what sits beside the verdicts:
    ``learning[method]`` (single-task learning, a number) and ``sizes[method]`` (update-size stats)."""

    label: str
    replicates: list[list[Unit]]
    sources: list[str] = field(default_factory=list)
    learning: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    learning_label: str = ""
    gate_floor: float = 0.0


def _pooled(replicates: Replicates) -> list[Unit]:
    return [u for rep in replicates for u in rep]


class Resample(list):
    """One bootstrap resample: its units, and a memo of what statistics read from them (:func:`mean_of`), so
    that the claims of a regime, judged on the same resamples, compute each method's mean once."""

    __slots__ = ("memo",)

    def __init__(self, units: Sequence[Unit] = ()):
        super().__init__(units)
        self.memo: dict[tuple, Optional[float]] = {}


def resamples(replicates: Replicates, n: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> list[Resample]:
    """``n`` hierarchical resamples of ``replicates`` from ``numpy.random.default_rng(seed)``: the
    replicates with replacement, then each drawn replicate's units with replacement (empty replicates
    left out). Every claim of a regime is judged on the same draws (the same seed)."""
    reps = [list(r) for r in replicates if len(r)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n if reps else 0):
        units = Resample()
        for i in rng.integers(0, len(reps), len(reps)):
            rep = reps[i]
            units += [rep[j] for j in rng.integers(0, len(rep), len(rep))]
        out.append(units)
    return out


def bootstrap(replicates: Replicates, statistic: Callable[[Sequence[Unit]], Optional[float]],
              n: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED, level: float = 0.95,
              draws: Optional[Sequence[Resample]] = None) -> Optional[tuple[float, float, float]]:
    """``(point, low, high)``: the statistic on all units, and the ``level`` percentile interval of its
    hierarchical bootstrap (:func:`resamples`, or the ``draws`` given: the regime's, drawn once). None
    when the statistic is undefined on the data."""
    reps = [list(r) for r in replicates if len(r)]
    if not reps:
        return None
    point = statistic(_pooled(reps))
    if point is None:
        return None
    values = [v for units in (resamples(reps, n, seed) if draws is None else draws)
              if (v := statistic(units)) is not None and not math.isnan(v)]
    if not values:
        return None
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(point), float(low), float(high)


def judge(low: float, high: float, rule: str, threshold: float, sesoi: Optional[float] = None) -> str:
    """The verdict of an interval against ``rule threshold`` (module docstring): *no effect* first when
    ``sesoi`` is given and the interval lies inside ``threshold +- sesoi``, whatever its side."""
    if sesoi is not None and rule != "abs<=" and threshold - sesoi <= low and high <= threshold + sesoi:
        return NO_EFFECT
    if rule == ">":
        return "reproduced" if low > threshold else "not reproduced" if high < threshold else "inconclusive"
    if rule == "<":
        return "reproduced" if high < threshold else "not reproduced" if low > threshold else "inconclusive"
    if -threshold <= low and high <= threshold:
        return "reproduced"
    return "not reproduced" if low > threshold or high < -threshold else "inconclusive"


def judge_claims(paper: str, claims: Sequence[Claim], regimes: Sequence[Regime], n: int = N_BOOTSTRAP,
                 seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """The ledger of one paper: every claim in every regime (``claims.json``'s content)."""
    out = {"paper": paper, "bootstrap": {"resamples": n, "seed": seed, "level": 0.95,
                                         "scheme": "replicates with replacement, then units within each"},
           "regimes": [{"label": r.label, "sources": r.sources, "replicates": len(r.replicates),
                        "units": sum(len(x) for x in r.replicates), "learning": r.learning,
                        "learning_label": r.learning_label, "update_size": r.sizes} for r in regimes],
           "claims": []}
    draws = {r.label: resamples(r.replicates, n, seed) for r in regimes}  # shared by the regime's claims
    for claim in claims:
        entry = {"id": claim.id, "claim": claim.text, "quantity": claim.quantity, "paper": claim.paper,
                 "rule": claim.criterion, "methods": list(claim.methods), "gated": claim.gated, "regimes": {}}
        for r in regimes:
            entry["regimes"][r.label] = _judge_in(claim, r, draws[r.label])
        out["claims"].append(entry)
    out["counts"] = {r.label: count_verdicts(out, r.label) for r in regimes}
    return out


def _judge_in(claim: Claim, r: Regime, draws: Sequence[Resample]) -> dict[str, Any]:
    beside = {"learning": {m: r.learning[m] for m in claim.methods if m in r.learning},
              "update_size": {m: r.sizes[m] for m in claim.methods if m in r.sizes}}
    if claim.regimes and r.label not in claim.regimes:
        return {"verdict": "not in this regime", **beside}
    if not r.replicates:
        return {"verdict": "not run", **beside}
    res = bootstrap(r.replicates, claim.statistic, draws=draws)
    if res is None:
        return {"verdict": "not run", "detail": "the runs lack a method it reads", **beside}
    point, low, high = res
    m = claim.sesoi.get(r.label) if isinstance(claim.sesoi, Mapping) else claim.sesoi
    entry = {"point": point, "low": low, "high": high, "verdict": judge(low, high, claim.rule, claim.threshold, m),
             **({"sesoi": m} if m is not None else {}), **beside}
    weak = [m for m in claim.methods if claim.gated and m in r.learning and not r.learning[m] > r.gate_floor]
    if weak:
        entry["verdict"] = "inconclusive"
        entry["detail"] = (f"nothing learned: {r.learning_label} of {', '.join(weak)} not above {r.gate_floor:g}; "
                           f"the interval alone says {judge(low, high, claim.rule, claim.threshold, m)}")
    return entry


def to_decide(entry: Mapping[str, Any], claim: Claim, replicates: int, sesoi: Optional[float] = None
              ) -> Optional[int]:
    """The replicates at which an interval of ``entry``'s spread, centred on its point, would decide an
    inconclusive cell: exclude the criterion ``c`` (``R * (h / |q - c|)^2``, ``h`` the half-width) or, with
    a smallest effect of interest ``m``, lie inside ``c +- m`` (``R * (h / (m - |q - c|))^2``), whichever
    is fewer; None for a decided cell, a gated one ("nothing learned") or one no number of replicates
    decides. It takes the point as the truth: a planning figure."""
    h = (entry.get("high", 0.0) - entry.get("low", 0.0)) / 2
    if entry.get("verdict") != "inconclusive" or "nothing learned" in entry.get("detail", "") or h <= 0:
        return None
    gap = abs(entry["point"] - claim.threshold)
    if claim.rule == "abs<=":
        gap = claim.threshold - abs(entry["point"])
    options = [replicates * (h / gap) ** 2] if gap > 0 else []
    if sesoi is not None and gap < sesoi:
        options.append(replicates * (h / (sesoi - gap)) ** 2)
    return max(replicates + 1, math.ceil(min(options))) if options else None


def count_verdicts(ledger: Mapping, regime: str) -> dict[str, int]:
    """How many claims are reproduced, not reproduced, inconclusive or not run in ``regime`` (and of no
    effect, in a ledger whose claims carry a smallest effect of interest)."""
    equivalence = any("sesoi" in e for c in ledger["claims"] for e in c["regimes"].values())
    counts = {v: 0 for v in (*VERDICTS, *([NO_EFFECT] if equivalence else []), "not run")}
    for c in ledger["claims"]:
        v = c["regimes"].get(regime, {}).get("verdict", "not run")
        if v in counts:
            counts[v] += 1
    return counts


SYMBOLS = {"reproduced": "yes", "not reproduced": "no", "inconclusive": "?", NO_EFFECT: "none", "not run": "not run",
           "not in this regime": "-"}


def _cell(entry: Mapping) -> str:
    v = entry.get("verdict", "not run")
    if "point" not in entry:
        return SYMBOLS.get(v, v)
    need = f" (R {entry['replicates_to_decide']})" if entry.get("replicates_to_decide") else ""
    return f"**{SYMBOLS.get(v, v)}** {entry['point']:.3g} [{entry['low']:.3g}, {entry['high']:.3g}]{need}"


def render_ledger(ledger: Mapping, title: str, link: str = "") -> str:
    """The paper's scoreboard: claims x regimes, each cell the verdict, the quantity and its interval."""
    regimes = [r["label"] for r in ledger["regimes"]]
    head = ["id", "claim (quantity q)", "paper", "rule", *regimes]
    rows = [[c["id"], f"{c['claim']} (q = {c['quantity']})", c["paper"], c["rule"],
             *[_cell(c["regimes"].get(r, {})) for r in regimes]] for c in ledger["claims"]]
    lines = [f"### {title}" + (f" ([{Path(link).name}]({link}))" if link else ""), "", markdown(head, rows), ""]
    sizes = []
    for r in ledger["regimes"]:
        counts = ledger["counts"][r["label"]]
        med = [s.get("weight_median") for s in r["update_size"].values() if s.get("weight_median") is not None]
        size = f", update size ||dW||/||W0|| median {np.median(med):.3g}" if med else ""
        sizes.append(f"- {r['label']}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
                     f" ({r['replicates']} replicates, {r['units']} units{size})")
    return "\n".join(lines + sizes)


def ledger_plot(ledger: Mapping, path: Path, title: str) -> Optional[Path]:
    """One panel per claim: the quantity and its interval against the regime's update size (median over
    the methods it involves of their median-layer ||dW|| / ||W0||), the criterion as a line."""
    claims = [c for c in ledger["claims"] if any("point" in e for e in c["regimes"].values())]
    if not claims:
        return None
    cols = min(4, len(claims))
    rows = math.ceil(len(claims) / cols)
    fig, axes = figure(cols, rows, figsize=(3.4 * cols, 2.7 * rows))
    order = [r["label"] for r in ledger["regimes"]]
    for ax, c in zip(axes.flat, claims):
        points = []
        for label, e in c["regimes"].items():
            if "point" in e:
                sizes = [s["weight_median"] for s in e.get("update_size", {}).values() if "weight_median" in s]
                points.append((label, float(np.median(sizes)) if sizes else float("nan"), e))
        by_size = all(x > 0 for _, x, _ in points)  # else (a regime without sizes): one column per regime
        for label, x, e in points:
            x = x if by_size else order.index(label)
            colour = {"reproduced": "tab:green", "not reproduced": "tab:red", NO_EFFECT: "tab:blue"}.get(
                e["verdict"], "tab:gray")
            ax.errorbar([x], [e["point"]], yerr=[[e["point"] - e["low"]], [e["high"] - e["point"]]], fmt="o",
                        color=colour, capsize=3)
            ax.annotate(label, (x, e["point"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        thr = float(c["rule"].split()[-1])
        for y in ((-thr, thr) if c["rule"].startswith("abs(q)") else (thr,)):
            ax.axhline(y, color="black", ls="--", lw=0.8)
        if by_size:
            ax.set_xscale("log")
            ax.set_xlabel("update size ||dW||/||W0|| (median)", fontsize=7)
        else:
            ax.set_xticks(range(len(order)), order, fontsize=6)
            ax.set_xlabel("regime (update size not measured in every one)", fontsize=7)
        ax.set_title(f"{c['id']}: {c['rule']}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(claims):]:
        ax.set_visible(False)
    fig.suptitle(title + " (green: reproduced, red: not reproduced, gray: inconclusive)", fontsize=9)
    save_figure(fig, path)
    return Path(path)


def mean_of(units: Sequence[Unit], method: str, key: str) -> Optional[float]:
    """The mean of ``unit[method][key]`` over the units that have it (None if none do); read once per
    :class:`Resample`."""
    memo = getattr(units, "memo", None)
    if memo is not None and (method, key) in memo:
        return memo[method, key]
    values = [u[method][key] for u in units if method in u and u[method].get(key) is not None]
    mean = float(np.mean(values)) if values else None
    if memo is not None:
        memo[method, key] = mean
    return mean


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, None when either is missing or ``b`` is 0."""
    return None if a is None or b is None or b == 0 else a / b


def difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a - b``, None when either is missing."""
    return None if a is None or b is None else a - b
