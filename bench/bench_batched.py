"""K adapters trained in one pass (protocol.batch_cells) against one after another, side by side in one run.

``--mode cells`` (the CPU question: is batching at least as fast as today's two one-thread processes?)
trains the same ``--cells`` world cells of ``--adapter`` (LoRA by default; ``all``: ``--cells`` of each of
the world Table 2's seven adapter types, its cell stage at ``--cells 12``; the Orthogonal Adaptation world
recipe, ``--steps`` steps, batch 8) into fresh caches through the protocols' own code path
(``lorabench.protocols.cells.run_cells``), three ways (``--ways`` picks beside separate):

  separate : ``--workers`` one-thread processes, each training cells one by one (today's world default);
  batched  : ``--workers`` one-thread processes, each training its share of the cells in one pass (auto);
  one pass : one process with every core's threads, all cells in one pass;
  one pass graph : the same with ``module.cuda_graph=true`` (on CUDA each step is one graph replay).

With ``--device cuda`` the cells train with ``trainer=gpu`` (the GPU question: how much do passes and
graphs take off a launch-bound world cell?).

and prints cells per minute and the ratio to ``separate``.

``--mode step`` (the GPU question) times training steps of ``--concepts`` LoRA adapters on one UNet of
``--size`` (bench_train_step's sizes; ``sd15-like`` is SD1.5's UNet at 512 px), each concept at batch
``--batch``: one after another (one adapter, a step each) against all stacked in one model (one step
for all), as concept-steps per second, steps interleaved so machine noise hits both alike. As lorabench
trains: the frozen UNet in ``--dtype``, the adapters' float32 masters, autocast to ``--dtype``, fused AdamW.
``--count`` also counts the operators a step of each dispatches (on a CPU it puts both on the CUDA paths,
``fused_forward`` and ``batched_forward``, for the count and the times).

    python bench/bench_batched.py --mode cells --cells 8 --steps 60
    python bench/bench_batched.py --mode cells --adapter all --cells 12 --steps 200 --ways batched
    python bench/bench_batched.py --mode step --device cuda --size sd15-like --concepts 4 --batch 1 --dtype bfloat16

Step mode first checks that stacking changes nothing but rounding: ``--check-steps`` steps of every member
stacked against each member alone from the same initial values and inputs, beside the floor that says
what rounding is (each member alone in float32 against itself in ``--dtype``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONCEPTS = ["sks", "twt", "vlx", "xod"]


def cells_mode(args) -> None:
    from hydra import compose, initialize_config_dir

    from lorabench.protocols.cells import cached, run_cells

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    tmp = Path(tempfile.mkdtemp())
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        overrides = [f"paths.output_dir={tmp}", f"paths.output_root={tmp}", "experiment=orthogonal_adaptation/world",
                     f"trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false",
                     *(["trainer=gpu"] if args.device == "cuda" else [])]
        cfg = compose("train", overrides)
        graph_cfg = compose("train", [*overrides, "module.cuda_graph=true"])
    from lorabench.adapters.ortho import concept_configs

    names = list(cfg.protocol.adapters) if args.adapter == "all" else [args.adapter]
    for name in names:
        if name not in cfg.protocol.adapters:
            raise SystemExit(f"--adapter: {name!r} is not one of the world's adapters "
                             f"({', '.join(cfg.protocol.adapters)}) or all")
    cells = []
    for name in names:  # each type's cells as the protocol builds them
        acfgs = concept_configs(cfg.protocol.adapters[name], CONCEPTS, None, name)
        for i in range(args.cells):
            c, seed = CONCEPTS[i % len(CONCEPTS)], i // len(CONCEPTS)
            cells.append((acfgs[c], {"concept": c}, seed, f"{name}-{c}-seed{seed}"))
    all_ways = {"separate": (args.workers, 1, cfg), "batched": (args.workers, "auto", cfg),
                "one pass": (1, "auto", cfg), "one pass graph": (1, "auto", graph_cfg)}
    asked = [w.strip() for w in args.ways.split(",") if w.strip()]
    if any(w not in all_ways for w in asked):
        raise SystemExit(f"--ways: {args.ways!r}; valid: a comma list of {', '.join(list(all_ways)[1:])}")
    ways = {w: all_ways[w] for w in ("separate", *asked)}
    rates = {}
    try:
        for name, (workers, batch, way_cfg) in ways.items():
            cache = tmp / name.replace(" ", "_")
            torch.set_num_threads(os.cpu_count() or 2)
            t = time.perf_counter()
            done = run_cells([cached(way_cfg, a, d, s, cache, n) for a, d, s, n in cells], batch, workers, cache)
            wall = time.perf_counter() - t
            assert not any(d.reused for d in done), name
            rates[name] = len(cells) / wall * 60
            print(f"  {name:>9}: {workers} process(es), batch_cells={batch}: {wall:6.1f} s, "
                  f"{rates[name]:.2f} cells/min", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"world {args.adapter} cells: {len(cells)} x {args.steps} steps, {os.cpu_count()} cores")
    for name, r in rates.items():
        print(f"  {name:>9}: {r / rates['separate']:.2f}x the cells per minute of separate")


def step_mode(args) -> None:
    from bench_train_step import TARGETS, build_unet
    from lorabench.adapters import Adapters
    from lorabench.adapters.base import factors_cast_once
    from lorabench.adapters.stacked import StackedAdapters, take_out
    from lorabench.utils.launches import count_ops

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base_unet, s, in_ch = build_unet(args.size)
    # as lorabench trains: the frozen UNet in --dtype, the adapters' float32 masters, autocast to --dtype
    single_unet = copy.deepcopy(base_unet).to(dev, dtype)
    stacked_unet = copy.deepcopy(single_unet)
    k, b = args.concepts, args.batch
    cfg = {"name": "lora", "rank": args.rank, "target_modules": TARGETS}
    # one after another: every concept's run is one adapter at batch b; its step costs what any other's does
    single = Adapters.inject({"unet": single_unet}, cfg)
    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(Adapters.inject({"unet": stacked_unet}, cfg))
        take_out(members[-1])
    stacked = StackedAdapters(members)
    if args.count and dev.type != "cuda":  # count (and time) the CUDA paths on this device
        for layer in single.layers.values():
            layer.forward = layer.fused_forward
        for layer in stacked.layers.values():
            layer.forward = layer.batched_forward

    # both steps as training runs them on CUDA: every (stacked) layer's factors cast in one go
    single_layers = list(single.layers.values()) if dev.type == "cuda" or args.count else []
    stacked_layers = list(stacked.layers.values()) if dev.type == "cuda" or args.count else []

    def make_step(unet, params, n, route, layers=()):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as training on CUDA, on any device

        def step():
            x = torch.randn(n, in_ch, s["res"], s["res"], device=dev, dtype=dtype)
            ctx = torch.randn(n, s["text_len"], s["cross_attention_dim"], device=dev, dtype=dtype)
            with route(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32), \
                    factors_cast_once(layers, dev.type):
                out = unet(x, torch.randint(0, 1000, (n,), device=dev), ctx).sample
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    if args.check_steps:
        check_equal(args, base_unet, single, stacked, single_unet, stacked_unet, s, in_ch, dev, dtype)
    one = make_step(single_unet, single.trainable_parameters(), b, contextlib.nullcontext, single_layers)
    many = make_step(stacked_unet, stacked.trainable_parameters(), k * b, lambda: stacked.router.route([b] * k),
                     stacked_layers)

    def timed(step):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        timed(one), timed(many)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_one, t_many = [], []
    for _ in range(args.steps):  # interleaved, so machine noise hits both alike
        t_one.append(timed(one))
        t_many.append(timed(many))
    print(f"{args.size} UNet, {k} LoRA adapters (rank {args.rank}) at batch {b} each, {args.device} {args.dtype}, "
          "float32 adapters")
    if args.count:
        paths = " (the CUDA paths)" if dev.type != "cuda" else ""
        print(f"  operators a step{paths}: one concept {count_ops(one)}, {k} stacked {count_ops(many)}")
    if not args.steps:
        return
    a, m = statistics.median(t_one), statistics.median(t_many)
    print(f"  one after another: {a * 1000:.1f} ms a step of 1 concept, {1 / a:.2f} concept-steps/s")
    print(f"  stacked          : {m * 1000:.1f} ms a step of {k} concepts, {k / m:.2f} concept-steps/s")
    if dev.type == "cuda":
        print(f"  peak memory of both models' steps: {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    print(f"  ratio: {(k / m) / (1 / a):.2f}x the concept-steps per second")


def check_equal(args, base_unet, single, stacked, single_unet, stacked_unet, s, in_ch, dev, dtype) -> None:
    """Train ``--check-steps`` steps of every member stacked, and of each member alone from the same initial
    values and inputs (its own AdamW), and print how far each member's update is from its separate run's
    (relative Frobenius norm over its layers, and the largest element-wise difference). Beside it, the floor
    that says what "to ``--dtype`` rounding" means: each separate run again with the UNet in float32 and no
    autocast, against the same run in ``--dtype``."""
    from lorabench.adapters import Adapters

    k, b, n_steps = args.concepts, args.batch, args.check_steps
    g = torch.Generator().manual_seed(0)
    data = [[(torch.randn(b, in_ch, s["res"], s["res"], generator=g), torch.randint(0, 1000, (b,), generator=g),
              torch.randn(b, s["text_len"], s["cross_attention_dim"], generator=g)) for _ in range(n_steps)]
            for _ in range(k)]
    init = {full: {n: getattr(layer, n).detach().clone() for n in layer.param_names}
            for full, layer in stacked.layers.items()}

    def loss_of(unet, x, t, c, dt=dtype):
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            out = unet(x.to(dev, dt), t.to(dev), c.to(dev, dt)).sample
        return out.float().square().mean(dim=(1, 2, 3))

    opt = torch.optim.AdamW(stacked.trainable_parameters(), lr=1e-3, fused=True)
    for i in range(n_steps):
        x, t, c = (torch.cat([data[m][i][j] for m in range(k)]) for j in range(3))
        with stacked.router.route([b] * k):
            per = loss_of(stacked_unet, x, t, c)
        torch.stack([chunk.mean() for chunk in per.split(b)]).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runs = [(single, single_unet, dtype)]
    if dtype != torch.float32:
        ref_unet = copy.deepcopy(base_unet).to(dev)
        runs.append((Adapters.inject({"unet": ref_unet}, single.config), ref_unet, torch.float32))

    def separate(m, adapters, unet, dt):  # member m's update, trained alone
        with torch.no_grad():
            for full, layer in adapters.layers.items():
                for n in stacked.layers[full].param_names:
                    layer.get_parameter(n).copy_(init[full][n][m])
        opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-3, fused=True)
        for i in range(n_steps):
            loss_of(unet, *data[m][i], dt=dt).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {(full, n): layer.get_parameter(n).detach().float() - init[full][n][m].float()
                for full, layer in adapters.layers.items() for n in stacked.layers[full].param_names}

    def apart(a, b):  # relative Frobenius difference over every tensor, and the largest element's
        num = sum(float((a[key] - b[key]).norm()) ** 2 for key in a)
        den = sum(float(a[key].norm()) ** 2 for key in a)
        return (num / max(den, 1e-30)) ** 0.5, max(float((a[key] - b[key]).abs().max()) for key in a)

    worst, floor = [0.0, 0.0], [0.0, 0.0]
    for m in range(k):
        sep = separate(m, *runs[0])
        bat = {(full, n): getattr(stacked.layers[full], n)[m].detach().float() - init[full][n][m].float()
               for full, n in sep}
        worst = [max(w, v) for w, v in zip(worst, apart(sep, bat))]
        if len(runs) > 1:
            floor = [max(w, v) for w, v in zip(floor, apart(separate(m, *runs[1]), sep))]
    print(f"  equality after {n_steps} steps (lr 1e-3): each member's update against its separate run's: "
          f"largest relative difference {worst[0]:.2e} (Frobenius), largest element {worst[1]:.2e}")
    if len(runs) > 1:
        print(f"  the {args.dtype} floor: each separate run against itself in float32: largest relative difference "
              f"{floor[0]:.2e}, largest element {floor[1]:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cells", "step"], default="cells")
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--adapter", default="lora",
                    help="cells mode: one of the world Table 2's protocol.adapters, or all (--cells of each)")
    ap.add_argument("--ways", default="batched,one pass",
                    help="cells mode: beside separate, a comma list of: batched, one pass, one pass graph "
                         "(module.cuda_graph: each step replayed as a CUDA graph; eager on the CPU)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--concepts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--count", action="store_true",
                    help="step mode: count the operators a step of each dispatches (on a CPU, of the CUDA paths)")
    ap.add_argument("--check-steps", type=int, default=3,
                    help="step mode: first train this many steps stacked and separately and print how far apart")
    args = ap.parse_args()
    cells_mode(args) if args.mode == "cells" else step_mode(args)


if __name__ == "__main__":
    main()
