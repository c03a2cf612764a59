"""The tasks of a continual sequence and how each is scored after every task: :class:`Task` (its data
and evaluation set), :func:`order` (the reference code's shuffle), :class:`TaskScorer` (per-image
scores against the task's references) and :func:`score_tasks` (sample and score the seen tasks, a
rank's share of them under DDP)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from lorabench.evaluation.scores import embed_batched
from lorabench.sampling import Sampler, eval_mode


@dataclass
class Task:
    """One task of a sequence: its position, name, data fields and evaluation set."""

    index: int
    name: str                      # the token (objects) or style word (styles)
    data: dict                     # data-config fields this task sets
    prompts: list[str]             # evaluation prompts
    references: torch.Tensor       # (N, 3, H, W) in [0, 1]
    train_prompt: str = ""


def order(names: Sequence[Any], order_seed: Optional[int]) -> list[Any]:
    """The task order: Python's ``random.shuffle`` seeded with ``order_seed`` (the reference code's
    shuffle, so an order seed gives the same order as theirs for the same list); ``None`` keeps it."""
    out = list(names)
    if order_seed is not None:
        random.Random(int(order_seed)).shuffle(out)
    return out


class TaskScorer:
    """Per-image scores of a task's samples: for each metric, the mean cosine of the image's embedding
    with every reference embedding of the task (the papers' "mean over all (generated, reference)
    pairs", kept per image so it can be sharded and gathered). References are embedded once per task;
    ``reference_embeddings`` counts how often that happened."""

    def __init__(self, embedders: Mapping[str, Any], batch_size: int = 256):
        self.embedders, self.batch_size = dict(embedders), batch_size
        self.refs: dict[int, dict[str, torch.Tensor]] = {}
        self.reference_embeddings = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, task: Task) -> dict[str, torch.Tensor]:
        if task.index not in self.refs:
            self.refs[task.index] = {m: embed_batched(e.embed_images, task.references, self.batch_size).float()
                                     for m, e in self.embedders.items()}
            self.reference_embeddings += 1
        out = {}
        for m, e in self.embedders.items():
            emb = embed_batched(e.embed_images, images, self.batch_size).float()
            out[m] = (emb @ self.refs[task.index][m].T).mean(1).double().cpu()
        return out


def score_tasks(components, sampler_cfg: dict, tasks: Sequence[Task], seeds: Sequence[int], scorer: TaskScorer,
                rank: int = 0, world_size: int = 1,
                device: Optional[torch.device] = None) -> tuple[dict[str, list], dict[int, torch.Tensor]]:
    """Sample this rank's share of every task's evaluation images (prompt-major: image k of task j is
    prompt k // len(seeds) from seed k % len(seeds)) on ``device`` (``None``: where the model is) and
    score them. Returns ``{metric: [(task, indices, values)]}`` and ``{task: images}``."""
    eval_mode(components, device)
    flat = [(t, k, p, s) for t in tasks for k, (p, s) in enumerate((p, s) for p in t.prompts for s in seeds)]
    mine = flat[rank::world_size]
    images = Sampler(components, **sampler_cfg)([p for *_, p, _ in mine], seeds=[s for *_, s in mine]) if mine else None
    scores: dict[str, list] = {m: [] for m in scorer.embedders}
    by_task: dict[int, torch.Tensor] = {}
    for t in tasks:
        pos = [i for i, (tt, *_) in enumerate(mine) if tt is t]
        if not pos:
            continue
        imgs = images[pos]
        by_task[t.index] = imgs
        index = torch.tensor([mine[i][1] for i in pos])
        for m, v in scorer(imgs, t).items():
            scores[m].append((t.index, index, v))
    return scores, by_task
