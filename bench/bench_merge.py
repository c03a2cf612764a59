"""Merging 10 rank-64 LoRA adapters into an SD1.5-shaped UNet, against the memory-bandwidth floor and PEFT.

The UNet has SD1.5's architecture with random weights (no download). Ten rank-64 LoRA adapters on
to_q, to_k, to_v, to_out.0 are merged by summation into the base weights:

- lorabench: ``merge(updates, {"name": "sum"})`` (the factors concatenated, rank 640) and then
  ``fold``: ``W += U D`` in place, the layers of one shape in one batched matmul; beside it the same
  fold layer by layer (``LayerDelta.add_to_``, one matmul per layer), and their largest difference;
- PEFT: ``add_weighted_adapter(..., combination_type="cat")`` then ``merge_adapter()`` (its unmerge
  between repeats is not timed);
- the floor: one read and one write of every adapted weight, timed in the same run as a single
  large tensor copy of that many bytes.

Printed: the medians of ``--repeats`` runs and the ratios to the floor (goal on a GPU: at most 1 ms).

``--overhead`` keeps the 128 layers and their six shape groups but gives each group a tiny shape (and
rank 4), so the arithmetic vanishes and what is left is the host's work per merge: Python, dispatch and
kernel launches, what bounded the merge on an H200 (7.55 ms for 0.15 ms of arithmetic). It runs on the
CPU too, and compares the stacked sum + fold (the factors kept stacked per shape, a few kernels per
shape) with the per-layer one and with the shape-group concatenation that preceded the stacks.

    python bench/bench_merge.py                      # CPU
    python bench/bench_merge.py --overhead           # host work per merge, on the CPU
    python bench/bench_merge.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import TARGETS, build_unet  # noqa: E402
from lorabench.merging import AdapterUpdate, LayerDelta, fold, merge  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def copy_time(nbytes: int, device, repeats: int) -> float:
    """Median time of one copy of ``nbytes`` (one read and one write of every byte)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), device, repeats)[0]


def unstacked_sum(updates, lam):
    """The sum as it was before the stacks: the layers of one shape concatenated, a view per layer."""
    by_shape = {}
    for layer, (up, down) in updates[0].layers.items():
        by_shape.setdefault((up.shape[0], down.shape[1]), []).append(layer)
    out = {}
    for layers in by_shape.values():
        ups = torch.cat([u.layers[k][0] for k in layers for u in updates], dim=1) * lam
        downs = torch.cat([u.layers[k][1] for k in layers for u in updates], dim=0)
        r = sum(u.layers[layers[0]][0].shape[1] for u in updates)
        for j, k in enumerate(layers):
            out[k] = LayerDelta(up=ups[:, j * r:(j + 1) * r], down=downs[j * r:(j + 1) * r])
    return out


