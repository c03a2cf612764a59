"""A researcher's first day (issue 31): each test is one thing a new user hit, run as they would run it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from helpers import FAST, assert_one_line_error, crashed, run_cli, run_here

pytestmark = pytest.mark.integration  # end to end: out of the fast tier

FIRST_ERROR = """
import atexit, sys
heavy = ('torch', 'diffusers', 'lightning')
atexit.register(lambda: sys.stderr.write(f"heavy imports: {sorted(m for m in heavy if m in sys.modules)}\\n"))
from lorabench.cli import main
sys.argv = ["lorabench", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("arg,fragment", [
    ("trainer.max_steps=ten", "trainer.max_steps: expected an integer, got 'ten'"),
    ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
    ("adapter.rank=four", "adapter.rank: expected an integer, got 'four'"),
    ("optim.lr=-1", "optim.lr: must be a number > 0, got -1"),
    # seed_everything raised deep inside the run (numpy's seeds are unsigned 32-bit); 1.5 reached the data module
    ("seed=-1", "seed: must be an integer from 0 to 4294967295, got -1"),
    ("seed=1.5", "seed: must be an integer from 0 to 4294967295, got 1.5"),
    ("protocol.weightz=[0.7,0.3]", "protocol.weightz: not a field of this config"),
    # one image file a seed: a repeated seed overwrote its own image and left the grid a column short of its files
    ("eval.validation.prompts=[red] eval.validation.seeds=[0,0]", "eval.validation.seeds: lists seed 0 twice"),
    # Hydra's ValueError ("Config group override must be a string or a list. Got NoneType"), a traceback
    ("logger=null", "logger: null is not an option here (leave the override out for the experiment's choice); "
                    "valid: csv, wandb"),
    ("data=imagefolder data.path=/no/such/folder", "data.path: image folder '/no/such/folder' does not exist"),
    ("model=sd15 model.pretrained=/no/such/model", "model.pretrained: '/no/such/model' is neither an existing folder"),
])
def test_a_bad_value_is_one_line_naming_field_and_type_before_any_heavy_import(tmp_path, arg, fragment):
    """Why: trainer.max_steps=ten answered "trainer: '<' not supported between instances of 'str' and 'int'",
    and every check that failed before work still took 6-8 s of imports. Now the composed config is checked
    before torch, diffusers or Lightning is imported."""
    proc = subprocess.run([sys.executable, "-c", FIRST_ERROR, "experiment=quickstart", *arg.split()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, tmp_path, fragment)
    assert "heavy imports: []" in proc.stderr, proc.stderr[-500:]


def test_a_sweep_value_of_the_wrong_type_fails_before_any_job(tmp_path):
    proc = run_cli(["-m", *FAST, "optim.lr=1e-3,fast"], tmp_path)
    assert_one_line_error(proc, tmp_path, "optim.lr: expected a number, got 'fast'")
    proc = run_cli(["-m", *FAST, "seed=0,1,-2"], tmp_path)  # each of a sweep's seeds, not its first alone
    assert_one_line_error(proc, tmp_path, "seed: must be an integer from 0 to 4294967295, got -2")


def test_a_failed_run_leaves_nothing_wherever_its_folder_is(tmp_path):
    """Why: with an explicit hydra.run.dir, nine of ten failed runs left their folder behind. A failure found
    after Hydra made the folder (a data path that does not exist) now removes it, under outputs/, at a
    hydra.run.dir, and in sweeps (the sweep folder too); a folder the user had keeps their files."""
    bad = ["data=imagefolder", "data.path=/no/such/folder"]
    for extra in ([], [f"hydra.run.dir={tmp_path / 'runs' / 'mine'}"]):
        proc = run_cli([*FAST, *bad, *extra], tmp_path)
        assert_one_line_error(proc, tmp_path, "data.path: image folder '/no/such/folder' does not exist")
        assert not (tmp_path / "runs" / "mine").exists()
    for extra in ([], [f"hydra.sweep.dir={tmp_path / 'sweeps' / 's1'}"]):
        proc = run_cli(["-m", *FAST, *bad, "seed=0,1", *extra], tmp_path)
        assert_one_line_error(proc, tmp_path, "data.path")
        assert not (tmp_path / "sweeps" / "s1").exists()
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    os.utime(own / "notes.txt", (0, 0))  # written long before the run
    proc = run_cli([*FAST, *bad, f"hydra.run.dir={own}"], tmp_path)
    assert_one_line_error(proc, tmp_path, "data.path")
    assert sorted(p.name for p in own.iterdir()) == ["notes.txt"]


# -- training: samples while training, resume, EMA, min-SNR ---------------------------------------------------------
def _train(overrides, model_dir, run_dir, steps=4, callbacks=()):
    from helpers import compose, tiny_overrides
    from lorabench.run import train

    cfg = compose([*tiny_overrides(model_dir, steps=steps), "exports=[]", "eval.validation.prompts=[]", *overrides],
                  output_dir=run_dir)
    return train(cfg, run_dir, callbacks=callbacks)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter.safetensors"))


def test_a_training_run_writes_labelled_sample_grids_and_trains_the_same_adapter(tiny_model_dir, tmp_path):
    """Why: the quickstart and a plain training run wrote no images (no validation prompts, no grid). With
    eval.validation, samples/step<N>.png holds one row per prompt and one column per seed, every N steps
    and at the end; sampling does not change what trains."""
    from PIL import Image

    prompts = ["a red circle", "a blue square"]
    results, _ = _train([f"eval.validation.prompts=[{','.join(repr(p) for p in prompts)}]",
                         "eval.validation.seeds=[0,1,2]", "eval.validation.every_n_steps=2",
                         "eval.validation.sampler.num_inference_steps=3"], tiny_model_dir, tmp_path / "with")
    assert results["samples"] == ["samples/step000002.png", "samples/step000004.png"]
    grid = Image.open(tmp_path / "with" / "samples" / "step000004.png")
    assert grid.height > 2 * 16 * 4 and grid.width > 3 * 16 * 4  # 2 rows x 3 seeds, 4x upscaled, labels around
    _train([], tiny_model_dir, tmp_path / "without")
    a, b = _adapter(tmp_path / "with"), _adapter(tmp_path / "without")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_validation_options_are_one_line_errors(tmp_path):
    proc = run_cli([*FAST, "eval.validation.prompts=[a red circle]", "eval.validation.every_n_steps=0"], tmp_path)
    assert_one_line_error(proc, tmp_path, "eval.validation.every_n_steps: must be null")


class _Crash(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


# random flips and crops (every full-scale config has one of them) and the adapters' dropout
AUGMENTED = ["data.random_flip=true", "data.center_crop=false", "adapter.dropout=0.25"]


@pytest.mark.parametrize("batch_size,extra", [(4, []), (3, []), (3, AUGMENTED), (4, ["+data.num_workers=2"]),
                                               (3, ["+data.num_workers=2"]), (3, [*AUGMENTED, "+data.num_workers=2"])],
                         ids=["epoch-end", "mid-epoch", "augmented", "workers-epoch-end", "workers-mid-epoch",
                              "workers-augmented"])
def test_a_run_resumes_from_its_last_checkpoint_and_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path,
                                                                                   batch_size, extra):
    """Why: a single training run could not be resumed. With callbacks=checkpoints, the same command (into the
    same folder) continues from checkpoints/last.ckpt: weights, optimiser, schedule, step, noise stream,
    the loader's shuffling and the loss history, and ends with the adapter of the run that was not stopped.
    8 images in batches of 4 put the step-4 checkpoint at an epoch's end; in batches of 3 (3 a epoch) inside
    the second epoch, after its first batch: the resumed run used to start that epoch again, with a fresh
    order, under Lightning's warning that the loader is not resumable (lorabench.data.loader). Random flips
    and crops, and dropout, drew from the global generator, which no checkpoint held: the resumed run flipped
    other images and dropped other features (now the dataset's own generator, kept by the loader, and the
    global state in the checkpoint). With worker processes the orders after the first epoch differed (5.2e-3 apart
    at the end): the fit's one iterator drew its workers' seed once, the resumed run's new one again."""
    import warnings

    opts = ["callbacks=checkpoints", "callbacks.checkpoints.every_n_train_steps=2", f"data.batch_size={batch_size}",
            "optim.lr_scheduler=cosine", "optim.lr=3e-3", "trainer.log_every_n_steps=1", *extra]
    whole, _ = _train(opts, tiny_model_dir, tmp_path / "whole", steps=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(opts, tiny_model_dir, tmp_path / "stopped", steps=6, callbacks=[_Crash(at=5)])
    assert (tmp_path / "stopped" / "checkpoints" / "last.ckpt").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, _ = _train(opts, tiny_model_dir, tmp_path / "stopped", steps=6)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed["metrics"]["steps"] == 6 and len(resumed["metrics"]) == len(whole["metrics"])
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "stopped")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert resumed["metrics"]["train_loss_last"] == pytest.approx(whole["metrics"]["train_loss_last"], abs=1e-6)
    # one metrics.csv: the first part's steps before the checkpoint, then the resumed part's (Lightning's CSV
    # logger alone would have deleted the first part)
    def losses(run):
        with open(tmp_path / run / "csv" / "metrics.csv", newline="") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    assert sorted(losses("stopped")) == sorted(losses("whole")) == list(range(6))
    assert all(abs(losses("stopped")[k] - v) < 1e-5 for k, v in losses("whole").items())


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path):
    proc = run_here([*FAST, f"resume={tmp_path / 'nowhere'}"], tmp_path)
    assert_one_line_error(proc, tmp_path, "resume:", "does not exist")


def test_a_checkpoint_that_does_not_hold_what_the_run_trains_is_one_line(tmp_path):
    """Lightning's own load raised torch's size mismatch for another rank, ``IndexError: pop from empty list`` for
    a file that is no checkpoint, and failed on the optimiser's state for another adapter type or fewer layers
    (the module loads non-strictly), each a traceback after the run folder was made; the same command into its
    own folder with another rank met its old last.ckpt the same way."""
    done = tmp_path / "done"
    proc = run_here([*FAST, "callbacks=checkpoints", f"hydra.run.dir={done}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    ckpt = f"'{done / 'checkpoints' / 'last.ckpt'}'"
    for args, fragments in (
        (["adapter.rank=8"], [f"resume: {ckpt} trained lora (rank 4), this run trains lora (rank 8): resume with"]),
        (["adapter=trilora"], ["trained lora (rank 4), this run trains trilora (rank 4)"]),
        (["adapter.target_modules=[to_q]"], ["holds weights this run has no layer for (", "resume with the targets"]),
        ([f"resume={done / 'csv' / 'hparams.yaml'}"], ["hparams.yaml' is not a checkpoint torch can read"]),
    ):
        work = tmp_path / "work"
        work.mkdir()
        assert_one_line_error(run_here([*FAST, "callbacks=checkpoints", f"resume={done}", *args], work), work,
                              *fragments)
        work.rmdir()
    kept = sorted(p.relative_to(done) for p in done.rglob("*"))
    assert_one_line_error(run_here([*FAST, "callbacks=checkpoints", "adapter.rank=8", f"hydra.run.dir={done}"],
                                   tmp_path), tmp_path, f"resume: {ckpt}, this run folder's own checkpoint "
                          "(resume=null takes it) trained lora (rank 4)", "or train afresh in another folder")
    assert sorted(p.relative_to(done) for p in done.rglob("*")) == kept
    (done / "checkpoints" / "last.ckpt").write_bytes(b"cut short")  # its own checkpoint, unreadable
    assert_one_line_error(run_here([*FAST, "callbacks=checkpoints", f"hydra.run.dir={done}"], tmp_path), tmp_path,
                          "(resume=null takes it) is not a checkpoint torch can read (", "): delete it to train "
                          "from the start")


def test_the_same_command_again_after_the_run_ended_changes_nothing(tmp_path):
    """The same command into a finished run's folder resumed its last.ckpt with no step left: it rewrote
    results.json with 0 steps, no train loss and no files, and cut metrics.csv to the validation rows. Now it
    says so and leaves the folder as it was; a checkpoint past trainer.max_steps is one line naming it."""
    done = tmp_path / "done"
    cmd = [*FAST, "callbacks=checkpoints", f"hydra.run.dir={done}"]
    assert run_here(cmd, tmp_path).returncode == 0
    files = {p: p.read_bytes() for p in [done / "results.json", done / "csv" / "metrics.csv"]}
    proc = run_here(cmd, tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert f"lorabench: {done} was trained to trainer.max_steps=2 already; nothing to do" in proc.stdout
    assert "steps                                   2" in proc.stdout  # the summary it recorded
    assert all(p.read_bytes() == b for p, b in files.items())
    assert_one_line_error(run_here([*cmd, "trainer.max_steps=1"], tmp_path), tmp_path,
                          "trainer.max_steps: ", "last.ckpt' is at step 2, so trainer.max_steps=1 leaves nothing")
    assert all(p.read_bytes() == b for p, b in files.items())
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run_here([*FAST, f"resume={done}"], work), work,
                          "trainer.max_steps: ", "is at step 2, so trainer.max_steps=2 leaves nothing to train")


class _Record(L.Callback):
    """The trained parameters at the start and after every optimiser step."""

    def __init__(self):
        self.values = []

    def _params(self, trainer):
        return [p.detach().clone() for g in trainer.optimizers[0].param_groups for p in g["params"]]

    def on_train_start(self, trainer, *_):
        self.values.append(self._params(trainer))

    def on_train_batch_end(self, trainer, *_):
        self.values.append(self._params(trainer))


def test_ema_of_the_adapter_matches_a_hand_computed_average(tiny_model_dir, tmp_path):
    """module.ema_decay: the saved adapter is e_k = d e_(k-1) + (1 - d) p_k from e_0 = p_0 (off by default)."""
    rec = _Record()
    _, module = _train(["module.ema_decay=0.7", "optim.lr=1e-2"], tiny_model_dir, tmp_path, steps=4,
                       callbacks=[rec])
    assert len(rec.values) == 5
    ema = rec.values[0]
    for step in rec.values[1:]:
        ema = [0.7 * e + 0.3 * p for e, p in zip(ema, step)]
    saved = [p.detach() for g in module.trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(torch.allclose(s.cpu(), e, atol=1e-6) for s, e in zip(saved, ema))
    assert not all(torch.allclose(s.cpu(), p, atol=1e-6) for s, p in zip(saved, rec.values[-1]))
    file = list(_adapter(tmp_path).values())  # the file holds the averages
    assert all(any(t.shape == e.shape and torch.allclose(t, e, atol=1e-6) for t in file) for e in ema)


def test_min_snr_weights_match_the_formula_and_are_off_by_default(tiny_model_dir, load_tiny, tmp_path):
    """module.snr_gamma: each example's loss times min(SNR(t), gamma) / SNR(t) (epsilon) or / (SNR(t) + 1)
    (v-prediction), SNR(t) = abar_t / (1 - abar_t); a gamma above every SNR trains the unweighted adapter."""
    from lorabench.training import DiffusionFineTuner

    comps = load_tiny()
    module = DiffusionFineTuner(comps, {"name": "lora", "rank": 2}, snr_gamma=5.0)
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = comps.noise_scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert torch.allclose(module.snr_weights(t).double(), expected, rtol=1e-5)
    comps.noise_scheduler.register_to_config(prediction_type="v_prediction")
    try:
        assert torch.allclose(module.snr_weights(t).double(), torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1),
                              rtol=1e-5)
    finally:
        comps.noise_scheduler.register_to_config(prediction_type="epsilon")
    module.adapters.remove()
    _train([], tiny_model_dir, tmp_path / "plain")
    _train(["module.snr_gamma=1e12"], tiny_model_dir, tmp_path / "huge")
    _train(["module.snr_gamma=1.0"], tiny_model_dir, tmp_path / "one")
    plain, huge, one = (_adapter(tmp_path / n) for n in ("plain", "huge", "one"))
    assert all(torch.equal(plain[k], huge[k]) for k in plain)
    assert not all(torch.equal(plain[k], one[k]) for k in plain)


def test_results_json_records_the_data_it_trained_on(tiny_model_dir, toy_images, tmp_path):
    """Why: results.json of a custom run did not record its data path."""
    results, _ = _train(["data=imagefolder", f"data.path={toy_images}"], tiny_model_dir, tmp_path, steps=1)
    assert results["data"]["path"] == str(toy_images) and results["data"]["name"] == "imagefolder"


# -- sweeps and sampling ----------------------------------------------------------------------------------------------
def test_a_job_that_fails_on_its_swept_values_or_crashes_fails_alone(tmp_path):
    """Why: bad input in one job's swept value (a warm-up longer than its run) ended the sweep at that job, before
    the jobs after it; a job that crashed let the others run, then ended the sweep on its traceback with no table.
    Now each fails alone: a line (bad input) or its traceback (kept in its cli.log), a failed.json in its folder,
    its row in the table, the count at the end, and status 1 (2 where every failure was bad input)."""
    (tmp_path / "crash_at.py").write_text(
        "import lightning.pytorch as L\n\n\nclass CrashAtSeed1(L.Callback):\n"
        "    def on_train_start(self, trainer, module):\n        if module.seed == 1:\n            1 / 0\n")
    args = ["-m", *FAST, "exports=[]", "trainer.max_steps=-1", "trainer.max_epochs=1", "optim.lr_scheduler=cosine",
            "+callbacks.crash._target_=crash_at.CrashAtSeed1"]
    proc = run_cli([*args, "optim.warmup_steps=500,0", "seed=0,1"], tmp_path, {"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, crashed(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lorabench: error:")]
    assert [e.split(":")[2].strip() for e in errors] == ["job 0_optim.warmup_steps=500,seed=0",
                                                          "job 1_optim.warmup_steps=500,seed=1"], errors
    assert all("optim.warmup_steps: 500 warm-up steps in a run of 1 optimiser step:" in e for e in errors)
    assert "ZeroDivisionError: division by zero" in proc.stderr
    assert "lorabench sweep: 3 of 4 jobs failed: 0_optim.warmup_steps=500,seed=0, 1_" in proc.stderr
    [sweep] = list((tmp_path / "outputs" / "multirun" / "quickstart").iterdir())
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(p.name for p in jobs["0_optim.warmup_steps=500,seed=0"].iterdir()) == [".hydra", "failed.json"]
    assert (jobs["2_optim.warmup_steps=0,seed=0"] / "results.json").is_file()
    crash = jobs["3_optim.warmup_steps=0,seed=1"]
    assert "ZeroDivisionError" in (crash / "cli.log").read_text() and not (crash / "results.json").exists()
    summary = (sweep / "summary.md").read_text()
    assert "| 0_optim.warmup_steps=500,seed=0 | optim.warmup_steps=500 seed=0 | failed: optim.warmup_steps: 500 " \
           "warm-up steps" in summary
    assert "| 2_optim.warmup_steps=0,seed=0 | optim.warmup_steps=0 seed=0 | done |" in summary
    assert "| 3_optim.warmup_steps=0,seed=1 | optim.warmup_steps=0 seed=1 | failed: ZeroDivisionError: division by " \
           "zero (traceback in its cli.log) |" in summary
    assert summary.split("\n", 2)[2].strip() in run_cli(["summarize", str(sweep)], tmp_path).stdout
    # every failure bad input: status 2, as a single run's; the job that ran is kept
    again = [*args[:-1], f"hydra.sweep.dir={tmp_path / 'again'}"]
    proc = run_cli([*again, "optim.warmup_steps=500,0", "seed=0"], tmp_path)
    assert proc.returncode == 2, crashed(proc)
    assert "lorabench sweep: 1 of 2 jobs failed: 0_optim.warmup_steps=500" in proc.stderr
    # a later sweep into that folder is judged by its own jobs (the table still lists the earlier one's)
    proc = run_cli([*again, "optim.warmup_steps=0"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert "jobs failed" not in proc.stderr and "| 0_optim.warmup_steps=500 |" in proc.stdout


def test_a_sweep_names_job_folders_by_their_values_prints_a_line_each_and_a_summary(tmp_path):
    """Why: sweep job folders were 0/, 1/, every job printed its whole console, and nothing summarised a sweep."""
    proc = run_cli(["-m", *FAST, "exports=[]", "adapter=lora,trilora", "seed=0"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [sweep] = list((tmp_path / "outputs" / "multirun" / "quickstart").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_adapter=lora", "1_adapter=trilora"]
    jobs = [ln for ln in proc.stdout.splitlines() if ln.startswith("lorabench quickstart job ")]
    assert len(jobs) == 2 and all("val loss" in ln for ln in jobs)
    assert "config                    " not in proc.stdout  # no per-job table
    for job in sweep.iterdir():  # each job's folder keeps its own console: its line
        if job.is_dir():
            assert (job / "cli.log").read_text().splitlines() == [ln for ln in jobs if f"job {job.name}:" in ln]
    summary = (sweep / "summary.md").read_text()
    assert "| 0_adapter=lora | adapter=lora | done | lora |" in summary and (sweep / "summary.csv").is_file()
    assert summary.split("\n", 2)[2].strip() in proc.stdout  # printed at the sweep's end
    again = run_cli(["summarize", str(sweep)], tmp_path)
    assert again.returncode == 0 and "1_adapter=trilora" in again.stdout
    bad = run_cli(["summarize", str(tmp_path / "nope")], tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("lorabench: error: sweep_dir:")
    # one job's results.json that is no JSON is that job's row (json's traceback ended the summary)
    (sweep / "1_adapter=trilora" / "results.json").write_text("{")
    from lorabench.sweeps import summarize

    text = summarize(sweep, write=False)
    assert "| 0_adapter=lora | adapter=lora | done | lora |" in text
    assert "| 1_adapter=trilora | adapter=trilora | failed (results.json is not JSON: " in text


def test_job_dir_names_keep_only_swept_values():
    from lorabench.sweeps import job_dir_name

    argv = ["-m", "experiment=quickstart", "adapter=lora,trilora", "seed=0,1", "data.path=/a/b"]
    assert job_dir_name(3, ["experiment=quickstart", "adapter=trilora", "seed=1", "data.path=/a/b"], argv) == \
        "3_adapter=trilora,seed=1"
    assert job_dir_name(0, ["x=1"], ["-m", "x=1"]) == "0"


def test_the_sample_job_applies_weighted_adapters_of_any_layout(tiny_model_dir, tmp_path):
    """Why: there was no command to sample from a trained adapter. `lorabench sample` loads lorabench, diffusers
    or kohya files, scales each by its weight, and writes a labelled grid and each image; the weighted sum
    samples what the merged adapter does."""
    import json

    import numpy as np
    from PIL import Image

    _train(["exports=[kohya]"], tiny_model_dir, tmp_path / "run")
    model = ["model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny", "model.resolution=16",
             "protocol.sampler.num_inference_steps=4", "protocol.seeds=[0,1]", "protocol.prompts=[a red circle]"]
    outs = {}
    for name, files, weights in (("two", f"[{tmp_path}/run/adapter.safetensors,{tmp_path}/run/kohya_lora.safetensors]",
                                  "[0.5,0.5]"),
                                 ("one", f"[{tmp_path}/run]", "null"),  # a run folder: its adapter.safetensors
                                 ("base", "[]", "null")):
        run = run_cli if name == "two" else run_here  # the command's own process once, then in this one
        proc = run(["sample", *model, f"protocol.adapters={files}", f"protocol.weights={weights}",
                    f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        assert "Loading weights" not in proc.stdout + proc.stderr  # transformers' bar, once per text encoder
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["images"] == ["images/prompt0_seed0.png", "images/prompt0_seed1.png"]
        assert (tmp_path / name / "samples.png").is_file()
        outs[name] = np.asarray(Image.open(tmp_path / name / res["images"][0]), dtype=np.int16)
    assert np.abs(outs["two"] - outs["one"]).max() <= 1  # 0.5 a + 0.5 a = a (uint8 rounding)
    assert np.abs(outs["one"] - outs["base"]).max() > 0


def test_the_sample_job_adds_a_runs_new_tokens(tiny_model_dir, tmp_path):
    """A run folder stood for its adapter.safetensors alone: a LoRA run with textual inversion sampled without its
    tokens (the bound word read as the base model's word), and a textual-inversion run was "a folder without
    adapter.safetensors". Now a run folder brings its embeddings.safetensors too, as protocol.embeddings does a
    token file, and the bound word samples the trained rows."""
    import json

    import numpy as np
    from PIL import Image

    tokens = ["embeddings=textual_inversion", "embeddings.token='<x>'", "embeddings.bind=red", "optim.lr=0.3"]
    _train(tokens, tiny_model_dir, tmp_path / "both")
    _train([*tokens, "adapter=none"], tiny_model_dir, tmp_path / "ti")
    model = ["sample", "model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny", "model.resolution=16",
             "protocol.sampler.num_inference_steps=2", "protocol.seeds=[0]", "protocol.prompts=[a red circle]"]
    both, ti = tmp_path / "both", tmp_path / "ti"
    images = {}
    for name, args in (("run", [f"protocol.adapters=[{both}]"]),
                       ("files", [f"protocol.adapters=[{both}/adapter.safetensors]",
                                  f"protocol.embeddings=[{both}/embeddings.safetensors]"]),
                       ("adapter", [f"protocol.adapters=[{both}/adapter.safetensors]"]),
                       ("ti", [f"protocol.adapters=[{ti}]"]), ("base", [])):
        proc = run_here([*model, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        res = json.loads((tmp_path / name / "results.json").read_text())
        images[name] = np.asarray(Image.open(tmp_path / name / res["images"][0]), dtype=np.int16)
        assert res["model_id"] == str(tiny_model_dir)  # which base model the grid came from
        if name in ("run", "files"):
            assert res["adapters"] == [f"{both}/adapter.safetensors"]
            assert res["embeddings"] == [f"{both}/embeddings.safetensors"]
    assert np.array_equal(images["run"], images["files"])
    assert np.abs(images["run"] - images["adapter"]).max() > 0 and np.abs(images["ti"] - images["base"]).max() > 0
    # a diffusers textual-inversion output folder stands for its learned_embeds.safetensors
    out = tmp_path / "diffusers_ti"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes((ti / "embeddings.safetensors").read_bytes())
    proc = run_here([*model, f"protocol.embeddings=[{out}]", f"hydra.run.dir={tmp_path / 'learned'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)  # was "no such token file"
    res = json.loads((tmp_path / "learned" / "results.json").read_text())
    assert res["embeddings"] == [str(out / "learned_embeds.safetensors")]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "learned" / res["images"][0]), dtype=np.int16), images["ti"])
    # tokens take no weight; a token file that is not there
    assert_one_line_error(run_here([*model, f"protocol.adapters=[{ti}]", "protocol.weights=[0.5]"], tmp_path),
                          tmp_path, f"protocol.weights: 0.5 for '{ti}', a run of new tokens alone", "give 1")
    assert_one_line_error(run_here([*model, f"protocol.embeddings=[{tmp_path}/nope.safetensors]"], tmp_path),
                          tmp_path, f"protocol.embeddings: '{tmp_path}/nope.safetensors': no such token file")


def test_a_diffusers_output_folder_stands_for_its_lora_file(tiny_model_dir, tmp_path):
    """diffusers' training scripts write ``pytorch_lora_weights.safetensors`` into their output folder, and
    ``load_lora_weights(folder)`` reads it; lorabench took a folder for a run folder alone ("a folder without
    adapter.safetensors"). Now such a folder stands for its file in the sample and merge jobs, as the file does."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    _train(["exports=[diffusers]"], tiny_model_dir, tmp_path / "run")
    out = tmp_path / "diffusers_output"
    out.mkdir()
    shutil.copy(tmp_path / "run" / "pytorch_lora_weights.safetensors", out)
    model = ["model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny", "model.resolution=16"]
    images = {}
    for name, given in (("folder", out), ("file", out / "pytorch_lora_weights.safetensors")):
        proc = run_here(["sample", *model, "protocol.sampler.num_inference_steps=2", "protocol.seeds=[0]",
                         "protocol.prompts=[a red circle]", f"protocol.adapters=[{given}]",
                         f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["adapters"] == [str(out / "pytorch_lora_weights.safetensors")]
        images[name] = np.asarray(Image.open(tmp_path / name / res["images"][0]))
    assert np.array_equal(images["folder"], images["file"])
    proc = run_here(["experiment=merge_adapters", *model, f"protocol.inputs=[{out},{tmp_path / 'run'}]",
                     f"hydra.run.dir={tmp_path / 'merged'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    res = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert res["inputs"] == [str(out / "pytorch_lora_weights.safetensors"),
                             str(tmp_path / "run" / "adapter.safetensors")]


def test_an_adapter_of_another_model_says_which_model_it_was_trained_on(tiny_model_dir, tmp_path):
    """Sampled from another model, an adapter's layers do not match: the error said a tensor was missing, not
    that the file was trained on another model (lorabench files record which)."""
    _train([], tiny_model_dir, tmp_path / "run")
    proc = run_here(["sample", "model=world", "protocol.prompts=[a red circle]", f"protocol.adapters=[{tmp_path}/run]"],
                    tmp_path)
    assert_one_line_error(proc, tmp_path, "adapter.safetensors': ", f"(trained on '{tiny_model_dir}', loaded into ")


@pytest.mark.parametrize("job", ["sample", "merge"])
def test_an_adapter_input_that_is_no_adapter_file_is_one_line_naming_its_field(tmp_path, job):
    """A folder without adapter.safetensors "did not exist"; a file that is no safetensors was named by its path
    alone, without the field (``protocol.adapters`` of the sample job, ``protocol.inputs`` of the merge job)."""
    (tmp_path / "notes.safetensors").write_text("not an adapter\n")
    (tmp_path / "empty").mkdir()
    args = {"sample": ["sample", "protocol.prompts=[a red circle]", "protocol.adapters"],
            "merge": ["experiment=merge_adapters", "model=tiny", "protocol.inputs"]}[job]
    field = args.pop()
    for given, fragment in ((f"{tmp_path}/empty", "is a folder without adapter.safetensors"),
                            (f"{tmp_path}/notes.safetensors", "is not a safetensors file")):
        proc = run_here([*args, f"{field}=[{given},{given}]"], tmp_path)
        assert_one_line_error(proc, tmp_path, f"{field}: '{given}", fragment)


# -- the docs' walkthrough, run as written -----------------------------------------------------------------------
def walkthrough_blocks(doc):
    """The (language, code) blocks between the walkthrough markers of ``doc``."""
    import re

    text = doc.read_text().split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", text, re.S)


def test_the_usage_walkthrough_runs_as_written(tmp_path):
    """Why: the docs said the file is for pipe.load_lora_weights but not how to get a pipeline, and the saved tiny
    model had no VAE (StableDiffusionPipeline.from_pretrained failed). docs/usage.md's walkthrough (own folder ->
    train with samples -> export -> diffusers pipeline -> merge with weights -> sample) runs here block by block:
    each `lorabench` line through the command's entry point and each Python snippet as its code, in this process
    (an interpreter start and torch import per line cost about 5 s each; the quickstart and main-job tests run
    the installed command itself)."""
    import json
    import shlex
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "usage.md"
    blocks = walkthrough_blocks(doc)
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash"]

    def python(code: str) -> None:
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            exec(compile(code, str(doc), "exec"), {"__name__": "__main__"})
        finally:
            os.chdir(cwd)

    for lang, code in blocks:
        if lang == "python":
            python(code)
            continue
        for line in (ln for ln in code.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")):
            cmd = shlex.split(line)
            if cmd[0] == "lorabench":
                proc = run_here(cmd[1:], tmp_path)
                assert proc.returncode == 0, f"{cmd}\n{crashed(proc)}"
            else:
                assert cmd[:2] == ["python", "-c"] and len(cmd) == 3, cmd
                python(cmd[2])
    dog = tmp_path / "outputs" / "my_dog"
    assert json.loads((dog / "results.json").read_text())["samples"] == ["samples/step000010.png",
                                                                         "samples/step000020.png"]
    assert (dog / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "sks_dog.png").is_file()
    assert json.loads((tmp_path / "outputs" / "merged" / "results.json").read_text())["weights"] == [0.7, 0.3]
    assert (tmp_path / "outputs" / "merged_samples" / "samples.png").is_file()


def test_the_quickstart_console_is_a_step_bar_and_the_summary_with_no_warning(tmp_path):
    """Why: the quickstart printed a Lightning tip, four Lightning warnings (LeafSpec, no val_dataloader,
    log_every_n_steps, modules in eval mode) and a bar reading `Epoch 29/-2`. Now: one bar over the 30 steps
    and the summary (11 lines; 21 before)."""
    proc = run_cli(["experiment=quickstart"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    # tqdm redraws its bar with carriage returns (text mode turns them into newlines): its redraws are one line
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    bar = [ln for ln in lines if ln.startswith("train:")]
    lines = [ln for ln in lines if not ln.startswith("train:")] + bar[-1:]
    assert len(lines) <= 12, "\n".join(lines)
    for noise in ("Warning", "warn", "Tip", "LeafSpec", "val_dataloader", "logging interval", "eval mode",
                  "GPU available", "Epoch", "/-2", ".py:"):  # "/-2": the old bar's "29/-2", not a date
        assert not any(noise in ln for ln in lines), (noise, lines)
    assert bar[-1].startswith("train: 100%") and "30/30" in bar[-1], bar[-1]
    # ... and the run folder keeps it: cli.log is the console, the bar as it ended (Hydra's own log was empty)
    [log] = (tmp_path / "outputs" / "quickstart").glob("*/cli.log")
    summary = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("train:")]
    assert [ln for ln in log.read_text().splitlines() if ln] == [bar[-1].rstrip(), *summary]
    # -v still shows the libraries' lines: test_cli.py's test_verbose_flag_is_accepted_and_lightning_log_lines_...


def test_validation_samples_go_to_loggers_that_take_images(load_tiny, tmp_path):
    """The grid is logged to W&B (any logger with log_image) under validation/samples at its step."""
    from types import SimpleNamespace

    from lorabench.training import DiffusionFineTuner, ValidationSamples

    calls = []
    fake = SimpleNamespace(log_image=lambda **kw: calls.append(kw))
    module = DiffusionFineTuner(load_tiny(), {"name": "lora", "rank": 2})
    cb = ValidationSamples(["a red circle"], [0], {"num_inference_steps": 2}, tmp_path / "samples")
    cb.sample(SimpleNamespace(global_step=3, is_global_zero=True, loggers=[fake]), module)
    assert (tmp_path / "samples" / "step000003.png").is_file() and module.training
    assert calls == [{"key": "validation/samples", "images": [str(tmp_path / "samples" / "step000003.png")],
                      "step": 3, "caption": ["step 3"]}]


def test_a_checkpoint_loads_into_a_module_outside_a_trainer(load_tiny):
    """A module given a checkpoint by hand (no Trainer): its streams are restored, as one process's (it raised
    Lightning's "not attached to a Trainer" once the hook read the process count)."""
    from lorabench.training import DiffusionFineTuner

    module = DiffusionFineTuner(load_tiny(), {"name": "lora", "rank": 2})
    saved = {"lorabench_noise_state": module._generator().get_state()}
    expected = torch.rand(3, generator=module._generator())
    module.on_load_checkpoint(saved)
    assert torch.equal(torch.rand(3, generator=module._generator()), expected)


@pytest.mark.parametrize("off", ["adapter=null", "~adapter", "adapter=none"])
def test_tokens_train_alone_from_the_command_line(tmp_path, off):
    """conf/train.yaml says adapter=null trains new tokens alone: Hydra refuses null for a config group and
    ~adapter would leave quickstart's adapter.rank behind, so both mean adapter=none (conf/adapter/none.yaml),
    which drops whatever an experiment set under adapter:."""
    args = [*FAST, off, "embeddings=textual_inversion", "embeddings.token='<x>'", "embeddings.bind=red", "exports=[]"]
    proc = (run_cli if off == "adapter=null" else run_here)(args, tmp_path)  # the reported one as users run it
    assert proc.returncode == 0, crashed(proc)
    [results] = list((tmp_path / "outputs").rglob("results.json"))
    assert (results.parent / "embeddings.safetensors").is_file()
    assert not (results.parent / "adapter.safetensors").exists()
    res = json.loads(results.read_text())
    assert res["adapter"] == "none" and res["adapter_config"] is None  # tokens alone, not full training
    assert res["embeddings_config"]["token"] == "<x>"
