"""Sweep launchers: the local_gpus (joblib) and slurm (submitit) configs compose with their plugins, a
joblib multirun writes one results folder per job, and jobs on one machine never share a GPU."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import FAST, assert_one_line_error, crashed, run_cli, run_here
from lorabench.errors import ConfigError

pytestmark = pytest.mark.integration  # end to end: out of the fast tier


def compose_launcher(launcher: str, overrides=()):
    from hydra import compose, initialize_config_dir

    from helpers import CONF
    from lorabench.cli import _register_resolvers

    _register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"hydra/launcher={launcher}", *overrides],
                       return_hydra_config=True)


def test_launcher_configs_compose(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("LORABENCH_GPUS", "0,1,2")
    joblib = compose_launcher("local_gpus").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 3
    slurm = compose_launcher("slurm", ["hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.tasks_per_node, slurm.gpus_per_node, slurm.partition) == (1, 1, "gpu")  # one process per GPU
    monkeypatch.delenv("LORABENCH_GPUS")
    with pytest.raises(Exception, match="LORABENCH_GPUS: not set"):
        _ = compose_launcher("local_gpus").hydra.launcher.n_jobs


def test_jobs_claim_distinct_gpus_and_wait_when_all_are_held(tmp_path):
    from lorabench.utils.gpus import claim_gpu, gpu_list

    assert gpu_list("0, 2") == ["0", "2"] and gpu_list("") == []
    with pytest.raises(ConfigError, match="LORABENCH_GPUS: must be comma-separated GPU indices"):
        gpu_list("cuda:0")
    got, order = [], []
    with claim_gpu(["0", "1"], str(tmp_path)) as a, claim_gpu(["0", "1"], str(tmp_path)) as b:
        assert {a, b} == {"0", "1"}

        def third():
            with claim_gpu(["0", "1"], str(tmp_path), poll_s=0.05) as c:
                got.append(c)
                order.append("third")
        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.3)
        assert not got  # both GPUs are held: the third job waits
        order.append("release")
    t.join(5)
    assert order == ["release", "third"] and got[0] in {"0", "1"}


@pytest.mark.parametrize("gpus, fragment", [
    ("", "LORABENCH_GPUS: not set; hydra/launcher=local_gpus runs one job per GPU"),
    ("cuda:0", "LORABENCH_GPUS: must be comma-separated GPU indices such as 0,1,2,3; got 'cuda:0'"),
])
def test_a_local_gpus_sweep_without_its_gpus_listed_is_one_line(tmp_path, gpus, fragment):
    """Hydra reads local_gpus' job count from $LORABENCH_GPUS when it starts the launcher: a missing or malformed
    list was a traceback of some hundred lines from there."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_here(["-m", "hydra/launcher=local_gpus", *FAST, "seed=0,1"], tmp_path, {"LORABENCH_GPUS": gpus})
    assert_one_line_error(proc, tmp_path, fragment)


def test_joblib_multirun_one_results_folder_per_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "seed=0,1",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0_seed=0", "1_seed=1"]


