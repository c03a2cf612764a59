"""The ``lorabench`` command: one Hydra entry point with overrides and ``--multirun``.

    lorabench                                   # the main job (conf/train.yaml defaults)
    lorabench experiment=sd15_dreambooth_lora data.path=my_dog/
    lorabench --multirun experiment=quickstart adapter=lora,ortho,trilora seed=0,1,2
    lorabench -v                                # everything the libraries print (quiet by default)
    lorabench sample protocol.adapters=[run/adapter.safetensors] protocol.prompts=["a photo of sks dog"]
    lorabench summarize outputs/multirun/<task>/<time>   # a sweep's table (also printed when it ends)
    lorabench tiny-model tiny-sd                # a tiny random SD1.5-shaped model folder (a diffusers pipeline)

Bad input prints one line (``lorabench: error: <field>: <what is valid>``) and exits
with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. A run that fails on
bad input removes its output folder, so ``outputs/`` holds no half-written runs. In a sweep,
a job that crashes or whose swept values are bad input fails alone (:mod:`lorabench.sweeps`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Mapping, Optional

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lorabench.checks import (
    adapter_file,
    check_callbacks,
    check_counts,
    check_data_counts,
    check_data_path,
    check_group_rates,
    check_model_source,
    check_optim,
    check_override_types,
    check_protocol_groups,
    check_sampler,
    check_trainer_limits,
    check_validation,
    check_writable,
)
from lorabench.errors import ConfigError, check_int, check_seed, choice_error, find_config_error
from lorabench.sweeps import EXIT_STATUS, job_dir_name, job_name, record_failure, set_by_sweep, swept_keys
from lorabench.sweeps import main as summarize_main
from lorabench.utils.console import VERBOSE_ENV, console_log_name, first_process, quiet_cells, record_console
from lorabench.utils.cpus import end_with_parent
from lorabench.utils.gpus import check_claimable, claim_gpu, gpu_count, gpu_list

CONF_DIR = Path(os.environ.get("LORABENCH_CONF") or Path(__file__).resolve().parent.parent / "conf")


def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """``{group: [options]}`` for every group in train.yaml's defaults list and every group folder
    (options may be nested: ``a/b``). A group with no folder yet has no options. Hydra's own groups
    (``hydra/launcher``, ``hydra/job_logging``) are not here: their options are Hydra's and its plugins' too, and
    :func:`precheck` composes them (``hydra/job_logging=disabled`` was refused as "valid: none yet")."""
    groups: dict[str, list[str]] = {}
    for entry in OmegaConf.load(conf_dir / "train.yaml").get("defaults", []):
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            for key in entry:
                if not str(key).split()[-1].startswith("hydra/"):
                    groups.setdefault(str(key).split()[-1], [])
    for d in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[d.name] = sorted(str(f.relative_to(d).with_suffix("")) for f in d.rglob("*.yaml"))
    return groups


NO_ADAPTER = "none"  # conf/adapter/none.yaml: training without an adapter (new tokens alone, or the whole model)


def no_adapter_overrides(args: list[str]) -> list[str]:
    """``adapter=null`` and ``~adapter`` as ``adapter=none``: Hydra cannot set a config group to null from the
    command line, and deleting the group would leave what an experiment sets under ``adapter:``."""
    out = []
    for arg in args:
        if arg == "~adapter":
            arg = f"adapter={NO_ADAPTER}"
        elif arg.startswith("adapter=") and "(" not in arg:
            arg = "adapter=" + ",".join(NO_ADAPTER if v.strip() == "null" else v for v in arg[8:].split(","))
        out.append(arg)
    return out


def drop_adapter(cfg: DictConfig, choice: Optional[str]) -> None:
    """With ``adapter=none`` chosen, ``cfg.adapter`` is null, whatever an experiment set under it."""
    if choice == NO_ADAPTER:
        with open_dict(cfg):
            cfg.adapter = None


MULTIRUN_FLAGS = ("-m", "--multirun")


def override_group(arg: str) -> str:
    """The key or group an override sets, without Hydra's ``+`` / ``~`` and ``@package``: ``+a/b@c=x`` -> ``a/b``."""
    return arg.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=option`` overrides naming an option that does not exist, in one line."""
    groups = config_groups(conf_dir)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = override_group(arg), arg.split("=", 1)[1]
        if key not in groups or "(" in value:  # not a group, or a sweep function like choice(...)
            continue
        for option in value.split(","):
            option = option.strip()
            if option != "null" and option not in groups[key]:  # "" too: experiment= named no option
                raise choice_error(key, option, groups[key])


def _split_overrides(args: list[str], groups: dict[str, list[str]]):
    """The command line's overrides as ``(compose, typed)``: ``compose``, the override strings to compose
    with (a sweep by its first value, Hydra's own keys left out), and ``typed``, ``(key, values)`` of every
    plain value override (all of a sweep's values) for :func:`lorabench.checks.check_override_types`."""
    parsed = OverridesParser.create().parse_overrides(args)
    groups_first, values, typed = [], [], []
    for ov in parsed:
        key = ov.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if ov.is_sweep_override():
            line = f"{ov.get_key_element()}={next(iter(ov.sweep_string_iterator()))}"
            vals = list(ov.sweep_iterator()) if isinstance(ov.value(), ChoiceSweep) else []
        else:
            line, vals = ov.input_line, ([] if ov.is_delete() else [ov.value()])
        (groups_first if key.split("@")[0] in groups else values).append(line)
        if key.split("@")[0] not in groups and not ov.is_add() and not ov.is_delete():
            typed.append((key, [v for v in vals if not (isinstance(v, str) and v.startswith("${"))]))
    return groups_first, values, typed


def precheck(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """What can be checked from the config alone, before Hydra makes a run folder and before torch is
    imported: the config the command asks for is composed with Hydra's compose API, each numeric override
    is checked against its field's type, keys that do not exist are named, and the optimiser and callbacks
    options are checked (:mod:`lorabench.checks`). Flags other than ``-m`` (``--help``, ``--cfg``, ...) are
    Hydra's own; their commands are left to it."""
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in args):
        return
    groups = config_groups(conf_dir)
    try:
        group_args, value_args, typed = _split_overrides([a for a in args if not a.startswith("-")], groups)
    except OverrideParseException as exc:
        raise override_error(exc) from exc
    # Hydra's own groups (hydra/launcher=...): Hydra reads them after the checks, in a traceback where an option
    # does not exist; composed here with the hydra config (one option each: Hydra sweeps none of them)
    hydra_groups = [a for a in args if not a.startswith("-") and "=" in a and override_group(a).startswith("hydra/")]
    for a in hydra_groups:
        if "," in a:
            raise ConfigError(override_group(a), f"takes one option, got {a.split('=', 1)[1]!r}: Hydra cannot sweep "
                              "its own groups; run one sweep per option")
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        try:
            base = compose("train", overrides=group_args + hydra_groups, return_hydra_config=True)
            choices = dict(base.hydra.runtime.choices)
            choice = choices.get("adapter")
            with open_dict(base):
                del base["hydra"]
            drop_adapter(base, choice)
            check_override_types(base, typed)
            cfg = compose("train", overrides=group_args + value_args)
            drop_adapter(cfg, choice)
            check_protocol_group_choices(cfg, group_args, choices)
        except (ConfigCompositionException, OmegaConfBaseException) as exc:
            raise composition_error(exc) from exc
        except ValueError as exc:  # Hydra's own, for group=null where the group cannot be left out that way
            raise null_group_error(exc, group_args, groups) from exc
    check_callbacks(cfg.get("callbacks"))
    check_protocol_groups(cfg)
    check_protocol_overrides(cfg, dict(typed))
    try:
        # every value of a seed sweep (seed=0,1,2), else the composed one (a range sweep's first)
        for seed in next((vals for key, vals in typed if key == "seed" and vals), None) or [cfg.get("seed")]:
            check_seed(seed, "seed")
        check_validation(OmegaConf.select(cfg, "eval.validation"))
        if OmegaConf.select(cfg, "eval.sampler") is not None:
            check_sampler(OmegaConf.to_container(cfg.eval.sampler, resolve=True), "eval.sampler")
            check_counts({"images_per_prompt": OmegaConf.select(cfg, "eval.images_per_prompt")}, "eval")
        check_data_counts(cfg.get("data"))
        resolution = OmegaConf.select(cfg, "model.resolution")
        if resolution is not None:  # 0 failed in the data, in PIL's words
            check_int(resolution, "model.resolution", minimum=8)
        if str(OmegaConf.select(cfg, "model._target_")).endswith("load_components"):
            check_model_source(OmegaConf.select(cfg, "model.pretrained"))
        images = str(OmegaConf.select(cfg, "data._target_")).endswith("ImageFolderDataModule")
        if images and cfg.get("protocol") is None:  # a protocol may give each cell its own data.path
            check_data_path(OmegaConf.select(cfg, "data.path"))
        check_folders(cfg, args)
        if cfg.get("init_adapter"):
            adapter_file(cfg.init_adapter, "init_adapter")
    except OmegaConfBaseException:
        pass  # an interpolation only a run can resolve: the run checks it
    if cfg.get("optim") is not None:
        try:
            optim = OmegaConf.to_container(cfg.optim, resolve=True)
            steps = OmegaConf.select(cfg, "trainer.max_steps")
        except OmegaConfBaseException:
            return  # an interpolation only a run can resolve: the run checks it
        check_optim(optim, steps=steps)


def check_protocol_overrides(cfg: DictConfig, given: Mapping[str, list]) -> None:
    """Keys a protocol sets itself, given on the command line (``given``: each overridden key's values), which
    changed nothing: ``seed`` where it takes its replicates from ``protocol.seeds`` (``seed=1`` did nothing, a
    sweep ``seed=0,1,2`` ran three identical jobs), and the data keys it sets per cell or per task
    (:func:`per_cell_data`: ``data.concept=zwz`` trained world_concepts' own three concepts; ``data.path`` trained
    the full-scale tables on each concept's or task's own folder)."""
    p = cfg.get("protocol")
    if not (p and p.get("_target_")):
        return
    if "seed" in given and p.get("seeds") is not None:
        instead = ",".join(f"[{v}]" for v in given["seed"]) if given["seed"] else "[...]"
        raise ConfigError("seed", f"this protocol takes its seeds from protocol.seeds ({list(p.seeds)}) and reads no "
                          f"seed; set protocol.seeds={instead} instead (each a job of its own under -m), or "
                          "protocol.seeds=[0,1,2] for several in one job")
    for key, where in per_cell_data(cfg).items():
        if f"data.{key}" not in given:
            continue
        items = p.get(f"{key}s") if key in ("concept", "style") else None  # protocol.concepts / protocol.styles
        if items is not None:
            instead = ",".join(f"[{v}]" for v in given[f"data.{key}"]) or "[...]"
            raise ConfigError(f"data.{key}", f"this protocol trains each of protocol.{key}s ({list(items)}) and "
                              f"sets data.{key} per cell; set protocol.{key}s={instead} instead")
        raise ConfigError(f"data.{key}", f"this protocol sets it for each {where}; set it there"
                          + (folder_hint(cfg) if key == "path" else ""))


def folder_hint(cfg: DictConfig) -> str:
    """Where a full-scale table's per-concept or per-task folders come from, as its config spells their first path:
    a top-level key (``${data_root}/person1``) and the environment variable behind it (``$ORTHA_DATA``)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    tasks = (raw.get("sequence") or {}).get("tasks") or []
    entries = [*((raw.get("protocol") or {}).get("concept_data") or {}).values(),
               *(t.get("data") or {} for t in tasks if isinstance(t, dict))]
    path = next((str(e["path"]) for e in entries if isinstance(e, dict) and e.get("path")), "")
    key = re.match(r"\$\{(\w+)\}", path)
    env = re.search(r"\$\{oc\.env:(\w+)", str(raw.get(key[1], "")) if key else path)
    hint = f"{key[1]}=<folder>" if key else ""
    hint += (" or " if hint and env else "") + (f"${env[1]}" if env else "")
    return f" (each under {hint})" if hint else ""


def per_cell_data(cfg: DictConfig) -> dict[str, str]:
    """The data keys a protocol sets per cell or per task, each with where it does: the concept or style of each of
    ``protocol.concepts`` / ``protocol.styles`` and the fields of ``protocol.concept_data`` (a full-scale table's
    folders and prompts), or each task's name field and data fields of a continual sequence."""
    p, out = cfg.protocol, {}
    if p.get("concepts") is not None:
        out["concept"] = "concept (protocol.concepts)"
        for entry in (p.get("concept_data") or {}).values():
            out.update({k: f"concept (protocol.concept_data.<concept>.{k})" for k in (entry or {}) if k != "word"})
    if p.get("styles") is not None:
        out["style"] = "style (protocol.styles)"
    seq = cfg.get("sequence")
    if seq is not None:
        kind = seq.get("kind")
        name = str(seq.get("data_key") or ("concept" if kind == "objects" else "style"))
        out[name] = (f"task (sequence.tasks, the first sequence.length of them in the order sequence.order_seed "
                     f"draws: each sets data.{name} to its name)")
        for task in seq.get("tasks") or []:  # a name, or {name, data: {...}}
            data = task.get("data") if hasattr(task, "get") else None
            out.update({k: f"task (sequence.tasks.<task>.data.{k})" for k in (data or {})})
    return out


def null_group_error(exc: ValueError, group_args: list[str], groups: Mapping[str, list[str]]) -> ConfigError:
    """``logger=null`` (any group whose default is an option, not null): Hydra's composition raised
    ``ValueError: Config group override must be a string or a list. Got NoneType``, a traceback naming no group.
    The group: the ``=null`` override that fails when composed alone. Called inside precheck's Hydra context."""
    if "Config group override must be" not in str(exc):
        raise exc
    for arg in group_args:
        key = override_group(arg)
        if arg.split("=", 1)[1] != "null" or key not in groups:
            continue
        try:
            compose("train", overrides=[arg])
        except ValueError:
            return ConfigError(key, f"null is not an option here (leave the override out for the experiment's "
                                    f"choice); valid: {', '.join(groups[key])}")
    raise exc


# The protocol groups a single training run does not read, and where each is read
SINGLE_RUN_READS_NO = {
    "merge": "merge adapter files with experiment=merge_adapters protocol.inputs=[a.safetensors,b.safetensors]",
    "sequence": "a continual sequence is its own experiment (e.g. experiment=continual/world_objects)",
    "eval": "a training run samples with eval.validation.prompts; a protocol's experiment scores (e.g. "
            "experiment=world_concepts)",
}


def check_protocol_group_choices(cfg: DictConfig, group_args: list[str], given: Mapping[str, Optional[str]]) -> None:
    """A protocol builds each cell's data from the ``data`` group its experiment chose (the mini world's protocols
    from ``data=world``, by concept or style name, and with ``model=world``): a ``data=`` group on the command
    line that replaces it ended in a traceback (``Interpolation key 'data.world_seed' not found``) after the run
    folder was made, and a ``model=`` group in a world evaluator's "built for another world". And a ``merge`` or
    ``sequence`` group the experiment did not choose is read by nothing (the main job's merges are
    ``protocol.methods.<name>.merge``): ``lorabench merge=ties`` ran the main job as if it were not there. The
    mini world's protocols score with the world's evaluators (``eval=world``); another ``eval`` group in its place
    said ``eval.concepts.concepts: unknown value 'sks'; valid: none yet``. ``given``: the command's group choices
    (precheck's composition). Called inside :func:`precheck`'s Hydra context; one more composition (the experiment's
    own choices), only when a protocol and such a group meet. A single training run reads none of the three
    (``merge=ties`` and ``sequence=`` trained as if they were not there; ``eval=world`` ended in a traceback after
    its run folder was made), nor a ``protocol`` block with no ``_target_`` (``+protocol.seeds=[1]``: a traceback)."""
    if not (cfg.get("protocol") and cfg.protocol.get("_target_")):
        if cfg.get("protocol"):
            raise ConfigError("protocol", "has no _target_: a protocol comes with its experiment (e.g. "
                              "experiment=world_concepts, experiment=orthogonal_adaptation/world); this is a single "
                              "training run, which has none")
        for group in dict.fromkeys(override_group(a) for a in group_args):
            if group in SINGLE_RUN_READS_NO and given.get(group) is not None:
                raise ConfigError(group, f"a single training run reads no {group} group, so {group}={given[group]} "
                                  f"would change nothing; {SINGLE_RUN_READS_NO[group]}")
        return
    asked = [a for a in group_args if override_group(a) in ("model", "data", "merge", "sequence", "eval")]
    if not asked:
        return
    own = compose("train", overrides=[a for a in group_args if a not in asked],
                  return_hydra_config=True).hydra.runtime.choices
    for group in dict.fromkeys(map(override_group, asked)):
        mine, theirs = own.get(group), given.get(group)
        if group == "data" and theirs != mine:
            raise ConfigError("data", f"this protocol's experiment trains its cells on data={mine}; data={theirs} "
                                      "would replace it: leave the group out (its fields can still be set, "
                                      "data.<key>=...); one run on your own images: experiment=sd15_dreambooth_lora "
                                      "data.path=<folder>")
        if group == "model" and mine == "world" and theirs != mine:
            raise ConfigError("model", f"this protocol trains and scores the mini world, whose evaluators know its own "
                                       f"model (model=world); model={theirs} would replace it: leave the group out; a "
                                       "paper's full-scale table is its own experiment (README.md, The papers)")
        if group == "eval" and mine == "world" and theirs != mine:
            raise ConfigError("eval", f"this protocol scores the mini world with its own evaluators (eval=world); "
                                      f"eval={theirs} would replace them: leave the group out (its fields can still "
                                      "be set, eval.<key>=...)")
        if group in ("merge", "sequence") and mine is None and theirs is not None:
            own_way = ("protocol.methods.<name>.merge.name" if "methods" in cfg.protocol
                       else f"protocol.method.name=merge:{theirs}" if "method" in cfg.protocol else "")
            raise ConfigError(group, f"this protocol reads no top-level {group} group, so {group}={theirs} would "
                                     "change nothing: set the protocol's own options instead (lorabench --cfg job "
                                     f"shows them{f', e.g. {own_way}' if group == 'merge' and own_way else ''})")


def check_folders(cfg: DictConfig, overrides: list[str]) -> None:
    """The folders the job will write in, before Hydra makes its run folder there (Hydra's own failure is a
    traceback naming no field): ``paths.output_root``, a ``hydra.run.dir`` or ``hydra.sweep.dir`` given as
    a plain path, and the cell cache ``protocol.cache_dir``."""
    check_writable(OmegaConf.select(cfg, "paths.output_root"), "paths.output_root",
                   hint="$LORABENCH_OUTPUTS sets it")
    for arg in overrides:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value and "," not in value:
            check_writable(value, key)
    if cache := OmegaConf.select(cfg, "protocol.cache_dir"):
        check_writable(cache, "protocol.cache_dir")


def override_error(exc: OverrideParseException) -> ConfigError:
    """An override Hydra's grammar rejects (its message: three lines and a link) as one line naming the key and
    the usual cause: a value with characters the grammar reserves, which needs quotes that reach Hydra."""
    line = exc.override or ""
    if re.fullmatch(r"[\w.-]+", line):  # a word alone: a command that does not exist, or a key without its value
        return ConfigError(line, f"neither a command of lorabench ({', '.join(SUBCOMMANDS)}) nor an override "
                                 "(key=value); lorabench --help lists both")
    key = line.split("=", 1)[0].lstrip("+~") or "override"
    reason = " ".join(str(exc).split("\n")[0].split())
    why = "" if reason.startswith("LexerNoViableAltException") else f" ({reason})"
    return ConfigError(key, f"{line!r} is not a valid override{why}; quote a value holding characters such as "
                       f"< > = , [ ] {{ }} ( ) inside the shell's quotes, e.g. \"{key}='<value>'\"")


def composition_error(exc: Exception) -> ConfigError:
    """Hydra's composition error (several lines) as one: the key it names and what to do."""
    text = f"{exc}\n{exc.__cause__ or ''}"
    missing = re.search(r"Could not find '(.+)/([^'/]*)'\n\nAvailable options in '\1':\n((?:\t.*\n?)+)", text)
    if missing:  # a group option that does not exist (a Hydra group such as hydra/launcher): Hydra lists them
        return choice_error(missing.group(1), missing.group(2), missing.group(3).split())
    key = re.search(r"full_key: (\S+)", text) or re.search(r"override '([^']+)'", text)
    if ("not in struct" in text or "append to your config" in text) and key:
        return ConfigError(key.group(1), "not a field of this config (see it with --cfg job); check the spelling, "
                           f"or add a new key with +{key.group(1)}=...")
    first = " ".join(text.split("\n")[0].split())
    return ConfigError(key.group(1) if key else "config", first)


# When this process started: what a failed run may remove is what it wrote since (see remove_run_dir).
STARTED = time.time()


def _written_since(path: Path, since: float) -> bool:
    """Whether ``path`` (a file, or a folder and everything in it) was written at or after ``since``."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    return all(p.lstat().st_mtime >= since for p in paths if not p.is_dir())


def remove_run_dir(run_dir: Path, root: Path, sweep_dir: Optional[Path] = None, since: float = STARTED) -> None:
    """Delete what a run that failed on bad input wrote: its folder, wherever it is (under ``root``, the
    ``paths.output_root``; or a ``hydra.run.dir`` / ``hydra.sweep.dir`` elsewhere), and the folders it leaves
    empty up to ``root``. Only files written since ``since`` (this process's start) go: a folder that held
    something before keeps it (this run's ``.hydra/`` and ``cli.log`` are removed from it). A resumable
    run's folder (``state/``, or a Lightning ``checkpoints/last.ckpt``) stays. In a sweep, the sweep folder
    goes too when this job was all it held (its ``multirun.yaml`` aside)."""
    run_dir, root = run_dir.resolve(), root.resolve()
    if (run_dir / "state").is_dir() or (run_dir / "checkpoints" / "last.ckpt").is_file():
        return
    if run_dir.is_dir() and _written_since(run_dir, since - 1.0):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.is_dir():  # the user's folder: only this run's Hydra files go
        for p in [run_dir / ".hydra", *run_dir.glob("*.log")]:
            if p.exists() and _written_since(p, since - 1.0):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if sweep_dir is not None:
        sweep_dir = sweep_dir.resolve()
        _remove_empty_parents(run_dir, sweep_dir)  # a job folder named by several values: method/seed=0
        left = list(sweep_dir.iterdir()) if sweep_dir.is_dir() else []
        if [p.name for p in left] == ["multirun.yaml"] and _written_since(sweep_dir, since - 1.0):
            shutil.rmtree(sweep_dir, ignore_errors=True)
        run_dir = sweep_dir
    _remove_empty_parents(run_dir, root)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _remove_empty_parents(path: Path, top: Path) -> None:
    """The empty folders above ``path``, up to (not including) ``top``."""
    parent = path.parent
    while parent != top and top in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def check_trainer(trainer_cfg, field: str = "trainer") -> None:
    """Lightning's own validation of the trainer options, run once on a throwaway Trainer (no logger,
    no checkpoints, a temporary folder) so that a bad option fails as one line before any work."""
    import torch  # noqa: PLC0415 - heavy: the CLI's start-up (override checks, --help) does not pay for torch

    if not trainer_cfg:
        return
    opts = OmegaConf.to_container(trainer_cfg, resolve=True)
    accel, devices = str(opts.get("accelerator", "auto")), opts.get("devices", "auto")
    check_trainer_limits(opts, field)
    if accel in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if not have:
            raise ConfigError(f"{field}.accelerator", f"{accel!r} but this machine has no CUDA device; use trainer=cpu")
        if isinstance(devices, int) and devices > have:
            raise ConfigError(f"{field}.devices", f"{devices} asked, {have} CUDA device(s) here; use devices<={have} "
                              "or one process per GPU through a launcher")
    if str(opts.get("precision")) in ("16", "16-mixed") and (accel == "cpu" or accel == "auto"
                                                           and not torch.cuda.is_available()):
        # Lightning trains bf16-mixed instead, with a warning the quiet console hides: results.json said 16-mixed
        raise ConfigError(f"{field}.precision", f"{opts['precision']!r} on the CPU, where fp16 AMP does not run "
                                                "(Lightning would train bf16-mixed instead); set trainer.precision="
                                                "bf16-mixed or 32-true, or train on a GPU")
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp:
            instantiate(trainer_cfg, logger=False, callbacks=[], enable_checkpointing=False, default_root_dir=tmp,
                        _convert_="all")
    except Exception as exc:  # noqa: BLE001 - Lightning's messages, made one line
        cause = exc.__cause__ or exc
        message = " ".join(str(cause).split())
        key = re.search(r"unexpected keyword argument '(\w+)'", message) or re.search(r"`(\w+)`", message)
        if key and "unexpected keyword" in message:
            raise ConfigError(f"{field}.{key.group(1)}", "not an option of lightning.pytorch.Trainer") from exc
        # the option the message names: quoted (`devices`), or given a value (`Trainer(devices=0)`), or any word
        assigned = [k for k in opts if re.search(rf"\b{re.escape(k)}=", message)]
        named = [key.group(1)] if key and key.group(1) in opts else assigned or \
            [k for k in opts if re.search(rf"\b{re.escape(k)}\b", message, re.IGNORECASE)]
        raise ConfigError(f"{field}.{named[0]}" if named else field, message) from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def preflight(cfg: DictConfig) -> None:
    """What can be checked with no model and no data, before the run does any work: optimiser
    numbers that make no sense, the Trainer's options and the callbacks."""
    # heavy (torch, diffusers): the CLI's start-up (override checks, --help) does not pay for them
    from lorabench.adapters.tokens import check_tokens_config, for_concept  # noqa: PLC0415
    from lorabench.protocols.cells import check_batch_cells  # noqa: PLC0415
    from lorabench.protocols.scoring import check_eval_batch  # noqa: PLC0415
    from lorabench.training.module import check_cuda_graph  # noqa: PLC0415

    check_callbacks(cfg.get("callbacks"))
    if cfg.get("embeddings"):
        check_tokens_config(for_concept(OmegaConf.to_container(cfg.embeddings, resolve=True),
                                        OmegaConf.select(cfg, "data.concept")))
    adapters = OmegaConf.select(cfg, "protocol.adapters") or {}
    for key, entry in (adapters.items() if OmegaConf.is_dict(adapters) else ()):  # the sample job's is a list
        if entry is None:  # dropped from an extended experiment (protocols.cells.protocol_inputs)
            continue
        if entry.get("embeddings") is not None:  # a null token: each concept's own
            field = f"protocol.adapters.{key}.embeddings"
            check_tokens_config(for_concept(OmegaConf.to_container(entry.embeddings, resolve=True), "concept", field),
                                field)
        elif entry.get("name") is None:
            raise ConfigError(f"protocol.adapters.{key}", "names no adapter (name: lora | ortho | trilora | "
                              "custom_diffusion) and no embeddings (embeddings: {name: textual_inversion, ...})")
    if OmegaConf.select(cfg, "protocol.batch_cells") is not None:
        check_batch_cells(OmegaConf.select(cfg, "protocol.batch_cells"))
    if OmegaConf.select(cfg, "protocol.eval_batch") is not None:
        check_eval_batch(OmegaConf.select(cfg, "protocol.eval_batch"))
    if cfg.get("optim") is not None:
        check_optim(OmegaConf.to_container(cfg.optim, resolve=True), steps=OmegaConf.select(cfg, "trainer.max_steps"))
        check_group_rates(cfg)
    check_trainer(cfg.get("trainer"))
    if cfg.get("module") is not None and cfg.get("trainer") is not None:
        check_cuda_graph(OmegaConf.to_container(cfg.module, resolve=True),
                         OmegaConf.to_container(cfg.trainer, resolve=True))


def sweep_dir(hc) -> Optional[Path]:
    """The sweep's folder in a multirun (None in a single run)."""
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def fail(err: ConfigError) -> None:
    print(f"lorabench: error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_entry(cfg: DictConfig) -> Optional[float]:
    importlib.import_module("lightning.pytorch")  # it installs its handlers on import: before clearing them

    # Lightning adds its own handlers to "lightning", "lightning.pytorch" and "lightning.fabric"; each
    # line then printed twice (once through them, once through Hydra's root handler). Hydra's only.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    hc = HydraConfig.get()
    drop_adapter(cfg, hc.runtime.choices.get("adapter"))
    run_dir = Path(hc.runtime.output_dir)
    name = hc.runtime.choices.get("experiment") or "train"
    protocol = cfg.get("protocol")
    try:
        gpus = gpu_list() if hc.mode == RunMode.MULTIRUN else []
        check_claimable(gpus, OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else None)
    except ConfigError as err:  # a malformed $LORABENCH_GPUS
        remove_run_dir(run_dir, Path(cfg.paths.output_root), sweep_dir(hc))
        fail(err)
    with claim_gpu(gpus) as gpu:
        return _run_job(cfg, run_dir, name, protocol, gpu, sweep_dir(hc))


def _run_job(cfg: DictConfig, run_dir: Path, name: str, protocol, gpu: Optional[str],
             sweep: Optional[Path]) -> Optional[float]:
    # heavy (torch, diffusers, Lightning): the CLI's start-up (override checks, --help) does not pay for them
    import torch  # noqa: PLC0415

    from lorabench.loggers import finish_wandb  # noqa: PLC0415
    from lorabench.run import format_one_line  # noqa: PLC0415

    if gpu is not None:  # this job's own GPU, for training (trainer.devices) and sampling ("cuda")
        with open_dict(cfg):
            cfg.trainer.devices = [int(gpu)]
        if torch.cuda.is_available():
            torch.cuda.set_device(int(gpu))
    # the run folder keeps its console; a rank Lightning's ddp started by running this command again
    # prints nothing (rank zero does) but keeps what goes wrong in its own log
    first = first_process()
    with record_console(run_dir / console_log_name()):
        try:
            summary, objective, results = _work(cfg, run_dir, name, protocol)
        except Exception as exc:  # noqa: BLE001 - only ConfigErrors are turned into one line
            err = find_config_error(exc)
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or (err is None and sweep is None):
                raise
            if err is None:  # a sweep's job that crashed: its traceback here and in its cli.log, the sweep goes on
                traceback.print_exc()
                finish_wandb(exit_code=1)  # a protocol's W&B run: failed, not left open
                record_failure(run_dir, f"{type(exc).__name__}: {exc} (traceback in its cli.log)", bad_input=False)
                return None
        else:
            err = None
            if first and sweep is not None:  # a sweep: one line per job (the table of all comes at its end)
                print(f"lorabench {name} job {job_name(run_dir, sweep)}: {format_one_line(results)}; "
                      f"results in {run_dir / 'results.json'}")
            elif first:
                print(f"\nlorabench {name}: results in {run_dir / 'results.json'}\n{summary}")
    if err is not None and sweep is not None and set_by_sweep(err.field, swept_keys(sweep)):
        # this job's swept values are bad; the sweep's other jobs may not be: they go on
        print(f"lorabench: error: job {job_name(run_dir, sweep)}: {err}", file=sys.stderr)
        finish_wandb(exit_code=2)
        remove_run_dir(run_dir, run_dir.parent)  # what it wrote; the sweep folder stays
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), run_dir / ".hydra" / "overrides.yaml")
        record_failure(run_dir, str(err), bad_input=True)
        return None
    if err is not None:
        remove_run_dir(run_dir, Path(cfg.paths.output_root), sweep)
        fail(err)
    return objective


def _work(cfg: DictConfig, run_dir: Path, name: str, protocol) -> tuple[str, Optional[float], dict]:
    """The job itself, checks first: ``(summary printed at its end, Hydra's sweep objective, results)``."""
    from lorabench.run import format_summary, train  # noqa: PLC0415 - heavy, as in _run_job

    with quiet_cells():
        preflight(cfg)
    if protocol:
        results = get_method(protocol._target_)(cfg, run_dir)
        return "\n" + results["table"], None, results
    with quiet_cells():
        results, _ = train(cfg, run_dir, config_name=str(name))
    return format_summary(results), results["metrics"].get("val_loss_after"), results



def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("lorabench_gpu_count"):
        OmegaConf.register_new_resolver("lorabench_gpu_count", gpu_count)
    if not OmegaConf.has_resolver("lb.job_dir"):
        OmegaConf.register_new_resolver("lb.job_dir", job_dir_name)


SUBCOMMANDS = {"sample": "experiment=sample", "summarize": None, "tiny-model": None, "rebuild": None}
# Flags that may come before a command (lorabench --multirun sample ...): Hydra's multirun, lorabench's verbose;
# and Hydra's flags that take a value (lorabench --cfg job sample).
LEADING_FLAGS = ("-m", "--multirun", "-v", "--verbose")
VALUE_FLAGS = ("-c", "--cfg", "-p", "--package")


def hydra_args(args: list[str]) -> list[str]:
    """A command line's arguments as Hydra reads them: the sample command as its experiment, first or after the
    :data:`LEADING_FLAGS` and :data:`VALUE_FLAGS` (``lorabench --multirun sample ...`` read "sample: neither a
    command of lorabench (sample, ...) nor an override"). A command of its own (summarize, rebuild, tiny-model)
    after flags is a ConfigError: it comes first."""
    lead = 0
    while lead < len(args) and args[lead] in LEADING_FLAGS + VALUE_FLAGS:
        lead += 2 if args[lead] in VALUE_FLAGS else 1
    if lead >= len(args) or args[lead] not in SUBCOMMANDS:
        return list(args)
    if SUBCOMMANDS[args[lead]] is None:
        raise ConfigError(args[lead], f"a command comes first: lorabench {args[lead]} ..., without "
                                      f"{' '.join(args[:lead])}")
    return [*args[:lead], SUBCOMMANDS[args[lead]], *args[lead + 1:]]


def check_command(args: list[str]) -> list[str]:
    """A command's arguments (after ``lorabench``, a subcommand made its experiment, ``-v`` taken out) as
    Hydra gets them, ``adapter=null`` as ``adapter=none``, once every check that needs no model, no data
    and no torch has passed: each group's option exists (:func:`check_group_overrides`), then
    :func:`precheck`; a ``local_gpus`` sweep's ``$LORABENCH_GPUS`` is set and well formed; ``-m`` first
    (``lorabench experiment=quickstart -m seed=0,1`` was Hydra's "unrecognized arguments: seed=0,1": its parser
    takes the overrides as one run of words). Raises the first :class:`ConfigError`."""
    args = [a for a in args if a in MULTIRUN_FLAGS] + [a for a in args if a not in MULTIRUN_FLAGS]
    args = no_adapter_overrides(args)
    check_group_overrides(args)
    if set(MULTIRUN_FLAGS) & set(args) and "hydra/launcher=local_gpus" in args:
        gpu_count()  # its GPUs listed (Hydra reads the count when it starts the launcher: a traceback from there)
    precheck(args)
    return args


def main() -> None:
    if not first_process():  # a rank Lightning's ddp started by running this command again: ends with rank zero
        end_with_parent()  # (a rank zero stopped by SIGKILL left the others waiting on it for good)
    # lorabench sample ...: the sample job (experiment=sample, hydra_args); lorabench summarize <dir>: a sweep's
    # table; lorabench rebuild <paper> RUNS...: a paper's tables from finished runs
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS and SUBCOMMANDS[sys.argv[1]] is None:
        if sys.argv[1] == "summarize":
            sys.exit(summarize_main(sys.argv[2:]))
        if sys.argv[1] == "rebuild":  # lorabench rebuild <paper> RUNS... = python -m lorabench.protocols rebuild ...
            from lorabench.protocols.__main__ import main as rebuild_main  # noqa: PLC0415 - heavy: torch

            rebuild_main(sys.argv[1:])
            return
        if sys.argv[1] == "tiny-model":
            from lorabench.models.tiny import main as tiny_main  # noqa: PLC0415 - heavy: torch, diffusers

            tiny_main(sys.argv[2:])
            return
    try:
        sys.argv = [sys.argv[0], *hydra_args(sys.argv[1:])]
    except ConfigError as err:
        fail(err)
    _register_resolvers()
    # -v / --verbose: the full console output of every library (see lorabench.utils.console).
    verbose_flags = {"-v", "--verbose"}
    if verbose_flags & set(sys.argv[1:]):
        os.environ[VERBOSE_ENV] = "1"
        sys.argv = [a for a in sys.argv if a not in verbose_flags]
    try:
        sys.argv = [sys.argv[0], *check_command(sys.argv[1:])]
    except ConfigError as err:
        fail(err)
    _hydra_entry()
    if EXIT_STATUS["status"]:  # a sweep whose jobs did not all finish: their table is printed, their count too
        sys.exit(EXIT_STATUS["status"])


if __name__ == "__main__":
    main()
