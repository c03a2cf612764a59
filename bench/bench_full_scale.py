"""GPU time and peak memory of each full-scale table's stages, at the real architecture sizes.

SD1.5 and SDXL are built at their published sizes with random weights (``build_scaled_down(...,
full_size=True)``: the diffusers configs' UNet, text encoders and VAE), so no hub is needed. For each
full-scale table (its settings from the experiment's config and protocol card) it times, on one GPU:

- a training step: text encoding, a UNet forward and backward through the adapter (and the text
  encoders' adapters where the table trains them), gradient clipping, the optimiser step; with the
  table's resolution, batch, rank, layers, precision and gradient checkpointing;
- a sampling step: one UNet call on a batch of the table's sampler (classifier-free guidance: twice the
  images), and one VAE decode of that batch.

Each is the median of ``--steps`` timed runs after ``--warmup``; peak memory is
``torch.cuda.max_memory_allocated`` over the stage. The last table multiplies them by each table's counts
(the experiment READMEs): GPU hours = training steps x step time + image batches x (sampling steps x
step time + decode time). Metric passes (CLIP, DINO, CSD, ArcFace, Inception) are not included.

    python bench/bench_full_scale.py --device cuda                 # every table
    python bench/bench_full_scale.py --device cuda --only continual
    python bench/bench_full_scale.py --scaled-down --steps 2       # CPU smoke run at tiny widths

The continual tables train with 8-bit Adam (bitsandbytes); where bitsandbytes is absent the step uses
torch's AdamW and says so (the optimiser step is a small share of an SDXL step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Table:
    """One full-scale table's stages and counts (experiments/<paper>/README.md, "Budget")."""

    name: str
    arch: str
    resolution: int
    batch: int                 # training batch
    rank: int
    te_targets: tuple          # text-encoder layers with adapters
    checkpointing: bool
    train_steps: int           # the whole table's training steps
    images: int                # the whole table's sampled images
    sample_batch: int          # images per sampler call
    sample_steps: int
    optimiser: str = "adamw"


TABLES = {
    "continual": Table("continual objects or styles (4 methods x 8 runs)", "sdxl", 1024, 1, 64, (), True,
                       272_000, 83_200, 5, 50, "adamw8bit"),
    "orthogonal_adaptation": Table("Orthogonal Adaptation Table 2 (12 ids x 3 seeds)", "sd15", 512, 1, 20,
                                   ("q_proj", "k_proj", "v_proj", "out_proj"), False, 324_000, 17_280, 8, 50),
    "trilora_pokemon": Table("TriLoRA Pokemon (4 adapters x 3 seeds)", "sd15", 512, 1, 4, (), False, 180_000,
                             46_648, 8, 20),
    "trilora_gac": Table("TriLoRA GAC (4 adapters x 3 seeds)", "sd15", 512, 1, 4, (), False, 9_360, 2_288, 8, 20),
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def optimiser(name: str, params):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415

            return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-4), "adamw8bit"
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=1e-5), "adamw (bitsandbytes absent)" if name == "adamw8bit" else "adamw"


def measure(table: Table, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
            scaled_down: bool) -> dict:
    from lorabench.adapters import inject_adapters  # noqa: PLC0415
    from lorabench.models import build_scaled_down, denoise, encode_prompts  # noqa: PLC0415

    res = 64 if scaled_down else table.resolution
    with torch.device(device):  # initialised where it runs: SDXL's 3.4B parameters take ~50 s on a CPU
        comps = build_scaled_down(table.arch, resolution=res, words=["sks", "photo", "person"],
                                  text_max_length=16 if scaled_down else 77, full_size=not scaled_down)
    for part in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if part is not None:
            part.to(device, dtype)
    rank = min(table.rank, 4) if scaled_down else table.rank
    adapters = inject_adapters(comps, {"name": "lora", "rank": rank, "target_modules": UNET_TARGETS,
                                       "text_encoder_targets": list(table.te_targets)})
    params = adapters.trainable_parameters()
    for p in params:  # adapters train in float32 under autocast, as lorabench trains them
        p.data = p.data.to(device, torch.float32)
    if table.checkpointing:
        comps.unet.enable_gradient_checkpointing()
    opt, opt_name = optimiser(table.optimiser, params)
    latent = comps.unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(table.batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (table.batch,), generator=g).to(device)
    prompts = ["a photo of sks person"] * table.batch

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            cond = encode_prompts(comps, prompts, device)
            pred = denoise(comps.unet, x, t, cond, dtype)
            loss = torch.nn.functional.mse_loss(pred.float(), x.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    out = {"table": table.name, "arch": table.arch, "resolution": res, "optimiser": opt_name,
           "unet_params_M": sum(p.numel() for p in comps.unet.parameters()) / 1e6}
    out["train_s"], out["train_peak_gib"] = timed(train_step, device, steps, warmup)
    opt.state.clear()  # the sampling stage's peak memory without the training state
    comps.unet.disable_gradient_checkpointing()
    xs = torch.randn(2 * table.sample_batch, 4, latent, latent, generator=g).to(device)
    ts = torch.full((2 * table.sample_batch,), 500, device=device)
    with torch.no_grad():
        cond = encode_prompts(comps, ["a photo of sks person"] * (2 * table.sample_batch), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out["sample_step_s"], out["sample_peak_gib"] = timed(lambda: denoise(comps.unet, xs, ts, cond, dtype),
                                                             device, steps, warmup)
        scale = comps.vae.config.scaling_factor
        out["decode_s"], _ = timed(lambda: comps.vae.decode(xs[:table.sample_batch].to(dtype) / scale), device,
                                   max(1, steps // 3), 1)
    batches = -(-table.images // table.sample_batch)
    out["gpu_hours"] = (table.train_steps * out["train_s"]
                        + batches * (table.sample_steps * out["sample_step_s"] + out["decode_s"])) / 3600
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="default: float16 on CUDA (the continual configs' 16-mixed), float32 on the CPU")
    ap.add_argument("--only", nargs="*", choices=sorted(TABLES), default=None)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scaled-down", action="store_true", help="tiny widths (a CPU smoke run, not the target)")
    args = ap.parse_args()
    device = torch.device(args.device if not args.scaled_down else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    rows = []
    for key in args.only or list(TABLES):
        row = measure(TABLES[key], device, dtype, args.steps, args.warmup, args.scaled_down)
        rows.append(row)
        print(f"{key}: {row}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    what = "scaled-down widths on the CPU (a smoke run: not the target)" if args.scaled_down else \
        f"real sizes, random weights, {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
    print(f"\n{what}, {dtype}; medians of {args.steps} steps")
    print("| table | UNet M params | train step | train peak | sampling step (CFG batch) | sample peak | "
          "VAE decode | GPU hours (training + sampling) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['table']} ({r['arch']}, {r['resolution']} px, {r['optimiser']}) | {r['unet_params_M']:.0f} | "
              f"{r['train_s'] * 1e3:.0f} ms | {r['train_peak_gib']:.1f} GiB | {r['sample_step_s'] * 1e3:.0f} ms | "
              f"{r['sample_peak_gib']:.1f} GiB | {r['decode_s'] * 1e3:.0f} ms | {r['gpu_hours']:.1f} |")


if __name__ == "__main__":
    main()
