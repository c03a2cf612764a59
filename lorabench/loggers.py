"""Experiment loggers: Lightning's CSV logger always, W&B when configured.

W&B runs offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads later).
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning_utilities.core.imports import RequirementCache

from lorabench.errors import ConfigError
from lorabench.utils.console import note

WANDB_MODES = ("offline", "online", "disabled")
WANDB_SERVICE_DEFAULT = RequirementCache("wandb>=0.21")  # the service process needs no wandb.require


class _HeaderReadingWriter(ExperimentWriter):
    """Lightning's CSV writer, but the columns it writes under are the file's header and its own keys
    together, read from the file before each save. Lightning's writer knows only the keys it logged itself,
    which under ddp_spawn is wrong: each ``validate`` and ``fit`` runs in new worker processes that receive
    the writer as the main process pickled it (no keys), while the file holds the earlier worker's rows. The
    fit's first save then rewrote the file under its own keys, and a row with ``val/loss`` failed with
    "dict contains fields not in fieldnames" (a ``trainer=ddp_cpu`` run crashed on its 5th step)."""

    def _record_new_keys(self) -> set[str]:
        header: list[str] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
        self.metrics_keys[:] = sorted(set(self.metrics_keys).union(header, *self.metrics))
        # save() rewrites the file under these columns where its header lacks one (headers here are sorted)
        return set(self.metrics_keys) - set(header)


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` writing through :class:`_HeaderReadingWriter`: one ``csv/metrics.csv`` a
    run, whichever processes wrote its rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer, made on first use as Lightning's is (rank zero only)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HeaderReadingWriter(log_dir=self.log_dir)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it always hands ``wandb.init``: recent wandb (0.31)
    prints "The anonymous setting has no effect" for any value of that deprecated setting, None included,
    on every W&B run's console."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    def __getstate__(self) -> dict[str, Any]:
        """Lightning's pickling for spawned workers (ddp_spawn pickles the logger for each validate and fit),
        without its ``wandb.require("service")``: the default since wandb 0.21, where the call only prints
        "is a no-op" once a worker, six times a DDP quickstart."""
        import wandb  # noqa: PLC0415 - as Lightning's: only a W&B run pickles this logger

        if not WANDB_SERVICE_DEFAULT:
            return super().__getstate__()
        require = wandb.require
        wandb.require = lambda feature: None if feature == "service" else require(feature)
        try:
            return super().__getstate__()
        finally:
            wandb.require = require


def _tags(tags) -> list[str]:
    """``logger.wandb.tags``: a list, or one tag (``tags=ablation``: its letters were the tags)."""
    if tags is None:
        return []
    return [str(tags)] if isinstance(tags, str) else [str(t) for t in tags]


def previous_wandb_id(run_dir: str | os.PathLike) -> Optional[str]:
    """The id of the W&B run that last logged from ``run_dir`` (its ``wandb/latest-run``, a link to
    ``[offline-]run-<time>-<id>``), None where none did."""
    latest = Path(run_dir) / "wandb" / "latest-run"
    try:
        name = os.readlink(latest) if latest.is_symlink() else ""
    except OSError:
        return None
    found = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)", Path(name).name)
    return found.group(1) if found else None


def build_loggers(cfg: Optional[Mapping[str, Any]], run_dir: str | os.PathLike, run_name: str,
                  resolved_config: Mapping[str, Any], job_type: str = "train",
                  resume_id: Optional[str] = None) -> list[Logger]:
    """``cfg`` is the ``logger`` config: ``{csv: {...}, wandb: {...} | null}``. W&B runs are grouped by
    ``wandb.group`` (the experiment) and typed ``job_type`` (train / merge / eval, from the caller) unless
    the config sets one. ``resume_id``: the W&B run of the part of this run before it resumed
    (:func:`previous_wandb_id`); an online run goes on logging to it (one run, one curve on the dashboard), an
    offline one starts its own and says so (W&B cannot resume offline runs, wandb/wandb#2423)."""
    cfg = dict(cfg or {})
    run_dir = Path(run_dir)
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wb = cfg.get("wandb")
    mode_field = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.wandb.mode"  # where the mode was set
    mode = None
    if wb:
        wb = dict(wb)
        mode = os.environ.get("WANDB_MODE") or wb.pop("mode", None) or "offline"
        wb.pop("mode", None)
        if mode not in WANDB_MODES:
            raise ConfigError(mode_field, f"unknown mode {mode!r}; valid: {', '.join(WANDB_MODES)}")
        if resume_id and "id" not in wb and mode == "online":
            wb["id"] = resume_id  # Lightning's logger asks wandb.init to resume="allow" it
        elif resume_id and mode == "offline":
            note(f"lorabench: W&B cannot resume the offline run {resume_id}; the resumed part logs to a run of its "
                 "own (wandb sync uploads both; online runs go on in theirs)")
        loggers.append(RunWandbLogger(
            project=wb.pop("project", "lorabench"), name=wb.pop("name", None) or run_name,
            group=wb.pop("group", None), job_type=wb.pop("job_type", None) or job_type,
            tags=_tags(wb.pop("tags", None)), save_dir=str(run_dir), mode=mode, **wb))
    for lg in loggers:
        try:
            lg.log_hyperparams(dict(resolved_config))  # W&B's run starts here
        except Exception as exc:
            unknown = isinstance(exc, TypeError) and re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if isinstance(lg, WandbLogger) and unknown:  # a key under logger.wandb that wandb.init does not take
                raise ConfigError(f"logger.wandb.{unknown.group(1)}", "not an option of wandb.init (project, name, "
                                  "group, job_type, tags, mode, entity, notes, ...)") from exc
            if not isinstance(lg, WandbLogger) or type(exc).__module__.split(".")[0] != "wandb":
                raise
            # online without an API key (or without the network): wandb.init's UsageError, a traceback before
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            wandb = sys.modules["wandb"]
            if wandb.setup().most_recent_active_run is None:
                wandb.teardown()  # the service the failed start left running, as finish_wandb ends it
            raise ConfigError(mode_field, f"W&B could not start the {mode} run ({said}); log offline "
                                          "(logger.wandb.mode=offline, then wandb sync the run folder's wandb/) or "
                                          "run wandb login first") from exc
    return loggers


def finish_wandb(exit_code: int = 0) -> None:
    """End the W&B run of this job (needed between jobs of a multirun) and wait until it is on disk;
    ``exit_code`` other than 0 marks it failed (a sweep's job that failed, whose sweep goes on).

    ``wandb.finish()`` can return before W&B's service process has written the run's records: a CI run
    read an offline run's ``run-*.wandb`` file straight after it and found only the file header. So the
    service is then torn down too (``wandb.teardown()`` waits for it to exit; the next run starts a new
    one), which also covers processes whose ``atexit`` hooks do not run (multiprocessing workers)."""
    wandb = sys.modules.get("wandb")  # no W&B run can be open if nothing imported wandb
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
        # finish() always clears wandb.run; only the setup knows whether another run still logs (teardown would end it)
        if wandb.setup().most_recent_active_run is None:
            wandb.teardown()


def set_aside_csv(run_dir: str | os.PathLike) -> Optional[Path]:
    """Before a resumed run builds its loggers (Lightning's CSV logger deletes an existing metrics.csv):
    move the first part's ``csv/metrics.csv`` aside; :func:`join_csv` puts the two parts together."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    aside = path.with_name("metrics.before_resume.csv")
    path.replace(aside)
    return aside


def join_csv(run_dir: str | os.PathLike, aside: Optional[Path], resumed_step: int) -> None:
    """One ``csv/metrics.csv`` for a run resumed at ``resumed_step``: the first part's rows before it, then
    the resumed part's rows from it on (the first part's later rows were trained again; the resumed part's
    earlier ones are its validation before fitting, the first part's again), under the union of columns. The
    first part's validation at ``resumed_step`` itself (a run that ended, resumed to more steps) scored the
    checkpoint's weights, which the resumed part does not score again: it stays."""
    if aside is None or not aside.is_file():
        return
    path = Path(run_dir) / "csv" / "metrics.csv"
    parts = []
    for file in (aside, path):
        if file.is_file():
            with open(file, newline="") as f:
                parts.append(list(csv.DictReader(f)))
        else:
            parts.append([])

    def step(row) -> int:
        return int(row.get("step") or 0)

    def kept(row) -> bool:  # trained before the checkpoint, or the checkpoint's own validation
        return step(row) < resumed_step or step(row) == resumed_step and not any(
            v for k, v in row.items() if k.startswith("train/"))

    rows = [r for r in parts[0] if kept(r)] + [r for r in parts[1] if step(r) >= resumed_step]
    keys = sorted({k for r in rows for k in r})
    tmp = path.with_name(".metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    aside.unlink()
