"""How many CPUs a job is given, for the pools of one-thread processes lorabench spawns (the LBFGS solver
processes of ``merge.workers: auto``, the threads of ``protocol.train_workers``' cell workers), and those
pools, whose processes end with the process that started them."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Optional

ENV = "OMP_NUM_THREADS"


def cpu_budget() -> int:
    """The CPUs this process is given: ``$OMP_NUM_THREADS`` where it is set to a positive integer (the usual
    way to hand a job its share of a machine; OpenMP reads its first entry, so does this), else the CPUs it
    may run on (its affinity, or every CPU where the system does not say). A process started with
    ``OMP_NUM_THREADS=2`` beside others, as ``bench/gpu_rows.sh`` starts its `gpu` test shards, so spawns two
    solver processes, not one a core of the whole machine."""
    first = os.environ.get(ENV, "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _exit_when_orphaned(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:  # re-parented: the process that started this one is gone
            os._exit(1)


def end_with_parent(parent: Optional[int] = None, poll_s: float = 1.0) -> None:
    """End this process within ``poll_s`` seconds of its parent's end (a daemon thread watching that this
    process's parent is still ``parent``: the pid of the process that started it, given where it may have
    ended before this call, else the parent now). A protocol's cell workers and solver processes, when the job
    was stopped by SIGTERM or SIGKILL (``kill``, ``timeout``, a scheduler) rather than Ctrl-C (which reaches
    them too), trained on, orphaned, to the end of their cell: minutes on the CPU, hours of a GPU at full
    scale; ddp_spawn's ranks waited on each other for good."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid() if parent is None else parent, poll_s),
                     daemon=True, name="lorabench-end-with-parent").start()


def _start_worker(parent: int, initializer: Optional[Callable], initargs: tuple) -> None:
    end_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(workers: int, initializer: Optional[Callable] = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes (a clean interpreter each: no forked torch or CUDA state) that end with
    this one (:func:`end_with_parent`), each running ``initializer(*initargs)`` first."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
