"""The tasks of a continual sequence and how each is scored after every task: :class:`Task` (its data
and evaluation set), :func:`resolve_sequence` (the ``sequence`` config group as tasks, every check before
any training), :func:`order` (the reference code's shuffle), :class:`TaskScorer` (per-image scores
against the task's references; :func:`build_scorer` from ``cfg.eval``) and :func:`score_tasks` (sample
and score the seen tasks, a rank's share of them under DDP)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.data.prepare import read_manifest
from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.evaluation.scores import embed_batched
from lorabench.sampling import Sampler, eval_mode

KINDS = ("objects", "styles")
# kind -> (eval set key, {metric: (scorer key, embedder attribute)})
SUITES = {"objects": ("concepts", {"clip_i": ("scorer", "text_image"), "dino": ("scorer", "identity")}),
          "styles": ("styles", {"csd": ("style_scorer", "style"), "dino": ("scorer", "identity")})}
LABELS = {"clip_i": "CLIP-I", "dino": "DINO", "csd": "CSD"}  # the metrics' names in tables and plots


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


# -- the sequence config: its tasks and their scorer ---------------------------------------------------------
def resolve_sequence(cfg: DictConfig) -> tuple[str, list[Task]]:
    """``(kind, tasks)`` in training order, each with its evaluation prompts and references; every
    check of the sequence happens here, before any training."""
    seq = cfg.get("sequence")
    if not seq:
        raise ConfigError("sequence", "no sequence; add one, e.g. sequence=world_objects")
    kind = str(seq.get("kind"))
    if kind not in KINDS:
        raise choice_error("sequence.kind", kind, KINDS)
    entries = OmegaConf.to_container(seq.tasks, resolve=True) if seq.get("tasks") else []
    if seq.get("manifest"):
        if entries:
            raise ConfigError("sequence.tasks", "give the tasks or sequence.manifest, not both")
        entries = manifest_tasks(seq.manifest, kind)
    data_key = str(seq.get("data_key") or ("concept" if kind == "objects" else "style"))
    # the data fields a task sets: each task's cell would add one the data group does not take, and fail in its
    # instantiation (a traceback after the base model's evaluation)
    fields = [k for k in (cfg.get("data") or {}) if k != "_target_"]
    if fields and data_key not in fields:
        raise ConfigError("sequence.data_key", f"{data_key!r} is not a field of data; valid: {', '.join(fields)}")
    items = []
    for i, e in enumerate(entries):
        e = {"name": e} if isinstance(e, str) else dict(e)
        if not e.get("name"):
            raise ConfigError(f"sequence.tasks[{i}]", "needs a name (the task's token or style word)")
        unknown = [k for k in (e.get("data") or {}) if fields and k not in fields]
        if unknown:
            raise ConfigError(f"sequence.tasks.{e['name']}.data.{unknown[0]}",
                              f"not a field of data; valid: {', '.join(fields)}")
        items.append((str(e["name"]), {data_key: str(e["name"]), **dict(e.get("data") or {})}))
    names = [n for n, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError("sequence.tasks", f"token {dup[0]!r} is listed twice; every task needs its own token")
    length = len(items) if seq.get("length") is None else check_int(seq.get("length"), "sequence.length", minimum=1)
    if len(items) < length:
        raise ConfigError("sequence.length", f"asks for {length} tasks, the sequence lists {len(items)}; "
                          f"give at least {length} tasks or lower sequence.length")
    # >= 0: Python's random seeds an int by its absolute value, so order -1 was order 1 under another name
    items = order(items[:length], check_int(seq.get("order_seed"), "sequence.order_seed", minimum=0, allow_none=True))
    sets_key, _ = SUITES[kind]
    if cfg.get("eval") is None or sets_key not in cfg.eval:
        raise ConfigError(f"eval.{sets_key}", f"a {kind} sequence needs eval.{sets_key}; use e.g. eval=world")
    eval_sets = instantiate(cfg.eval[sets_key])
    tasks = []
    for i, (name, data) in enumerate(items):
        path = data.get("path")
        if path is not None and not Path(str(path)).exists():
            raise ConfigError(f"sequence.tasks.{name}.data.path", f"{path} does not exist; each task needs its images")
        try:
            es = eval_sets(name)
            refs = eval_sets.references(name) if kind == "styles" else es.references
        except ConfigError as err:
            raise ConfigError(f"sequence.tasks.{name}", f"no data or evaluation set for this task ({err})") from err
        tasks.append(Task(i, name, data, list(es.prompts), refs))
    return kind, tasks


def manifest_tasks(path, kind: str) -> list[dict]:
    """The sequence's tasks from a prepared style dataset (the reference's config.json order): each
    trains on its five images with "{style} image of {train object}", the reference's prompt."""
    if kind != "styles":
        raise ConfigError("sequence.manifest", "only style sequences read a manifest; list object tasks in "
                          "sequence.tasks")
    root, tasks = read_manifest(path)
    out = []
    for i, t in enumerate(tasks):
        if not all(k in t for k in ("name", "style", "train_object", "train_path")):
            raise ConfigError("sequence.manifest", f"{path}: task {i} lacks name, style, train_object or train_path")
        out.append({"name": t["name"], "data": {"path": str(root / t["train_path"]),
                                                 "instance_prompt": f"{t['style']} image of {t['train_object']}"}})
    return out


def build_scorer(cfg: DictConfig, kind: str) -> TaskScorer:
    """The task scorer of a ``kind`` sequence: its metrics' embedders, from ``cfg.eval``."""
    _, metrics = SUITES[kind]
    scorers = {}
    for key in {k for k, _ in metrics.values()}:
        if key not in cfg.eval:
            raise ConfigError(f"eval.{key}", f"a {kind} sequence scores with eval.{key}; use e.g. eval=world")
        scorers[key] = instantiate(cfg.eval[key])
    return TaskScorer({m: getattr(scorers[k], attr) for m, (k, attr) in metrics.items()})
