"""How many CPUs a job is given, for the pools of one-thread processes lorabench spawns (the LBFGS solver
processes of ``merge.workers: auto``, the threads of ``protocol.train_workers``' cell workers)."""

from __future__ import annotations

import os

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
