"""Continual personalization (Staniszewski, Zaleska, Deja; arXiv 2410.04891): one adapter method over
a sequence of tasks, every seen task scored after every task.

    lorabench experiment=continual/world_objects protocol.method.name=magmax
    lorabench --multirun experiment=continual/world_objects protocol.method.name=naive,merge_init,ortho_init,magmax \\
        sequence.order_seed=0,5,10 seed=0
    python -m lorabench.protocols rebuild continual outputs/continual --out experiments/continual   # the tables

One run = one method, one task order (``sequence.order_seed``) and one training seed (``seed``), run by the
shared sequence engine (:mod:`lorabench.protocols.sequence`): the tasks resolved and checked before any work,
the base model scored on every task, each task trained, folded into the method's state and followed by
scores of every seen task (``M[j, t]`` per metric: CLIP-I and DINO for objects, CSD and DINO for styles; in
the mini world their stand-ins), and each finished task's state written so that a killed run resumes where
it stopped. This file holds what is the paper's: its ``protocol:`` block (the method, the adapter), its tables
across runs (Average Score and Forgetting beside the poster's), its claims and the sign-conflict figure (Fig. 2).

The run folder is fixed by the config (``hydra.run.dir``), so "the same command" finds its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from lorabench.checks import check_protocol_groups
from lorabench.continual.methods import build_method
from lorabench.continual.tasks import LABELS
from lorabench.errors import ConfigError
from lorabench.protocols import sequence
from lorabench.protocols.base import Paper, Rebuilt, join_rows, pm, read_settings, setting
from lorabench.protocols.cells import check_adapter_entry, check_processes
from lorabench.protocols.report import Session, mean_std, rebuild_cli
from lorabench.utils.plots import band_panels
from lorabench.utils.tables import Column, csv_text, markdown

# The poster's tables (papers/continual_personalization_poster.txt): (S metric 1, S metric 2, F 1, F 2)
# as (mean, std); the base model has no forgetting.
PUBLISHED = {
    "objects": {"base": ((0.586, None), (0.304, None), None, None),
                "naive": ((0.670, .013), (0.402, .029), (0.063, .013), (0.144, .039)),
                "merge_init": ((0.675, .005), (0.457, .011), (0.026, .003), (0.056, .009)),
                "ortho_init": ((0.673, .014), (0.403, .025), (0.072, .015), (0.162, .033)),
                "magmax": ((0.643, .002), (0.408, .006), (0.018, .002), (0.036, .006))},
    "styles": {"base": ((0.088, None), (0.146, None), None, None),
               "naive": ((0.345, .032), (0.249, .010), (0.184, .039), (0.136, .013)),
               "merge_init": ((0.385, .019), (0.285, .019), (0.131, .019), (0.085, .021)),
               "ortho_init": ((0.349, .014), (0.252, .012), (0.204, .013), (0.141, .013)),
               "magmax": ((0.289, .015), (0.240, .009), (0.093, .013), (0.052, .015))},
}
METHOD_LABELS = {"base": "Base model (reference)", "naive": "Naive continual fine-tuning",
                 "merge_init": "Merge & Initialization", "ortho_init": "Merge & Orthogonal Initialization",
                 "magmax": "Magnitude-based merging (MagMax-light)", "ortha": "Orthogonal Adaptation in sequence"}


@dataclass(kw_only=True)
class ContinualSettings:
    """The ``protocol:`` block of a continual run (its tasks are the ``sequence`` group)."""

    adapter: Optional[dict] = setting(None, doc="the adapter each task trains (/adapter@protocol.adapter: lora)")
    method: dict = setting({}, doc="name: naive | merge_init | ortho_init | magmax | ortha | merge:<name>, options")
    eval_seed: int = setting(0, minimum=0, doc="the seed the evaluation samples' initial latents derive from")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the sequence ``cfg`` describes (resuming from ``run_dir/state`` when it holds one): the shared
    sequence run (:func:`lorabench.protocols.sequence.run`) with the method and adapter of ``protocol``."""
    check_protocol_groups(cfg)
    session = Session(cfg, Path(run_dir), "continual")
    st = read_settings(ContinualSettings, cfg.protocol)
    if not st.adapter:
        raise ConfigError("protocol.adapter", "no adapter; add e.g. /adapter@protocol.adapter: lora")
    check_adapter_entry(st.adapter, "protocol.adapter")
    check_processes(cfg, "continual", "ranks")  # the method and the metric live in the task's callback
    return sequence.run(session, build_method(st.method or {}), st.adapter, st.eval_seed)


