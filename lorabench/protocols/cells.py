"""Cells: what every protocol trains, and the one runner that trains them. A cell (:class:`Cell`) is one
adapter trained on one dataset with one seed; a protocol is a loop over cells, then sampling and scoring.

- :func:`protocol_inputs`: the protocol's adapters, items and seeds, checked before any work;
- :func:`cell_config`: a cell's plain training config (the protocol's, with its adapter and data set);
- :func:`cell_key` (on :func:`config_hash`, the one hash of what decides a result): the cell cache's key;
  :func:`cached` places a cell in the cache shared by runs and sweep jobs;
- :func:`run_cells`: the one runner. It knows workers, threads, ``batch_cells``, and (in :func:`train_pass`,
  the only place) the choice between one run and a batched pass;
- :func:`loaded_cell`: a trained cell's adapter and tokens in the model for a ``with`` block.

The single-concept and single-style loop (the base model, then every cell, sampled and scored) is
:func:`lorabench.protocols.scoring.compare_with_base`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.adapters import Adapters, get_adapter_class, load_adapter
from lorabench.adapters.base import parse_options
from lorabench.adapters.injection import PLACEMENT_KEYS, inject_adapters
from lorabench.adapters.tokens import ConceptTokens, check_tokens_config, for_concept, load_tokens
from lorabench.checks import (
    check_data_counts,
    check_optim,
    check_protocol_groups,
    check_trainer_limits,
    check_warmup,
)
from lorabench.errors import ConfigError, check_seed
from lorabench.run import spawning, train, train_batched
from lorabench.utils.console import CellProgress, note, quiet_cells, record_worker_console, share_console
from lorabench.utils.cpus import cpu_budget, spawn_pool
from lorabench.world.spec import make_world


def protocol_inputs(cfg: DictConfig, items_key: str, example: str) -> tuple[dict, list[str], list[int]]:
    """The protocol's adapters, items (``protocol.<items_key>``) and seeds, checked before any work. An
    adapter set to null (``protocol.adapters.<name>: null``) is dropped: how an experiment that extends
    another leaves out some of its adapters."""
    p = cfg.protocol
    check_protocol_groups(cfg)
    adapters = {k: v for k, v in (p.get("adapters") or {}).items() if v is not None}
    if not adapters:
        raise ConfigError("protocol.adapters", "no adapters to compare; add e.g. /adapter@protocol.adapters.lora: lora")
    items = list(p.get(items_key) or [])
    seeds = [check_seed(s, f"protocol.seeds[{i}]") for i, s in enumerate(p.get("seeds") or [])]
    if not items:
        raise ConfigError(f"protocol.{items_key}", f"empty; give at least one name (e.g. [{example}])")
    if len(set(items)) < len(items):
        raise ConfigError(f"protocol.{items_key}", f"lists a name twice: {items}")
    if not seeds:
        raise ConfigError("protocol.seeds", "empty; give at least one seed")
    if len(set(seeds)) < len(seeds):  # the same cells twice: replicates that are copies, intervals that shrink
        raise ConfigError("protocol.seeds", f"lists a seed twice: {seeds}; each seed is one replicate")
    check_batch_cells(p.get("batch_cells", 1))
    for name, entry in adapters.items():
        check_adapter_entry(entry, f"protocol.adapters.{name}")
        recipe = entry.get("recipe") or {}
        trainer = {**dict(cfg.get("trainer") or {}), **dict(recipe.get("trainer") or {})}
        if recipe.get("trainer") is not None:  # a baseline's own budget and clipping, over the protocol's trainer
            check_trainer_limits(trainer, f"protocol.adapters.{name}.recipe.trainer")
        if recipe.get("optim") is not None:  # its own optimiser and schedule (a warm-up within its own budget)
            check_optim(OmegaConf.to_container(OmegaConf.merge(cfg.get("optim") or {}, recipe["optim"]), resolve=True),
                        f"protocol.adapters.{name}.recipe.optim", trainer.get("max_steps"))
        check_data_counts(recipe.get("data"), f"protocol.adapters.{name}.recipe.data")  # its batch size
    check_world_items(cfg, items_key, items)
    return adapters, items, seeds


def check_epoch_warmups(cfg: DictConfig, adapters: Mapping[str, Any], epochs: Mapping[str, int]) -> None:
    """A protocol whose cells train by epochs (``epochs[name]`` for adapter ``name``): each adapter's warm-up
    (``optim``, or its recipe's) against its cells' optimiser steps, ``epochs`` times an epoch of its data (the
    training loader's batches over ``trainer.accumulate_grad_batches``, rounded up as Lightning counts them), as
    one line before any model is loaded or sampled (:func:`lorabench.checks.check_warmup`); ``trainer.max_steps``
    is no bound on such cells. The data is read as the cells will (the run's own folder for the mini world's)."""
    per_epoch: dict[str, int] = {}
    for name, entry in adapters.items():
        recipe = entry.get("recipe") or {}
        optim = OmegaConf.to_container(OmegaConf.merge(cfg.get("optim") or {}, recipe.get("optim") or {}),
                                       resolve=True)
        if not optim.get("warmup_steps"):
            continue
        field = f"protocol.adapters.{name}.recipe.optim" if recipe.get("optim") is not None else "optim"
        data = OmegaConf.to_container(OmegaConf.merge(cfg.data, recipe.get("data") or {}), resolve=True)
        trainer = {**dict(cfg.get("trainer") or {}), **dict(recipe.get("trainer") or {})}
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in per_epoch:
            datamodule = instantiate(data, _convert_="all")
            datamodule.prepare()
            per_epoch[key] = len(datamodule.train_dataloader())
        accumulate = int(trainer.get("accumulate_grad_batches") or 1)
        check_warmup(optim, epochs[name] * -(-per_epoch[key] // accumulate), field)


# An adapter entry's keys that are not the adapter's own options: where it goes (injection), the new tokens and
# the recipe trained beside it (cell_config), and the keys a protocol sets per concept (OrthA's disjoint slots)
ENTRY_KEYS = (*PLACEMENT_KEYS, "embeddings", "recipe")
PER_CONCEPT = {"slot": 0, "num_slots": 1}


def check_adapter_entry(entry: Optional[Mapping], field: str) -> None:
    """A protocol's adapter entry (``protocol.adapters.<name>``, the continual ``protocol.adapter``) checked as its
    adapter's own options are at injection, before any work: a cell found ``rank: 0`` or an unknown option after the
    protocol's first cells (in a continual sequence, after the base model's evaluation), and named it
    ``adapter.<key>``, a key the protocol's config does not have. An entry of new tokens alone has no options."""
    if not entry or entry.get("name") is None:
        return
    entry = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else dict(entry)
    options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    try:
        cls = get_adapter_class(entry["name"])
        if options.get("row_mode") == "disjoint":  # the protocol gives each concept its slot
            options.update({k: v for k, v in PER_CONCEPT.items() if options.get(k) is None})
        parse_options(cls, options)
    except ConfigError as err:
        key = err.field.partition(".")[2] if err.field.startswith("adapter.") else "name"
        raise ConfigError(f"{field}.{key}", err.message) from None


def check_world_items(cfg: DictConfig, items_key: str, items: Sequence[str]) -> None:
    """On the mini world's data, each of ``protocol.concepts`` / ``protocol.styles`` is one of its experiment
    identities / styles (or a name of ``protocol.concept_data``): the world's own lookup, before any cell, naming
    the field the user set (alone it names ``world.concept``, when the first cell builds its data)."""
    data = cfg.get("data") or {}
    if items_key not in ("concepts", "styles") or not str(data.get("_target_", "")).endswith(".world_datamodule"):
        return
    world = make_world(int(data.get("world_seed", 0)), int(data.get("resolution", 16)))
    lookup = world.identity if items_key == "concepts" else world.style
    own = cfg.protocol.get("concept_data") or {}
    for name in items:
        if name not in own:
            lookup(name, field=f"protocol.{items_key}")


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
OFF_WHEN_NULL = {"module": ("snr_gamma", "ema_decay"), "data": ("buckets",), "model": ("unet",)}
# Trainer options that change how a run is shown, not what it computes.
DISPLAY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def device_indices(devices):
    """A Trainer's ``devices`` as a list where it names device indices (a list, ``"0,1"``); else as it is (a
    count, ``-1``, ``auto``)."""
    if isinstance(devices, str) and "," in devices:
        return [d for d in devices.split(",") if d.strip()]
    return list(devices) if isinstance(devices, (list, tuple)) else devices


def decisive(cfg: Mapping, keys: Sequence[str]) -> dict:
    """The config groups ``keys`` of ``cfg`` (resolved) as they decide a result: without the trainer's
    display options, its devices as their number (the GPU a ``local_gpus`` sweep's job trains on,
    ``devices: [3]``, is one device as ``devices: 1`` is), ``module.cuda_graph`` (how steps are launched: a
    captured step computes what an eager one does), ``eval.validation`` (a training run's samples score
    nothing) and the options of :data:`OFF_WHEN_NULL` while null (added after results were cached: caches
    stay valid)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else copy.deepcopy(cfg[k])
            for k in keys if k in cfg}
    if "trainer" in keys:
        keep["trainer"] = {k: v for k, v in (keep.get("trainer") or {}).items() if k not in DISPLAY}
        devices = device_indices(keep["trainer"].get("devices"))
        if isinstance(devices, list):
            keep["trainer"]["devices"] = len(devices)
    if isinstance(keep.get("module"), dict):
        keep["module"] = {k: v for k, v in keep["module"].items() if k != "cuda_graph"}
    for group, names in OFF_WHEN_NULL.items():
        if isinstance(keep.get(group), dict):
            keep[group] = {k: v for k, v in keep[group].items() if not (k in names and v is None)}
    if isinstance(keep.get("eval"), dict):
        keep["eval"] = {k: v for k, v in keep["eval"].items() if k != "validation"}
        if not keep["eval"]:  # no eval group: as before eval.validation existed
            del keep["eval"]
    return keep


def digest(obj, length: int = 12) -> str:
    """The one hash of lorabench's keys: sha256 of ``obj`` as sorted JSON, its first ``length`` hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_hash(cfg: DictConfig, keys: Sequence[str], length: int = 12, extra: Mapping | None = None) -> str:
    """A hash of what in the config groups ``keys`` decides a result (:func:`decisive`), and ``extra``."""
    return digest({**decisive(cfg, keys), **(extra or {})}, length)


# What decides what a cell trains (not where it is written or logged): equal keys train equal adapters.
CELL_KEYS = ("model", "adapter", "embeddings", "data", "optim", "trainer", "module", "seed", "init_adapter")


def cell_key(cell: DictConfig | Mapping) -> str:
    """The cell cache's key: a hash of the cell's :data:`CELL_KEYS`."""
    return config_hash(cell, CELL_KEYS)


@dataclass
class Cell:
    """One adapter (or set of new tokens) trained on one dataset with one seed, into ``folder``.

    ``config`` is the cell's plain training config (:func:`cell_config`); ``reuse``: a finished folder
    (results.json, the last file training writes, and the adapter or tokens) is taken as it is (the
    cell cache). ``callbacks`` join the cell's trainer (in a batched pass: called with the cell alone
    in the model); ``prepare`` and ``components`` are :func:`lorabench.run.train`'s (a continual task:
    the running model and the method's initialisation), and make the cell train alone. ``key``: what the
    protocol knows the cell by (e.g. its ``(adapter, seed)``), handed back with its results. ``source``: where
    the protocol's config sets the cell's adapter (``protocol.adapters.lora``), which names its bad options."""

    config: DictConfig
    folder: Path
    name: str
    reuse: bool = False
    callbacks: list = field(default_factory=list)
    prepare: Optional[Callable] = None
    components: Any = None
    key: Any = None
    source: Optional[str] = None

    @property
    def files(self) -> list[str]:
        """The files a trained cell holds besides results.json."""
        return (["adapter.safetensors"] if self.config.get("adapter") else []) + \
            (["embeddings.safetensors"] if self.config.get("embeddings") else [])

    def finished(self) -> bool:
        """Whether ``folder`` holds this cell trained (and may be reused)."""
        return self.reuse and (self.folder / "results.json").is_file() and \
            all((self.folder / f).is_file() for f in self.files)

    def resolved(self) -> dict:
        """The config as a plain dict (what batching and worker processes see)."""
        return OmegaConf.to_container(self.config, resolve=True)


def cached(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cache_root: Path, name: str,
           source: Optional[str] = None) -> Cell:
    """The cell of ``(adapter_cfg, data, seed)`` in the cache ``cache_root/<name>-<key>/`` (:func:`cell_key`):
    protocols and sweep jobs that share ``cache_root`` train each (adapter, concept, seed) once."""
    cell = cell_config(cfg, adapter_cfg, data, seed, Path("."))  # the key leaves the folder out
    folder = Path(cache_root) / f"{name}-{cell_key(cell)}"
    with open_dict(cell):
        cell.paths.output_dir = str(folder)
    return Cell(cell, folder, name, reuse=True, source=source)


@contextmanager
def named_at(source: Optional[str]) -> Iterator[None]:
    """A cell's bad adapter or token option, raised at injection as ``adapter.rank`` (the cell's own config, which
    no user writes), named where the protocol's config sets it (``source``, :attr:`Cell.source`):
    ``protocol.adapters.lora.rank``, ``protocol.adapters.pplus.embeddings.token``. None: left as it is."""
    try:
        yield
    except ConfigError as err:
        if source is None:
            raise
        for group in ("adapter", "embeddings"):
            if err.field == group or err.field.startswith(f"{group}."):
                where = source if group == "adapter" else f"{source}.embeddings"
                raise ConfigError(where + err.field[len(group):], err.message) from err
        raise


def source_of(batch: Sequence[Cell]) -> Optional[str]:
    """The one :attr:`Cell.source` of a pass's cells (None where they have none, or several)."""
    sources = {c.source for c in batch}
    return sources.pop() if len(sources) == 1 else None


def base_model(cfg: DictConfig, adapters: Iterable[tuple[Optional[str], Any]]):
    """A protocol's base model (``cfg.model``'s components), loaded quietly, once each of ``adapters`` has been
    injected into it and removed (:func:`check_injection`): its first step, before any scoring or cell."""
    with quiet_cells():
        components = instantiate(cfg.model, _convert_="all")
        check_injection(components, adapters)
    return components


def check_injection(components, adapters: Iterable[tuple[Optional[str], Any]]) -> None:
    """Each adapter config of ``adapters`` (``(source, config)``: where the protocol's config sets it, and the
    cell's adapter config) injected into ``components`` and removed at once, each distinct one once, before the
    protocol's work: a rank above a layer's width, or targets no layer matches, fail here, named at their source,
    not after the base model was scored and other cells trained (minutes on a GPU). The random draws of the
    adapters' initialisation are undone: the generators stand as they were."""
    seen: list[dict] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    for source, config in adapters:
        config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
        if config and config not in seen:
            seen.append(config)
            with named_at(source), torch.random.fork_rng(devices=devices):
                inject_adapters(components, config).remove()


@dataclass
class Trained:
    """A cell after :func:`run_cells`: its training results and whether they were reused from its folder."""

    cell: Cell
    results: dict
    reused: bool


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
    if trainer_processes(trainer) > 1 or "ddp" in str(trainer.get("strategy", "")):
        return None
    shared = {
        "model": cell.get("model"), "optim": optim, "module": module, "init": cell.get("init_adapter") is None,
        "trainer": decisive({"trainer": trainer}, ["trainer"])["trainer"],
        "adapter": {k: v for k, v in (adapter or {}).items() if k not in MEMBER_ADAPTER_KEYS},
        "embeddings": {k: v for k, v in (embeddings or {}).items() if k not in ("token", "bind")},
        "data": {k: v for k, v in (cell.get("data") or {}).items() if k not in MEMBER_DATA_KEYS},
    }
    return digest(shared)


def check_count_or_auto(value, field: str, one: str) -> int | str:
    """A pass's width (``batch_cells``, ``eval_batch``): a positive integer (1: ``one``) or ``auto``; else one
    line naming ``field``."""
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1 (1: {one}) or auto, got {value!r}")
    return value


def trainer_processes(trainer: Mapping) -> int:
    """How many training processes a Trainer config starts: ``devices`` (a count, -1 for all, a list or
    ``"0,1"``; ``auto``: every GPU, one CPU) on its accelerator, times ``num_nodes``; 1 with a single-device
    strategy (``auto`` with several devices is Lightning's ddp)."""
    if OmegaConf.is_config(trainer):  # a ListConfig of devices is no list: [0, 1] read as "auto"
        trainer = OmegaConf.to_container(trainer, resolve=True)
    if "single" in str(trainer.get("strategy") or "auto"):
        return 1
    gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
    available = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    devices = device_indices(trainer.get("devices", "auto"))
    if isinstance(devices, list):
        count = len(devices)
    elif str(devices).strip().lstrip("-").isdigit():
        count = available if int(devices) == -1 else int(devices)
    else:  # auto
        count = available
    return count * int(trainer.get("num_nodes") or 1)


def check_processes(cfg: DictConfig, protocol: str, mode: str) -> None:
    """A one-line error, before any work, where ``cfg.trainer`` starts several processes (trainer=ddp,
    ddp_cpu) in a way the protocol cannot use. ``mode``: ``"ranks"``, the protocol keeps state in its callbacks
    across fits, so every rank must run the whole protocol (strategy=ddp, not under ``--multirun``);
    ``"one"``, it trains in one process only. (A protocol whose cells come back whole from Lightning's
    spawned workers, as the Orthogonal Adaptation one's do, needs no check.)"""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") is not None else {}
    n, spawn = trainer_processes(trainer), spawning(trainer)
    if n <= 1 and not spawn:  # a spawning strategy trains in new processes even on one device
        return
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if mode == "one":
        raise ConfigError("trainer.devices" if n > 1 else "trainer.strategy",
                          f"{trainer.get('devices') if n > 1 else trainer.get('strategy')}: the {protocol} protocol "
                          "trains in its own process on one device (its checkpoint evaluation runs there between "
                          "epochs); use trainer=gpu, and for several GPUs one job per GPU: "
                          "lorabench -m hydra/launcher=local_gpus ... trainer=gpu protocol.seeds=[0],[1],[2]")
    if mode == "ranks" and spawn:
        raise ConfigError("trainer.strategy", f"{trainer.get('strategy')}: its processes end with each fit, and "
                          f"the {protocol} protocol keeps its state (the method's, the metric's) across fits in "
                          "them; use trainer.strategy=ddp (each rank started once runs the whole protocol)")
    if mode == "ranks" and multirun:
        raise ConfigError("trainer.strategy", "ddp under --multirun: Lightning starts each rank by running this "
                          "command again, which would run the whole sweep in every rank; run one job per GPU "
                          "(hydra/launcher=local_gpus, trainer=gpu) or this job alone")


def check_batch_cells(value, field: str = "protocol.batch_cells") -> int | str:
    """``protocol.batch_cells``: a positive integer (1: every cell alone) or ``auto``."""
    return check_count_or_auto(value, field, "every cell alone")


def plan_batches(cells: Sequence[Cell], batch_cells: int | str, workers: int,
                 capacity: Optional[Callable[[list], int]] = None, max_cells: Optional[int] = None) -> list[list[Cell]]:
    """``cells`` grouped into the passes that train them: cells of one :func:`batch_key` in batches of
    ``batch_cells``; ``auto``: a group's cells shared evenly over the ``workers``, at most ``max_cells`` a
    pass (:data:`AUTO_MAX_CELLS` on the CPU, :data:`GPU_AUTO_MAX_CELLS` on a GPU) and at most
    ``capacity(group)`` (what fits the device, :func:`gpu_capacity`); the others alone (also a cell with
    its own model or ``prepare`` hook). The order of ``cells`` is kept within a batch."""
    groups: dict[str, list] = {}
    out: list[list] = []
    for cell in cells:
        alone = batch_cells == 1 or cell.prepare is not None or cell.components is not None
        key = None if alone else batch_key(cell.resolved())
        if key is None:
            out.append([cell])
        else:
            groups.setdefault(key, []).append(cell)
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


def gpu_capacity(group: Sequence[Cell], scratch: Path, processes: int = 1) -> int:
    """The cells of ``group`` that fit in one pass on this process's GPU: one training step of the first
    cell alone and of the first two batched, their peak memory measured (:func:`lorabench.run.train_batched`),
    extrapolated (:func:`capacity_from`) to the free memory, of which each of the ``processes`` that train
    passes on this GPU at once (``protocol.train_workers``) plans on its share. Probe cells train in
    ``scratch``, removed after."""
    peaks = []
    try:
        for k in (1, 2):
            probes = []
            for i, cell in enumerate(group[:k]):
                probe, folder = cell.resolved(), scratch / f"k{k}-{i}"
                probe["trainer"] = {**probe["trainer"], "max_steps": 1}
                probe["data"] = {**probe["data"], "val_samples": 0}
                probe["exports"] = []
                probe["paths"] = {**probe.get("paths", {}), "output_dir": str(folder)}
                if "folder" in probe["data"]:
                    probe["data"]["folder"] = str(folder / "world_data")
                probes.append(Cell(OmegaConf.create(probe), folder, f"probe-{cell.name}"))
            torch.cuda.empty_cache()
            res = train_pass(probes)
            peaks.append(int(res[0]["timings"]["batched"]["peak_memory_bytes"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return capacity_from(peaks[0], peaks[1], free, GPU_MEMORY_SHARE / max(1, processes))


def plan_passes(cells: Sequence[Cell], batch_cells: int | str, workers: int, scratch: Path) -> list[list[Cell]]:
    """:func:`plan_batches`, with ``auto`` bounded by the GPU's memory when the cells train on one."""
    capacity, max_cells = None, AUTO_MAX_CELLS
    if batch_cells == "auto" and cells:
        accel = str((cells[0].config.get("trainer") or {}).get("accelerator", "cpu"))
        if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
            # passes in `workers` processes at once share the GPU: each plans on its part of the memory
            capacity = lambda group: gpu_capacity(group, scratch, processes=workers)  # noqa: E731
            max_cells = GPU_AUTO_MAX_CELLS
    return plan_batches(cells, batch_cells, workers, capacity, max_cells)


def train_pass(batch: Sequence[Cell]) -> list[dict]:
    """Train one pass of :func:`plan_batches`: a cell alone (:func:`lorabench.run.train`) or several in one
    batched pass (:func:`lorabench.run.train_batched`); their results. The only place that chooses."""
    if len(batch) == 1:
        (c,) = batch
        return [train(c.config, c.folder, config_name=c.name, components=c.components, prepare=c.prepare,
                      callbacks=c.callbacks)[0]]
    return train_batched([c.config for c in batch], [c.folder for c in batch], [c.name for c in batch],
                         member_callbacks=[c.callbacks for c in batch])


def _train_in_worker(batch: list[tuple[dict, str, str]], threads: int) -> list[dict]:
    record_worker_console()  # what this worker prints is the job's console: its cli.log keeps it too
    if threads:
        torch.set_num_threads(threads)
    with quiet_cells():
        return train_pass([Cell(OmegaConf.create(r), Path(d), n) for r, d, n in batch])


class CellClaims:
    """Which of the processes sharing a cell cache trains a cell: the jobs of a parallel sweep
    (``hydra/launcher=local_gpus``) start together with the same cells missing, and each trained all of
    them. Now a process trains a cached cell while it holds the cell's lock file (``<cache>/.claims/<cell
    folder>.lock``, :mod:`filelock`; the files stay, as removing a lock file another process may be waiting
    on is unsafe, but for bad input, which stops every job alike). It claims a pass's cells as it comes to
    the pass (with ``workers`` > 1, every pass's before the pool starts), so jobs that start together share
    the cells out; the cells whose locks another holds, it leaves to that one and waits for after its own
    (:func:`run_cells`), and a cell the other process stopped without finishing, it trains. Cells outside a
    cache, and those of a trainer with several processes (whose ranks must train every cell together), take
    no lock."""

    def __init__(self):
        self.held: dict[int, FileLock] = {}

    @staticmethod
    def applies(cell: Cell) -> bool:
        """Whether ``cell`` takes a lock: a cached cell trained by a one-process trainer."""
        trainer = cell.config.get("trainer") or {}
        return cell.reuse and trainer_processes(trainer) == 1 and not spawning(trainer)

    @staticmethod
    def lock_file(cell: Cell) -> Path:
        """The lock file of ``cell``: ``<cache>/.claims/<its folder's name>.lock``."""
        return cell.folder.parent / ".claims" / f"{cell.folder.name}.lock"

    def claim(self, cell: Cell, wait: bool = False, while_waiting: Optional[Callable[[], None]] = None,
              poll_s: float = 1.0) -> bool:
        """Whether this process may train ``cell`` now: its lock taken (at once, or once free with ``wait``,
        calling ``while_waiting`` every ``poll_s`` seconds until then: the bar's clock), or none needed."""
        if not self.applies(cell):
            return True
        self.lock_file(cell).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file(cell), thread_local=False)
        while True:
            try:
                lock.acquire(timeout=poll_s if wait else 0)
                break
            except Timeout:
                if not wait:
                    return False
                if while_waiting is not None:
                    while_waiting()
        self.held[id(cell)] = lock
        return True

    def release(self, cell: Cell) -> None:
        """Let ``cell`` go (trained, reused, or not this process's after all); nothing if it holds none."""
        lock = self.held.pop(id(cell), None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        """Let every held cell go (the run ends, or stops on an error)."""
        for lock in self.held.values():
            lock.release()
        self.held.clear()


def run_cells(cells: Sequence[Cell], batch_cells: int | str = 1, workers: int = 1, scratch: Optional[Path] = None,
              on_done: Optional[Callable[[Trained], None]] = None, progress: bool = False) -> list[Trained]:
    """Train ``cells`` (those not finished in their folders), and return each one's :class:`Trained`, in order.

    ``batch_cells`` cells a pass where they can train together (:func:`batch_key`,
    :func:`lorabench.run.train_batched`: the same adapters as alone); ``workers`` spawned processes at once,
    each with ``cores // workers`` threads (never more threads than cores: oversubscribed OpenMP runs
    several times slower; on 2 cores two 1-thread processes train 1.4x the steps per second of one
    2-thread process, docs/benchmarks.md). Cells with callbacks, a model or a hook train in this process.
    ``on_done`` sees each cell as it finishes (a reused one first); ``progress``: a bar (``training in 2
    processes, 6 cells in 2 batched passes``) and a line per cell, when more than one cell trains.

    A cell of a shared cache that another process is training (a parallel sweep job; :class:`CellClaims`)
    is waited for after this process's own cells, and reused once finished (trained here if it was not)."""
    trained: dict[int, Trained] = {}

    def reuse(i: int, c: Cell) -> None:
        trained[i] = Trained(c, json.loads((c.folder / "results.json").read_text()), True)
        if on_done is not None:
            on_done(trained[i])

    pending = []
    for i, c in enumerate(cells):
        if c.finished():
            reuse(i, c)
        else:
            pending.append(c)
    # what bad input removes again: the cells' new folders, and the folders made to hold them (a cache's)
    fresh = [c for c in pending if not c.folder.exists()]
    made = sorted({p for c in fresh for p in c.folder.parents if not p.exists()}, key=lambda p: len(p.parts))
    index = {id(c): i for i, c in enumerate(cells)}
    # the memory probe's scratch is this process's own: the jobs of a local_gpus sweep share one cell cache,
    # and each removes its probe folder when done
    probe = Path(scratch or cells[0].folder.parent) / f".probe-{os.getpid()}"
    passes = plan_passes(pending, batch_cells, workers, probe) if pending else []
    local = workers <= 1 or len(passes) < 2 or any(c.callbacks or c.prepare or c.components for c in pending)
    batched = sum(len(p) for p in passes if len(p) > 1)
    desc = f"training in {'this process' if local else f'{workers} processes'}" + (
        f", {batched} cells in {sum(len(p) > 1 for p in passes)} batched passes" if batched else "")
    bar = CellProgress(len(pending), desc=desc) if progress and len(pending) > 1 else None
    claims, theirs = CellClaims(), []  # theirs: cells another process was training when this one came to them

    def finish(batch: Sequence[Cell], results: Sequence[dict], by_another: bool = False) -> None:
        for c, res in zip(batch, results):
            trained[index[id(c)]] = Trained(c, res, by_another)
            claims.release(c)
            if on_done is not None:
                on_done(trained[index[id(c)]])
            if bar is not None:
                bar.done(f"{c.name:>24}: " + ("trained by another job" if by_another else "trained")
                         + (f" ({len(batch)} at once)" if len(batch) > 1 else ""))

    def finished_there(c: Cell) -> None:
        finish([c], [json.loads((c.folder / "results.json").read_text())], by_another=True)

    def take(batch: Sequence[Cell]) -> list[Cell]:
        """The cells of ``batch`` this process trains now: those it claims; one another process holds waits
        in ``theirs``, one finished meanwhile is reused."""
        mine = []
        for c in batch:
            if not claims.claim(c):
                theirs.append(c)
            elif c.finished():  # by another process, since this one looked
                finished_there(c)
            else:
                mine.append(c)
        return mine

    try:
        if local:  # pass by pass: jobs that start together share the cells out as they go
            for batch in passes:
                if batch := take(batch):
                    with quiet_cells(), named_at(source_of(batch)):
                        results = train_pass(batch)
                    finish(batch, results)
        elif mine := [b for b in map(take, passes) if b]:
            threads = max(1, cpu_budget() // workers)
            share_console()  # the workers add what they print to the job's cli.log
            with spawn_pool(min(workers, len(mine))) as pool:
                # the largest passes first, so the last ones to finish are short
                futures = {pool.submit(_train_in_worker, [(c.resolved(), str(c.folder), c.name) for c in batch],
                                       threads): batch for batch in sorted(mine, key=len, reverse=True)}
                running = list(futures)
                while running:  # on a terminal the bar is redrawn each second (its clock; a worker's line clears it)
                    done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in [f for f in running if f in done]:
                        with named_at(source_of(futures[fut])):
                            results = fut.result()
                        finish(futures[fut], results)
                    running = [f for f in running if f not in done]
                    if bar is not None:
                        bar.tick()
        if theirs and progress:  # a wait that could look like a hang
            note(f"waiting for {len(theirs)} cell(s) another job is training "
                 f"(its claims: {CellClaims.lock_file(theirs[0]).parent})")
        for c in theirs:  # after this process's own cells: the other job's, once it lets them go
            claims.claim(c, wait=True, while_waiting=None if bar is None else bar.tick)
            if c.finished():
                finished_there(c)
            else:  # that job stopped before it finished the cell
                with quiet_cells(), named_at(c.source):
                    finish([c], train_pass([c]))
    except ConfigError:  # bad input stops every cell alike: none leaves a half-written folder (in a shared cache too)
        claims.release_all()
        for c in fresh:
            if not c.finished():
                shutil.rmtree(c.folder, ignore_errors=True)
                with suppress(FileNotFoundError):
                    CellClaims.lock_file(c).unlink()
        for claims_dir in {CellClaims.lock_file(c).parent for c in fresh}:
            with suppress(OSError):  # left where it holds other cells' locks
                claims_dir.rmdir()
        for folder in reversed(made):  # deepest first, where nothing else was written
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        claims.release_all()
        if bar is not None:
            bar.close()
    return [trained[i] for i in range(len(cells))]
