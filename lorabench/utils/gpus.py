"""One GPU per job for sweeps on one machine (``hydra/launcher=local_gpus``): each job claims a free GPU
of ``$LORABENCH_GPUS`` with an exclusive lock file (:mod:`filelock`) held for the job's life, so parallel
jobs never share a device, however the launcher orders them."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock, Timeout

from lorabench.errors import ConfigError

ENV = "LORABENCH_GPUS"


def gpu_list(value: Optional[str] = None) -> list[str]:
    """The GPU ids of ``$LORABENCH_GPUS`` (``0,1,2,3``); empty when unset."""
    value = os.environ.get(ENV, "") if value is None else value
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if any(not v.isdigit() for v in ids):
        raise ConfigError(ENV, f"must be comma-separated GPU indices such as 0,1,2,3; got {value!r}")
    return ids


def gpu_count() -> int:
    """``hydra.launcher.n_jobs`` of local_gpus: one job per listed GPU."""
    ids = gpu_list()
    if not ids:
        raise ConfigError(ENV, "not set; hydra/launcher=local_gpus runs one job per GPU: e.g. LORABENCH_GPUS=0,1,2,3")
    return len(ids)


def check_claimable(ids: list[str], trainer: Optional[dict]) -> None:
    """One line naming ``$LORABENCH_GPUS`` where its GPUs cannot be what a job trains on: a job whose
    trainer is not on a CUDA GPU (a CPU job was handed ``trainer.devices=[k]`` and failed on that field,
    which the user never set), no CUDA device here, or an index this process does not see
    (``CUDA_VISIBLE_DEVICES`` renumbers the visible GPUs from 0)."""
    if not ids:
        return
    accel = str((trainer or {}).get("accelerator", "auto"))
    if accel not in ("gpu", "cuda", "auto"):
        raise ConfigError(ENV, f"{','.join(ids)} is set, but trainer.accelerator is {accel!r}, not a CUDA GPU: "
                          "unset it, or train on the GPUs with trainer=gpu")
    import torch  # noqa: PLC0415 - heavy: only a sweep with GPUs listed pays for it, in its jobs

    have = torch.cuda.device_count()
    if not have:
        raise ConfigError(ENV, f"{','.join(ids)} is set, but this machine shows no CUDA device; unset it, or run "
                          "where the GPUs are")
    unseen = [i for i in ids if int(i) >= have]
    if unseen:
        raise ConfigError(ENV, f"GPU {unseen[0]} is not one of the {have} CUDA device(s) this process sees "
                          f"(indices 0 to {have - 1}; CUDA_VISIBLE_DEVICES numbers the visible GPUs from 0)")


def try_claim(ids: list[str], lock_dir: Path) -> Optional[tuple[str, FileLock]]:
    """(gpu, its held lock) for the first free GPU of ``ids``, or ``None`` when all are held."""
    for gpu in ids:
        lock = FileLock(lock_dir / f"lorabench-gpu{gpu}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return gpu, lock
    return None


@contextmanager
def claim_gpu(ids: list[str], lock_dir: Optional[str] = None, poll_s: float = 5.0) -> Iterator[Optional[str]]:
    """Hold the first free GPU of ``ids`` (``None`` when ``ids`` is empty) until the block ends; with
    every GPU held (more jobs than GPUs), wait for one."""
    if not ids:
        yield None
        return
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    while (claimed := try_claim(ids, lock_dir)) is None:
        time.sleep(poll_s)
    gpu, lock = claimed
    try:
        yield gpu
    finally:
        lock.release()
