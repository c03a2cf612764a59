"""Training-step time of lorabench LoRA against PEFT LoRA on the same UNet, as a ratio.

Both adapters wrap the same layers (to_q, to_k, to_v, to_out.0) of identical UNets at the same
rank; a step is forward + MSE + backward + AdamW. The two are timed interleaved (A B A B ...)
so machine noise hits both alike; the ratio of medians is what to read (goal: <= 1.0).

With ``--graph`` (CUDA) two more variants, ``lorabench-graph`` and ``peft-graph``: each step captured
whole as a CUDA graph (:class:`lorabench.training.cuda_graph.CapturedStep`, fused capturable AdamW). The
issue's goal reads ``lorabench-graph / peft`` (lorabench's fastest step against PEFT's eager one, as its
users train) at most 0.75; ``lorabench-graph / peft-graph`` says what is left once both are captured.

    python bench/bench_train_step.py                 # CPU, defaults below
    python bench/bench_train_step.py --device cuda --size sd15-like --batch 8
    python bench/bench_train_step.py --device cuda --size sd15-like --batch 4 --dtype bfloat16 --graph
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

SIZES = {
    # ~1M parameters, 16 px: the mini-world scale.
    "tiny": dict(block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, res=16, text_len=16),
    # A few M parameters, 32 px.
    "small": dict(block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=16, res=32, text_len=16),
    # SD1.5's UNet architecture (860M parameters), 64x64 latents (512 px); for GPUs.
    "sd15-like": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                      res=64, text_len=77, layers_per_block=2, in_channels=4),
    # SD1.5's blocks and layers (128 adapted attention projections) at toy widths, each of SD1.5's widths
    # its own (320, 640, 1280 and the text's 768 -> 16, 32, 64 and 24): the same operators as sd15-like in a
    # step, for counting them on a CPU (--count).
    "sd15-shape": dict(block_out_channels=(16, 32, 64, 64), cross_attention_dim=24, attention_head_dim=8,
                       res=16, text_len=16, layers_per_block=2, in_channels=4),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(size: str):
    from diffusers import UNet2DConditionModel

    s = dict(SIZES[size])
    n = len(s["block_out_channels"])
    in_ch = s.pop("in_channels", 3)
    unet = UNet2DConditionModel(
        sample_size=s["res"], in_channels=in_ch, out_channels=in_ch, block_out_channels=s["block_out_channels"],
        layers_per_block=s.get("layers_per_block", 1), cross_attention_dim=s["cross_attention_dim"],
        attention_head_dim=s["attention_head_dim"], norm_num_groups=min(32, s["block_out_channels"][0] // 4),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))
    return unet.requires_grad_(False), s, in_ch


def graphed_step(unet, params, x, t, e, target, dtype, layers=()):
    """A training step of ``unet`` (MSE of its output against ``target``, backward, fused capturable AdamW on
    ``params``; with no ``params``, the backward reaches ``x``) captured as a CUDA graph; called, it replays
    on ``x``. The factors of the lorabench adapter ``layers`` are cast in one go, as training does."""
    from lorabench.adapters.base import factors_cast_once
    from lorabench.training.cuda_graph import CapturedStep

    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=True) if params else None

    def loss_fn(x, t, e, target):
        with factors_cast_once(layers):
            return torch.nn.functional.mse_loss(unet(x, t, e).sample.float(), target.float())

    inputs = {"x": x.detach().requires_grad_(not params), "t": t, "e": e, "target": target}
    captured = CapturedStep(loss_fn, inputs, opt, autocast_dtype=dtype if dtype != torch.float32 else None)
    if not captured.graphed:  # a CPU (a dry run of the set-up): CapturedStep runs eagerly on what it is given
        return lambda: captured(**inputs)
    return lambda: captured(x=x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--graph", action="store_true",
                    help="add both steps captured as CUDA graphs (CUDA; on a CPU eagerly: "
                    "their set-up checked)")
    args = ap.parse_args()
    if args.graph and args.device != "cuda":
        print("--graph on a CPU: the graph rows run eagerly (CapturedStep's fallback): a check of their set-up, not "
              "of capture; their times are eager times")

    from peft import LoraConfig

    from lorabench.adapters import Adapters
    from lorabench.adapters.base import factors_cast_once

    torch.manual_seed(0)
    dev = torch.device(args.device)
    base, s, in_ch = build_unet(args.size)
    dtype = getattr(torch, args.dtype)
    ours_unet = copy.deepcopy(base).to(dev, dtype)
    peft_unet = copy.deepcopy(base).to(dev, dtype)
    ours = Adapters.inject({"unet": ours_unet}, {"name": "lora", "rank": args.rank, "target_modules": TARGETS})
    peft_unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                     init_lora_weights="gaussian"))
    ours_params = ours.trainable_parameters()
    peft_params = [p for p in peft_unet.parameters() if p.requires_grad]
    for p in peft_params:  # PEFT keeps adapter weights in the base dtype; train both in float32
        p.data = p.data.float()
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in peft_params)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, in_ch, s["res"], s["res"], generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    e = torch.randn(args.batch, s["text_len"], s["cross_attention_dim"], generator=g).to(dev, dtype)
    target = torch.randn(x.shape, generator=g).to(dev, dtype)

    def make_step(unet, params, layers=()):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32), factors_cast_once(layers):
                out = unet(x, t, e).sample
            loss = torch.nn.functional.mse_loss(out.float(), target.float())
            loss.backward()
            opt.step()
        return step

    # lorabench's step as its training runs it: on CUDA every layer's factors cast in one go
    steps = {"lorabench": make_step(ours_unet, ours_params, ours.layers.values()),
             "peft": make_step(peft_unet, peft_params)}
    if args.graph:  # own copies of the UNets: a captured graph holds its model's tensors
        ours_g, peft_g = copy.deepcopy(ours_unet), copy.deepcopy(peft_unet)
        for name, unet in (("lorabench-graph", ours_g), ("peft-graph", peft_g)):
            try:
                steps[name] = graphed_step(unet, [p for p in unet.parameters() if p.requires_grad],
                                           x, t, e, target, dtype, list(unet.modules()))
            except Exception as exc:  # a capture that fails leaves the eager rows standing
                print(f"  {name}: could not be captured: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in base.parameters())
    print(f"UNet {args.size} ({n_params / 1e6:.2f}M params), batch {args.batch}, rank {args.rank}, "
          f"{args.device} {args.dtype}, {args.steps} interleaved steps each, torch {torch.__version__}")
    for k, v in med.items():
        q1, q3 = statistics.quantiles(times[k], n=4)[0], statistics.quantiles(times[k], n=4)[2]
        print(f"  {k:<10} median {v * 1000:8.1f} ms/step   (IQR {q1 * 1000:.1f}-{q3 * 1000:.1f})")
    print(f"  ratio lorabench / peft = {med['lorabench'] / med['peft']:.3f}   (goal <= 1.0)")
    if "lorabench-graph" in med and "peft-graph" in med:
        print(f"  ratio lorabench-graph / peft = {med['lorabench-graph'] / med['peft']:.3f}   (goal <= 0.75);  "
              f"lorabench-graph / peft-graph = {med['lorabench-graph'] / med['peft-graph']:.3f}")


if __name__ == "__main__":
    main()
