"""The `lorabench` command as users run it: the main job, multirun, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from helpers import FAST, assert_one_line_error, crashed, run_cli, run_here

pytestmark = pytest.mark.integration  # end to end: out of the fast tier

# The single-concept table (experiment=world_concepts) shrunk: one concept, two adapters, 2 steps, 1 image per prompt.
MAIN_FAST = ["experiment=world_concepts", "protocol.concepts=[zwz]", "~protocol.adapters.ortho", "trainer.max_steps=2",
             "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2", "eval.concepts.n_references=2"]


def test_single_concept_experiment_prints_its_table(tmp_path):
    proc = run_here(MAIN_FAST, tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [results_file] = list((tmp_path / "outputs" / "world_concepts").glob("*/results.json"))
    results = json.loads(results_file.read_text())
    assert results["protocol"] == "single_concept" and results["methods"] == ["base", "lora", "trilora"]
    assert [(r["method"], r["concept"]) for r in results["rows"]] == [("base", "zwz"), ("lora", "zwz"),
                                                                     ("trilora", "zwz")]
    for method in ("| base |", "| lora |", "| trilora |", "identity sim. in context"):
        assert method in proc.stdout
    assert (results_file.parent / "samples.png").is_file() and (results_file.parent / "table.md").is_file()
    # every trained cell's update size, in its row, per method, as a plot and as the table's dW/W0 column
    assert all(r["size_weight_median"] > 0 for r in results["rows"][1:]) and "dW/W0" in proc.stdout
    assert set(results["update_size"]) == {"lora", "trilora"}
    assert (results_file.parent / "update_size.png").is_file()


def test_an_adapter_the_model_cannot_take_is_one_line_before_the_base_is_scored(tmp_path):
    """Targets no layer matches (or a rank above a layer's width) failed in the first cell as adapter.target_modules,
    after the base model was sampled and scored: now at the protocol's start, named where the config sets them."""
    assert_one_line_error(run_here([*MAIN_FAST, "protocol.adapters.trilora.target_modules=[to_qq]"], tmp_path),
                          tmp_path, "protocol.adapters.trilora.target_modules: no layer of unet matches ['to_qq']")


def test_a_dry_injection_leaves_the_model_and_the_random_generators_as_they_were():
    """check_injection injects and removes each adapter: the weights and the global generator stand as before
    (a LoRA's initialisation draws from it)."""
    import torch

    from lorabench.models import build_tiny_components
    from lorabench.protocols.cells import check_injection

    comps = build_tiny_components()
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    torch.manual_seed(3)
    state = torch.get_rng_state()
    check_injection(comps, [("protocol.adapters.a", {"name": "lora", "rank": 4}), ("protocol.adapters.b", None),
                            ("protocol.adapters.c", {"name": "trilora", "rank": 2})])
    assert torch.equal(torch.get_rng_state(), state)
    after = comps.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_main_job_unknown_concept_is_one_line(tmp_path):
    """Named as the user set it, before any cell trains (it read ``world.concept``, when a cell built its data)."""
    # through the installed command's own process, as users meet it (the others run in-process: run_here)
    assert_one_line_error(run_cli(["protocol.concepts=[nope,sks,twt]"], tmp_path), tmp_path,
                          "protocol.concepts: unknown value 'nope'", "sks")
    assert_one_line_error(run_here(["experiment=world_style", "protocol.styles=[vango,nope]"], tmp_path), tmp_path,
                          "protocol.styles: unknown value 'nope'; valid: dalio, escha")


def test_main_job_rejects_a_top_level_adapter(tmp_path):
    assert_one_line_error(run_here(["adapter=lora", *MAIN_FAST], tmp_path), tmp_path, "adapter:", "protocol.adapters")


def test_quickstart_writes_results(tmp_path):
    proc = run_here(FAST, tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [results_file] = list((tmp_path / "outputs").rglob("results.json"))
    results = json.loads(results_file.read_text())
    assert results["config_name"] == "quickstart" and results["seed"] == 0
    assert results["metrics"]["steps"] == 2 and results["timings"]["fit_s"] > 0
    assert {"adapter.safetensors", "pytorch_lora_weights.safetensors"} <= set(results["artifacts"])
    assert "val loss (fixed noise) before -> after" in proc.stdout


def test_a_callback_from_the_config_group_joins_the_trainer(tmp_path):
    """callbacks=lr_monitor: Lightning's LearningRateMonitor logs the learning rate at every step."""
    proc = run_here([*FAST, "callbacks=lr_monitor", "exports=[]", "trainer.log_every_n_steps=1"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [metrics] = list((tmp_path / "outputs").rglob("csv/metrics.csv"))
    header = metrics.read_text().splitlines()[0].split(",")
    assert any(col.startswith("lr-AdamW") for col in header), header


def documented_callback_line() -> list[str]:
    """docs/usage.md's "any Lightning callback from the command line" command, its continuation joined and split
    as a shell would (the one quoted argument unquoted)."""
    import shlex

    text = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    start = text.index("lorabench experiment=quickstart +callbacks.")
    line = text[start:text.index("# any Lightning callback from the command line", start)].replace("\\\n", " ")
    return shlex.split(line)[1:]


def test_the_documented_command_line_callback_joins_the_trainer(tmp_path):
    """The docs' example of a callback given on the command line runs as written (its first example,
    StochasticWeightAveraging, failed in on_fit_start: a float swa_epoch_start needs max_epochs). Timer with a
    zero budget then stops the run before its first step (it checks at fit start): the callback is in the trainer,
    not only in the config, and a run it stops still writes its results."""
    args = documented_callback_line()
    assert args[0] == "experiment=quickstart" and any(a.startswith("+callbacks.") for a in args), args
    as_written, zero = tmp_path / "as_written", tmp_path / "zero"
    as_written.mkdir(), zero.mkdir()
    proc = run_here([*args, *FAST, "exports=[]"], as_written)
    assert proc.returncode == 0, crashed(proc)
    [results] = [json.loads(p.read_text()) for p in as_written.rglob("results.json")]
    assert results["metrics"]["steps"] == 2
    budget = re.compile(r"^\+callbacks\.timer\.duration=.*")
    zero_budget = [budget.sub("+callbacks.timer.duration={seconds:0}", a) for a in args]
    assert zero_budget != args, args
    stopped = run_here([*zero_budget, *FAST, "exports=[]"], zero)
    assert stopped.returncode == 0, crashed(stopped)
    [results] = [json.loads(p.read_text()) for p in zero.rglob("results.json")]
    assert results["metrics"]["steps"] == 0


def test_multirun_one_results_per_job(tmp_path):
    proc = run_here(["--multirun", "adapter=lora,trilora", *FAST, "exports=[]"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    results = sorted((tmp_path / "outputs" / "multirun").rglob("results.json"))
    assert [json.loads(p.read_text())["adapter"] for p in results] == ["lora", "trilora"]


@pytest.mark.parametrize("override,fragments", [
    ("adapter=dora", ["adapter: unknown value 'dora'", "valid: custom_diffusion, lora, none, ortho, trilora"]),
    ("model=sd99", ["model: unknown value 'sd99'", "sd15", "sdxl"]),
    ("data=laion", ["data: unknown value 'laion'", "imagefolder"]),
])
def test_unknown_group_option(tmp_path, override, fragments):
    assert_one_line_error(run_here([override], tmp_path), tmp_path, *fragments)


@pytest.mark.parametrize("args,fragments", [
    (["adapter.name=dora"], ["adapter.name: unknown value 'dora'; valid: custom_diffusion, lora, ortho, trilora"]),
    (["adapter.rank=64"], ["adapter.rank: 64 exceeds min(in, out) = 32"]),
    (["adapter=ortho", "adapter.row_mode=disjoint", "adapter.slot=0", "adapter.num_slots=9"],
     ["adapter.num_slots: rank * num_slots = 4 * 9 = 36 exceeds input width 32"]),
    (["data=imagefolder", "data.path=/no/such/folder"], ["data.path: image folder '/no/such/folder' does not exist"]),
    # a class prompt without class images trained without prior preservation, without a word
    (["data=imagefolder", "data.path=.", "data.class_prompt=a photo of dog"],
     ["data.class_prompt: 'a photo of dog' with no class images: prior preservation needs data.class_data_dir="]),
    (["model=sd15", "model.pretrained=/no/such/model"],
     ["model.pretrained: '/no/such/model' is neither an existing folder nor a hub id"]),
    # numbers that make no sense, and options Lightning rejects: one line, before any work
    (["optim.lr=-1e-4"], ["optim.lr: must be a number > 0, got -0.0001"]),
    (["optim.warmup_steps=-3"], ["optim.warmup_steps: must be an integer >= 0"]),
    # each trained without a word (diffusers' constant schedule drops the warm-up; a warm-up as long as the run
    # never reached optim.lr), or failed inside the run (piecewise_constant wants step rules no config passes)
    (["optim.warmup_steps=3"], ["optim.warmup_steps: 3 with lr_scheduler constant, which has no warm-up",
                                "optim.lr_scheduler=constant_with_warmup"]),
    (["optim.lr_scheduler=linear", "optim.warmup_steps=2"],  # FAST's trainer.max_steps=2
     ["optim.warmup_steps: 2 warm-up steps in a run of 2 optimiser steps: the learning rate would never reach"]),
    (["optim.lr_scheduler=piecewise_constant"], ["optim.lr_scheduler: unknown value 'piecewise_constant'; valid: "
                                                 "constant, constant_with_warmup, cosine, cosine_with_restarts"]),
    (["trainer.max_epochs=-5"], ["trainer.max_epochs: `max_epochs` must be a non-negative integer or -1"]),
    (["+trainer.max_stepz=10"], ["trainer.max_stepz: not an option of lightning.pytorch.Trainer"]),
    (["trainer.precision=17"], ["trainer.precision: Precision 17 is invalid. Allowed precision values"]),
    # Lightning trained bf16-mixed instead, its warning hidden by the quiet console; results.json said 16-mixed
    (["trainer.precision=16-mixed"], ["trainer.precision: '16-mixed' on the CPU, where fp16 AMP does not run"]),
    (["trainer=gpu"], ["trainer.accelerator: 'gpu' but this machine has no CUDA device; use trainer=cpu"]),
    (["trainer=ddp"], ["trainer.accelerator: 'gpu' but this machine has no CUDA device"]),
    # named where the config sets them (they read "sampler.scheduler" before), and a switch given a word
    (["eval.validation.sampler.scheduler=foo"],
     ["eval.validation.sampler.scheduler: unknown value 'foo'; valid: ddim, ddpm, dpm, euler, euler_a, pipeline"]),
    (["data.center_crop=maybe"], ["data.center_crop: expected true or false, got 'maybe'"]),
    # the weight of the prior-preservation loss, with no class images: it changed nothing, without a word
    (["module.prior_loss_weight=0.5"], ["module.prior_loss_weight: 0.5 with no class images: it weighs the "
                                        "prior-preservation loss, which needs data.class_data_dir"]),
    (["+callbacks.lr={logging_interval:step}"], ["callbacks.lr: needs a _target_"]),
    # a callback refusing its options only when the fit starts (Lightning's MisconfigurationException, a
    # traceback before): one line naming it, the run folder removed
    (["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging", "+callbacks.swa.swa_lrs=1e-4"],
     ["callbacks.swa: SWA with `swa_epoch_start` as a float is not supported when `max_epochs=-1`"]),
    # new tokens: a word the tokenizer knows is not a new token; options are checked before any work
    (["embeddings=textual_inversion", "embeddings.token=a"],
     ["embeddings.token: 'a' is already in text_encoder's vocabulary"]),
    # the shell ate the quotes Hydra's grammar needs (a config comment showed this very command): one line, not
    # Hydra's three and a link
    (["embeddings=textual_inversion", "embeddings.token=<x>"],
     ["embeddings.token: 'embeddings.token=<x>' is not a valid override", "\"embeddings.token='<value>'\""]),
    # new tokens that no training prompt holds (the toy captions name colours and shapes) got no gradient: the run
    # ended with its validation loss unchanged
    (["embeddings=textual_inversion", "embeddings.token='<x>'"],
     ["embeddings.token: '<x>' is in no training prompt (e.g. 'a ", "the new tokens would train nothing",
      "embeddings.bind=<word>"]),
    (["embeddings=textual_inversion", "embeddings.token='<x>'", "embeddings.bind=sks"],
     ["embeddings.bind: '<x>', nor its bound word 'sks', is in no training prompt"]),
    # a word alone (a command that does not exist, a key without its value) was called an override to quote
    (["train"], ["train: neither a command of lorabench (sample, summarize, tiny-model, rebuild) nor an override"]),
    (["seed"], ["seed: neither a command of lorabench"]),
])
def test_bad_config_values(tmp_path, args, fragments):
    assert_one_line_error(run_here([*args, *FAST], tmp_path), tmp_path, *fragments)


def test_a_command_after_flags(tmp_path):
    """The sample job after --multirun read "sample: neither a command of lorabench (sample, ...) nor an override":
    it is the sample job (here with its own one line for a missing prompt); another command says it comes first."""
    assert_one_line_error(run_here(["--multirun", "sample", "model=tiny"], tmp_path), tmp_path,
                          "protocol.prompts: give at least one prompt")
    assert_one_line_error(run_here(["-m", "summarize", str(tmp_path)], tmp_path), tmp_path,
                          "summarize: a command comes first: lorabench summarize ..., without -m")
    proc = run_here(["--cfg", "job", "sample"], tmp_path)  # Hydra's flag with a value: the config printed
    assert proc.returncode == 0 and "_target_: lorabench.protocols.sample.run" in proc.stdout, crashed(proc)


@pytest.mark.parametrize("args,fragments", [
    # a protocol's sampler and its adapters' new tokens (a single run refuses eval=world and a protocol block)
    (["eval.sampler.num_inference_steps=0"], ["eval.sampler.num_inference_steps: must be an integer >= 1, got 0"]),
    (["+protocol.adapters.ti.embeddings={token: '<x>', num_vectors: 0}"],
     ["protocol.adapters.ti.embeddings.num_vectors: must be an integer >= 1"]),
])
def test_bad_protocol_values(tmp_path, args, fragments):
    assert_one_line_error(run_here(["experiment=world_concepts", *args], tmp_path), tmp_path, *fragments)


def test_empty_and_corrupt_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    line = assert_one_line_error(run_here(["data=imagefolder", f"data.path={empty}", "data.instance_prompt=x",
                                          *FAST], work), work, "holds no images")
    assert str(empty) in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (bad / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "x"}\n')
    assert_one_line_error(run_here(["data=imagefolder", f"data.path={bad}", *FAST], work), work,
                          "data.path: image", "0.png", "is not a readable image")


def test_folders_the_job_cannot_write_in_are_one_line_before_any_run_folder(tmp_path, monkeypatch):
    """Where Hydra makes the run folder (``paths.output_root``, ``$LORABENCH_OUTPUTS``, ``hydra.run.dir``) or the
    protocol keeps its cells (``protocol.cache_dir``) cannot be written: Hydra's traceback naming no field, or the
    protocol's after its run folder was made and left behind. One line naming the field now, and nothing made."""
    import tempfile

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run_here([f"protocol.cache_dir={a_file / 'cells'}"], work), work,
                          f"protocol.cache_dir: '{a_file}' is a file, not a folder")
    assert_one_line_error(run_here([f"hydra.run.dir={a_file / 'run'}", *FAST], work), work, "hydra.run.dir: ")
    assert_one_line_error(run_here(FAST, work, {"LORABENCH_OUTPUTS": str(a_file)}), work,
                          f"paths.output_root: '{a_file}' is a file", "$LORABENCH_OUTPUTS sets it")

    def refused(dir=None, prefix=None):  # a read-only or foreign folder: root, as CI runs, may write anywhere
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    line = assert_one_line_error(run_here([f"paths.output_root={tmp_path / 'ro' / 'out'}", *FAST], work), work,
                                 f"paths.output_root: cannot make '{tmp_path / 'ro' / 'out'}': cannot write in "
                                 f"'{tmp_path}' (Permission denied)")
    assert "give a folder this user can write in" in line
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "work"]  # no folder made, no scratch file


def test_the_command_tiny_model_prints_trains_on_its_model(tmp_path, capsys):
    """It printed ``lorabench model=sd15 ...``, the main job, a mini-world protocol that cannot train on another
    model (refused now; before, the world's evaluators said "built for another world")."""
    from lorabench.models.tiny import main as tiny_main

    tiny_main([str(tmp_path / "model")])
    said = capsys.readouterr()
    assert "Writing model shards" not in said.err  # transformers' bar, for a model of a few kilobytes
    shown = said.out.strip().split("train on it with: ", 1)[1]
    assert shown.startswith("lorabench experiment=quickstart ")
    proc = run_here([*shown.split()[1:], "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_tiny_model_into_a_folder_it_cannot_make_is_one_line(tmp_path, capsys):
    """``lorabench tiny-model DIR`` where DIR cannot be made: a FileNotFoundError traceback from the save, before."""
    from lorabench.models.tiny import main as tiny_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as stop:
        tiny_main([str(a_file / "model")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"lorabench tiny-model: error: folder: '{a_file}' is a file, not a folder: give a folder to "
                       "write in")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_adapter_file_that_does_not_fit(tmp_path):
    from lorabench.adapters import inject_adapters, save_adapter
    from lorabench.models import build_tiny_components

    other = build_tiny_components(cross_attention_dim=16, text_hidden_size=16, block_out_channels=(16, 32))
    path = save_adapter(inject_adapters(other, {"name": "lora", "rank": 4}), tmp_path / "other.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    line = assert_one_line_error(run_here([f"init_adapter={path}", *FAST], work), work, "init_adapter",
                                 "other.safetensors", "has shape", "needs")
    assert "(4, 16)" in line and "(4, 32)" in line


def test_init_adapter_loads_text_encoder_layers_and_takes_a_run_folder(tmp_path):
    """A file with text-encoder layers names them with the published ``text_model`` level, which transformers 5's
    CLIPTextModel lacks: ``init_adapter`` said "no matching layer" for every such file (it copied the file's keys
    as they were). A run folder stands for its adapter.safetensors."""
    import torch

    from lorabench.adapters import inject_adapters, load_init_adapter, save_adapter
    from lorabench.checks import adapter_file
    from lorabench.models import build_tiny_components

    config = {"name": "lora", "rank": 4, "text_encoder_targets": ["q_proj", "v_proj"]}
    trained = inject_adapters(build_tiny_components(), config)
    with torch.no_grad():
        for t in trained.parameters():
            t.normal_()
    assert any(k.startswith("text_encoder.") for k in trained.state_dict())
    save_adapter(trained, tmp_path / "adapter.safetensors")
    fresh = inject_adapters(build_tiny_components(), config)
    load_init_adapter(fresh, adapter_file(tmp_path, "init_adapter"))
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize("make, fragments", [
    # each once went past the model's load: a folder or a wrong file said "does not exist" or "not a readable
    # safetensors file" without naming init_adapter, a foreign layout and another adapter type "no matching layer"
    ("folder", ["init_adapter: ", "is a folder without adapter.safetensors or pytorch_lora_weights.safetensors: "
                "give an adapter file"]),
    ("text", ["init_adapter: ", "is not a safetensors file (ValueError reading its header)"]),
    ("diffusers", ["init_adapter: ", "is not a lorabench adapter file (a diffusers or kohya export?)"]),
    ("trilora", ["init_adapter: ", "holds a trilora adapter of rank 4, this run trains lora of rank 4: set "
                 "adapter=trilora adapter.rank=4"]),
])
def test_init_adapter_that_cannot_start_this_run_is_one_line(tmp_path, make, fragments):
    from lorabench.adapters import export_diffusers, inject_adapters, save_adapter
    from lorabench.models import build_tiny_components

    path = tmp_path / "given"
    if make == "folder":
        path.mkdir()
    elif make == "text":
        path.write_text("a: 1\n")
    else:
        name = "lora" if make == "diffusers" else make
        adapters = inject_adapters(build_tiny_components(), {"name": name, "rank": 4})
        (export_diffusers if make == "diffusers" else save_adapter)(adapters, path)
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run_here([f"init_adapter={path}", *FAST], work), work, *fragments)


@pytest.mark.parametrize("arg, fragment", [
    ("module.val_timesteps=0", "module.val_timesteps: must be an integer >= 1, got 0"),  # an IndexError before
    ("exports=bogus", "exports: unknown value 'bogus'; valid: "),  # "unknown value 'b'": the name's letters
    ("module.prior_loss_weight=-1", "module.prior_loss_weight: must be a number >= 0, got -1"),  # it trained
    # no step and no epoch limit: an OverflowError from the schedule after the run folder was made
    ("trainer.max_steps=-1", "trainer.max_steps: -1 (no step limit) with max_epochs=-1 (no epoch limit) trains"),
    ("trainer.devices=0", "trainer.devices: `Trainer(devices=0)`"),  # was named trainer.accelerator
    # torch clipped to a negative norm by flipping every gradient: the run climbed its loss without a word
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val: must be null or 0 (no clipping) or a number > 0"),
    # a scale of 0: the adapter added nothing and its gradients were 0, a run that trained nothing
    ("adapter.alpha=0", "adapter.alpha: must be null (alpha = rank: scale 1) or a number > 0, got 0"),
    ("model.resolution=0", "model.resolution: must be an integer >= 8, got 0"),  # PIL's AttributeError, in data
    ("data.n=0", "data.n: must be an integer >= 1, got 0"),  # an empty metadata.jsonl, named as data.path
    # a LoRA's Custom Diffusion file held its to_k/to_v updates and dropped the rest, after training
    ("exports=[custom_diffusion]", "exports: a Custom Diffusion file holds the UNet's to_k and to_v weights only"),
    ("adapter.target_modules=[]", "adapter.target_modules: empty; give the UNet layers to adapt, or null"),  # default
    ("+adapter.rank_pattern=5", "adapter.rank_pattern: must map full layer names to ranks"),  # a TypeError traceback
    ("+adapter.rank_pattern={to_q:2}", "names no targeted layer: ['to_q']; its keys are full layer names, e.g. 'unet."),
    # a rate for weights the run does not train: applied to nothing, without a word
    ("optim.text_encoder_lr=1e-5", "optim.text_encoder_lr: set, but this run trains no text-encoder weights; adapt"),
    ("optim.embedding_lr=1e-3", "optim.embedding_lr: set, but this run learns no new tokens"),
    # with an adapter of the UNet alone it was ignored: the text encoder stayed frozen
    ("module.train_text_encoder=true", "module.train_text_encoder: trains the text encoder's weights in full "
                                       "training only (adapter=null, no embeddings); with an adapter, adapt"),
])
def test_a_run_option_out_of_range_is_one_line(tmp_path, arg, fragment):
    assert_one_line_error(run_here([*FAST, arg], tmp_path), tmp_path, fragment)


def test_a_text_encoder_rate_trains_the_text_encoder_layers_at_it(tmp_path):
    """optim.text_encoder_lr with text-encoder targets: those layers in their own optimiser group at that rate
    (the check that refuses the rate for a UNet-only adapter lets it through)."""
    from helpers import compose
    from lorabench.run import train

    cfg = compose([*FAST[:2], "adapter.text_encoder_targets=[q_proj]", "optim.text_encoder_lr=1e-5", "exports=[]"],
                  tmp_path)
    _, module = train(cfg, tmp_path)
    groups = module.optimizers().optimizer.param_groups
    assert [g["lr"] for g in groups] == [cfg.optim.lr, 1e-5]
    te = {id(p) for p in module.adapters.trainable_parameters("text_encoder")}
    assert te and {id(p) for p in groups[1]["params"]} == te
    assert not te & {id(p) for p in groups[0]["params"]}


def test_a_warm_up_longer_than_a_run_of_epochs_is_one_line(tmp_path):
    """A run of epochs knows its steps only when the fit starts (from the data): checked there, the run folder
    removed; the warm-up ran to the end of training without a word."""
    args = [*FAST, "trainer.max_steps=-1", "trainer.max_epochs=1", "optim.lr_scheduler=cosine",
            "optim.warmup_steps=500"]
    assert_one_line_error(run_here(args, tmp_path), tmp_path, "optim.warmup_steps: 500 warm-up steps in a run of ")


def test_the_schedule_spans_the_steps_the_run_takes(tmp_path):
    """max_steps=100 with max_epochs=1 (4 steps of the toy data): the cosine schedule spanned 100 steps, so the rate
    barely fell in a run of 4; now it spans the 4 steps Lightning takes (also the warm-up's count)."""
    import csv

    from helpers import compose
    from lorabench.run import train

    cfg = compose([*FAST[:1], "trainer.max_steps=100", "trainer.max_epochs=1", "data.batch_size=2",
                   "optim.lr_scheduler=cosine", "optim.lr=1e-3", "trainer.log_every_n_steps=1", "exports=[]",
                   "data.val_samples=0"], tmp_path)
    results, _ = train(cfg, tmp_path)
    steps = results["metrics"]["steps"]
    assert steps == 4
    lrs = [float(r["train/lr"]) for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("train/lr")]
    expected = [0.5e-3 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-6), lrs


def test_a_variant_vae_or_unet_the_model_cannot_load_is_one_line_naming_its_field(tmp_path, tiny_model_dir):
    """It named model.pretrained, whose folder holds the weights, only not that variant's files of them."""
    args = [*FAST, "model=sd15", f"model.pretrained={tiny_model_dir}", "model.resolution=16", "model.variant=fp16"]
    assert_one_line_error(run_here(args, tmp_path), tmp_path, "model.variant: 'fp16': ", "set model.variant=null")
    # a VAE that is not one was said to be model.pretrained's; a missing folder read "couldn't connect to the hub"
    args = args[:-1]
    assert_one_line_error(run_here([*args, f"model.vae={tmp_path}"], tmp_path), tmp_path,
                          f"model.vae: folder '{tmp_path}' has no config.json; give a diffusers AutoencoderKL folder")
    assert_one_line_error(run_here([*args, f"model.unet={tmp_path / 'nope'}"], tmp_path), tmp_path,
                          f"model.unet: '{tmp_path / 'nope'}' does not exist; give a diffusers UNet2DConditionModel "
                          "folder", "protocol.save_as=unet")


def test_a_callback_monitoring_a_metric_no_step_logs_is_one_line(tmp_path):
    """EarlyStopping on val/loss (lorabench validates before and after fitting only) raised its RuntimeError as a
    traceback at the first epoch's end and left the run folder."""
    args = [*FAST, "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
            "+callbacks.stop.monitor=val/loss"]
    assert_one_line_error(run_here(args, tmp_path), tmp_path, "callbacks.stop: Early stopping conditioned on metric "
                          "`val/loss` which is not available", "`train/loss`")


def test_exports_takes_one_name_alone():
    from lorabench.training import SaveArtifacts

    assert SaveArtifacts("run", exports="kohya").exports == ["kohya"]
    assert SaveArtifacts("run", exports=["kohya", "diffusers"]).exports == ["kohya", "diffusers"]


def test_full_error_shows_traceback(tmp_path):
    proc = run_cli(["adapter.rank=64", *FAST], tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


MAIN_TABLE2_FAST = ["protocol.concepts=[sks,twt]", "protocol.group_size=2", "trainer.max_steps=2",
                    "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2", "eval.concepts.n_references=2",
                    "protocol.capture.images_per_prompt=1", "protocol.capture.num_inference_steps=2"]


def test_main_job_is_the_compact_table2_and_its_console_is_short(tmp_path):
    """`lorabench` with no arguments: LoRA FedAvg, OrthA and closed-form fusion, single -> merged. Two concepts
    and two adapter types: whatever a cell prints once per cell would show up four times. The console is
    the progress bar, one line per finished cell, and the table (stdout)."""
    proc = run_cli(MAIN_TABLE2_FAST, tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [results_file] = list((tmp_path / "outputs" / "orthogonal_adaptation_compact").glob("*/results.json"))
    results = json.loads(results_file.read_text())
    assert results["protocol"] == "modular"
    assert set(results["methods"]) == {"dblora_fedavg", "ortha_disjoint", "lora_fusion_closed_form"}
    for label in ("| DB-LoRA (FedAvg) |", "| OrthA, disjoint slots (sum) |", "| LoRA gradient fusion (closed form) |",
                  "single -> merged", "Published"):
        assert label in proc.stdout
    # tqdm redraws its bar with carriage returns; a line is what is left after the last one.
    lines = [ln.rsplit("\r", 1)[-1] for ln in (proc.stdout + proc.stderr).split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    table = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    cells = [ln for ln in lines if " seed 0: " in ln and "align." in ln]
    bars = ("modular:", "training in 2 processes:")  # the protocol's bar, and the parallel training's
    other = [ln for ln in lines if ln not in table and ln not in cells and not ln.startswith(bars)]
    assert len(table) <= 40 and len(other) <= 3, "\n".join(other)
    assert not any("Loading weights" in ln for ln in lines)
    warnings = [ln for ln in lines if "Warning" in ln or "warn" in ln.lower()]
    assert len(warnings) == len(set(warnings)), "\n".join(warnings)
    for fragment in ("eval mode", "val_dataloader", "logging interval", "LeafSpec"):
        assert not any(fragment in ln for ln in lines), fragment
    # one line per cell: 4 trained (2 concepts x 2 adapter types) + 6 merged (3 methods x 2 concepts)
    assert sum("single identity align." in ln for ln in cells) == 4
    assert sum("->" in ln for ln in cells) == 6


def test_verbose_flag_is_accepted_and_lightning_log_lines_appear_once(tmp_path):
    proc = run_cli(["-v", *FAST], tmp_path)  # -v: the libraries' own lines, each once
    assert proc.returncode == 0, crashed(proc)
    out = proc.stdout + proc.stderr
    assert out.count("`Trainer.fit` stopped") == 1, out[-3000:]
    assert "GPU available" in out  # the lines the quiet console hides (test_first_day.py's quickstart test)


@pytest.mark.parametrize("paper, args", [
    ("single_concept", ["experiment=world_concepts", "protocol.concepts=[zwz,sks]", "~protocol.adapters.ortho",
                        "trainer.max_steps=2", "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2",
                        "eval.concepts.n_references=2"]),
    ("single_style", ["experiment=world_style", "protocol.styles=[vango,monex]", "protocol.seeds=[0]",
                      "trainer.max_steps=2", "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2"]),
])
def test_single_item_protocols_sample_in_batches_as_each_alone(tmp_path, paper, args):
    """protocol.eval_batch=4 in the single-concept and single-style tables: the base model's settings and every
    cell's (LoRA, TriLoRA) sampled four a pass, and the cells' update-size captures in passes too, give the rows
    of eval_batch=1 to float rounding, in order (their size_* fields included)."""
    import importlib

    from helpers import compose

    run = importlib.import_module(f"lorabench.protocols.{paper}").run
    alone = run(compose(args, tmp_path / "a"), tmp_path / "a")
    together = run(compose([*args, "protocol.eval_batch=4"], tmp_path / "b"), tmp_path / "b")
    assert [(r["method"], r.get("concept", r.get("style"))) for r in together["rows"]] == \
        [(r["method"], r.get("concept", r.get("style"))) for r in alone["rows"]]
    for a, b in zip(alone["rows"], together["rows"]):
        for k, v in a.items():
            if isinstance(v, float) and not k.endswith("_s") and k != "s_per_step":
                assert b[k] == pytest.approx(v, abs=1e-5), (a["method"], k)
    n = len(alone["rows"])
    assert alone["timings"]["alone"] == n and together["timings"]["alone"] == 0
    assert together["timings"]["passes"] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    cells = sum(r["method"] != "base" for r in alone["rows"])
    assert alone["timings"]["capture"] == {**alone["timings"]["capture"], "alone": cells, "passes": []}
    captured = together["timings"]["capture"]
    assert captured["alone"] == 0 and sum(captured["passes"]) == cells and max(captured["passes"]) > 1
    assert all("size_weight_median" in r for r in together["rows"] if r["method"] != "base")
    # the table's gist a sweep's summary shows per job (lorabench.sweeps): each method's mean, metric by metric
    metrics = {"single_concept": [("identity_alignment", "identity align."),
                                  ("context_text_alignment", "CLIP-T in context")],
               "single_style": [("style_top1", "style top-1")]}[paper]
    assert alone["headline"] == [[f"{label} {m}", alone["summary"][m][k]["mean"]] for k, label in metrics
                                 for m in alone["methods"]]


def test_help_says_what_to_run_under_the_commands_name(tmp_path):
    """`lorabench --help` read "cli is powered by Hydra." over the groups: now the command's name, what to run
    first, the groups (every experiment) and how bad input reads."""
    proc = run_here(["--help"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert proc.stdout.startswith("lorabench: train, merge and continually stack adapters"), proc.stdout[:300]
    assert "lorabench experiment=quickstart" in proc.stdout and "powered by Hydra" not in proc.stdout
    assert "experiment/trilora: gac, pokemon, regime, world" in proc.stdout
    assert "Bad input is one line naming the key" in proc.stdout
    assert not list(tmp_path.iterdir())  # no run folder