def overhead(args, device, dtype, layers) -> None:
    """Host time per merge + fold with the arithmetic made negligible (see the module's docstring)."""
    shapes = sorted({tuple(m.weight.shape) for m in layers.values()})
    tiny = {s: (4 + k, 5 + k) for k, s in enumerate(shapes)}
    weights = {n: torch.zeros(tiny[tuple(m.weight.shape)], device=device, dtype=dtype) for n, m in layers.items()}
    g = torch.Generator().manual_seed(0)
    updates = [AdapterUpdate(f"a{i}", {n: (torch.randn(w.shape[0], 4, generator=g).to(device, dtype),
                                          torch.randn(4, w.shape[1], generator=g).to(device, dtype))
                                      for n, w in weights.items()}) for i in range(args.adapters)]
    repeats = max(args.repeats, 50)

    def per_layer(deltas):
        for n, d in deltas.items():
            d.add_to_(weights[n])

    rows = {
        "stacked sum + stacked fold": lambda: fold(weights, merge(updates, {"name": "sum", "lam": 1.0}).deltas),
        "stacked sum + per-layer fold": lambda: per_layer(merge(updates, {"name": "sum", "lam": 1.0}).deltas),
        "shape-group sum + grouped fold": lambda: fold(weights, unstacked_sum(updates, 1.0)),
    }
    print(f"host work per merge ({len(weights)} layers in {len(shapes)} shape groups, {args.adapters} adapters, "
          f"tiny shapes on {device}; median of {repeats}):")
    base = None
    with torch.no_grad():
        for name, fn in rows.items():
            fn()
            t, _ = timed(fn, device, repeats)
            base = base or t
            print(f"  {name:32s} {t * 1e3:7.3f} ms   ({t / base:.2f}x the first)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--adapters", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", default="sd15-like")
    ap.add_argument("--overhead", action="store_true", help="host work per merge only (tiny shapes)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet, _, _ = build_unet(args.size)
    unet = unet.to(device, dtype)
    layers = {n: m for n, m in unet.named_modules() if n.split(".")[-1] in ("to_q", "to_k", "to_v")
              or n.endswith("to_out.0")}
    if args.overhead:
        return overhead(args, device, dtype, layers)
    weights = {n: m.weight for n, m in layers.items()}
    n_params = sum(w.numel() for w in weights.values())
    nbytes = n_params * weights[next(iter(weights))].element_size()
    g = torch.Generator().manual_seed(0)
    updates = [AdapterUpdate(f"a{i}", {n: ((torch.randn(w.shape[0], args.rank, generator=g) * 0.01).to(device, dtype),
                                          (torch.randn(args.rank, w.shape[1], generator=g) * 0.01).to(device, dtype))
                                      for n, w in weights.items()}) for i in range(args.adapters)]
    print(f"torch {torch.__version__}, {device} {args.dtype}, {torch.get_num_threads()} threads; {len(weights)} "
          f"adapted layers, {n_params / 1e6:.1f}M weights ({nbytes / 2**20:.0f} MiB); {args.adapters} adapters x rank "
          f"{args.rank}")

    t_floor = copy_time(nbytes, device, max(args.repeats, 10))  # the floor: one read + one write of nbytes

    originals = {n: w.detach().clone() for n, w in weights.items()}

    def ours():
        fold(weights, merge(updates, {"name": "sum", "lam": 1.0}).deltas)

    def per_layer():
        res = merge(updates, {"name": "sum", "lam": 1.0})
        with torch.no_grad():
            for n, d in res.deltas.items():
                d.add_to_(weights[n])

    results = {}
    for name, fn in (("grouped", ours), ("per_layer", per_layer)):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(originals[n])
        fn()  # one untimed run: its result, then warm
        results[name] = {n: w.detach().float().clone() for n, w in weights.items()}
    diff = max(float((results["grouped"][n] - results["per_layer"][n]).abs().max()) for n in weights)
    scale = max(float(r.abs().max()) for r in results["per_layer"].values())
    t_ours, _ = timed(ours, device, args.repeats)
    t_per_layer, _ = timed(per_layer, device, args.repeats)
    # where the grouped merge's time goes: the sum alone, and the fold's batched products alone
    stacks = list({id(d.stack): d.stack for d in merge(updates, {"name": "sum", "lam": 1.0}).deltas.values()}.values())
    t_sum, _ = timed(lambda: merge(updates, {"name": "sum", "lam": 1.0}), device, max(args.repeats, 10))
    t_bmm, _ = timed(lambda: [torch.bmm(st.ups, st.downs) for st in stacks], device, max(args.repeats, 10))

    # PEFT on the same UNet and the same factors
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False)
    model = LoraModel(unet, cfg, "a0")
    for i in range(1, args.adapters):
        model.peft_config[f"a{i}"] = cfg
        model.inject_adapter(unet, f"a{i}")
    with torch.no_grad():
        for n, mod in unet.named_modules():
            if hasattr(mod, "lora_A") and n in layers:
                for i, u in enumerate(updates):
                    up, down = u.layers[n]
                    mod.lora_A[f"a{i}"].weight.copy_(down)
                    mod.lora_B[f"a{i}"].weight.copy_(up)
    names = [f"a{i}" for i in range(args.adapters)]
    peft_times = []
    for k in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        model.add_weighted_adapter(names, [1.0] * len(names), f"merged{k}", combination_type="cat")
        model.set_adapter(f"merged{k}")
        model.merge_adapter()
        sync(device)
        peft_times.append(time.perf_counter() - t0)
        model.unmerge_adapter()  # untimed: puts the base weights back for the next repeat
        model.set_adapter("a0")
        model.delete_adapter(f"merged{k}")
    t_peft = statistics.median(peft_times)
    print(f"floor (read + write {nbytes / 2**20:.0f} MiB, one copy): {t_floor * 1e3:9.1f} ms "
          f"({2 * nbytes / t_floor / 1e9:.1f} GB/s)")
    print(f"lorabench sum + grouped fold:            {t_ours * 1e3:9.2f} ms   {t_ours / t_floor:6.2f}x floor")
    print(f"lorabench sum + per-layer fold:          {t_per_layer * 1e3:9.2f} ms   {t_per_layer / t_floor:6.2f}x floor"
          f"   (grouped / per-layer = {t_ours / t_per_layer:.2f}; largest difference {diff:.2e}, "
          f"{diff / scale:.1e} of the largest weight)")
    print(f"PEFT add_weighted_adapter(cat) + merge_adapter:   {t_peft * 1e3:9.1f} ms   {t_peft / t_floor:6.2f}x floor"
          f"   (lorabench / PEFT = {t_ours / t_peft:.2f})")
    flops = 2 * sum(w.numel() for w in weights.values()) * args.rank * args.adapters
    print(f"compute of the fold: {flops / 1e9:.0f} GFLOP = {flops / t_ours / 1e9:.0f} GFLOP/s achieved; arithmetic "
          f"intensity {flops / (2 * nbytes):.0f} FLOP/byte (above the machine's FLOP/byte balance the floor is "
          "out of reach)")
    print(f"  of which: the sum alone {t_sum * 1e3:.3f} ms; the fold's {len(stacks)} batched products alone "
          f"{t_bmm * 1e3:.3f} ms ({flops / t_bmm / 1e9:.0f} GFLOP/s; shapes "
          f"{', '.join('x'.join(map(str, (st.ups.shape[0], st.ups.shape[1], st.downs.shape[2]))) for st in stacks)}"
          f", inner {stacks[0].ups.shape[2]})")


if __name__ == "__main__":
    main()
