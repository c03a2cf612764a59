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
  the step; and, where ``--rank`` is not a multiple of 8, ``lora-graph-r8`` (the rank rounded up to one,
  e.g. 8 for 4): a bf16 rank-4 factor's rows are 8 bytes, under the 16-byte alignment cuBLAS's tensor-core
  GEMMs want, so the adapter's GEMMs may run on slower kernels; rank 4 padded with zeros to 8 would launch
  exactly rank 8's kernels, so ``lora-graph-r8 / lora-graph`` <= 1 says that padding the rank pays.

Read ``lora / base`` (goal on a GPU: <= 1.10; ``lora-graph / base-graph`` where launches are gone) and the
peak memory of ``lora`` against ``lora+ckpt`` (CUDA only).

With ``--count``, one more step of each eager variant counts the operators it dispatches (each about one
kernel on a GPU), and what LoRA adds per adapted layer. On a CPU ``--count`` puts the ``lora`` and
``lora-layercast`` rows (their counts and times) on the CUDA path (``fused_forward``), so ``--size
sd15-shape`` (SD1.5's 128 adapted layers at toy widths) predicts the GPU's count in seconds.

With ``--kernels``, one more eager step of ``base`` and of ``lora`` under ``torch.profiler``: the time the
device spent in each step's operators (self time: CUDA kernels on a GPU, the operators' own CPU time on a CPU)
and their ratio, the floor a captured step's ``lora-graph / base-graph`` approaches once launches are gone;
then what LoRA adds, by operator and input shapes (the rank shows which are the adapter's), largest first. On
the 2026-12-04 H200 the captured ratio was 1.209 against the goal 1.10: this says which kernels hold the rest.

    python bench/bench_lora_overhead.py --device cuda --size sd15-like --batch 4 --dtype bfloat16 [--compile] [--graph]
    python bench/bench_lora_overhead.py --size tiny --steps 5      # a CPU smoke run of the script
    python bench/bench_lora_overhead.py --size sd15-shape --steps 0 --warmup 1 --count --only base,lora,lora-ref
    python bench/bench_lora_overhead.py --device cuda --size sd15-like --dtype bfloat16 --kernels --graph
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_train_step import SIZES, TARGETS, build_unet, graphed_step


def device_times(step, cuda: bool, reps: int = 3) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
    """``reps`` calls of ``step`` under ``torch.profiler``, per step: ``{"ops": {(operator, input shapes): (calls,
    self time in us)}, "kernels": {(kernel, ""): (launches, time in us)}}``. On CUDA an operator's self time is the
    time of the kernels it launched, and each kernel is also an event of its own (the profiler lists both), so the
    step's kernel time is the kernels' sum, not the operators'; elsewhere the operators' own CPU time, no kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(reps):
            step()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, dict] = {"ops": {}, "kernels": {}}
    for e in prof.key_averages(group_by_input_shape=True):
        on_device = e.device_type != DeviceType.CPU
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and (cuda or not on_device):
            out["kernels" if on_device else "ops"][e.key, "" if on_device else str(e.input_shapes)] = \
                (e.count / reps, us / reps)
    return out


def _added(lora: dict, base: dict) -> tuple[list, float]:
    """What ``lora`` calls more often than ``base`` ((extra time, extra calls, name, shapes), largest first) and the
    time the entries both call as often moved."""
    added, moved = [], 0.0
    for key in set(base) | set(lora):
        (n1, t1), (n0, t0) = lora.get(key, (0, 0.0)), base.get(key, (0, 0.0))
        if n1 > n0:
            added.append((t1 - t0, n1 - n0, *key))
        else:
            moved += t1 - t0
    return sorted(added, reverse=True), moved


def print_kernels(profiled: dict, cuda: bool, top: int) -> None:
    """The profiled steps' totals, their ratio, and what LoRA adds: the operators (and shapes) it calls more often
    than the base, largest time first, and the time the operators both call equally often moved; on CUDA the same
    by kernel name (which GEMM kernels the adapter's rank-r products got)."""
    what = "kernel time" if cuda else "operator CPU time"
    total = {k: sum(us for _, us in v["kernels" if cuda else "ops"].values()) for k, v in profiled.items()}
    print(f"  {what} a step (torch.profiler over 3 eager steps, self time):")
    for k, us in total.items():
        print(f"    {k:<6} {us / 1000:8.2f} ms")
    floor = "   (the floor of lora-graph / base-graph)" if cuda else ""
    print(f"  ratio {what} lora / base = {total['lora'] / total['base']:.3f}{floor}")
    lists = [("ops", "operators LoRA calls more often than the base", "operator-shapes", "calls",
              "the operators both call as often")]
    if cuda:
        lists.append(("kernels", "kernels LoRA launches more often than the base", "kernels", "launches",
                      "the kernels both launch as often"))
    for key, title, what_n, calls, same in lists:
        added, moved = _added(profiled["lora"][key], profiled["base"][key])
        print(f"  {title}: {sum(a[0] for a in added) / 1000:+.2f} ms a step ({len(added)} {what_n}; {top} largest):")
        for d, n, name, shapes in added[:top]:
            print(f"    {d / 1000:+8.3f} ms  {n:+6.0f} {calls}  {name[:140]}" + (f"  {shapes[:120]}" if shapes else ""))
        print(f"  {same}: {moved / 1000:+.2f} ms a step")


def profile_kernels(args, steps: dict, cuda: bool) -> None:
    """With ``--kernels``: profile ``base`` and ``lora`` and print what LoRA adds; a profiler that cannot run
    here (no CUPTI, say) says so in a line."""
    if not args.kernels:
        return
    try:
        profiled = {name: device_times(steps[name], cuda) for name in ("base", "lora")}
    except Exception as exc:
        print(f"  --kernels: the profiler failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return
    print_kernels(profiled, cuda, args.top)


def captured(name: str) -> bool:
    """Whether row ``name`` is a step captured as a CUDA graph: ``base-graph``, ``lora-graph`` and its variants
    (``lora-graph-layercast``, ``lora-graph-r8``)."""
    return name.endswith("-graph") or "-graph-" in name


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
    ap.add_argument("--graph", action="store_true",
                    help="add base and LoRA steps captured as CUDA graphs (CUDA; on a CPU eagerly: "
                    "their set-up checked)")
    ap.add_argument("--only", default="", help="comma list of variants to time (default: all asked for)")
    ap.add_argument("--count", action="store_true", help="count the operators one eager step of each dispatches")
    ap.add_argument("--kernels", action="store_true",
                    help="profile one eager step of base and lora: device time by operator and shapes")
    ap.add_argument("--top", type=int, default=12, help="with --kernels, how many of LoRA's extra operators to list")
    args = ap.parse_args()
    if args.graph and args.device != "cuda":
        print("--graph on a CPU: the graph rows run eagerly (CapturedStep's fallback): a check of their set-up, not "
              "of capture; their times are eager times")

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
    padded = -(-args.rank // 8) * 8  # the rank rounded up to a multiple of 8 (16-byte rows in bf16)
    if args.graph and padded != args.rank:
        names.append(f"lora-graph-r{padded}")
    if args.only:
        asked = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in asked if n not in names]
        if bad or "base" not in asked or "lora" not in asked:
            raise SystemExit(f"--only: {args.only!r}; it needs base and lora, and names among {', '.join(names)}")
        names = [n for n in names if n in asked]
    unets = {name: copy.deepcopy(base).to(dev, dtype) for name in names}
    params = {name: [] for name in names}
    # the rows whose step casts every layer's factors in one go, as training does on CUDA (not compiled)
    once = {"lora", "lora+ckpt", "lora-graph", f"lora-graph-r{padded}"} if dev.type == "cuda" else \
        ({"lora"} if args.count else set())
    layers = {name: [] for name in names}
    n_layers = 0
    for name in [n for n in names if n.startswith("lora")]:
        rank = padded if name == f"lora-graph-r{padded}" else args.rank
        ad = Adapters.inject({"unet": unets[name]}, {"name": "lora", "rank": rank, "target_modules": TARGETS})
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
        if captured(name):
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
            if not (captured(name) or name.endswith("-compiled")):
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
                if not (captured(name) or name.endswith("-compiled")):
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
        ops = {name: count_ops(fn) for name, fn in steps.items() if not (captured(name) or name.endswith("-compiled"))}
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
        profile_kernels(args, steps, cuda)
        return
    for k, v in med.items():
        q = statistics.quantiles(times[k], n=4) if len(times[k]) > 1 else [v, v, v]  # one step: no spread
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
    if f"lora-graph-r{padded}" in med and "lora-graph" in med:
        print(f"  ratio lora-graph-r{padded} / lora-graph = {med[f'lora-graph-r{padded}'] / med['lora-graph']:.3f}   "
              f"(rank {padded} against {args.rank}, captured: <= 1 says padding the rank to {padded} pays)")
    for a, b in (("lora-layercast", "lora"), ("lora-graph-layercast", "lora-graph")):
        if a in med and b in med:
            print(f"  ratio {a} / {b} = {med[a] / med[b]:.3f}   (each layer casting its own factors, against all "
                  "cast together)")
    if "lora+ckpt" in med:
        print(f"  ratio lora+ckpt / lora = {med['lora+ckpt'] / med['lora']:.3f}")
        if peak:
            print(f"  peak memory lora+ckpt / lora = {peak['lora+ckpt'] / peak['lora']:.3f}")
    profile_kernels(args, steps, cuda)  # last: the timed rows are printed whatever the profiler does


if __name__ == "__main__":
    main()