# -- tables, verdicts and the sign-conflict plot, rebuilt from results.json files -----------------------------
PAPER_METHODS = ("naive", "merge_init", "ortho_init", "magmax")
MIN_RUNS = 3


def aggregate(results: Sequence[dict]) -> dict:
    """``{kind: {method: {"S"|"F"|"F_textbook"|"BWT": {metric: {mean, std, n}}, "runs": [...]}}}`` with the
    population std over runs (order seed x training seed); the base model's row under ``"base"``. A run
    (kind, method, order seed, training seed) given twice is an error, not a second replicate."""
    # each run is one row of the join: a run given twice is a row two runs hold
    join_rows([{**r, "rows": [r]} for r in results], (), lambda r: (r["kind"], r["method"], r["order_seed"], r["seed"]),
              lambda r, _: f"{r['method']} order {r['order_seed']} seed {r['seed']} ({r['kind']}) appears in two runs")
    out: dict = {}
    for kind in dict.fromkeys(r["kind"] for r in results):
        rows = [r for r in results if r["kind"] == kind]
        names = rows[0]["metrics"]
        agg = {"base": {"S": {n: mean_std([r["base"][n]["average_score"] for r in rows]) for n in names},
                        "runs": sorted({(r["order_seed"], r["seed"]) for r in rows})}}
        found = list(dict.fromkeys(r["method"] for r in rows))
        for method in [m for m in PAPER_METHODS if m in found] + [m for m in found if m not in PAPER_METHODS]:
            sel = [r for r in rows if r["method"] == method]
            agg[method] = {q: {n: mean_std([r["final"][n][key] for r in sel]) for n in names}
                           for q, key in (("S", "average_score"), ("F", "forgetting_ref"),
                                          ("F_textbook", "forgetting"), ("BWT", "backward_transfer"))}
            agg[method]["runs"] = sorted((r["order_seed"], r["seed"]) for r in sel)
            agg[method]["total_s"] = mean_std([r["timings"]["total_s"] for r in sel])
        out[kind] = {"metrics": names, "methods": agg}
    return out


def _pub(v) -> str:
    if v is None:
        return "-"
    mean, std = v
    return f"{mean:.3f}" + (f" +- {std:.3f}" if std is not None else "")


def render_table(kind: str, agg: dict) -> tuple[str, list[list]]:
    """Markdown (measured, then the published side table) and CSV rows for one kind."""
    names, methods = agg["metrics"], agg["methods"]
    lab = [LABELS.get(n, n) for n in names]
    quantities = ("S", "F", "F_textbook", "BWT")

    def measured(method: str, q: str, n: str) -> str:
        return "-" if method == "base" and q != "S" else pm(methods[method][q][n])

    columns = [Column("method", lambda m: METHOD_LABELS.get(m, m)),
               Column("runs", lambda m: str(len(methods[m]["runs"]))),
               *(Column(f"{q.replace('_', ' ')} {x}", lambda m, q=q, n=n: measured(m, q, n))
                 for q in quantities for n, x in zip(names, lab)),
               Column("run s", lambda m: "-" if m == "base" else f"{methods[m]['total_s']['mean']:.0f}")]
    csv_rows = [["kind", "method", "quantity", "metric", "mean", "std", "n"]]
    csv_rows += [[kind, method, q, n, v["mean"], v["std"], v["n"]] for method, a in methods.items() for q in quantities
                 for n in names if (v := a.get(q, {}).get(n))]
    published = [[METHOD_LABELS.get(m, m), *map(_pub, vals)] for m, vals in PUBLISHED.get(kind, {}).items()]
    md = [markdown(columns, list(methods)), "",
          f"Published ({'objects' if kind == 'objects' else 'styles'} table of the poster; SDXL, rank 64, 8 runs: "
          "order seeds {0, 5, 10, 42} x training seeds {0, 5}):", "",
          markdown(["method", *(f"{q} {x}" for q in ("S", "F") for x in lab)], published), "",
          "S: Average Score after the last task; F: Average Forgetting as the reference code computes it (divided by "
          "T, the paper's numbers); F textbook: divided by T - 1, last task left out; BWT: backward transfer. Mean +- "
          "population std over runs (order seed x training seed)."]
    return "\n".join(md), csv_rows


