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

``--capture``: each setting is instead the capture of a cell's input statistics, as the world Table 2 runs
it for gradient fusion and the update sizes (a LoRA adapter injected with the setting's update, an
:class:`~lorabench.merging.InputStats` on its layers; its first prompt x 4 seeds, 10 DPM steps), and the
difference printed is the largest relative one between the two ways' ``X^T X / n``.

    python bench/bench_eval_batch.py --settings 28 --count         # CPU
    python bench/bench_eval_batch.py --settings 28 --count --capture
    python bench/bench_eval_batch.py --device cuda --settings 28 64 --count
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorabench.adapters import inject_adapters
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


def capture_way(model, sampler: dict, device, size: int, deltas, seeds) -> dict:
    """Each setting's ``{layer: X^T X / n}``: its update injected as a LoRA adapter while it is added, its first
    prompt sampled alone (``size`` 1) or in passes of ``size``, as the Orthogonal Adaptation protocol captures."""
    evals, stats = EvalBatch(model, sampler, device, size), {}
    for i, d in enumerate(deltas):
        ad = inject_adapters(model, {"name": "lora", "rank": 4, "target_modules": list(TARGETS)})
        with torch.no_grad():
            for name, layer in ad.layers.items():
                layer.lora_up.copy_(d[name].up)
                layer.lora_down.copy_(d[name].down)
        try:
            evals.capture(i, ad, PROMPTS[:1], seeds, d, then=lambda result, i=i: stats.__setitem__(i, result[0]))
        finally:
            ad.remove()
        if evals.full:
            evals.sample()
    evals.sample()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stats


def largest_difference(a: dict, b: dict, capture: bool) -> float:
    """The largest difference of the two ways' images, or (``capture``) of their grams relative to each layer's."""
    if not capture:
        return max((a[i] - b[i]).abs().max().item() for i in a)
    return max(((b[i][k] - g).abs().max() / g.abs().max()).item() for i in a for k, g in a[i].items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", type=int, nargs="+", default=[28])
    ap.add_argument("--images", type=int, default=4, help="seeds a prompt (the world Table 2: 4)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--count", action="store_true", help="operators dispatched per setting, both ways")
    ap.add_argument("--capture", action="store_true", help="each setting a capture of its layers' input statistics")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = load_world_model(name="world", world_seed=0, resolution=16, dtype="float32")
    eval_mode(model, device)
    steps = 10 if args.capture and args.steps == 25 else args.steps  # the world's capture: 10 steps
    sampler = {"scheduler": "dpm", "num_inference_steps": steps, "guidance_scale": 3.0, "batch_size": 64,
               "progress": False}
    way = capture_way if args.capture else run_way
    seeds = list(range(args.images))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}; a setting: "
          f"{'a capture of 1' if args.capture else len(PROMPTS)} prompts x {args.images} images, {steps} steps")
    way(model, sampler, device, 2, settings_of(model, 2), seeds)  # warm-up both paths
    way(model, sampler, device, 1, settings_of(model, 1), seeds)
    what = "grams' largest relative difference" if args.capture else "images differ by at most"
    for k in args.settings:
        deltas = settings_of(model, k)
        times = {"alone": [], "together": []}
        results = {}
        for _ in range(args.repeats):
            for mode, size in (("alone", 1), ("together", k)):
                t0 = time.perf_counter()
                results[mode] = way(model, sampler, device, size, deltas, seeds)
                times[mode].append((time.perf_counter() - t0) / k)
        diff = largest_difference(results["alone"], results["together"], args.capture)
        med = {w: statistics.median(t) for w, t in times.items()}
        line = (f"K={k:>3}: alone {1e3 * med['alone']:8.1f} ms a setting, together {1e3 * med['together']:8.1f} ms "
                f"a setting ({med['alone'] / med['together']:.2f}x); {what} {diff:.1e}")
        if args.count:
            ops = {m: count_ops(lambda s=s: way(model, sampler, device, s, deltas, seeds)) / k
                   for m, s in (("alone", 1), ("together", k))}
            line += f"; operators a setting: alone {ops['alone']:.0f}, together {ops['together']:.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
