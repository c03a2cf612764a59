"""Continual personalization: the formulas, the Metric (one process = two DDP ranks), MagMax and
Merge & Orthogonal Init against independent re-implementations, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    DEVICES,
    SHORT,
    assert_one_line_error,
    cli_env,
    crashed,
    run_here,
    write_tiny_csd,
    write_unlearncanvas_tree,
)
from lorabench.continual import (
    ContinualScores,
    average_score,
    backward_transfer,
    build_method,
    forgetting,
    magmax_select,
    orthogonal_columns,
    sign_conflict_ratio,
)
from lorabench.errors import ConfigError

pytestmark = pytest.mark.integration  # end to end: out of the fast tier

NAN = math.nan


# -- formulas --------------------------------------------------------------------------------------------
def test_formulas_on_a_hand_computed_matrix():
    # Task 0 peaks after task 1 (0.7), not right after its own training (0.5).
    m = torch.tensor([[0.5, 0.7, 0.4], [NAN, 0.6, 0.5], [NAN, NAN, 0.8]])
    assert average_score(m) == pytest.approx((0.4 + 0.5 + 0.8) / 3)
    assert forgetting(m, "reference") == pytest.approx(((0.7 - 0.4) + (0.6 - 0.5) + 0.0) / 3)
    assert forgetting(m, "textbook") == pytest.approx(((0.7 - 0.4) + (0.6 - 0.5)) / 2)
    assert backward_transfer(m) == pytest.approx(((0.4 - 0.5) + (0.5 - 0.6)) / 2)


def test_the_printed_score_matrix_labels_rows_as_evaluated_tasks_and_columns_as_after_task():
    """Why: the continual score matrix was not printed and its orientation documented nowhere."""
    from lorabench.continual.metrics import matrix_table

    m = torch.tensor([[0.9, 0.7, 0.5], [float("nan"), 0.8, 0.6], [float("nan"), float("nan"), 0.95]])
    lines = matrix_table(m, ["sks", "zwz", "vlx"], "DINO").splitlines()
    assert lines[0] == "| DINO (row: evaluated task, column: after task) | after 1 | after 2 | after 3 |"
    assert lines[2] == "| task 1: sks | 0.900 | 0.700 | 0.500 |"
    assert lines[3] == "| task 2: zwz |  | 0.800 | 0.600 |"
    assert lines[4] == "| task 3: vlx |  |  | 0.950 |"


def test_textbook_forgetting_leaves_the_final_column_out_of_the_max():
    m = torch.tensor([[0.3, 0.6], [NAN, 0.7]])  # task 0 improved: no forgetting by the reference's max
    assert forgetting(m, "reference") == pytest.approx(0.0)
    assert forgetting(m, "textbook") == pytest.approx(0.3 - 0.6)
    assert math.isnan(forgetting(m[:1, :1], "textbook")) and forgetting(m[:1, :1], "reference") == 0.0
    with pytest.raises(ValueError, match="textbook, reference"):
        forgetting(m, "other")


def _rows(seed=0, tasks=3, per=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for after in range(tasks):
        for task in range(after + 1):
            for name in ("clip_i", "dino"):
                out.append((name, task, after, torch.arange(per), torch.rand(per, generator=g, dtype=torch.float64)))
    return out


def test_metric_matrix_is_the_mean_of_per_image_scores_and_drops_duplicates():
    rows = _rows()
    metric = ContinualScores(["clip_i", "dino"], 3)
    for name, task, after, idx, vals in rows:
        metric.update(name, task, after, idx, vals)
    name, task, after, idx, vals = rows[0]
    metric.update(name, task, after, idx[:2], vals[:2])  # a padded duplicate of two images
    mats = metric.matrices()
    for name, task, after, idx, vals in rows:
        assert mats[name][task, after].item() == pytest.approx(vals.mean().item(), rel=1e-12)
    assert torch.isnan(mats["dino"][2, 0]) and mats["dino"].shape == (3, 3)
    out = metric.compute()
    assert out["clip_i/average_score"] == pytest.approx(average_score(mats["clip_i"]))
    assert out["dino/forgetting_ref"] == pytest.approx(forgetting(mats["dino"], "reference"))
    with pytest.raises(ValueError, match="task"):
        metric.update("dino", 2, 1, idx, vals)


def _ddp_worker(rank, world, init_file, rows, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metric = ContinualScores(["clip_i", "dino"], 3)
    for name, task, after, idx, vals in rows:  # each rank holds every other image (its shard)
        metric.update(name, task, after, idx[rank::world], vals[rank::world])
    values = metric.compute()
    mats = {k: torch.nan_to_num(v, nan=-1.0).tolist() for k, v in metric.matrices().items()}  # every rank calls it
    if rank == 0:
        Path(out_file).write_text(json.dumps({"values": values, "mats": mats}))
    dist.destroy_process_group()


def test_metric_is_identical_in_one_process_and_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    rows = _rows(seed=3)
    single = ContinualScores(["clip_i", "dino"], 3)
    for name, task, after, idx, vals in rows:
        single.update(name, task, after, idx, vals)
    out_file = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), rows, str(out_file)), nprocs=2, join=True)
    ddp = json.loads(out_file.read_text())
    assert ddp["values"] == single.compute()  # bit for bit
    assert ddp["mats"] == {k: torch.nan_to_num(v, nan=-1.0).tolist() for k, v in single.matrices().items()}


# -- methods against independent re-implementations ---------------------------------------------------------
def test_magmax_matches_an_independent_reimplementation_with_ties_to_the_newer_task():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(4)]
    deltas[2][0, 0] = -deltas[1][0, 0]  # a tie in magnitude with opposite sign: the newer task wins
    deltas[3][1, 1] = deltas[0][1, 1].abs()
    merged = deltas[0]
    for d in deltas[1:]:
        merged = magmax_select(merged, d)
    stack = np.stack([d.numpy() for d in deltas])
    mags = np.abs(stack)
    # independent: the last task index that reaches the element's maximum magnitude
    last = len(deltas) - 1 - np.argmax(mags[::-1] == mags.max(0), axis=0)
    expected = np.take_along_axis(stack, last[None], 0)[0]
    np.testing.assert_array_equal(merged.numpy(), expected)
    assert merged[0, 0] == deltas[2][0, 0] or abs(deltas[2][0, 0]) < max(abs(deltas[3][0, 0]), abs(deltas[0][0, 0]))


def test_orthogonal_columns_match_numpy_per_column_svd():
    g = torch.Generator().manual_seed(1)
    down = torch.randn(2, 7, generator=g)
    new = orthogonal_columns(down)
    for j in range(down.shape[1]):
        _, _, vh = np.linalg.svd(down[:, j].double().numpy()[None, :])
        ref = vh[-1]  # r = 2: unique up to sign
        got = new[:, j].double().numpy()
        assert min(np.abs(got - ref).max(), np.abs(got + ref).max()) < 1e-6
    down4 = torch.randn(4, 9, generator=g)
    new4 = orthogonal_columns(down4)
    assert torch.allclose(new4.norm(dim=0), torch.ones(9), atol=1e-6)
    assert (new4 * down4).sum(0).abs().max() < 1e-5


class _Layer(torch.nn.Module):
    def __init__(self, up, down, scale=1.0):
        super().__init__()
        self.lora_up, self.lora_down = torch.nn.Parameter(up.clone()), torch.nn.Parameter(down.clone())
        self.scale, self.multiplier, self.is_conv = scale, 1.0, False

    def factors(self):
        return self.lora_up, self.lora_down


class _Adapters:
    adapter_type = "lora"

    def __init__(self, layers):
        self.layers = layers

    def state_dict(self):
        return {f"{k}.{n}": p.detach() for k, layer in self.layers.items() for n, p in layer.named_parameters()}

    def load_state_dict(self, tensors, source=""):
        for k, layer in self.layers.items():
            for n, p in layer.named_parameters():
                p.data.copy_(tensors[f"{k}.{n}"])


def test_ortho_init_matches_an_independent_reimplementation():
    g = torch.Generator().manual_seed(2)
    r, n_in, n_out, scale = 3, 8, 5, 0.5
    method = build_method({"name": "ortho_init"})
    ups, downs = [], []
    for t in range(3):
        ad = _Adapters({"l": _Layer(torch.zeros(n_out, r), torch.randn(r, n_in, generator=g), scale)})
        method.start(ad, t)
        layer = ad.layers["l"]
        if t > 0:  # the new down is orthogonal, column by column, to the running sum of downs
            prev = np.sum([d.numpy() for d in downs], axis=0)
            got = layer.lora_down.detach().numpy()
            assert np.allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-6)
            assert np.abs((got * prev).sum(0)).max() < 1e-5
            assert np.abs(layer.lora_up.detach().numpy()).max() == 0
        with torch.no_grad():  # "training"
            layer.lora_up.add_(torch.randn(n_out, r, generator=g))
            layer.lora_down.add_(0.1 * torch.randn(r, n_in, generator=g))
        ups.append(layer.lora_up.detach().clone())
        downs.append(layer.lora_down.detach().clone())
        task = method.finish(ad, t)
        np.testing.assert_allclose(task["l"].numpy(), scale * ups[-1].numpy() @ downs[-1].numpy(), rtol=1e-5, atol=1e-6)
    # the model: W0 + scale * (sum up)(sum down), cross terms included
    expected = scale * np.sum([u.numpy() for u in ups], 0) @ np.sum([d.numpy() for d in downs], 0)
    np.testing.assert_allclose(method.eval_deltas()["l"].to_dense().numpy(), expected, rtol=1e-5, atol=1e-5)
    again = build_method({"name": "ortho_init"})
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.eval_deltas()["l"].to_dense(), method.eval_deltas()["l"].to_dense())


def test_merge_init_magmax_and_naive_states():
    g = torch.Generator().manual_seed(4)
    pairs = [(torch.randn(4, 2, generator=g), torch.randn(2, 6, generator=g)) for _ in range(3)]
    mi, mm, nv = (build_method({"name": n}) for n in ("merge_init", "magmax", "naive"))
    for t, (u, d) in enumerate(pairs):
        for m in (mi, mm):
            m.finish(_Adapters({"l": _Layer(u, d)}), t)
        nv.start(_Adapters({"l": _Layer(u, d)}), t)
        nv.finish(_Adapters({"l": _Layer(u, d)}), t)
    dense = [u @ d for u, d in pairs]
    assert torch.allclose(mi.eval_deltas()["l"].to_dense(), sum(dense), atol=1e-6)
    assert torch.equal(mm.eval_deltas()["l"].to_dense(), magmax_select(magmax_select(dense[0], dense[1]), dense[2]))
    assert torch.equal(nv.eval_deltas()["l"].to_dense(), dense[-1])
    assert sign_conflict_ratio({"l": dense[1]}, {}) is None
    ratio = sign_conflict_ratio({"l": dense[1]}, mi.eval_deltas())
    opposed = (torch.sign(dense[1]) * torch.sign(sum(dense))) < 0
    assert ratio == pytest.approx(float(dense[1][opposed].norm() / dense[1].norm()))


def test_unknown_method_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="protocol.method.name: unknown value 'magmix'.*magmax"):
        build_method({"name": "magmix"})
    with pytest.raises(ConfigError, match="protocol.method.lr: not an option of 'magmax'; valid: lam"):
        build_method({"name": "magmax", "lr": 1})
    assert build_method({"name": "merge:ties", "merge_options": {"density": 0.5}}).name == "merge:ties"




def test_a_cell_stopped_mid_training_resumes_from_its_own_checkpoint(tmp_path):
    """With callbacks=checkpoints each cell keeps its checkpoints/last.ckpt; a run stopped inside task 2 (last.ckpt at
    step 8 of 12, no results.json, no state for the task) started again resumes that cell from step 8, not from
    its start (the step-4 checkpoint it would write again stays gone), and ends with the uninterrupted run's
    matrices."""
    args = [*SHORT, "sequence.length=2", "callbacks=checkpoints", "callbacks.checkpoints.every_n_train_steps=4"]
    done = run_here(args, tmp_path)
    assert done.returncode == 0, crashed(done)
    run = tmp_path / "outputs/continual/world_objects/ortho_init/order0-seed0"
    ref = json.loads((run / "results.json").read_text())
    cell = run / "tasks" / "01-zwz"
    ckpts = cell / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=11-step=12.ckpt", "epoch=3-step=4.ckpt",
                                                       "epoch=7-step=8.ckpt", "last.ckpt"]
    (ckpts / "epoch=7-step=8.ckpt").replace(ckpts / "last.ckpt")  # stopped after step 8's checkpoint
    for p in (ckpts / "epoch=11-step=12.ckpt", ckpts / "epoch=3-step=4.ckpt", cell / "results.json",
              cell / "adapter.safetensors", run / "results.json"):
        p.unlink()
    shutil.rmtree(run / "state" / "task_001")
    again = run_here(args, tmp_path)
    assert again.returncode == 0, crashed(again)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=11-step=12.ckpt", "last.ckpt"]
    res = json.loads((run / "results.json").read_text())
    assert res["matrices"] == ref["matrices"] and res["tasks"] == ref["tasks"]


def test_a_sweep_of_methods_prints_each_job_and_a_summary_of_their_scores(tmp_path):
    """Why: the continual sweep the docs show (methods x orders) crashed after its first job (the job's line read
    the sequence's metrics, a list, as a training run's dict), and its summary found no job: the experiment nests
    them (hydra.sweep.subdir <method>/order<k>-seed<s>), where it looked at the top only. Now each job's line names
    its folder, and the summary lists every job with the run table's S and F per metric."""
    sweep = tmp_path / "sweep"
    proc = run_here(["-m", *SHORT, "sequence.length=2", "trainer.max_steps=2", "protocol.method.name=naive,magmax",
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    for job in ("naive/order0-seed0", "magmax/order0-seed0"):
        assert f"job {job}: continual done; results in {sweep / job / 'results.json'}" in proc.stdout
    summary = (sweep / "summary.md").read_text()
    assert "| job | overrides | status | protocol | table | S CLIP-I | S DINO | F CLIP-I | F DINO |" in summary
    for job in ("naive/order0-seed0", "magmax/order0-seed0"):
        final = json.loads((sweep / job / "results.json").read_text())["final"]
        row = next(ln for ln in summary.splitlines() if ln.startswith(f"| {job} |"))
        assert row.endswith(f"| {final['clip_i']['average_score']:.4g} | {final['dino']['average_score']:.4g} | "
                            f"{final['clip_i']['forgetting_ref']:.4g} | {final['dino']['forgetting_ref']:.4g} |"), row
    assert summary.index("| naive/") < summary.index("| magmax/")  # the order the sweep ran them


def test_a_killed_sequence_resumes_and_ends_bit_for_bit_equal(tmp_path):
    """The reference run, a finished run started again and the resumed run go through the command's entry point
    in this process (:func:`run_here`); the run to kill is the command's own process, with this process's
    thread count (the reductions, hence the bits, depend on it)."""
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    done = run_here(SHORT, ref_dir)
    assert done.returncode == 0, crashed(done)
    # the console's final score matrices, rows and columns labelled (issue 31)
    assert "(row: evaluated task, column: after task) | after 1 | after 2 |" in done.stdout, done.stdout[-3000:]
    assert "| task 1: " in done.stdout and "| task 2: " in done.stdout
    run = Path("outputs/continual/world_objects/ortho_init/order0-seed0/results.json")  # fixed by the config
    ref = ref_dir / run
    ref = json.loads(ref.read_text())
    # a finished run started again shows the final model's samples: the same image (it once crashed on W0)
    samples = (ref_dir / run).with_name("samples.png").read_bytes()
    rerun = run_here(SHORT, ref_dir)
    assert rerun.returncode == 0, crashed(rerun)
    assert (ref_dir / run).with_name("samples.png").read_bytes() == samples

    threads = str(torch.get_num_threads())
    proc = subprocess.Popen([sys.executable, "-m", "lorabench", *SHORT], cwd=kill_dir,
                            env=cli_env({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    run_dirs = []
    while time.time() < deadline and proc.poll() is None:  # kill once task 2 (index 1) is training
        run_dirs = list((kill_dir / "outputs").rglob("state"))
        if run_dirs and (run_dirs[0] / "task_000" / "record.json").is_file() and \
                list((run_dirs[0].parent / "tasks").glob("01-*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed mid-task"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = run_dirs[0]
    assert (state / "task_000" / "record.json").is_file() and not (state / "task_001").exists()

    again = run_here(SHORT, kill_dir)
    assert again.returncode == 0, crashed(again)
    assert "resumed" in again.stdout + again.stderr
    res = json.loads((kill_dir / run).read_text())
    assert res["matrices"] == ref["matrices"] and res["base"] == ref["base"]
    assert res["sign_conflict"] == ref["sign_conflict"]
    assert res["tasks"] == ref["tasks"] and len(res["tasks"]) == 3


@pytest.mark.parametrize("override,fragments", [
    (["sequence.tasks=[sks,zwz,sks]", "sequence.length=3"], ("sequence.tasks", "'sks' is listed twice")),
    (["sequence.tasks=[sks,nope]", "sequence.length=2"], ("sequence.tasks.nope", "no data")),
    (["sequence.length=12"], ("sequence.length", "asks for 12 tasks", "lists 10")),
    (["sequence.length=0"], ("sequence.length: must be an integer >= 1, got 0",)),  # it ran all ten before
    (["protocol.method.name=magmix"], ("protocol.method.name", "unknown value 'magmix'", "merge_init")),
    # the method given where its options go: Hydra's traceback from the run folder's name before
    (["protocol.method=magmax"], ("protocol.method: holds options (name), not one value: set one of them, "
                                  "e.g. protocol.method.name=magmax",)),
    (["sequence.order_seed=abc"], ("sequence.order_seed: expected an integer, got 'abc'",)),
    # each ran all ten tasks: order -1 is Python's order 1 (random seeds an int by its absolute value)
    (["sequence.order_seed=-1"], ("sequence.order_seed: must be an integer >= 0 or null, got -1",)),
    (["protocol.eval_seed=-1"], ("protocol.eval_seed: must be an integer >= 0, got -1",)),
    # a rank the model cannot take: adapter.rank, after the base model's scores (and their state) were written
    (["protocol.adapter.rank=64"], ("protocol.adapter.rank: 64 exceeds min(in, out) = 32",)),
    # a context of one word: an unpacking ValueError inside Hydra's instantiation, the run folder left behind
    (["eval.concepts.contexts=[[left]]"], ("eval.concepts.contexts[0]: must be a [position, background] pair",)),
    # a field the data group does not have: the first task's cell failed in Hydra's words, after the base model's
    # evaluation
    (["sequence.data_key=nope"], ("sequence.data_key: 'nope' is not a field of data; valid: name, kind, concept",)),
    (["sequence.tasks=[{name: sks, data: {colour: red}}]", "sequence.length=1"],
     ("sequence.tasks.sks.data.colour: not a field of data; valid: ",)),
    (["protocol.method.name=ortha"], ("protocol.adapter.name: method 'ortha' trains Orthogonal Adaptation adapters; "
                                      "got 'lora' (use adapter@protocol.adapter=ortho)",)),
    (["protocol.method.name=merge:ties", "+protocol.method.merge_options.density=0"],
     ("protocol.method.merge_options.density: must be a number in (0, 1], got 0",)),
    # found by the first task's cell, after the base model's evaluation, as adapter.rank
    (["protocol.adapter.rank=0"], ("protocol.adapter.rank: must be a positive integer, got 0",)),
])
def test_bad_sequences_fail_in_one_line_before_training(tmp_path, override, fragments):
    proc = run_here(["experiment=continual/world_objects", *override], tmp_path)
    assert_one_line_error(proc, tmp_path, *fragments)


def test_a_task_whose_folder_is_missing_fails_before_training(tmp_path):
    """A full-scale sequence's task folder that is not there; a world sequence's task given a folder, which the
    world's data group takes no path for (its cell failed in Hydra's words, after the base model's evaluation)."""
    proc = run_here(["experiment=continual/sdxl_objects", "trainer=cpu", "trainer.precision=32"], tmp_path,
                    env_extra={"DREAMBOOTH_DATA": str(tmp_path / "nowhere")})
    assert_one_line_error(proc, tmp_path, "sequence.tasks.", f".data.path: {tmp_path / 'nowhere'}/",
                          "does not exist; each task needs its images")
    proc = run_here(["experiment=continual/world_objects", "sequence.length=1",
                    "sequence.tasks=[{name: sks, data: {path: /nonexistent/dog}}]"], tmp_path)
    assert_one_line_error(proc, tmp_path, "sequence.tasks.sks.data.path: not a field of data; valid: name, kind")


# What both full-scale sequences override: sizes, the trainer (the CPU in fp32, or CUDA in bf16: the configs'
# fp16 AMP needs CUDA, and the 8-bit optimiser bitsandbytes), the tiny metric models; the rest is the
# full-scale config.
def sdxl_dry_run_args(experiment: str, model_dir: Path, clip_dir: Path, vit_dir: Path, trainer: str = "cpu"
                      ) -> list[str]:
    device = "cuda" if trainer == "gpu" else "cpu"
    precision = ["trainer.precision=32"] if trainer == "cpu" else []
    return [f"experiment={experiment}", f"model.pretrained={model_dir}", "model.vae=null", "model.variant=null",
            "model.dtype=float32", "model.resolution=32", f"trainer={trainer}", *precision, "trainer.max_steps=2",
            "optim.name=adamw", "protocol.adapter.rank=2", "protocol.adapter.alpha=2", "protocol.method.name=magmax",
            f"eval.scorer.clip={clip_dir}", f"eval.scorer.identity={vit_dir}", f"eval.scorer.device={device}",
            "eval.sampler.num_inference_steps=2", "eval.sampler.progress=false", "eval.images_per_prompt=1"]


@pytest.mark.parametrize("trainer", DEVICES)
def test_full_scale_objects_config_dry_run_on_a_scaled_down_sdxl(tmp_path, scaled_down_models, tiny_metric_models,
                                                                  trainer):
    """continual/sdxl_objects end to end on an SDXL-architecture model with tiny widths (two text encoders
    of different widths, text_time conditioning), toy subject folders and tiny CLIP / ViT metric models."""
    from lorabench.data import write_toy_dataset

    data = tmp_path / "dreambooth"
    for i, subject in enumerate(("colorful_sneaker", "fancy_boot", "backpack")):
        write_toy_dataset(data / subject, n=2, resolution=32, seed=i)
    args = sdxl_dry_run_args("continual/sdxl_objects", scaled_down_models["sdxl"], *tiny_metric_models, trainer)
    env = {"DREAMBOOTH_DATA": str(data)}
    # the 4th subject (the bear plushie) has no folder: caught before any training, nothing left behind
    assert_one_line_error(run_here([*args, "sequence.length=4"], tmp_path, env_extra=env), tmp_path,
                          "sequence.tasks.uwu.data.path", "bear_plushie does not exist")
    proc = run_here([*args, "sequence.length=3"], tmp_path, env_extra=env)
    assert proc.returncode == 0, crashed(proc)
    [res] = list((tmp_path / "outputs").glob("continual/sdxl_objects/magmax/order0-seed0/results.json"))
    out = json.loads(res.read_text())
    assert out["metrics"] == ["clip_i", "dino"] and len(out["tasks"]) == 3
    assert all(v is not None for v in out["matrices"]["dino"][0])
    # every task's update against the weights it trained on, on its own inputs
    per_task = out["update_size_per_task"]
    assert len(per_task) == 3 and all(t["size_output_median"] > 0 for t in per_task)
    assert out["update_size"]["magmax"]["adapters"] == 3


@pytest.mark.parametrize("trainer", DEVICES)
def test_full_scale_styles_config_dry_run_with_csd(tmp_path, scaled_down_models, tiny_metric_models, trainer):
    """continual/sdxl_styles end to end on the scaled-down SDXL, with CSD from a tiny checkpoint in the
    authors' format ($CSD_CHECKPOINT) scoring the style retrieval; a missing checkpoint is one line."""

    from lorabench.data.prepare import prepare_continual_styles

    prepare_continual_styles(write_unlearncanvas_tree(tmp_path / "unlearncanvas"), tmp_path / "styles")
    write_tiny_csd(tmp_path / "csd.pth")
    args = [*sdxl_dry_run_args("continual/sdxl_styles", scaled_down_models["sdxl"], *tiny_metric_models, trainer),
            "sequence.length=2", f"eval.style_scorer.device={'cuda' if trainer == 'gpu' else 'cpu'}"]
    env = {"CONTINUAL_STYLES_DATA": str(tmp_path / "styles"), "CSD_CHECKPOINT": str(tmp_path / "missing.pth")}
    assert_one_line_error(run_here(args, tmp_path, env_extra=env), tmp_path, "eval.style_scorer.csd",
                          "give the CSD checkpoint")
    proc = run_here(args, tmp_path, env_extra={**env, "CSD_CHECKPOINT": str(tmp_path / "csd.pth")})
    assert proc.returncode == 0, crashed(proc)
    [res] = list((tmp_path / "outputs").glob("continual/sdxl_styles/magmax/order0-seed0/results.json"))
    out = json.loads(res.read_text())
    assert len(out["tasks"]) == 2 and "csd" in out["metrics"]
    assert all(v is not None for v in out["matrices"]["csd"][0])


def test_csd_loads_the_authors_checkpoint_format(tmp_path):
    """CSD's checkpoint holds OpenAI-format visual weights (``backbone.*``, fused q/k/v ``in_proj``) and
    ``last_layer_style``; loaded into transformers' CLIPVisionModel it embeds as the original does."""
    import torch.nn.functional as F

    from lorabench.evaluation.hf import CLIP_MEAN, CLIP_STD, CSDEmbedder

    ref, sd = write_tiny_csd(tmp_path / "checkpoint.pth")
    csd = CSDEmbedder(str(tmp_path / "checkpoint.pth"))
    images = torch.rand(3, 3, 32, 32)
    pix = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(ref(pixel_values=pix).pooler_output @ sd["last_layer_style"], dim=-1)
    torch.testing.assert_close(csd.embed_images(images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((csd.embed_images(images) * csd.embed_images(images.clone())).sum(-1), torch.ones(3),
                               atol=1e-5, rtol=0)  # an image against itself: cosine 1
    with pytest.raises(ConfigError, match="eval.style_scorer.checkpoint: .* is not a file"):
        CSDEmbedder(str(tmp_path / "missing.pth"))


def test_cross_paper_rows_compose_and_orthA_takes_a_fresh_slot_per_task(tmp_path):
    from helpers import compose

    c = compose(["experiment=continual/world_objects", "adapter@protocol.adapter=trilora",
                 "protocol.method.name=merge_init"], tmp_path)
    assert c.protocol.adapter.name == "trilora"  # TriLoRA as the per-task adapter
    o = compose(["experiment=continual/world_objects", "adapter@protocol.adapter=ortho", "protocol.method.name=ortha"],
                tmp_path)
    method = build_method(dict(o.protocol.method))
    slots = [method.adapter_config(dict(o.protocol.adapter), t, 10) for t in range(10)]
    assert [s["slot"] for s in slots] == list(range(10)) and {s["row_mode"] for s in slots} == {"disjoint"}
    assert {s["num_slots"] for s in slots} == {10}
    with pytest.raises(ConfigError, match=r"protocol\.adapter\.name: .*use adapter@protocol\.adapter=ortho"):
        method.adapter_config({"name": "lora", "rank": 4}, 0, 10)


def _fake_run(method, order_seed, s, f, base=0.3):
    m = {"average_score": s, "forgetting_ref": f, "forgetting": f * 1.1, "backward_transfer": -f}
    return {"protocol": "continual", "kind": "objects", "method": method, "order_seed": order_seed, "seed": 0,
            "metrics": ["clip_i", "dino"], "final": {"clip_i": m, "dino": m},
            "base": {"clip_i": {"average_score": base}, "dino": {"average_score": base}},
            "sign_conflict": [None, 0.4, 0.5], "timings": {"total_s": 100.0}}


def test_tables_and_verdicts_rebuild_from_results_files(tmp_path):
    from lorabench.protocols.__main__ import main
    from lorabench.protocols.base import rebuild

    # (S, F) per method: naive forgets more than merge_init; magmax forgets least and scores lower;
    # ortho_init is no better than naive.
    recipe = {"naive": (0.5, 0.20), "merge_init": (0.6, 0.05), "ortho_init": (0.5, 0.22), "magmax": (0.55, 0.02)}
    for method, (s, f) in recipe.items():
        for k, order_seed in enumerate((0, 5, 10)):
            d = tmp_path / "runs" / method / f"order{order_seed}-seed0"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_fake_run(method, order_seed, s + 0.01 * k, f + 0.001 * k)))
    out = rebuild("continual", [tmp_path / "runs"], tmp_path / "tables")
    assert [v["verdict"] for v in out.files["verdicts.json"]] == ["reproduced"] * 3
    md = (tmp_path / "tables" / "table_objects.md").read_text()
    assert "| Merge & Initialization | 3 | 0.610 +- 0.008 |" in md and "Published" in md and "0.457 +- 0.011" in md
    assert (tmp_path / "tables" / "sign_conflicts.png").is_file()
    assert (tmp_path / "tables" / "table_objects.csv").is_file()
    # two runs of a method are too few for a verdict
    for d in (tmp_path / "runs" / "magmax").glob("order10-*"):
        (d / "results.json").unlink()
    out = rebuild("continual", [tmp_path / "runs"], tmp_path / "tables2")
    assert out.files["verdicts.json"][1]["verdict"].startswith("inconclusive (fewer than 3 runs of magmax")
    with pytest.raises(SystemExit) as exit_info:
        main(["rebuild", "continual", str(tmp_path / "nothing"), "--out", str(tmp_path / "t3")])
    assert exit_info.value.code == 2


def test_callback_logs_curves_heatmap_and_matrix_to_wandb_every_task(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from helpers import compose
    from lorabench.protocols.continual import run

    calls = {"metrics": [], "image": [], "table": []}
    real_metrics, real_table = WandbLogger.log_metrics, WandbLogger.log_table

    def spy_metrics(self, metrics, step=None):
        calls["metrics"].append((step, dict(metrics)))
        return real_metrics(self, metrics, step)

    def spy_image(self, key, images, step=None, **kw):
        calls["image"].append((key, step))

    def spy_table(self, key, columns=None, data=None, step=None, **kw):
        calls["table"].append((key, step, list(columns), len(data)))
        return real_table(self, key=key, columns=columns, data=data, step=step, **kw)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy_metrics)
    monkeypatch.setattr(WandbLogger, "log_image", spy_image)
    monkeypatch.setattr(WandbLogger, "log_table", spy_table)
    args = [a for a in SHORT if not a.startswith("sequence.length")] + ["sequence.length=2", "logger=wandb"]
    cfg = compose(args, tmp_path)
    res = run(cfg, tmp_path / "run")
    per_task = [(s, m) for s, m in calls["metrics"] if "continual/task" in m]
    assert [s for s, _ in per_task] == [0, 1]
    assert per_task[1][1]["continual/dino/average_score"] == pytest.approx(res["final"]["dino"]["average_score"])
    assert "continual/clip_i/forgetting_ref" in per_task[1][1] and "continual/dino/backward_transfer" in per_task[1][1]
    # the heatmap after every task, then the run's sample grid, final heatmap and update sizes
    assert calls["image"] == [("continual/score_matrix", 0), ("continual/score_matrix", 1),
                              ("continual/samples", None), ("continual/score_matrix_final", None),
                              ("continual/update_size", None)]
    assert ("continual/M_dino", 1, ["task", "after_1", "after_2"], 2) in calls["table"]
    csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()  # the CSV logger gets the same curves
    assert "continual/dino/average_score" in csv.splitlines()[0]
