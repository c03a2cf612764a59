"""What a LoRA training step costs over the frozen base model's own forward and backward, and what
gradient checkpointing saves in memory.

Three steps on identical UNets (SD1.5's architecture at full size with ``--size sd15-like``: 512 px,
64 x 64 latents, 77 text tokens), timed interleaved (A B C A B C ...) so machine noise hits all alike:

- ``base``: the frozen UNet, forward + MSE + backward to the input latents (no weight gradients): the
  floor any adapter step pays;
- ``lora``: lorabench LoRA (rank ``--rank``) on to_q/k/v/out, forward + backward + AdamW, as training steps
  on CUDA (the factors of every layer cast in one go, ``factors_cast_once``);
- ``lora-layercast`` (CUDA, or a CPU with ``--count``): the same with each layer casting its own factors
  (the step before ``factors_cast_once``), to measure what casting them together saves;
- ``lora+ckpt``: the same with gradient checkpointing (``module.gradient_checkpointing=true``);
- ``lora-ref``: the same LoRA with every layer forced onto the reference arithmetic the CPU uses
  (``base(x) + adapter_forward(x)``) instead of the fused CUDA path, to show what the fused path saves;
- with ``--compile``, ``base-compiled`` and ``lora-compiled``: both UNets through ``torch.compile``
  (``module.compile=true``); their first warm-up steps compile;
- with ``--graph`` (CUDA), ``base-graph``, ``lora-graph`` and ``lora-graph-layercast``: those steps
  captured whole as CUDA graphs (:class:`lorabench.training.cuda_graph.CapturedStep`: forward, loss,
  backward and the fused, capturable AdamW in one replay), which takes the CPU's kernel launches out of
  the step.

Read ``lora / base`` (goal on a GPU: <= 1.10; ``lora-graph / base-graph`` where launches are gone) and the
peak memory of ``lora`` against ``lora+ckpt`` (CUDA only).

With ``--count``, one more step of each eager variant counts the operators it dispatches (each about one
kernel on a GPU), and what LoRA adds per adapted layer. On a CPU ``--count`` puts the ``lora`` and
``lora-layercast`` rows (their counts and times) on the CUDA path (``fused_forward``), so ``--size
sd15-shape`` (SD1.5's 128 adapted layers at toy widths) predicts the GPU's count in seconds.

    python bench/bench_lora_overhead.py --device cuda --size sd15-like --batch 4 --dtype bfloat16 [--compile] [--graph]
    python bench/bench_lora_overhead.py --size tiny --steps 5      # a CPU smoke run of the script
    python bench/bench_lora_overhead.py --size sd15-shape --steps 0 --warmup 1 --count --only base,lora,lora-ref
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_train_step import SIZES, TARGETS, build_unet, graphed_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="sd15-like")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd base and LoRA variants")
    ap.add_argument("--graph", action="store_true", help="add base and LoRA steps captured as CUDA graphs (CUDA)")
    ap.add_argument("--only", default="", help="comma list of variants to time (default: all asked for)")
    ap.add_argument("--count", action="store_true", help="count the operators one eager step of each dispatches")
    args = ap.parse_args()
    if args.graph and args.device != "cuda":
        raise SystemExit("--graph needs --device cuda (CUDA graphs)")

    from lorabench.adapters import Adapters
    from lorabench.adapters.base import factors_cast_once
    from lorabench.utils.launches import count_ops

    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base, s, in_ch = build_unet(args.size)
    layercast = ["lora-layercast"] if args.device == "cuda" or args.count else []
    names = ["base", "lora", *layercast, "lora+ckpt", "lora-ref"] \
        + (["base-compiled", "lora-compiled"] if args.compile else []) \
        + (["base-graph", "lora-graph", "lora-graph-layercast"] if args.graph else [])
    if args.only:
        asked = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in asked if n not in names]
        if bad or "base" not in asked or "lora" not in asked:
            raise SystemExit(f"--only: {args.only!r}; it needs base and lora, and names among {', '.join(names)}")
        names = [n for n in names if n in asked]
    unets = {name: copy.deepcopy(base).to(dev, dtype) for name in names}
    params = {name: [] for name in names}
    # the rows whose step casts every layer's factors in one go, as training does on CUDA (not compiled)
    once = {"lora", "lora+ckpt", "lora-graph"} if dev.type == "cuda" else ({"lora"} if args.count else set())
    layers = {name: [] for name in names}
    n_layers = 0
    for name in [n for n in names if n.startswith("lora")]:
        ad = Adapters.inject({"unet": unets[name]}, {"name": "lora", "rank": args.rank, "target_modules": TARGETS})
        params[name], n_layers = ad.trainable_parameters(), len(ad)  # float32 master weights, as in training
        layers[name] = list(ad.layers.values()) if name in once else []
        if name in ("lora", "lora-layercast") and args.count and dev.type != "cuda":  # the CUDA path here
            for layer in ad.layers.values():
                layer.forward = layer.fused_forward
        if name == "lora-ref":
            for layer in ad.layers.values():
                layer.forward = layer.reference_forward
    if "lora+ckpt" in unets:
        unets["lora+ckpt"].enable_gradient_checkpointing()
    for name in [n for n in names if n.endswith("-compiled")]:
        unets[name].compile()
    for u in unets.values():
        u.train()  # checkpointing (and any dropout) as in training; the frozen weights do not change

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, in_ch, s["res"], s["res"], generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    e = torch.randn(args.batch, s["text_len"], s["cross_attention_dim"], generator=g).to(dev, dtype)
    target = torch.randn(x.shape, generator=g).to(dev, dtype)

    def make_step(name):
        if name.endswith("-graph"):
            return graphed_step(unets[name], params[name], x, t, e, target, dtype, layers[name])
        unet, ps = unets[name], params[name]
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True) if ps else None  # as training on CUDA, on any device

        def step():
            inp = x.detach().requires_grad_(not ps)  # the base model's backward reaches the input
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32), \
                    factors_cast_once(layers[name], dev.type):
                out = unet(inp, t, e).sample
            torch.nn.functional.mse_loss(out.float(), target.float()).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    steps = {}
    for name in unets:
        try:
            steps[name] = make_step(name)
        except Exception as exc:  # a capture or compile that fails leaves the other rows standing
            if not name.endswith(("-graph", "-compiled")):
                raise
            print(f"  {name}: could not be set up: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {k: [] for k in steps}
    peak = {}
    order = list(steps)
    for i in range(args.warmup + args.steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            if name not in steps:
                continue
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                steps[name]()
            except Exception as exc:  # e.g. a compile that fails at its first step: drop that row only
                if not name.endswith(("-graph", "-compiled")):
                    raise
                print(f"  {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                del steps[name], times[name]
                continue
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    ops = {}
    if args.count:  # one more step each after the warm ones (the optimiser's state exists by then)
        ops = {name: count_ops(fn) for name, fn in steps.items() if not name.endswith(("-graph", "-compiled"))}
    med = {k: statistics.median(v) for k, v in times.items() if v}
    n_params = sum(p.numel() for p in base.parameters())
    print(f"UNet {args.size} ({n_params / 1e6:.0f}M params), {s['res'] * (8 if in_ch == 4 else 1)} px, batch "
          f"{args.batch}, LoRA rank {args.rank}, {args.device} {args.dtype}, {args.steps} interleaved steps each, "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if cuda else ""))
    for k, n in ops.items():
        extra = f"   {(n - ops['base']) / n_layers:5.2f} a layer over base" if k != "base" and n_layers else ""
        path = " (the CUDA path)" if k in ("lora", "lora-layercast") and not cuda else ""
        print(f"  {k:<14} {n:6d} operators a step{path}{extra}")
    if not med:
        return
    for k, v in med.items():
        q = statistics.quantiles(times[k], n=4)
        mem = f"   peak {peak[k] / 2**30:6.2f} GiB" if k in peak else ""
        print(f"  {k:<20} median {v * 1000:8.1f} ms/step   (IQR {q[0] * 1000:.1f}-{q[2] * 1000:.1f}){mem}")
    print(f"  ratio lora / base = {med['lora'] / med['base']:.3f}   (goal <= 1.10)")
    if "lora-ref" in med:
        print(f"  ratio lora-ref / base = {med['lora-ref'] / med['base']:.3f}   "
              "(the reference arithmetic on this device)")
    if "lora-compiled" in med and "base-compiled" in med:
        print(f"  ratio lora-compiled / base-compiled = {med['lora-compiled'] / med['base-compiled']:.3f};  "
              f"lora-compiled / base (eager) = {med['lora-compiled'] / med['base']:.3f}")
    if "lora-graph" in med and "base-graph" in med:
        print(f"  ratio lora-graph / base-graph = {med['lora-graph'] / med['base-graph']:.3f}   (goal <= 1.10);  "
              f"lora-graph / lora (eager) = {med['lora-graph'] / med['lora']:.3f}")
    for a, b in (("lora-layercast", "lora"), ("lora-graph-layercast", "lora-graph")):
        if a in med and b in med:
            print(f"  ratio {a} / {b} = {med[a] / med[b]:.3f}   (each layer casting its own factors, against all "
                  "cast together)")
    if "lora+ckpt" in med:
        print(f"  ratio lora+ckpt / lora = {med['lora+ckpt'] / med['lora']:.3f}")
        if peak:
            print(f"  peak memory lora+ckpt / lora = {peak['lora+ckpt'] / peak['lora']:.3f}")


if __name__ == "__main__":
    main()
