"""The continual score matrix and what the papers compute from it, as a torchmetrics Metric, and the
Lightning callback that evaluates and logs it at the end of every task.

``M[j, i]``: the score of task j's evaluation prompts after training task i (j <= i; undefined above).
With T tasks seen (0-based columns, the last one T - 1):

- Average Score ``S_T = (1/T) sum_j M[j, T-1]``.
- Average Forgetting, reference code (``forgetting_ref``):
  ``F_T = (1/T) sum_{j < T} (max_{i in [j, T-1]} M[j, i] - M[j, T-1])``: divides by T, the last task
  contributes 0, and the max includes the final column, so every term is >= 0.
- Average Forgetting, textbook (Chaudhry et al. 2018; ``forgetting``):
  ``F_T = (1/(T-1)) sum_{j < T-1} (max_{i in [j, T-2]} M[j, i] - M[j, T-1])``: leaves the last task
  out, and the max runs over the evaluations before the final one (a term can be negative).
- Backward transfer (Lopez-Paz & Ranzato 2017): ``BWT = (1/(T-1)) sum_{j < T-1} (M[j, T-1] - M[j, j])``.

The Metric keeps per-image scores ``(metric, task, after, image index, value)`` rather than sums:
its ``cat`` states gather across DDP ranks, ``compute`` drops duplicate indices (padding) and averages
in index order, so one process and N ranks give identical numbers.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lorabench.utils.plots import figure
from lorabench.utils.tables import markdown

STATES = ("rows_metric", "rows_task", "rows_after", "rows_index", "rows_value")


# -- the formulas, on one (T, T) matrix with NaN above the diagonal ------------------------------------
def _seen(m: torch.Tensor) -> int:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (T, T) score matrix, got {tuple(m.shape)}")
    return m.shape[0]


def average_score(m: torch.Tensor) -> float:
    """Average Score ``S_T``: the mean of the last column (every seen task after the last one)."""
    return float(m[:, -1].double().mean()) if _seen(m) else math.nan


def forgetting(m: torch.Tensor, definition: str = "textbook") -> float:
    """Average forgetting after the last column; ``definition``: ``textbook`` (1/(T-1)) or ``reference`` (1/T)."""
    t = _seen(m)
    m = m.double()
    if definition == "reference":
        terms = [float(m[j, j:].max() - m[j, -1]) for j in range(t)]
        return sum(terms) / t if t else math.nan
    if definition == "textbook":
        if t < 2:
            return math.nan
        terms = [float(m[j, j:t - 1].max() - m[j, -1]) for j in range(t - 1)]
        return sum(terms) / (t - 1)
    raise ValueError(f"unknown forgetting definition {definition!r}; valid: textbook, reference")


def backward_transfer(m: torch.Tensor) -> float:
    """Backward transfer ``(1/(T-1)) sum_{j < T-1} (M[j, T-1] - M[j, j])``."""
    t = _seen(m)
    if t < 2:
        return math.nan
    m = m.double()
    return float(sum(m[j, -1] - m[j, j] for j in range(t - 1)) / (t - 1))


def summary(m: torch.Tensor) -> dict[str, float]:
    """Every quantity of the module docstring, from a (T, T) matrix."""
    return {"average_score": average_score(m), "forgetting": forgetting(m, "textbook"),
            "forgetting_ref": forgetting(m, "reference"), "backward_transfer": backward_transfer(m)}


def sequence_results(matrices: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """What a run's results.json keeps of its (T, T) matrices: ``matrices`` (not-yet-scored entries as null),
    ``final`` (:func:`summary` after the last task) and ``curves`` (each quantity after every task)."""
    after = {n: [summary(m[:t + 1, :t + 1]) for t in range(m.shape[0])] for n, m in matrices.items()}
    return {"matrices": {n: [[None if math.isnan(x) else x for x in row] for row in m.tolist()]
                         for n, m in matrices.items()},
            "final": {n: summary(m) for n, m in matrices.items()},
            "curves": {n: {q: [s[q] for s in after[n]] for q in summary(m)} for n, m in matrices.items()}}


class ContinualScores(Metric):
    """The score matrices of one sequence, one per metric name (CLIP-I, DINO, CSD, ...).

    ``update(metric, task, after, index, values)``: per-image scores of task ``task``'s evaluation
    images ``index`` after training task ``after``. ``matrix(name)``: the (T, T) matrix of the tasks
    seen so far; ``compute()``: ``{<name>/<quantity>: value}`` after the last task seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, names: Sequence[str], num_tasks: int, **kwargs):
        super().__init__(**kwargs)
        self.names, self.num_tasks = list(names), int(num_tasks)
        for state in STATES:
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, metric: str, task: int, after: int, index: torch.Tensor, values: torch.Tensor) -> None:
        if metric not in self.names:
            raise ValueError(f"unknown metric {metric!r}; this matrix holds {', '.join(self.names)}")
        if not 0 <= task <= after < self.num_tasks:
            raise ValueError(f"need 0 <= task ({task}) <= after ({after}) < {self.num_tasks}")
        index, values = torch.as_tensor(index).long().flatten(), torch.as_tensor(values).double().flatten()
        if len(index) != len(values):
            raise ValueError(f"{len(index)} indices for {len(values)} values")
        n = len(index)
        self.rows_metric.append(torch.full((n,), self.names.index(metric), dtype=torch.long, device=self.device))
        self.rows_task.append(torch.full((n,), task, dtype=torch.long, device=self.device))
        self.rows_after.append(torch.full((n,), after, dtype=torch.long, device=self.device))
        self.rows_index.append(index.to(self.device))
        self.rows_value.append(values.to(self.device))

    def _rows(self) -> torch.Tensor:
        """Unique rows (metric, task, after, index, value), sorted: one value per image."""
        if isinstance(self.rows_value, list) and not self.rows_value:
            return torch.zeros(0, 5, dtype=torch.float64)
        cols = [dim_zero_cat(getattr(self, s)).double().cpu() for s in STATES]
        rows = torch.stack(cols, 1)
        keys = rows[:, :4].long()
        order = torch.from_numpy(np.lexsort(keys.T.flip(0).numpy()))
        rows, keys = rows[order], keys[order]
        keep = torch.ones(len(rows), dtype=torch.bool)
        keep[1:] = (keys[1:] != keys[:-1]).any(1)
        return rows[keep]

    def matrices(self) -> dict[str, torch.Tensor]:
        """``{name: (T_seen, T_seen)}``, NaN where nothing was scored (above the diagonal); gathered
        from every rank when torch.distributed runs."""
        if not self._is_synced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with self.sync_context():
                return self._matrices()
        return self._matrices()

    def _matrices(self) -> dict[str, torch.Tensor]:
        rows = self._rows()
        seen = int(rows[:, 2].max()) + 1 if len(rows) else 0
        out = {}
        for mi, name in enumerate(self.names):
            total = torch.zeros(seen, seen, dtype=torch.float64)
            count = torch.zeros(seen, seen, dtype=torch.float64)
            sel = rows[rows[:, 0] == mi]
            for _, j, i, _, v in sel.tolist():  # sorted by index: the same order on any number of ranks
                total[int(j), int(i)] += v
                count[int(j), int(i)] += 1
            out[name] = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
        return out

    def compute(self) -> dict[str, float]:
        return {f"{name}/{k}": v for name, m in self._matrices().items() for k, v in summary(m).items()}

    def replay(self, after: int, rows: Mapping[str, list]) -> None:
        """Put back the scores recorded after task ``after`` (:func:`rows_json`'s form), e.g. on resume."""
        for m, parts in rows.items():
            for j, idx, vals in parts:
                self.update(m, j, after, torch.tensor(idx), torch.tensor(vals, dtype=torch.float64))


