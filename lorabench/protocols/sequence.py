"""A task sequence run, the engine of a continual protocol: one continual method
(:mod:`lorabench.continual.methods`) over the tasks of the ``sequence`` config group, every seen task
scored after every task, and a killed run resumed where it stopped.

1. The sequence is resolved and checked before any work (:func:`lorabench.continual.tasks.resolve_sequence`):
   every task's data and evaluation set exist, no token twice, as many tasks as ``sequence.length`` asks.
2. The base model is scored on every task (the tables' reference row), once per run folder.
3. For each task t: the method sets the base weights (``train_deltas``) and initialises a fresh
   adapter, the task trains as a cell (:mod:`lorabench.protocols.cells`, the plain training of
   :func:`lorabench.run.train`), and at the end of the fit the
   :class:`~lorabench.continual.metrics.ContinualEvaluation` callback folds the adapter into the
   method's state and scores tasks 0..t from fixed initial latents and prompts: ``M[j, t]`` per metric.
4. The completed task's state (the method's tensors, its score rows, the RNG state) is written
   atomically to ``<run>/state/task_<t>`` (:class:`~lorabench.protocols.resume.SequenceState`). A run
   killed during task k and started again with the same command resumes at task k, and ends with the
   same results as an uninterrupted run.

:func:`run` does all of it and writes the run's own outputs (results.json with the score matrices,
table.md, score_matrix.png, samples.png); a continual paper's protocol file keeps its settings, its tables
across runs, its published numbers and its claims (:mod:`lorabench.protocols.continual`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lorabench.continual.methods import ContinualMethod, RunningModel, sign_conflict_ratio
from lorabench.continual.metrics import (
    ContinualEvaluation,
    ContinualScores,
    average_score,
    gather_rows,
    heatmap,
    matrix_table,
    rows_json,
    sequence_results,
    summary,
)
from lorabench.continual.tasks import LABELS, SUITES, Task, TaskScorer, build_scorer, resolve_sequence, score_tasks
from lorabench.protocols import sizes
from lorabench.protocols.base import mean_std
from lorabench.protocols.cells import Cell, base_model, cell_config, run_cells
from lorabench.protocols.report import Session
from lorabench.protocols.resume import SequenceState, fingerprint, rank_zero
from lorabench.sampling import eval_device
from lorabench.utils.console import quiet_cells
from lorabench.utils.plots import save_figure
from lorabench.utils.seeding import derive_seed, derive_seed_list
from lorabench.utils.tables import markdown

# what decides a resumed run's results besides the protocol block (resume.fingerprint)
STATE_KEYS = ("model", "data", "optim", "module", "seed", "sequence", "eval", "trainer")


@dataclass
class SequenceRun:
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
        self.records[t] = {"task": t, "name": self.tasks[t].name, "rows": gather_rows(rows_json(scores)),
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

    def results(self, session: Session, base: Mapping, mats: Mapping[str, torch.Tensor]) -> dict:
        """The run's results.json content (``base``: the base model's scores per task; ``mats``: the metric's
        final matrices)."""
        cfg, name = self.cfg, self.method.name
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
                            if not math.isnan(v)}},
            # the run table's S and F columns, a sweep's summary shows them per job (lorabench.sweeps)
            headline=[[f"{q} {LABELS.get(n, n)}", s[key]] for q, key in (("S", "average_score"),
                                                                          ("F", "forgetting_ref"))
                      for n, s in fields["final"].items()])  # [label, value] pairs: JSON keeps their order

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
                                 prepare=prepare, components=self.model.components, source="protocol.adapter")])
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


def run(session: Session, method: ContinualMethod, adapter: dict, eval_seed: int) -> dict[str, Any]:
    """Run the sequence ``session.cfg`` describes with ``method``, each task training a fresh ``adapter``
    (the method's :meth:`adapter_config` of it), resuming from ``<run>/state`` when it holds one; writes the
    run's outputs and returns results.json's content. ``eval_seed``: the seed the evaluation samples' initial
    latents derive from."""
    cfg, run_dir = session.cfg, session.run_dir
    kind, tasks = resolve_sequence(cfg)
    n_img = int(cfg.eval.images_per_prompt)
    adapter_cfgs = [method.adapter_config(adapter, t, len(tasks)) for t in range(len(tasks))]
    state = SequenceState(run_dir / "state", fingerprint(cfg, STATE_KEYS), [t.name for t in tasks])
    seed = int(cfg.seed)
    sampler_cfg = OmegaConf.to_container(cfg.eval.sampler, resolve=True)
    # the same n_img initial latents for every prompt: per-seed latents, or (eval.sampler.latent_seed, the
    # reference code's way) rows 0..n_img-1 of one batch drawn from that seed
    eval_seeds = list(range(n_img)) if sampler_cfg.get("latent_seed") is not None else \
        derive_seed_list("continual-eval", eval_seed, n_img)
    r = SequenceRun(cfg, run_dir, kind, tasks, method, build_scorer(cfg, kind), sampler_cfg, eval_seeds,
                    ContinualScores(list(SUITES[kind][1]), len(tasks)), eval_device(cfg))

    # an adapter config the model cannot take: one line before the run's state and scores
    r.model = RunningModel(base_model(cfg, [("protocol.adapter", a) for a in adapter_cfgs]))
    state.start()
    loggers = session.open_loggers(f"{session.protocol}-{method.name}-seed{seed}", resumed=state.completed() > 0)
    callback = ContinualEvaluation(r.metric, r.evaluate, loggers, [t.name for t in tasks])
    session.count(len(tasks) + 1, desc=f"{session.protocol} {method.name}")
    with quiet_cells():
        base = r.base_scores(state)
        session.done("base model: " + ", ".join(f"{LABELS.get(m, m)} {np.mean(v):.3f}" for m, v in base.items()))
        for t in range(r.resume(state, session), len(tasks)):
            session.done(r.train_task(t, adapter_cfgs[t], callback, state))
        if not r.last_images:  # a finished run started again: show the final model's samples
            r.model.reset(method.eval_deltas())
            _, r.last_images = score_tasks(r.model.components, r.sampler_cfg, tasks, r.seeds, r.scorer, device=r.device)
            r.model.reset({})

    mats = r.metric.matrices()  # a collective under DDP: every rank calls it
    out = r.results(session, base, mats)
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