def verdicts(agg: dict) -> list[dict]:
    """The paper's directional claims, by criteria fixed here (means over runs, both metrics of a table):

    - naive forgets more than merge_init: F(naive) > F(merge_init);
    - magmax forgets least, at some cost in score: the lowest F of the four paper methods, and an S
      below the best method's S on at least one metric;
    - ortho_init is no better than naive: F(ortho_init) >= F(naive) - std and S(ortho_init) <=
      S(naive) + std (naive's std over runs).

    Fewer than 3 runs of a method involved: inconclusive."""
    out = []
    for kind, a in agg.items():
        names, m = a["metrics"], a["methods"]

        def have(*methods):
            return all(x in m and len(m[x]["runs"]) >= MIN_RUNS for x in methods)

        def f(x, n):
            return m[x]["F"][n]["mean"]

        def s(x, n):
            return m[x]["S"][n]["mean"]

        def numbers(methods):
            return "; ".join(f"{x}: " + ", ".join(f"S {LABELS.get(n, n)} {pm(m[x]['S'][n])}, F {LABELS.get(n, n)} "
                                                  f"{pm(m[x]['F'][n])}" for n in names) for x in methods if x in m)

        claims = [
            ("naive forgets more than merge_init", ("naive", "merge_init"),
             lambda: all(f("naive", n) > f("merge_init", n) for n in names)),
            ("magmax forgets least, at some cost in score", PAPER_METHODS,
             lambda: all(f("magmax", n) <= min(f(x, n) for x in PAPER_METHODS) for n in names)
             and any(s("magmax", n) < max(s(x, n) for x in PAPER_METHODS) for n in names)),
            ("ortho_init is no better than naive", ("naive", "ortho_init"),
             lambda: all(f("ortho_init", n) >= f("naive", n) - m["naive"]["F"][n]["std"]
                         and s("ortho_init", n) <= s("naive", n) + m["naive"]["S"][n]["std"] for n in names)),
        ]
        for claim, methods, test in claims:
            if not have(*methods):
                verdict = f"inconclusive (fewer than {MIN_RUNS} runs of {', '.join(x for x in methods if not have(x))})"
            else:
                verdict = "reproduced" if test() else "not reproduced"
            out.append({"kind": kind, "claim": claim, "verdict": verdict, "numbers": numbers(methods)})
    return out


def sign_conflict_plot(results: Sequence[dict], path: Path) -> None:
    """The paper's Fig. 2: the norm of the parameters of task t's change that oppose the sign of what
    was handed on, over the norm of the change, per task and method (mean +- std over runs)."""
    panels = {}
    for kind in dict.fromkeys(r["kind"] for r in results):
        panels[f"sign conflicts ({kind})"] = series = {}
        for method in dict.fromkeys(r["method"] for r in results if r["kind"] == kind):
            runs = [r["sign_conflict"] for r in results if r["kind"] == kind and r["method"] == method]
            arr = np.array([[np.nan if v is None else v for v in run] for run in runs], dtype=float)[:, 1:]
            # task 1 has nothing handed on to conflict with
            series[method] = (np.arange(2, arr.shape[1] + 2), np.nanmean(arr, 0), np.nanstd(arr, 0))
    band_panels(path, panels, "task", "||opposed|| / ||task change||", alpha=0.2)


def rebuild(results: list[dict]) -> Rebuilt:
    """Tables (markdown + CSV per kind), verdicts.json and the sign-conflict plot from results.json contents."""
    agg = aggregate(results)
    files: dict = {}
    for kind, a in agg.items():
        md, rows = render_table(kind, a)
        files[f"table_{kind}.md"], files[f"table_{kind}.csv"] = md + "\n", csv_text(rows)
    files["verdicts.json"] = v = verdicts(agg)
    files["sign_conflicts.png"] = lambda path: sign_conflict_plot(results, path)
    tables = "".join(f"\n## {kind}\n\n{files[f'table_{kind}.md'][:-1]}\n" for kind in agg)
    return Rebuilt(files, tables + "\n" + "\n".join(f"- {x['kind']}: {x['claim']}: **{x['verdict']}** ({x['numbers']})"
                                                   for x in v))


PAPER = Paper("continual", "continual", rebuild, "folder for table_<kind>.md/.csv, verdicts.json, sign_conflicts.png")

if __name__ == "__main__":  # the command before `python -m lorabench.protocols rebuild continual`
    rebuild_cli(PAPER.name)