def gather_rows(rows: Mapping[str, list]) -> dict[str, list]:
    """Every rank's score rows (:func:`rows_json`'s form), joined, when torch.distributed runs (a collective: every
    rank calls it); else ``rows``. What rank zero records for a resumed run to replay: its own shard alone made a
    two-rank sequence resumed after task 1 score task 1's column on half the images."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(rows)
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, dict(rows))
    return {m: [part for shard in shards for part in shard.get(m, [])] for m in rows}


def rows_json(scores: Mapping[str, list]) -> dict[str, list]:
    """Score rows ``{metric: [(task, indices, values)]}`` as JSON: ``{metric: [[task, [indices], [values]]]}``."""
    return {m: [[int(j), idx.tolist(), vals.tolist()] for j, idx, vals in parts] for m, parts in scores.items()}


def matrix_table(m: torch.Tensor, tasks: Sequence[str], name: str = "") -> str:
    """A score matrix as a markdown table with labelled rows and columns: row ``j`` is the evaluated task
    (``task j: <name>``), column ``i`` the state after training task ``i``; ``M[j, i]`` is task ``j``'s score
    after task ``i`` (blank above the diagonal: task ``j`` not trained yet). The last column is the final
    model; Average Score is its mean, and a row falling from its diagonal entry is forgetting."""
    t = m.shape[0]
    head = [f"{name} (row: evaluated task, column: after task)" if name else "evaluated task \\ after task",
            *[f"after {i + 1}" for i in range(t)]]
    rows = [[f"task {j + 1}: {tasks[j]}", *["" if i < j or torch.isnan(m[j, i]) else f"{float(m[j, i]):.3f}"
                                            for i in range(t)]] for j in range(t)]
    return markdown(head, rows)


def heatmap(matrices: dict[str, torch.Tensor], tasks: Sequence[str], title: str = ""):
    """A matplotlib figure: one heatmap of M[j, i] per metric (rows: evaluated task, columns: after task)."""
    fig, axes = figure(len(matrices), figsize=(4.2 * len(matrices), 3.8))
    for ax, (name, m) in zip(axes[0], matrices.items()):
        t = m.shape[0]
        im = ax.imshow(m.numpy(), cmap="viridis")
        ax.set_xticks(range(t), [f"{k}" for k in range(1, t + 1)])
        ax.set_yticks(range(t), list(tasks[:t]))
        ax.set_xlabel("after task")
        ax.set_ylabel("evaluated task")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class ContinualEvaluation(L.Callback):
    """At the end of each task's fit: score every task seen so far and log the continual metrics.

    ``evaluate(module, task, rank, world_size)`` is the protocol's: it folds the trained adapter into
    the method's state and returns ``{metric: [(task j, image indices, per-image values)]}`` for this
    rank's share of the evaluation images (shards never overlap; a duplicate would be dropped anyway).
    The callback feeds them to the :class:`ContinualScores` metric (synced across ranks when
    torch.distributed runs), and rank zero logs to ``loggers`` (the sequence's, not the task's, so a
    W&B run spans the whole sequence): Average Score, both Forgetting definitions and BWT per metric as
    curves over tasks, the M heatmap as an image, and the matrices as a W&B table."""

    def __init__(self, metric: ContinualScores, evaluate: Callable, loggers: Sequence, tasks: Sequence[str]):
        self.metric, self.evaluate, self.loggers, self.tasks = metric, evaluate, list(loggers), list(tasks)
        self.task: Optional[int] = None
        self.logged: dict[str, float] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        t = int(self.task)
        scores = self.evaluate(pl_module, t, trainer.global_rank, trainer.world_size)
        for name, parts in scores.items():
            for j, index, values in parts:
                self.metric.update(name, j, t, index, values)
        values = self.metric.compute()  # both gather across ranks: every rank calls them
        matrices = self.metric.matrices()
        if trainer.is_global_zero:
            self.log_task(t, values, matrices)

    def log_task(self, t: int, values: dict[str, float], matrices: dict[str, torch.Tensor]) -> None:
        """Log task ``t``'s quantities as curves, the score matrix as a heatmap and as tables."""
        self.logged = {f"continual/{k}": v for k, v in values.items() if not math.isnan(v)}
        fig = heatmap(matrices, self.tasks, title=f"after task {t + 1}")
        for lg in self.loggers:
            lg.log_metrics({**self.logged, "continual/task": t + 1}, step=t)
            if hasattr(lg, "log_image"):
                lg.log_image("continual/score_matrix", [fig], step=t)
            if hasattr(lg, "log_table"):
                for name, m in matrices.items():
                    columns = ["task", *[f"after_{i + 1}" for i in range(m.shape[1])]]
                    data = [[self.tasks[j], *[None if math.isnan(x) else x for x in m[j].tolist()]]
                            for j in range(m.shape[0])]
                    lg.log_table(f"continual/M_{name}", columns=columns, data=data, step=t)
            if hasattr(lg, "save"):
                lg.save()
