"""Evaluation in batches: K settings of the world model sampled one by one against in one pass.

A setting is what the world Table 2 samples for one cell or one merge: its concept's 3 prompts x
``--images`` seeds, 25 DPM steps with guidance (the world's eval sampler), and its own weights on the
UNet's attention projections (here a random rank-4 update on to_q, to_k, to_v and to_out.0, as a LoRA cell
or a merge gives). Both ways go through the protocols' own path (:class:`lorabench.protocols.scoring.EvalBatch`):

- alone: ``eval_batch=1``, each setting's update merged into the weights, then sampled (what the world
  configs do);
- together: ``eval_batch=K``, each setting's prompts encoded, then every setting in one UNet batch, each
  updated Linear holding one weight per setting.

Printed, side by side in one run (the two ways interleaved ``--repeats`` times, medians): the time per
setting, the operators dispatched per setting (``--count``; on a GPU about one kernel launch each, so the
count says what a launch-bound GPU pays), and the largest difference between the two ways' images.

    python bench/bench_eval_batch.py --settings 28 --count         # CPU
    python bench/bench_eval_batch.py --device cuda --settings 28 64 --count
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorabench.merging import LayerDelta
from lorabench.protocols.scoring import EvalBatch
from lorabench.sampling import eval_mode
from lorabench.utils.launches import count_ops
from lorabench.world.assets import load_world_model

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPTS = ["a photo of sks", "a photo of sks on the left, black background", "a photo of sks at the top"]


def settings_of(model, k: int, rank: int = 4) -> list[dict[str, LayerDelta]]:
    """``k`` settings, each a random rank-``rank`` update on every attention projection of the UNet."""
    gen = torch.Generator().manual_seed(0)
    layers = [(n, m) for n, m in model.unet.named_modules() if n.endswith(TARGETS) and isinstance(m, torch.nn.Linear)]
    out = []
    for _ in range(k):
        out.append({f"unet.{n}": LayerDelta(up=0.05 * torch.randn(m.out_features, rank, generator=gen),
                                            down=torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5)
                    for n, m in layers})
    return out


def run_way(model, sampler: dict, device, size: int, deltas, seeds) -> dict:
    evals = EvalBatch(model, sampler, device, size)
    for i, d in enumerate(deltas):
        evals.add(i, PROMPTS, seeds, d)
    images = evals.images()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", type=int, nargs="+", default=[28])
    ap.add_argument("--images", type=int, default=4, help="seeds a prompt (the world Table 2: 4)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--count", action="store_true", help="operators dispatched per setting, both ways")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = load_world_model(name="world", world_seed=0, resolution=16, dtype="float32")
    eval_mode(model, device)
    sampler = {"scheduler": "dpm", "num_inference_steps": args.steps, "guidance_scale": 3.0, "batch_size": 64,
               "progress": False}
    seeds = list(range(args.images))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}; a setting: "
          f"{len(PROMPTS)} prompts x {args.images} images, {args.steps} steps")
    run_way(model, sampler, device, 2, settings_of(model, 2), seeds)  # warm-up both paths
    run_way(model, sampler, device, 1, settings_of(model, 1), seeds)
    for k in args.settings:
        deltas = settings_of(model, k)
        times = {"alone": [], "together": []}
        images = {}
        for _ in range(args.repeats):
            for way, size in (("alone", 1), ("together", k)):
                t0 = time.perf_counter()
                images[way] = run_way(model, sampler, device, size, deltas, seeds)
                times[way].append((time.perf_counter() - t0) / k)
        diff = max((images["alone"][i] - images["together"][i]).abs().max().item() for i in range(k))
        med = {w: statistics.median(t) for w, t in times.items()}
        line = (f"K={k:>3}: alone {1e3 * med['alone']:8.1f} ms a setting, together {1e3 * med['together']:8.1f} ms "
                f"a setting ({med['alone'] / med['together']:.2f}x); images differ by at most {diff:.1e}")
        if args.count:
            ops = {w: count_ops(lambda s=s: run_way(model, sampler, device, s, deltas, seeds)) / k
                   for w, s in (("alone", 1), ("together", k))}
            line += f"; operators a setting: alone {ops['alone']:.0f}, together {ops['together']:.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
