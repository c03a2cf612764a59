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
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.adapters import Adapters, load_adapter
from lorabench.adapters.tokens import ConceptTokens, check_tokens_config, for_concept, load_tokens
from lorabench.errors import ConfigError, check_int
from lorabench.protocols.sizes import row_fields
from lorabench.run import train
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
    return adapters, items, seeds


def cell_config(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cell_dir: Path) -> DictConfig:
    """The plain training config of one cell: the protocol's config with its adapter group swapped in
    and ``data`` (e.g. ``{"concept": "sks"}``) set. An adapter entry's ``embeddings`` (new tokens, e.g.
    textual inversion) become the cell's ``embeddings`` group, a null token or bind named after the
    concept's word (``data["word"]``, else ``data["concept"]``; ``word`` is not a data field); an entry
    with embeddings and no ``name`` trains the tokens alone. W&B stays with the protocol's own run; each
    cell logs to CSV in its folder."""
    data = dict(data)
    word = data.pop("word", None) or data.get("concept")
    cell = copy.deepcopy(cfg)
    adapter_cfg = copy.deepcopy(adapter_cfg)
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
        for key, value in data.items():
            cell.data[key] = value
        cell.seed = seed
        cell.paths.output_dir = str(cell_dir)
        cell.logger = {"wandb": None}
        cell.protocol = None
    return cell


def config_hash(cfg: DictConfig, keys: Sequence[str], length: int = 12, extra: Mapping | None = None) -> str:
    """A hash of the config groups ``keys`` (resolved) and ``extra``, leaving out the trainer's display
    options: what decides a result, not where it is written or how it is shown."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys if k in cfg}
    keep["trainer"] = {k: v for k, v in (keep.get("trainer") or {}).items()
                       if k not in ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")}
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


def _train_in_worker(resolved: dict, cell_dir: str, name: str, threads: int) -> str:
    torch.set_num_threads(threads)
    with quiet_cells():
        train(OmegaConf.create(resolved), Path(cell_dir), config_name=name)
    return name


def pretrain_cells(cfg: DictConfig, cells: Sequence[tuple[DictConfig, Mapping, int, str]], cache_root: Path,
                   workers: int) -> set[str]:
    """Train the unfinished ``(adapter_cfg, data, seed, name)`` cells into the cache, ``workers`` at a
    time in spawned processes with ``cores // workers`` threads each (never more threads than cores:
    oversubscribed OpenMP runs several times slower). On 2 cores, two 1-thread processes train 1.4x the
    steps per second of one 2-thread process (docs/benchmarks.md). Returns the names trained here; the
    protocol then finds them finished, as :func:`trained_cell` does any cached cell. ``workers <= 1``
    trains nothing here (the protocol trains each cell when it reaches it)."""
    if workers <= 1:
        return set()
    pending = []
    for adapter_cfg, data, seed, name in cells:
        cell_dir, finished = cached_cell(cfg, adapter_cfg, data, seed, cache_root, name)
        if not finished:
            resolved = OmegaConf.to_container(cell_config(cfg, adapter_cfg, data, seed, cell_dir), resolve=True)
            pending.append((resolved, str(cell_dir), name))
    if len(pending) < 2:
        return set()
    threads = max(1, (os.cpu_count() or 2) // workers)
    done = set()
    progress = CellProgress(len(pending), desc=f"training in {workers} processes")
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_train_in_worker, *job, threads) for job in pending]
            for fut in as_completed(futures):
                done.add(fut.result())
                progress.done(f"{fut.result():>24}: trained")
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
    trains in ``run_dir/cells/<adapter>-<item>-seed<seed>`` and is dropped after scoring."""
    rows = []
    for name, acfg in adapters.items():
        for item in items:
            for seed in seeds:
                cell_dir = run_dir / "cells" / f"{name}-{item}-seed{seed}"
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
