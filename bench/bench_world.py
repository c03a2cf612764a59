"""Mini-world speed on this machine: concept fine-tuning s/step, sampling images/s, main-job wall time.

The three are measured in one run, one after the other (never two torch jobs at once on a small
CPU). Fine-tuning is timed through the real Lightning module and trainer on the shipped world model
(LoRA rank 4 on to_q/to_k/to_v/to_out.0, batch 8); sampling with the world eval sampler (DPM-Solver++,
25 steps, CFG 3.0); the main job as users run it (`lorabench`, a subprocess, imports included).

    python bench/bench_world.py                    # all three (the main job takes minutes)
    python bench/bench_world.py --skip-main-job
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def finetune_step_times(steps: int, batch: int, rank: int) -> list[float]:
    import lightning as L
    import torch

    from lorabench.training import DiffusionFineTuner
    from lorabench.world.assets import load_world_model
    from lorabench.world.build import world_datamodule

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        dm = world_datamodule("concept", f"{tmp}/data", concept="sks", n=8, batch_size=batch, val_samples=0)
        dm.prepare()
        module = DiffusionFineTuner(load_world_model(), {"name": "lora", "rank": rank}, {"lr": 1e-3})
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
                            default_root_dir=tmp)
        torch.manual_seed(0)
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return times


def sampling_rate(n: int) -> float:
    from lorabench.sampling import Sampler
    from lorabench.world.assets import load_world_model

    sampler = Sampler(load_world_model(), "dpm", num_inference_steps=25, guidance_scale=3.0, batch_size=64,
                      progress=False)
    sampler(["a small red circle at left on black"] * 8, seeds=list(range(8)))  # warm-up
    t0 = time.perf_counter()
    sampler(["a small red circle at left on black"] * n, seeds=list(range(n)))
    return n / (time.perf_counter() - t0)


def main_job_wall_time() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lorabench"], cwd=tmp, env={**os.environ, "WANDB_MODE": "offline"},
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the main job failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout[-2500:])
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--skip-main-job", action="store_true")
    args = ap.parse_args()

    times = finetune_step_times(args.steps, args.batch, args.rank)[5:]  # first steps: warm-up
    q = statistics.quantiles(times, n=4)
    print(f"fine-tuning (LoRA r{args.rank}, batch {args.batch}): median {statistics.median(times):.3f} s/step "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}, {len(times)} steps)")
    print(f"sampling (DPM-Solver++ 25 steps, CFG 3.0): {sampling_rate(args.images):.2f} images/s "
          f"({args.images} images)")
    if not args.skip_main_job:
        wall = main_job_wall_time()
        print(f"main job (`lorabench`): {wall:.0f} s wall time = {wall / 600:.2f} x the 10-minute budget")


if __name__ == "__main__":
    main()
