"""Cells: what every protocol trains. A cell is one adapter trained on one dataset with one seed;
a protocol is a loop over cells, then sampling and scoring.

- :func:`protocol_inputs`: the protocol's adapters, items and seeds, checked before any work;
- :func:`cell_config`: a cell's plain training config (the protocol's, with its adapter and data set);
- :func:`cell_key`, :func:`cached_cell`, :func:`trained_cell`: a cache of trained cells keyed by what
  decides the result, shared by runs and sweep jobs;
- :func:`pretrain_cells`: the uncached cells trained first, several at a time in spawned processes;
- :func:`train_cells`: train and score every (adapter, item, seed) cell;
- :func:`compare_with_base`: the single-concept and single-style loop (the base model, then every cell).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.adapters import Adapters, load_adapter
from lorabench.adapters.tokens import ConceptTokens, check_tokens_config, for_concept, load_tokens
from lorabench.errors import ConfigError, check_int
from lorabench.protocols.sizes import row_fields
from lorabench.run import train, train_batched
from lorabench.utils.console import CellProgress, quiet_cells

# evaluate(components, item, seed, method) -> (scores, images)
Evaluate = Callable[..., tuple[dict, torch.Tensor]]
# measure(module, item, seed, method) -> the trained adapter's update size (lorabench.protocols.sizes.measure)
Measure = Callable[..., dict]


def protocol_inputs(cfg: DictConfig, items_key: str, example: str) -> tuple[dict, list[str], list[int]]:
    """The protocol's adapters, items (``protocol.<items_key>``) and seeds, checked before any work. An
    adapter set to null (``protocol.adapters.<name>: null``) is dropped: how an experiment that extends
    another leaves out some of its adapters."""
    p = cfg.protocol
    for key in ("adapter", "embeddings"):
        if cfg.get(key):
            raise ConfigError(key, f"this protocol trains protocol.adapters.<name>, not {key}; override "
                              "those instead (e.g. protocol.adapters.lora.rank=8)")
    adapters = {k: v for k, v in (p.get("adapters") or {}).items() if v is not None}
    if not adapters:
        raise ConfigError("protocol.adapters", "no adapters to compare; add e.g. /adapter@protocol.adapters.lora: lora")
    items = list(p.get(items_key) or [])
    seeds = [check_int(s, f"protocol.seeds[{i}]") for i, s in enumerate(p.get("seeds") or [])]
    if not items:
        raise ConfigError(f"protocol.{items_key}", f"empty; give at least one name (e.g. [{example}])")
    if len(set(items)) < len(items):
        raise ConfigError(f"protocol.{items_key}", f"lists a name twice: {items}")
    if not seeds:
        raise ConfigError("protocol.seeds", "empty; give at least one seed")
    check_batch_cells(p.get("batch_cells", 1))
    return adapters, items, seeds


# what an adapter entry's ``recipe`` may override: the training groups of its cells
RECIPE_GROUPS = ("optim", "trainer", "data", "module")


def cell_config(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cell_dir: Path) -> DictConfig:
    """The plain training config of one cell: the protocol's config with its adapter group swapped in
    and ``data`` (e.g. ``{"concept": "sks"}``) set. An adapter entry's ``embeddings`` (new tokens, e.g.
    textual inversion) become the cell's ``embeddings`` group, a null token or bind named after the
    concept's word (``data["word"]``, else ``data["concept"]``; ``word`` is not a data field); an entry
    with embeddings and no ``name`` trains the tokens alone. An entry's ``recipe`` (``{optim: ...,
    trainer: ..., data: ..., module: ...}``) overrides those groups for its cells: a baseline trained
    with its own published settings. W&B stays with the protocol's own run; each
    cell logs to CSV in its folder."""
    data = dict(data)
    word = data.pop("word", None) or data.get("concept")
    cell = copy.deepcopy(cfg)
    adapter_cfg = copy.deepcopy(adapter_cfg)
    recipe = None
    if adapter_cfg is not None and adapter_cfg.get("recipe") is not None:
        with open_dict(adapter_cfg):
            recipe = OmegaConf.to_container(adapter_cfg.pop("recipe"), resolve=True)
        bad = sorted(set(recipe) - set(RECIPE_GROUPS))
        if bad:
            raise ConfigError("protocol.adapters.*.recipe", f"{bad[0]!r} is not a training group; a recipe overrides "
                              f"{', '.join(RECIPE_GROUPS)}")
    embeddings = None
    if adapter_cfg is not None and adapter_cfg.get("embeddings") is not None:
        with open_dict(adapter_cfg):
            embeddings = adapter_cfg.pop("embeddings")
        if adapter_cfg.get("name") is None:
            adapter_cfg = None
        embeddings = OmegaConf.create(for_concept(OmegaConf.to_container(embeddings, resolve=True), word))
    with open_dict(cell):
        cell.adapter = adapter_cfg
        if embeddings is not None:
            cell.embeddings = embeddings
        for group, values in (recipe or {}).items():  # the method's own training recipe (e.g. Mix-of-Show's)
            cell[group] = OmegaConf.merge(cell[group], values)
        for key, value in data.items():
            cell.data[key] = value
        cell.seed = seed
        cell.paths.output_dir = str(cell_dir)
        cell.logger = {"wandb": None}
        cell.protocol = None
        cell.resume = None  # a cell resumes from its own folder's checkpoint, never from the protocol's resume
        if cell.get("eval") is not None:
            cell.eval.validation = None  # a cell is scored by its protocol, not sampled while it trains
    return cell


# Options added after results were cached, off when null: a null one hashes as if the key were not there.
OFF_WHEN_NULL = {"module": ("snr_gamma", "ema_decay"), "data": ("buckets",)}


def config_hash(cfg: DictConfig, keys: Sequence[str], length: int = 12, extra: Mapping | None = None) -> str:
    """A hash of the config groups ``keys`` (resolved) and ``extra``, leaving out the trainer's display
    options, ``module.cuda_graph`` and ``eval.validation``: what decides a result, not where it is written,
    how it is shown or how its steps are launched (a captured step computes what an eager one does)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys if k in cfg}
    keep["trainer"] = {k: v for k, v in (keep.get("trainer") or {}).items()
                       if k not in ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")}
    if isinstance(keep.get("module"), dict):  # how steps are launched (CUDA graphs), not what they compute
        keep["module"] = {k: v for k, v in keep["module"].items() if k != "cuda_graph"}
    for group, names in OFF_WHEN_NULL.items():  # options added later hash as absent while off: caches stay valid
        if isinstance(keep.get(group), dict):
            keep[group] = {k: v for k, v in keep[group].items() if not (k in names and v is None)}
    if isinstance(keep.get("eval"), dict):  # a training run's samples (eval.validation) score nothing
        keep["eval"] = {k: v for k, v in keep["eval"].items() if k != "validation"}
        if not keep["eval"]:  # no eval group: as before eval.validation existed
            del keep["eval"]
    keep.update(extra or {})
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cell_key(cell: DictConfig) -> str:
    """A hash of everything that decides what a cell trains (model, adapter, data, optimiser, trainer,
    module, seed), not where it is written or logged: equal keys train equal adapters."""
    return config_hash(cell, ("model", "adapter", "embeddings", "data", "optim", "trainer", "module", "seed",
                              "init_adapter"))


def cached_cell(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cache_root: Path,
                name: str) -> tuple[Path, bool]:
    """``(cell_dir, finished)``: where the cell trains (``cache_root/<name>-<key>/``) and whether a
    finished one is there (its results.json, the last thing training writes, and its adapter or tokens)."""
    probe = cell_config(cfg, adapter_cfg, data, seed, Path("."))
    cell_dir = Path(cache_root) / f"{name}-{cell_key(probe)}"
    files = (["adapter.safetensors"] if probe.get("adapter") else []) + \
        (["embeddings.safetensors"] if probe.get("embeddings") else [])
    return cell_dir, (cell_dir / "results.json").is_file() and all((cell_dir / f).is_file() for f in files)


def trained_cell(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cache_root: Path,
                 name: str) -> tuple[Path, dict, bool]:
    """Train one cell into ``cache_root/<name>-<key>/`` unless a finished one is there already.

    Returns ``(cell_dir, training results, reused)``. An interrupted cell is trained again. Protocols and
    sweep jobs that share ``cache_root`` train each (adapter, concept, seed) once."""
    cell_dir, finished = cached_cell(cfg, adapter_cfg, data, seed, cache_root, name)
    if finished:
        return cell_dir, json.loads((cell_dir / "results.json").read_text()), True
    results, module = train(cell_config(cfg, adapter_cfg, data, seed, cell_dir), cell_dir, config_name=name)
    del module
    return cell_dir, results, False


@contextmanager
def loaded_cell(components, cell_dir: Path) -> Iterator[tuple[Optional[Adapters], Optional[ConceptTokens]]]:
    """A trained cell in ``components`` for the ``with`` block: its adapter (``adapter.safetensors``) and
    its new tokens (``embeddings.safetensors``), whichever it has; both are removed afterwards."""
    adapters = tokens = None
    try:
        if (cell_dir / "adapter.safetensors").is_file():
            adapters = load_adapter(components, cell_dir / "adapter.safetensors")
        if (cell_dir / "embeddings.safetensors").is_file():
            tokens = load_tokens(components, cell_dir / "embeddings.safetensors")
        yield adapters, tokens
    finally:
        if tokens is not None:
            tokens.remove()
        if adapters is not None:
            adapters.remove()


def check_cell_tokens(cfg: DictConfig, adapters: Mapping[str, DictConfig], items: Sequence[str],
                      data: Mapping[str, Mapping]) -> None:
    """Concepts that would be merged side by side need their own tokens and words: two items whose cells
    resolve to one token (or one bound word) for an adapter with embeddings is a one-line error. Each
    cell's token config is checked too."""
    for name, acfg in adapters.items():
        if acfg is None or acfg.get("embeddings") is None:
            continue
        seen: dict[tuple[str, str], str] = {}
        for item in items:
            emb = cell_config(cfg, acfg, data[item], 0, Path(".")).embeddings
            check_tokens_config(OmegaConf.to_container(emb), f"protocol.adapters.{name}.embeddings")
            for key in ("token", "bind"):
                value = emb.get(key)
                if value is None:
                    continue
                if (key, value) in seen:
                    raise ConfigError(f"protocol.adapters.{name}.embeddings.{key}",
                                      f"{seen[key, value]!r} and {item!r} both get {value!r}; each concept needs "
                                      "its own (e.g. <${{data.concept}}>)")
                seen[key, value] = item


# Data fields that say which concept or style a cell learns and where its files go: cells that differ
# only in these (and in their seed, an OrthA concept's rows) can train in one batched pass.
MEMBER_DATA_KEYS = ("concept", "style", "name", "folder", "path", "seed", "data_seed", "sample_seed",
                    "instance_prompt", "class_data_dir", "class_prompt", "exclude_contexts")
MEMBER_ADAPTER_KEYS = ("concept_key", "slot")


def batch_key(cell: Mapping) -> Optional[str]:
    """Which cells can train together, K adapters stacked in one model (:func:`lorabench.run.train_batched`),
    each exactly as it would alone: cells with equal keys; ``None`` for a cell that trains alone.

    Alone: full fine-tuning; an adapter with dropout (its masks would come from one shared generator);
    new tokens that no word is bound to; 8-bit AdamW (its quantisation blocks span members); a compiled
    UNet; user callbacks; several devices. Cells batch when everything
    else is equal: model, adapter (but an OrthA concept's rows), new tokens (but their names), optimiser,
    trainer, module, data (but the concept or style and its files)."""
    cell = OmegaConf.to_container(cell, resolve=True) if OmegaConf.is_config(cell) else dict(cell)
    adapter, trainer = cell.get("adapter"), dict(cell.get("trainer") or {})
    module, optim = dict(cell.get("module") or {}), dict(cell.get("optim") or {})
    embeddings = cell.get("embeddings")
    if not adapter and not embeddings or embeddings and not embeddings.get("bind"):
        return None  # (unbound tokens: the prompts name them, and members' tokens must have their own names)
    if adapter and (adapter.get("dropout") or 0) > 0:
        return None
    if optim.get("name", "adamw") != "adamw" or module.get("compile") or module.get("train_text_encoder"):
        return None
    if any(v is not None for v in (cell.get("callbacks") or {}).values()):
        return None
    devices = trainer.get("devices", 1)
    if devices not in (1, "1", [0]) or "ddp" in str(trainer.get("strategy", "")):
        return None
    shared = {
        "model": cell.get("model"), "optim": optim, "module": module, "init": cell.get("init_adapter") is None,
        "trainer": {k: v for k, v in trainer.items() if k not in ("enable_progress_bar", "enable_model_summary")},
        "adapter": {k: v for k, v in (adapter or {}).items() if k not in MEMBER_ADAPTER_KEYS},
        "embeddings": {k: v for k, v in (embeddings or {}).items() if k not in ("token", "bind")},
        "data": {k: v for k, v in (cell.get("data") or {}).items() if k not in MEMBER_DATA_KEYS},
    }
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_batch_cells(value, field: str = "protocol.batch_cells") -> int | str:
    """``protocol.batch_cells``: a positive integer (1: every cell alone) or ``auto``."""
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1 (1: every cell alone) or auto, got {value!r}")
    return value


def plan_batches(jobs: Sequence[tuple[dict, str, str]], batch_cells: int | str, workers: int,
                 capacity: Optional[Callable[[list], int]] = None, max_cells: Optional[int] = None) -> list[list]:
    """``jobs`` ``(resolved cell config, cell folder, name)`` grouped into the passes that train them: cells
    of one :func:`batch_key` in batches of ``batch_cells``; ``auto``: a group's cells shared evenly over
    the ``workers``, at most ``max_cells`` a pass (:data:`AUTO_MAX_CELLS` on the CPU,
    :data:`GPU_AUTO_MAX_CELLS` on a GPU) and at most ``capacity(group)`` (what fits the device,
    :func:`gpu_capacity`); the others alone. The order of ``jobs`` is kept within a batch."""
    groups: dict[str, list] = {}
    out: list[list] = []
    for job in jobs:
        key = batch_key(job[0]) if batch_cells != 1 else None
        if key is None:
            out.append([job])
        else:
            groups.setdefault(key, []).append(job)
    for members in groups.values():
        size = batch_cells
        if batch_cells == "auto":
            size = min(max_cells or AUTO_MAX_CELLS, -(-len(members) // max(1, workers)))
            if capacity is not None and size > 1:
                size = max(1, min(size, capacity(members)))
        out += [members[i:i + size] for i in range(0, len(members), size)]
    return out


# ``batch_cells: auto``: at most this many cells a pass (on the CPU the cores, not the memory, limit it:
# a world cell needs a few MB). On a GPU a pass of K cells costs about what one cell does while kernel
# launches set the pace, so passes are wider there, bounded by the measured memory (gpu_capacity).
AUTO_MAX_CELLS = 16
GPU_AUTO_MAX_CELLS = 64
GPU_MEMORY_SHARE = 0.85  # of the free memory a pass may plan to use


def capacity_from(peak_one: int, peak_two: int, free: int, share: float = GPU_MEMORY_SHARE) -> int:
    """How many cells a pass can hold: a pass of k cells is taken to peak at ``peak_one + (k - 1) * (peak_two
    - peak_one)`` (the model once, each cell's adapter, optimiser state and activations once more), and
    must stay within ``share`` of the ``free`` memory. At least 1."""
    per_cell = max(1, peak_two - peak_one)
    return max(1, 1 + int((share * free - peak_one) // per_cell))


def gpu_capacity(group: Sequence[tuple[dict, str, str]], scratch: Path) -> int:
    """The cells of ``group`` that fit in one pass on this process's GPU: one training step of the first
    cell alone and of the first two batched, their peak memory measured (:func:`lorabench.run.train_batched`),
    extrapolated (:func:`capacity_from`) to the free memory. Probe cells train in ``scratch``, removed after."""
    peaks = []
    try:
        for k in (1, 2):
            jobs = []
            for i, (resolved, _, name) in enumerate(group[:k]):
                cell = copy.deepcopy(resolved)
                cell["trainer"] = {**cell["trainer"], "max_steps": 1}
                cell["data"] = {**cell["data"], "val_samples": 0}
                cell["exports"] = []
                cell["paths"] = {**cell.get("paths", {}), "output_dir": str(scratch / f"k{k}-{i}")}
                if "folder" in cell["data"]:
                    cell["data"]["folder"] = str(scratch / f"k{k}-{i}" / "world_data")
                jobs.append((cell, str(scratch / f"k{k}-{i}"), f"probe-{name}"))
            torch.cuda.empty_cache()
            res = train_batched([OmegaConf.create(j[0]) for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs])
            peaks.append(int(res[0]["timings"]["batched"]["peak_memory_bytes"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return capacity_from(peaks[0], peaks[1], free)


def plan_passes(jobs: Sequence[tuple[dict, str, str]], batch_cells: int | str, workers: int,
                scratch: Path) -> list[list]:
    """:func:`plan_batches`, with ``auto`` bounded by the GPU's memory when the cells train on one."""
    capacity, max_cells = None, AUTO_MAX_CELLS
    if batch_cells == "auto" and jobs:
        accel = str((jobs[0][0].get("trainer") or {}).get("accelerator", "cpu"))
        if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
            capacity = lambda group: gpu_capacity(group, scratch)  # noqa: E731
            max_cells = GPU_AUTO_MAX_CELLS
    return plan_batches(jobs, batch_cells, workers, capacity, max_cells)


def train_pass(batch: Sequence[tuple[dict, str, str]]) -> list[dict]:
    """Train one pass of :func:`plan_batches`: a cell alone, or several batched; their results."""
    if len(batch) == 1:
        resolved, cell_dir, name = batch[0]
        return [train(OmegaConf.create(resolved), Path(cell_dir), config_name=name)[0]]
    return train_batched([OmegaConf.create(r) for r, _, _ in batch], [d for _, d, _ in batch],
                         [n for _, _, n in batch])


def _train_in_worker(batch: list[tuple[dict, str, str]], threads: int) -> list[str]:
    if threads:
        torch.set_num_threads(threads)
    with quiet_cells():
        train_pass(batch)
    return [name for _, _, name in batch]


def pretrain_cells(cfg: DictConfig, cells: Sequence[tuple[DictConfig, Mapping, int, str]], cache_root: Path,
                   workers: int, batch_cells: int | str = 1) -> set[str]:
    """Train the unfinished ``(adapter_cfg, data, seed, name)`` cells into the cache, ``workers`` at a
    time in spawned processes with ``cores // workers`` threads each (never more threads than cores:
    oversubscribed OpenMP runs several times slower), and ``batch_cells`` cells a pass where they can
    train together (:func:`batch_key`, :func:`lorabench.run.train_batched`: the same adapters as alone).
    On 2 cores, two 1-thread processes train 1.4x the steps per second of one 2-thread process
    (docs/benchmarks.md). Returns the names trained here; the protocol then finds them finished, as
    :func:`trained_cell` does any cached cell. With ``workers <= 1`` and no batching nothing trains here
    (the protocol trains each cell when it reaches it)."""
    pending = []
    for adapter_cfg, data, seed, name in cells:
        cell_dir, finished = cached_cell(cfg, adapter_cfg, data, seed, cache_root, name)
        if not finished:
            resolved = OmegaConf.to_container(cell_config(cfg, adapter_cfg, data, seed, cell_dir), resolve=True)
            pending.append((resolved, str(cell_dir), name))
    passes = plan_passes(pending, batch_cells, workers, Path(cache_root) / ".probe")
    if workers <= 1 and all(len(p) == 1 for p in passes) or len(pending) < 2:
        return set()
    done: set[str] = set()
    how = f"{workers} processes" if workers > 1 else "this process"
    batched = sum(len(p) for p in passes if len(p) > 1)
    desc = f"training in {how}" + (f", {batched} cells in {sum(len(p) > 1 for p in passes)} batched passes"
                                   if batched else "")
    progress = CellProgress(len(pending), desc=desc)
    try:
        if workers <= 1:
            for batch in passes:
                for name in _train_in_worker(batch, 0):
                    done.add(name)
                    progress.done(f"{name:>24}: trained" + (f" ({len(batch)} at once)" if len(batch) > 1 else ""))
            return done
        threads = max(1, (os.cpu_count() or 2) // workers)
        with ProcessPoolExecutor(max_workers=min(workers, len(passes)), mp_context=get_context("spawn")) as pool:
            # the largest passes first, so the last ones to finish are short
            futures = [pool.submit(_train_in_worker, batch, threads)
                       for batch in sorted(passes, key=len, reverse=True)]
            for fut in as_completed(futures):
                names = fut.result()
                for name in names:
                    done.add(name)
                    progress.done(f"{name:>24}: trained" + (f" ({len(names)} at once)" if len(names) > 1 else ""))
    finally:
        progress.close()
    return done


def cell_line(template: str, row: dict) -> str:
    """The line a finished cell prints: ``template`` filled from the row, then `` (400 steps, 55 s)`` for a
    trained cell (nothing for the base model's)."""
    return template.format(**row) + (f" ({row['steps']} steps, {row['train_s']:.0f} s)" if "train_s" in row else "")


def train_cells(cfg: DictConfig, run_dir: Path, adapters: Mapping[str, DictConfig], items: Sequence[str],
                seeds: Sequence[int], data_key: str, evaluate: Evaluate, progress: CellProgress,
                line: str, grids: dict[str, list[torch.Tensor]], measure: Optional[Measure] = None) -> list[dict]:
    """Train every (adapter, item, seed) cell and score it.

    ``data_key``: the data field each item sets (``concept``, ``style``). ``evaluate(components, item,
    seed, method)`` returns the cell's scores and images (the first seed's go to ``grids[item]``);
    ``measure(module, item, seed, method)``, if given, the cell's update size (its ``size_*`` fields join
    the row); ``line`` is the template of the line printed when it is done (:func:`cell_line`). Each cell
    trains in ``run_dir/cells/<adapter>-<item>-seed<seed>`` and is dropped after scoring.

    With ``protocol.batch_cells`` above 1 (or ``auto``) the cells that can train together
    (:func:`batch_key`) train first, that many a pass (:func:`lorabench.run.train_batched`), and are
    then loaded back one by one and scored as a cell trained alone is."""
    cells = [(name, acfg, item, seed, run_dir / "cells" / f"{name}-{item}-seed{seed}")
             for name, acfg in adapters.items() for item in items for seed in seeds]
    batch_cells = check_batch_cells((cfg.get("protocol") or {}).get("batch_cells", 1))
    jobs = [(OmegaConf.to_container(cell_config(cfg, acfg, {data_key: item}, seed, cell_dir), resolve=True),
             str(cell_dir), f"{name}/{item}") for name, acfg, item, seed, cell_dir in cells] if batch_cells != 1 else []
    pretrained: dict[str, dict] = {}
    for batch in plan_passes(jobs, batch_cells, 1, run_dir / "cells" / ".probe"):
        if len(batch) > 1:
            pretrained.update({d: res for (_, d, _), res in zip(batch, train_pass(batch))})
    base = instantiate(cfg.model, _convert_="all") if pretrained else None
    rows = []
    for name, acfg, item, seed, cell_dir in cells:
        if str(cell_dir) in pretrained:
            results = pretrained[str(cell_dir)]
            with loaded_cell(base, cell_dir) as (ad, _):
                scores, images = evaluate(base, item, seed, name)
                module = SimpleNamespace(components=base, adapters=ad)
                sizes = row_fields(measure(module, item, seed, name)) if measure is not None else {}
        else:
            results, module = train(cell_config(cfg, acfg, {data_key: item}, seed, cell_dir), cell_dir,
                                    config_name=f"{name}/{item}")
            scores, images = evaluate(module.components, item, seed, name)
            sizes = row_fields(measure(module, item, seed, name)) if measure is not None else {}
        if seed == seeds[0]:
            grids[item].append(images)
        rows.append({"method": name, data_key: item, "seed": seed, **scores, **sizes,
                     "steps": results["metrics"]["steps"], "train_s": results["timings"]["fit_s"],
                     "s_per_step": results["timings"]["s_per_step"]})
        progress.done(cell_line(line, rows[-1]))
        del module
    return rows


def compare_with_base(cfg: DictConfig, run_dir: Path, name: str, data_key: str, items: Sequence[str],
                      seeds: Sequence[int], adapters: Mapping[str, DictConfig], evaluate: Evaluate, line: str,
                      grids: dict[str, list[torch.Tensor]], measure: Optional[Measure] = None) -> list[dict]:
    """The base model scored on every (item, seed), then every trained cell (:func:`train_cells`): the
    rows of a single-item protocol, ``method`` "base" first. ``evaluate(components, item, seed, method)``
    samples and scores; the first seed's images of every method go to ``grids[item]``; ``line`` is the
    template of a finished cell's line (:func:`cell_line`); ``measure``: as in :func:`train_cells`."""
    rows: list[dict] = []
    progress = CellProgress(len(items) * len(seeds) * (1 + len(adapters)), desc=name)
    with quiet_cells():
        base = instantiate(cfg.model, _convert_="all")
        for item in items:
            for seed in seeds:
                scores, images = evaluate(base, item, seed, "base")
                rows.append({"method": "base", data_key: item, "seed": seed, **scores})
                if seed == seeds[0]:
                    grids[item].append(images)
                progress.done(cell_line(line, rows[-1]))
        del base
        rows += train_cells(cfg, run_dir, adapters, items, seeds, data_key, evaluate, progress, line, grids, measure)
    progress.close()
    return rows
