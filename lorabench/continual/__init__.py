"""Low-rank continual personalization: the methods that pass one adapter (or one merged model) from
task to task (:mod:`lorabench.continual.methods`), the tasks and how they are scored
(:mod:`lorabench.continual.tasks`), and the score matrix, Average Score and Average Forgetting as a
torchmetrics Metric with the Lightning callback that logs them (:mod:`lorabench.continual.metrics`).
The protocol is :mod:`lorabench.protocols.continual`."""

from lorabench.continual.methods import (
    CONTINUAL,
    ContinualMethod,
    build_method,
    magmax_select,
    method_names,
    orthogonal_columns,
    register_continual,
    sign_conflict_ratio,
)
from lorabench.continual.metrics import (
    ContinualEvaluation,
    ContinualScores,
    average_score,
    backward_transfer,
    forgetting,
    summary,
)
from lorabench.continual.tasks import Task, TaskScorer, order, score_tasks

__all__ = [
    "CONTINUAL",
    "ContinualEvaluation",
    "ContinualMethod",
    "ContinualScores",
    "Task",
    "TaskScorer",
    "average_score",
    "backward_transfer",
    "build_method",
    "forgetting",
    "magmax_select",
    "method_names",
    "order",
    "orthogonal_columns",
    "register_continual",
    "score_tasks",
    "sign_conflict_ratio",
    "summary",
]
