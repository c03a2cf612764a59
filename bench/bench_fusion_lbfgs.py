"""Mix-of-Show gradient fusion by LBFGS at the world's sizes: one process against ``merge.workers`` processes.

The world's ED-LoRA adapts 64 layers (46 of 64 x 64: text-encoder attention and the UNet's wider
blocks; 18 of 32 x 32). Three concepts' rank-4 updates are fused per layer by LBFGS (500 iterations,
the world config's solver) on input statistics ``G_i = X_i X_i^T`` shaped like the captured ones:
rank-deficient for the text encoder (40 token rows) and full rank with a decaying spectrum for the
UNet. At these sizes each LBFGS iteration is mostly the optimizer's own Python work, so the layers'
independent solves split across processes (``merge.workers``, spawned once and kept).

Printed: the median merge time of each setting over ``--repeats`` runs (the pool's spawn is paid
before the first timed run, as a protocol pays it once for dozens of merges), their ratio, the
iterations LBFGS used, and how far the two settings' results are from the closed-form minimiser's
objective (LBFGS stops at 500 iterations, before convergence in the ill-conditioned directions, so
its result depends on rounding; both settings land on the same objective to that precision).

``--schedule 2 16 64``: instead, each layer's solve timed alone in one one-thread process, and the makespan of
those solves spread over that many processes (longest first onto the least loaded, as the pool's queue does):
whether the layers are even enough that one process a core finishes a merge in about ``total / workers``, or
whether a slow layer bounds it (then a batched solver would pay on a many-core GPU host).

    python bench/bench_fusion_lbfgs.py
    python bench/bench_fusion_lbfgs.py --schedule 2 16 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorabench.merging import AdapterUpdate, merge  # noqa: E402
from lorabench.merging.methods import fuse_closed_form, fusion_objective, ridge_value  # noqa: E402


def world_like(n_concepts: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"text.{i}": (64, 64, 40) for i in range(16)}
    shapes |= {f"unet.wide.{i}": (64, 64, 256) for i in range(30)}
    shapes |= {f"unet.narrow.{i}": (32, 32, 1024) for i in range(18)}
    updates, stats = [], []
    for c in range(n_concepts):
        factors, grams = {}, {}
        for name, (out, inn, rows) in shapes.items():
            factors[name] = (0.3 * torch.randn(out, 4, generator=g), 0.3 * torch.randn(4, inn, generator=g))
            x = torch.randn(inn, rows, generator=g) * torch.logspace(0, -2, inn).unsqueeze(1)
            grams[name] = x @ x.T / rows
        updates.append(AdapterUpdate(f"concept{c}", factors))
        stats.append(grams)
    return updates, stats


def schedule(workers: list[int]) -> None:
    """Each layer's LBFGS solve timed alone (one thread), then its makespan over ``workers`` processes."""
    import time

    from lorabench.merging.methods import fuse_lbfgs

    torch.set_num_threads(1)
    updates, stats = world_like()
    solves = []
    for layer in stats[0]:
        deltas = [u.delta(layer).double() for u in updates]
        grams = [s[layer].double() for s in stats]
        rho = ridge_value(grams, 1e-4)
        t0 = time.perf_counter()
        _, iters = fuse_lbfgs(deltas, grams, rho, 500, 1e-10)
        solves.append((time.perf_counter() - t0, iters))
    times = sorted((t for t, _ in solves), reverse=True)
    total = sum(times)
    print(f"{len(times)} layers, 3 concepts, one thread: {total:.2f} s of solving; a layer's solve median "
          f"{statistics.median(times):.3f} s, longest {times[0]:.3f} s; iterations {min(i for _, i in solves)}-"
          f"{max(i for _, i in solves)} (of 500)")
    for w in workers:
        loads = [0.0] * w
        for t in times:  # longest first onto the least loaded process
            loads[loads.index(min(loads))] += t
        print(f"workers={w}: makespan {max(loads):.2f} s, against {total / w:.2f} s for a perfect split "
              f"({max(loads) / (total / w):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schedule", type=int, nargs="*", metavar="WORKERS",
                    help="time each layer's solve alone, and print the makespan over these process counts")
    args = ap.parse_args()
    if args.schedule:
        return schedule(args.schedule)
    torch.set_num_threads(2)
    updates, stats = world_like()
    config = {"name": "gradient_fusion", "solver": "lbfgs"}
    merge(updates[:2], {**config, "max_iter": 2, "workers": args.workers}, stats=stats[:2])  # spawn the pool
    times, results = {}, {}
    for w in (1, args.workers):
        runs = [merge(updates, {**config, "workers": w}, stats=stats) for _ in range(args.repeats)]
        times[w] = statistics.median(r.merge_s for r in runs)
        results[w] = runs[-1]
    gaps = {w: [] for w in results}
    for layer in stats[0]:
        deltas = [u.delta(layer).double() for u in updates]
        grams = [s[layer].double() for s in stats]
        rho = ridge_value(grams, 1e-4)
        best = float(fusion_objective(fuse_closed_form(deltas, grams, rho), deltas, grams, rho))
        for w, r in results.items():
            value = float(fusion_objective(r.deltas[layer].dense.double(), deltas, grams, rho))
            gaps[w].append((value - best) / best)
    iters = sum(results[1].info["lbfgs_iterations"].values())
    print(f"{len(stats[0])} layers, 3 concepts, LBFGS {iters} iterations in all (one process)")
    for w in results:
        print(f"workers={w}: {times[w]:.2f} s per merge (median of {args.repeats}); objective above the "
              f"closed form: median {statistics.median(gaps[w]):.2e}, max {max(gaps[w]):.2e}")
    print(f"ratio workers=1 / workers={args.workers}: {times[1] / times[args.workers]:.2f}x")


if __name__ == "__main__":
    main()
