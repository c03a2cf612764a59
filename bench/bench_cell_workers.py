"""Training throughput of world cells: one process with all cores' threads against one-thread processes
side by side (what ``protocol.train_workers`` does), as steps per second of the whole machine.

Each measurement trains one Orthogonal Adaptation world LoRA cell (``--steps`` steps, batch 8) in a fresh
subprocess: ``--threads`` threads alone, then 1 thread alone, then ``--workers`` 1-thread processes at once.

    python bench/bench_cell_workers.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from hydra import compose, initialize_config_dir
from lorabench.protocols.cells import cell_config
from lorabench.run import train
from lorabench.utils.console import quiet_cells
from pathlib import Path
out = Path(sys.argv[3])
with initialize_config_dir(config_dir=sys.argv[4], version_base="1.3"):
    cfg = compose("train", [f"paths.output_dir={out}", f"paths.output_root={out}",
                            "experiment=orthogonal_adaptation/world", f"trainer.max_steps={sys.argv[2]}",
                            "trainer.enable_progress_bar=false"])
with quiet_cells():
    res, _ = train(cell_config(cfg, cfg.protocol.adapters.lora, {"concept": "sks"}, 0, out), out)
print(json.dumps({"s_per_step": res["timings"]["s_per_step"]}))
"""


def launch(threads: int, steps: int, out: Path) -> subprocess.Popen:
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(steps), str(out), conf],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def s_per_step(procs: list[subprocess.Popen]) -> list[float]:
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["s_per_step"] for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        [full] = s_per_step([launch(args.threads, args.steps, tmp / "full")])
        [one] = s_per_step([launch(1, args.steps, tmp / "one")])
        par = s_per_step([launch(1, args.steps, tmp / f"w{k}") for k in range(args.workers)])
    rate_full, rate_par = 1 / full, sum(1 / s for s in par)
    print(f"world LoRA cell, {args.steps} steps, {os.cpu_count()} cores")
    print(f"  1 process x {args.threads} threads : {full:.3f} s/step   {rate_full:.2f} steps/s")
    print(f"  1 process x 1 thread    : {one:.3f} s/step   {1 / one:.2f} steps/s")
    per_process = ", ".join(f"{s:.3f}" for s in par)
    print(f"  {args.workers} processes x 1 thread  : {per_process} s/step   {rate_par:.2f} steps/s")
    print(f"  ratio parallel / one process = {rate_par / rate_full:.2f}x steps per second")


if __name__ == "__main__":
    main()