def test_listed_gpus_a_job_cannot_train_on_are_one_line_naming_the_variable(tmp_path, monkeypatch):
    """$LORABENCH_GPUS with a CPU trainer handed the job trainer.devices=[0] and stopped on
    'trainer.devices: `devices` selected with `CPUAccelerator` should be an int > 0', a field the user never
    set; an index CUDA_VISIBLE_DEVICES hid would have failed in torch.cuda.set_device with a traceback."""
    import torch

    from lorabench.utils.gpus import check_claimable

    proc = run_cli(["-m", *FAST, "seed=0", f"hydra.sweep.dir={tmp_path / 'outputs' / 'sweep'}"], tmp_path,
                   {"LORABENCH_GPUS": "0"})
    assert_one_line_error(proc, tmp_path, "LORABENCH_GPUS: 0 is set", "trainer.accelerator is 'cpu'", "trainer=gpu")

    check_claimable([], {"accelerator": "cpu"})  # nothing listed: nothing to check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="LORABENCH_GPUS: 0,1 is set, but this machine shows no CUDA device"):
        check_claimable(["0", "1"], {"accelerator": "auto"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_claimable(["0", "1"], {"accelerator": "gpu"})
    with pytest.raises(ConfigError, match=r"LORABENCH_GPUS: GPU 3 is not one of the 2 CUDA device\(s\) this process "
                                          r"sees \(indices 0 to 1"):
        check_claimable(["1", "3"], {"accelerator": "cuda"})


def test_which_swept_values_can_set_a_field():
    """A job's bad input fails that job alone when a swept key or group sets its field (otherwise every job would
    fail alike and the sweep stops): the key, a group above it, a key below it, a group's package, experiment."""
    from lorabench.sweeps import set_by_sweep

    assert set_by_sweep("optim.warmup_steps", ["optim.warmup_steps", "seed"])
    assert set_by_sweep("adapter.rank", ["adapter"])  # adapter=lora,ortho
    assert set_by_sweep("adapter", ["adapter.rank"])
    assert set_by_sweep("protocol.adapter.rank", ["adapter@protocol.adapter"])
    assert set_by_sweep("data.path", ["experiment"])
    assert not set_by_sweep("data.path", ["seed", "adapter", "hydra/launcher"])
    assert not set_by_sweep("optim.lr_scheduler", ["optim.lr"])  # a sibling, not the key


def test_the_summary_of_a_protocol_sweep_lists_each_job_and_its_table(tmp_path):
    """Why: a continual sequence's results.json holds its metrics as a list (one entry a task), which the summary
    read as a training run's dict (AttributeError: 'list' object has no attribute 'get', no summary), and its
    jobs are nested (<method>/order<k>-seed<s>), where the summary looked at the sweep's top folder only. Jobs are
    found at any depth, in the order the sweep ran them (Hydra's job number), each with its headline numbers."""
    import json

    from lorabench.sweeps import summarize

    for num, name, s_clip in ((1, "naive", 0.25), (0, "magmax", 0.5)):
        job = tmp_path / "sweep" / name / "order0-seed0"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (job / "results.json").write_text(json.dumps({"protocol": "continual", "metrics": ["clip_i"],
                                                      "headline": [["S CLIP-I", s_clip], ["F CLIP-I", 0.125]]}))
        (job / "table.md").write_text("| model |\n")
        (job / "cells" / "a" / ".hydra").mkdir(parents=True)  # a job's own folders are not jobs
    text = summarize(tmp_path / "sweep")
    assert text.splitlines()[2:] == ["| magmax/order0-seed0 |  | done | continual | table.md | 0.5 | 0.125 |",
                                     "| naive/order0-seed0 |  | done | continual | table.md | 0.25 | 0.125 |"], text
    assert (tmp_path / "sweep" / "summary.md").is_file() and (tmp_path / "sweep" / "summary.csv").is_file()
    # a training run's row: its steps and losses (timings null: "-")
    job = tmp_path / "train" / "1_seed=1"
    (job / ".hydra").mkdir(parents=True)
    (job / "results.json").write_text(json.dumps({"metrics": {"steps": 30, "train_loss_last": 0.5}, "timings": None}))
    assert "| 1_seed=1 |  | done | - | 30 | 0.5 | - | - |" in summarize(tmp_path / "train", write=False)


def test_a_sweep_summary_plots_each_measured_column_per_job(tmp_path):
    """summary.md and summary.csv were tables only: summary.png has a panel per measured column (a run's losses,
    a protocol's headline), a dot per job in the table's order; ids, counts and times are not plotted, and a sweep
    of one job, or of jobs that measured nothing (sample jobs), gets no figure."""
    import json

    import numpy as np
    from PIL import Image

    from lorabench.sweeps import summarize, summary_plot

    for i, loss in enumerate((0.5, 0.25, None)):
        job = tmp_path / "sweep" / f"{i}_optim.lr={i}"
        (job / ".hydra").mkdir(parents=True)
        if loss is not None:  # the third job failed: its bar is missing
            (job / "results.json").write_text(json.dumps({"metrics": {"steps": 30, "train_loss_last": loss,
                                                                      "val_loss_after": loss / 2},
                                                          "timings": {"total_s": 9.0}}))
    summarize(tmp_path / "sweep")
    png = np.asarray(Image.open(tmp_path / "sweep" / "summary.png"))
    assert png.shape[1] > png.shape[0]  # two panels side by side
    rows = [{"job": "a", "status": "done", "steps": "30", "total s": "9"}, {"job": "b", "steps": "3"}]
    assert not summary_plot(tmp_path / "none.png", rows, ["job", "status", "steps", "total s"])
    assert not summary_plot(tmp_path / "one.png", rows[:1], ["job", "train loss last"])
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "one.png").exists()
