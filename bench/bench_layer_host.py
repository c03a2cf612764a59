"""The host's time per adapted layer in an eager training step: what a launch-bound GPU step pays per
LoRA layer, with the arithmetic made negligible.

``--layers`` tiny Linear layers (16 x 16, bf16) in a row, each with a rank-4 LoRA (float32 masters), one
forward and backward under bf16 autocast on ``--device``, timed interleaved (A B C A B C ...), medians over
``--steps``, divided by the layers:

- ``reference``: the CPU's arithmetic, ``base(x) + adapter_forward(x)``;
- ``fused``: :meth:`~lorabench.adapters.base.AdapterLayer.fused_forward` (``LowRankLinear``), each layer
  casting its own factors;
- ``fused, cast once``: the same under :func:`~lorabench.adapters.base.factors_cast_once`, as training
  steps on CUDA.

On a GPU this is dispatch and launch time (the kernels are tiny); on a CPU mostly dispatch. The operator
counts (``bench_lora_overhead.py --count``) say what a captured step's graph holds; this says what an eager
step's host does.

    python bench/bench_layer_host.py                    # CPU
    python bench/bench_layer_host.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    from lorabench.adapters import Adapters
    from lorabench.adapters.base import factors_cast_once

    dev = torch.device(args.device)
    variants = ("reference", "fused", "fused, cast once")
    models, layers = {}, {}
    for name in variants:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(args.layers))).to(dev, torch.bfloat16)
        ad = Adapters.inject({"unet": model}, {"name": "lora", "rank": 4, "target_modules": ["re:[0-9]+"]})
        for layer in ad.layers.values():
            layer.forward = layer.fused_forward if name != "reference" else layer.reference_forward
        models[name], layers[name] = model, list(ad.layers.values())
    x = torch.randn(2, 16, device=dev, dtype=torch.bfloat16, requires_grad=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(name):
        once = factors_cast_once(layers[name], dev.type) if name == "fused, cast once" else contextlib.nullcontext()
        with torch.autocast(dev.type, dtype=torch.bfloat16), once:
            y = models[name](x)
        y.float().sum().backward()

    times = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name in (variants if i % 2 == 0 else variants[::-1]):
            sync()
            t0 = time.perf_counter()
            step(name)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    print(f"{args.layers} LoRA layers (16 x 16, rank 4, bf16 autocast, float32 masters) on {args.device}, "
          f"torch {torch.__version__}; forward + backward, median of {args.steps} interleaved steps:")
    med = {k: statistics.median(v) / args.layers for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<18} {v * 1e6:7.1f} us a layer   ({v / med['reference']:.2f}x the reference)")


if __name__ == "__main__":
    main()
