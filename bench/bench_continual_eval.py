"""Continual evaluation cost: after task t the protocol scores every seen task, so its cost should
grow linearly with the number of seen tasks, and each task's references should be embedded once.

The world object sequence (conf/experiment/continual/world_objects.yaml) with the base model: after
"task" t, score tasks 0..t exactly as the protocol does (lorabench.continual.tasks.score_tasks),
timing each evaluation and counting reference embeddings. Prints seconds per evaluation, seconds per
seen task (flat if linear), a least-squares line and its R^2, and the reference-embedding count.

    python bench/bench_continual_eval.py
    python bench/bench_continual_eval.py --images-per-prompt 8 --repeats 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="evaluations per t (the minimum is kept)")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lorabench.continual.tasks import build_scorer, resolve_sequence, score_tasks
    from lorabench.utils.seeding import derive_seed_list

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=continual/world_objects", "paths.output_dir=/tmp/bench",
                                          f"eval.images_per_prompt={args.images_per_prompt}"])
    torch.manual_seed(0)
    kind, tasks = resolve_sequence(cfg)
    scorer = build_scorer(cfg, kind)
    comps = instantiate(cfg.model, _convert_="all")
    sampler = dict(cfg.eval.sampler)
    seeds = derive_seed_list("continual-eval", 0, args.images_per_prompt)
    score_tasks(comps, sampler, tasks[:1], seeds, scorer)  # warm-up (first-call allocations)
    scorer.refs.clear()
    scorer.reference_embeddings = 0
    times, counts = [], []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(tasks)} tasks, "
          f"{len(tasks[0].prompts)} prompts x {len(seeds)} images per task")
    print(f"{'seen':>5} {'eval s':>8} {'s / seen task':>14} {'reference embeddings':>21}")
    for t in range(len(tasks)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            score_tasks(comps, sampler, tasks[:t + 1], seeds, scorer)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
        counts.append(scorer.reference_embeddings)
        print(f"{t + 1:>5} {best:>8.2f} {best / (t + 1):>14.3f} {scorer.reference_embeddings:>21}")
    x = np.arange(1, len(tasks) + 1)
    slope, intercept = np.polyfit(x, times, 1)
    pred = slope * x + intercept
    r2 = 1 - ((np.array(times) - pred) ** 2).sum() / ((np.array(times) - np.mean(times)) ** 2).sum()
    print(f"\nline: {slope:.3f} s per seen task + {intercept:.3f} s; R^2 = {r2:.4f}")
    print(f"time ratio last/first = {times[-1] / times[0]:.2f} for {len(tasks)}x the tasks")
    print(f"reference embeddings: {counts[-1]} for {len(tasks)} tasks over {len(tasks)} evaluations "
          f"({'each task once' if counts == list(range(1, len(tasks) + 1)) else 'RECOMPUTED'})")


if __name__ == "__main__":
    main()
