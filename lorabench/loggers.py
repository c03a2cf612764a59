"""Experiment loggers: Lightning's CSV logger always, W&B when configured.

W&B runs offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads later).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from lorabench.errors import ConfigError

WANDB_MODES = ("offline", "online", "disabled")


def build_loggers(cfg: Optional[Mapping[str, Any]], run_dir: str | os.PathLike, run_name: str,
                  resolved_config: Mapping[str, Any], job_type: str = "train") -> list[Logger]:
    """``cfg`` is the ``logger`` config: ``{csv: {...}, wandb: {...} | null}``. W&B runs are grouped by
    ``wandb.group`` (the experiment) and typed ``job_type`` (train / merge / eval, from the caller) unless
    the config sets one."""
    cfg = dict(cfg or {})
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wb = cfg.get("wandb")
    if wb:
        wb = dict(wb)
        mode = os.environ.get("WANDB_MODE") or wb.pop("mode", None) or "offline"
        wb.pop("mode", None)
        if mode not in WANDB_MODES:
            raise ConfigError("WANDB_MODE", f"unknown mode {mode!r}; valid: {', '.join(WANDB_MODES)}")
        loggers.append(WandbLogger(
            project=wb.pop("project", "lorabench"), name=wb.pop("name", None) or run_name,
            group=wb.pop("group", None), job_type=wb.pop("job_type", None) or job_type,
            tags=list(wb.pop("tags", None) or []), save_dir=str(run_dir), mode=mode, **wb))
    for lg in loggers:
        lg.log_hyperparams(dict(resolved_config))
    return loggers


def finish_wandb() -> None:
    """End the W&B run of this job (needed between jobs of a multirun) and wait until it is on disk.

    ``wandb.finish()`` can return before W&B's service process has written the run's records: a CI run
    read an offline run's ``run-*.wandb`` file straight after it and found only the file header. So the
    service is then torn down too (``wandb.teardown()`` waits for it to exit; the next run starts a new
    one), which also covers processes whose ``atexit`` hooks do not run (multiprocessing workers)."""
    wandb = sys.modules.get("wandb")  # no W&B run can be open if nothing imported wandb
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
        # finish() always clears wandb.run; only the setup knows whether another run still logs (teardown would end it)
        if wandb.setup().most_recent_active_run is None:
            wandb.teardown()
