"""Continual personalization (Staniszewski, Zaleska, Deja; arXiv 2410.04891): one adapter method over
a sequence of tasks, every seen task scored after every task.

    lorabench experiment=continual/world_objects protocol.method.name=magmax
    lorabench --multirun experiment=continual/world_objects protocol.method.name=naive,merge_init,ortho_init,magmax \\
        sequence.order_seed=0,5,10 seed=0
    python -m lorabench.protocols rebuild continual outputs/continual --out experiments/continual   # the tables

One run = one method, one task order (``sequence.order_seed``) and one training seed (``seed``):

1. The sequence is resolved and checked before any work: every task's data and evaluation set exist,
   no token twice, as many tasks as ``sequence.length`` asks, a known method.
2. The base model is scored on every task (the tables' reference row).
3. For each task t: the method sets the base weights (``train_deltas``) and initialises a fresh
   adapter, the task trains (the plain training of :func:`lorabench.run.train`), and at the end of the
   fit the :class:`~lorabench.continual.metrics.ContinualEvaluation` callback folds the adapter into
   the method's state and scores tasks 0..t from fixed initial latents and prompts: ``M[j, t]`` per
   metric (CLIP-I and DINO for objects, CSD and DINO for styles; in the mini world their stand-ins).
   References are embedded once per task.
4. The completed task's state (the method's tensors, its score rows, the RNG state) is written
   atomically to ``<run>/state/task_<t>``. A run killed during task k and started again with the same
   command resumes at task k, and ends with the same results as an uninterrupted run.

The run folder is fixed by the config (``hydra.run.dir``), so "the same command" finds its state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.continual.methods import ContinualMethod, RunningModel, build_method, sign_conflict_ratio
from lorabench.continual.metrics import (
    ContinualEvaluation,
    ContinualScores,
    average_score,
    heatmap,
    matrix_table,
    rows_json,
    sequence_results,
    summary,
)
from lorabench.continual.tasks import SUITES, Task, TaskScorer, build_scorer, resolve_sequence, score_tasks
from lorabench.errors import ConfigError
from lorabench.protocols import sizes
from lorabench.protocols.base import Paper, Rebuilt, join_rows, pm, read_settings, setting
from lorabench.protocols.cells import Cell, cell_config, run_cells
from lorabench.protocols.report import Session, mean_std, rebuild_cli
from lorabench.protocols.resume import SequenceState, fingerprint, rank_zero
from lorabench.sampling import eval_device
from lorabench.utils.console import quiet_cells
from lorabench.utils.plots import band_panels, save_figure
from lorabench.utils.seeding import derive_seed, derive_seed_list
from lorabench.utils.tables import Column, csv_text, markdown

LABELS = {"clip_i": "CLIP-I", "dino": "DINO", "csd": "CSD"}
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
    eval_seed: int = setting(0, doc="the seed the evaluation samples' initial latents derive from")


# -- the run ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One sequence run: the method's model (``model``: W0 + the method's deltas on the adapted layers)."""

    cfg: DictConfig
    run_dir: Path
    kind: str
    tasks: list[Task]
    method: ContinualMethod
    scorer: TaskScorer
    sampler_cfg: dict
    seeds: list[int]
    metric: ContinualScores
    device: torch.device
    model: Any = None  # a RunningModel, once the components are loaded
    records: dict = field(default_factory=dict)
    last_images: dict = field(default_factory=dict)

    def evaluate(self, module, t: int, rank: int, world_size: int) -> dict[str, list]:
        """The callback's ``evaluate``: fold task t in, then score tasks 0..t on the method's model."""
        t0 = time.perf_counter()
        adapters = module.adapters
        task = self.tasks[t]  # the task's update against the weights it trained on, on its own inputs
        measured = sizes.measure(self.model.components, adapters, [task.train_prompt or task.prompts[0]],
                                 {k: v for k, v in self.sampler_cfg.items() if k != "latent_seed"},
                                 module.device, seed=t)
        before = self.method.eval_deltas()
        task_vector = self.method.finish(adapters, t)
        for layer in adapters.layers.values():
            layer.multiplier = 0.0  # the adapter is folded into the method's state now
        self.model.set(adapters.base_weights(), self.method.eval_deltas())
        scores, images = score_tasks(self.model.components, self.sampler_cfg, self.tasks[:t + 1], self.seeds,
                                     self.scorer, rank, world_size, module.device)
        self.last_images = images
        self.records[t] = {"task": t, "name": self.tasks[t].name, "rows": rows_json(scores),
                           "sign_conflict": sign_conflict_ratio(task_vector, before), "update_size": measured,
                           "eval_s": time.perf_counter() - t0}
        return scores

    def base_scores(self, state: SequenceState) -> dict[str, list[float]]:
        """The base model's mean score per task and metric (the tables' reference row), kept in the state."""
        def score() -> dict[str, list[float]]:
            scores, _ = score_tasks(self.model.components, self.sampler_cfg, self.tasks, self.seeds, self.scorer,
                                    device=self.device)
            return {m: [float(v.mean()) for _, _, v in parts] for m, parts in scores.items()}

        return state.cached("base.json", score)

    def resume(self, state: SequenceState, progress: Session) -> int:
        """Replay the completed tasks' score rows into the metric and load the method's state after the
        last of them; returns how many tasks are done."""

        def replay(t: int, record: dict) -> None:
            self.records[t] = record
            self.metric.replay(t, record["rows"])
            progress.done(f"task {t + 1} ({record['name']}): resumed from {state.task_dir(t)}")

        done, method_state = state.replay(replay)
        if done:
            self.method.load_state_dict(method_state)
        return done

    def results(self, session: Session, base: Mapping) -> dict:
        """The run's results.json content (``base``: the base model's scores per task)."""
        cfg, mats, name = self.cfg, self.metric.matrices(), self.method.name
        fields, recs = sequence_results(mats), [self.records[t] for t in range(len(self.tasks))]
        for rec in recs:
            session.size_log.add(name, rec.get("update_size") or {})
        return session.results(
            kind=self.kind, method=name, method_config=OmegaConf.to_container(cfg.protocol.method, resolve=True),
            adapter=OmegaConf.to_container(cfg.protocol.adapter, resolve=True),
            order_seed=cfg.sequence.get("order_seed"), seed=int(cfg.seed), seeds=[int(cfg.seed)],
            tasks=[t.name for t in self.tasks], metrics=list(mats), num_tasks=len(self.tasks), **fields,
            base={n: {"per_task": v, "average_score": float(np.mean(v))} for n, v in base.items()},
            sign_conflict=[rec.get("sign_conflict") for rec in recs],
            update_size_per_task=[sizes.row_fields(rec.get("update_size") or {}) for rec in recs],
            timings={"train_s": [rec.get("train_s") for rec in recs], "eval_s": [rec.get("eval_s") for rec in recs],
                     "total_s": time.perf_counter() - session.t0},
            summary={name: {f"{n}/{q}": mean_std([v]) for n, s in fields["final"].items() for q, v in s.items()
                            if not math.isnan(v)}})

    def train_task(self, t: int, adapter_cfg: dict, callback: ContinualEvaluation, state: SequenceState) -> str:
        """Train task ``t`` (the callback scores every seen task at the end of the fit), save its state;
        returns the task's line for the console."""
        task, seed = self.tasks[t], int(self.cfg.seed)
        task_dir = self.run_dir / "tasks" / f"{t:02d}-{task.name}"
        tcfg = cell_config(self.cfg, OmegaConf.create(adapter_cfg), task.data,
                           derive_seed("continual-task", seed, t) % (2 ** 31), task_dir)
        callback.task = t
        modules: list = []  # the trained module, whose adapter comes out of the running model before the next task

        def prepare(module) -> None:  # after task t's adapter is injected: the method's model and initialisation
            modules.append(module)
            self.model.set(module.adapters.base_weights(), self.method.train_deltas())
            self.method.start(module.adapters, t)

        [done] = run_cells([Cell(tcfg, task_dir, f"{self.method.name}/{task.name}", callbacks=[callback],
                                 prepare=prepare, components=self.model.components)])
        results = done.results
        modules[0].adapters.remove()
        self.model.reset({})
        # fit_s includes the callback's evaluation at the end of the fit
        record = self.records[t]
        record.update(train_s=results["timings"]["fit_s"] - record["eval_s"], steps=results["metrics"]["steps"])
        state.save_task(t, self.method.state_dict(), record)
        modules.clear()
        m = self.metric.matrices()
        return (f"task {t + 1} ({task.name}): " + ", ".join(
            f"{LABELS.get(n, n)} S {average_score(m[n]):.3f} F {summary(m[n])['forgetting_ref']:.3f}" for n in m)
            + f" ({results['metrics']['steps']} steps, {record['train_s']:.0f} s train, {record['eval_s']:.0f} s eval)")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the sequence ``cfg`` describes (resuming from ``run_dir/state`` when it holds one)."""
    session = Session(cfg, Path(run_dir), "continual")
    run_dir = session.run_dir
    if cfg.get("adapter"):
        raise ConfigError("adapter", "this protocol trains protocol.adapter, not adapter; override that instead "
                          "(e.g. protocol.adapter.rank=8)")
    st = read_settings(ContinualSettings, cfg.protocol)
    if not st.adapter:
        raise ConfigError("protocol.adapter", "no adapter; add e.g. /adapter@protocol.adapter: lora")
    method = build_method(st.method or {})
    kind, tasks = resolve_sequence(cfg)
    n_img = int(cfg.eval.images_per_prompt)
    adapter_cfgs = [method.adapter_config(st.adapter, t, len(tasks)) for t in range(len(tasks))]
    keys = ("model", "data", "optim", "module", "seed", "sequence", "eval", "trainer")
    state = SequenceState(run_dir / "state", fingerprint(cfg, keys), [t.name for t in tasks])
    seed = int(cfg.seed)
    sampler_cfg = OmegaConf.to_container(cfg.eval.sampler, resolve=True)
    # the same n_img initial latents for every prompt: per-seed latents, or (eval.sampler.latent_seed, the
    # reference code's way) rows 0..n_img-1 of one batch drawn from that seed
    eval_seeds = list(range(n_img)) if sampler_cfg.get("latent_seed") is not None else \
        derive_seed_list("continual-eval", st.eval_seed, n_img)
    r = Run(cfg, run_dir, kind, tasks, method, build_scorer(cfg, kind), sampler_cfg, eval_seeds,
            ContinualScores(list(SUITES[kind][1]), len(tasks)), eval_device(cfg))

    state.start()
    loggers = session.open_loggers(f"continual-{method.name}-seed{seed}")
    callback = ContinualEvaluation(r.metric, r.evaluate, loggers, [t.name for t in tasks])
    session.count(len(tasks) + 1, desc=f"continual {method.name}")
    with quiet_cells():
        r.model = RunningModel(instantiate(cfg.model, _convert_="all"))
        base = r.base_scores(state)
        session.done("base model: " + ", ".join(f"{LABELS.get(m, m)} {np.mean(v):.3f}" for m, v in base.items()))
        for t in range(r.resume(state, session), len(tasks)):
            session.done(r.train_task(t, adapter_cfgs[t], callback, state))
        if not r.last_images:  # a finished run started again: show the final model's samples
            r.model.reset(method.eval_deltas())
            _, r.last_images = score_tasks(r.model.components, r.sampler_cfg, tasks, r.seeds, r.scorer, device=r.device)
            r.model.reset({})

    out = r.results(session, base)
    mats = r.metric.matrices()  # a collective under DDP: every rank calls it
    table = run_table(out) + "".join(f"\n\n{matrix_table(m, [t.name for t in tasks], LABELS.get(n, n))}"
                                     for n, m in mats.items())
    if not rank_zero():
        session.progress.close()
        return {**out, "table": table}
    save_figure(heatmap(mats, [t.name for t in tasks], title=f"{method.name}, order {out['order_seed']}, seed {seed}"),
                run_dir / "score_matrix.png")
    session.grid = [(f"task {t.index + 1}: {t.name}", r.last_images[t.index][:2 * n_img])
                    for t in tasks if t.index in r.last_images]
    return session.finish(out, table, f"{method.name}: each task's update size",
                          f"{method.name}, order {out['order_seed']}, seed {seed}, after the last task; each row: the "
                          f"task's first 2 prompts x {n_img} samples", step=len(tasks),
                          images={"score_matrix_final": run_dir / "score_matrix.png"})


def run_table(out: dict) -> str:
    """The run's own table: the base model and the method, Average Score, Forgetting and BWT per metric."""
    names, f = out["metrics"], out["final"]
    head = ["model", *(f"{q} {LABELS.get(n, n)}" for q in ("S", "F", "F textbook", "BWT") for n in names)]
    base = ["base model", *(f"{out['base'][n]['average_score']:.3f}" for n in names), *["-"] * (3 * len(names))]
    row = [out["method"], *(f"{f[n][q]:.3f}" for q in ("average_score", "forgetting_ref", "forgetting",
                                                       "backward_transfer") for n in names)]
    note = (f"{out['kind']}, {out['num_tasks']} tasks in order {', '.join(out['tasks'])} (order seed "
            f"{out['order_seed']}, training seed {out['seed']}). S: Average Score after the last task; F: Average "
            "Forgetting as the reference code computes it (divided by T); F textbook: divided by T - 1, last task "
            "left out; BWT: backward transfer.")
    return markdown(head, [base, row]) + "\n\n" + note


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
