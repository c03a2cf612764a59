"""Two-process DDP on CPU (gloo, trainer=ddp_cpu, spawned as trainer=ddp spawns on GPUs): a fine-tune
with its evaluation, synced metrics equal to one process's, files and W&B written once by rank zero."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from helpers import assert_one_line_error, compose, crashed, run_cli, run_here
from lorabench.run import train

pytestmark = pytest.mark.integration  # end to end: out of the fast tier

# 3 validation images on 2 ranks: DistributedSampler pads one duplicate, which must not count. 5 steps: the
# CPU trainer logs a training row at the 5th (each validate and the fit run in new worker processes).
RUN = ["experiment=quickstart", "trainer.max_steps=5", "data.val_samples=3", "trainer.enable_progress_bar=false"]


def test_two_process_fine_tune_syncs_metrics_and_writes_once(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "ddp"
    proc = run_cli([*RUN, "trainer=ddp_cpu", "logger=wandb", f"hydra.run.dir={run_dir}",
                    "trainer.enable_progress_bar=true"], tmp_path,
                   {"WANDB_SILENT": "false"})  # W&B's console as users see it (the suite's conftest silences it)
    assert proc.returncode == 0, crashed(proc)
    # The run folder's cli.log is that console, rank zero's step bar included (drawn in a spawned worker), as
    # it ended: tqdm redraws with carriage returns, which text mode reads as line ends
    shown = [ln.rstrip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    bar = [ln for ln in shown if ln.startswith("train:")]
    assert bar[-1].startswith("train: 100%") and "5/5" in bar[-1], bar[-1]
    kept = [ln for ln in (run_dir / "cli.log").read_text().splitlines() if ln]
    assert sorted(kept) == sorted([ln for ln in shown if not ln.startswith("train:")] + bar[-1:]), (kept, shown)
    # The spawned workers' console is the main process's: no Lightning banner or expected warning from
    # any of the six workers (two a spawn; W&B's own "wandb:" lines aside), as in one process
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not ln.startswith("wandb:")]
    for noise in ("Initializing distributed", "distributed_backend", "processes registered", ".py:", "Warning"):
        assert not any(noise in ln for ln in lines), (noise, lines)
    assert "WARNING" not in proc.stderr  # W&B's own: wandb.require('service') is a no-op, once a worker
    ddp = json.loads((run_dir / "results.json").read_text())
    assert ddp["metrics"]["steps"] == 5
    assert set(ddp["artifacts"]) <= {p.name for p in run_dir.iterdir()}
    assert ddp["samples"] == ["samples/step000005.png"]  # the quickstart's eval.validation, drawn by rank zero

    # Evaluation before training: the same weights, so the 2-rank metric equals the 1-rank one.
    single = tmp_path / "single"
    one, _ = train(compose([*RUN, "exports=[]", "logger=csv"], single), single)
    assert ddp["metrics"]["val_loss_before"] == pytest.approx(one["metrics"]["val_loss_before"], rel=1e-6)
    # After training: the adapter rank zero saved, evaluated in one process, gives the 2-rank metric.
    reload = tmp_path / "reload"
    again, _ = train(compose([*RUN, "exports=[]", "logger=csv", "trainer.max_steps=0",
                              f"init_adapter={run_dir / 'adapter.safetensors'}"], reload), reload)
    assert ddp["metrics"]["val_loss_after"] == pytest.approx(again["metrics"]["val_loss_before"], rel=1e-6)
    assert ddp["metrics"]["val_loss_after"] != pytest.approx(ddp["metrics"]["val_loss_before"], rel=1e-6)

    # One output folder, written by rank zero only: one W&B run, one CSV log, no per-rank folders.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("metrics.csv")] == ["csv/metrics.csv"]
    # ... holding the rows of all three spawns at the steps one process logs them: validation before (step 0),
    # the training row, validation after at the last step (the workers' writer used to lose the first
    # spawn's columns and crash, and the main process logged the last validation at step 0)
    def rows(folder):
        with open(folder / "csv" / "metrics.csv", newline="") as f:
            return [(r["epoch"], r["step"], bool(r["train/loss"]), bool(r["val/loss"])) for r in csv.DictReader(f)]
    assert rows(run_dir) == rows(single) == [("0", "0", False, True), ("4", "4", True, False), ("5", "5", False, True)]
    assert not list(tmp_path.glob("outputs"))  # nothing written outside the run folder


def test_continual_sequence_on_two_ranks_logs_average_score_and_forgetting_once(tmp_path):
    """trainer.strategy=ddp: Lightning starts rank 1 by running the command again and both ranks run the
    sequence, evaluation sharded over them and the metric synced; rank zero alone prints, writes and logs
    the per-task Average Score and Forgetting to W&B and the CSV (its final row equal to results.json's)."""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "seq"
    args = ["experiment=continual/world_objects", "sequence.length=2", "trainer.max_steps=4",
            "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2", "eval.concepts.n_references=2",
            "trainer=ddp_cpu", "trainer.strategy=ddp", "logger=wandb", f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert proc.stdout.count("results in") == 1 and proc.stdout.count("| naive |") == 1, proc.stdout
    # rank zero's console in the run folder (rank 1's Hydra job, train_ddp_process_1, writes no log of its own)
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["cli.log"]
    assert (run_dir / "cli.log").read_text().count("| naive |") == 1
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_tasks"] == 2 and res["tasks"] == ["sks", "zwz"]
    assert [p.name for p in sorted((run_dir / "tasks").iterdir())] == ["00-sks", "01-zwz"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("continual/task")]
    assert [r["continual/task"] for r in rows] == ["1", "2"]
    for name in ("clip_i", "dino"):
        assert float(rows[-1][f"continual/{name}/average_score"]) == pytest.approx(
            res["final"][name]["average_score"], rel=1e-6)
        assert float(rows[-1][f"continual/{name}/forgetting_ref"]) == pytest.approx(
            res["final"][name]["forgetting_ref"], rel=1e-6)
    # Killed in task 2 and started again, it resumes after task 1 with the uninterrupted run's matrices: rank zero's
    # record of task 1 held its own half of the images, so the resumed run's column 1 was scored on those alone
    # (CLIP-I 0.453 against 0.479 by hand; the record now joins every rank's rows)
    import shutil

    shutil.rmtree(run_dir / "state" / "task_001")
    shutil.rmtree(run_dir / "tasks" / "01-zwz")
    (run_dir / "results.json").unlink()
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, crashed(again)
    assert "task 1 (sks): resumed from" in again.stdout
    assert json.loads((run_dir / "results.json").read_text())["matrices"] == res["matrices"]


def test_a_two_rank_run_resumes_as_the_uninterrupted_run(tmp_path):
    """Why: rank zero alone writes a checkpoint, and it held rank zero's noise and global streams only: on
    resuming, both ranks drew rank zero's noise and timesteps (and dropout masks) for their different images,
    and the adapter differed from the uninterrupted run's by 2.4e-3 (of 0.96) after 2 more steps. The file
    now keeps each rank's streams. Random flips and crops and the adapters' dropout draw from them."""
    from safetensors.torch import load_file

    args = ["experiment=quickstart", "trainer=ddp_cpu", "callbacks=checkpoints",
            "callbacks.checkpoints.every_n_train_steps=2", "eval.validation.prompts=[]", "data.val_samples=0",
            "trainer.enable_progress_bar=false", "exports=[]", "logger=csv", "data.random_flip=true",
            "data.center_crop=false", "adapter.dropout=0.25"]
    for run, steps in (("whole", 6), ("stopped", 4), ("stopped", 6)):
        proc = run_cli([*args, f"trainer.max_steps={steps}", f"hydra.run.dir={tmp_path / run}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        assert "resume:" not in proc.stderr
    whole, resumed = (load_file(tmp_path / run / "adapter.safetensors") for run in ("whole", "stopped"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # resumed on another number of processes, it trains on (each rank its own stream) and says why it differs
    proc = run_cli([*args, "trainer=cpu", "trainer.max_steps=8", f"resume={tmp_path / 'stopped'}",
                    f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert "resume: a checkpoint 2 process(es) wrote, resumed on 1 (trainer.devices)" in proc.stderr


@pytest.mark.parametrize("args, fragments", [
    # the continual method and metric live in the task's callback: ddp_spawn's workers end with each fit
    # (this ran and failed with KeyError: 0 after the first task)
    (["experiment=continual/world_objects", "trainer=ddp_cpu"],
     ["trainer.strategy: ddp_spawn: its processes end with each fit", "use trainer.strategy=ddp"]),
    # TriLoRA scores on rank zero between epochs (this hung under ddp, and failed to pickle under ddp_spawn)
    (["experiment=trilora/world", "trainer=ddp_cpu"], ["trainer.devices: 2: the trilora protocol trains in its own",
                                                       "hydra/launcher=local_gpus"]),
    (["experiment=trilora/world", "trainer=ddp_cpu", "trainer.devices=1"],
     ["trainer.strategy: ddp_spawn: the trilora"]),
    # Lightning's ddp starts each rank by running the command again: the whole sweep, in every rank
    (["-m", "experiment=continual/world_objects", "trainer=ddp_cpu", "trainer.strategy=ddp", "seed=0,1"],
     ["trainer.strategy: ddp under --multirun"]),
])
def test_protocols_refuse_process_layouts_they_cannot_run(tmp_path, args, fragments):
    """Before any work, one line, no folder left (a sweep's nested job folder, method/seed, included)."""
    assert_one_line_error(run_here(args, tmp_path), tmp_path, *fragments)


def test_process_count_of_a_trainer_config():
    from lorabench.protocols.cells import trainer_processes

    assert trainer_processes({"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2}) == 2
    assert trainer_processes({"strategy": "ddp", "accelerator": "cpu", "devices": [0, 1, 2], "num_nodes": 2}) == 6
    assert trainer_processes({"strategy": "ddp", "accelerator": "cpu", "devices": "0,1"}) == 2
    assert trainer_processes({"strategy": "auto", "accelerator": "cpu", "devices": 4}) == 4  # Lightning's ddp
    assert trainer_processes({"strategy": "auto", "accelerator": "cpu", "devices": "auto"}) == 1
    assert trainer_processes({"strategy": "single_device", "accelerator": "cpu", "devices": 1}) == 1
    # a config node as a protocol's cell holds it: its list of devices was read as "auto" (1 here, every GPU there)
    from omegaconf import OmegaConf

    assert trainer_processes(OmegaConf.create({"strategy": "ddp", "accelerator": "cpu", "devices": [0, 1]})) == 2


SPAWN_PARENT = """
import pickle, time
from multiprocessing import get_context

from lorabench.training.callbacks import QuietSpawnedWorkers


def rank(trainer_callbacks):  # what Lightning's ddp_spawn does: the callbacks unpickled in a new interpreter
    pickle.loads(trainer_callbacks)
    time.sleep(120)  # a rank waiting on the others


if __name__ == "__main__":
    child = get_context("spawn").Process(target=rank, args=(pickle.dumps(QuietSpawnedWorkers()),))
    child.start()
    print(child.pid, flush=True)
    time.sleep(5)  # the child's imports
    time.sleep(120)
"""


def test_a_spawned_rank_ends_with_the_job_that_spawned_it(tmp_path):
    """Why: `timeout` (SIGTERM) ended a trainer=ddp_cpu job's main process and left its two ddp_spawn ranks
    waiting on each other, orphaned, holding the console's pipe (a shell pipeline on it never returned). The
    callback every spawned rank unpickles first now makes it end with its parent."""
    from helpers import child_outlives_parent

    assert child_outlives_parent(tmp_path, SPAWN_PARENT, wait_s=20) is False



RANK_PARENT = """
import os, subprocess, sys, time

# a rank as Lightning's ddp starts it: the same command again with LOCAL_RANK set; here its run waits
RANK = ("import sys, time; import lorabench.cli as cli; cli._hydra_entry = lambda: time.sleep(120); "
        "sys.argv = ['lorabench', 'experiment=quickstart']; cli.main()")
if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, "-c", RANK], env={**os.environ, "LOCAL_RANK": "1"})
    time.sleep(3)  # its imports and checks: it waits in its run
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_rank_ddp_started_ends_with_rank_zero(tmp_path):
    """Why: the ranks Lightning's ddp starts by running the command again wait on rank zero in every
    collective; a rank zero stopped by SIGKILL left them waiting for good. The command's entry point makes such
    a rank (LOCAL_RANK set, not 0) end with the process that started it."""
    from helpers import child_outlives_parent

    assert child_outlives_parent(tmp_path, RANK_PARENT, wait_s=15) is False
