"""Fine-tuning through the real configs, shrunk to a tiny model saved and loaded back from disk."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from helpers import compose, run_here, tiny_overrides
from lorabench.run import train

pytestmark = pytest.mark.integration  # end to end: out of the fast tier


@pytest.mark.parametrize("adapter", ["lora", "ortho", "trilora"])
def test_each_adapter_trains_and_leaves_base_bitwise_unchanged(adapter, tiny_model_dir, load_tiny, tmp_path):
    cfg = compose([f"adapter={adapter}", *tiny_overrides(tiny_model_dir, steps=20), "data.batch_size=4",
                   "optim.lr=3e-3", "exports=[diffusers,kohya]"], tmp_path)
    results, module = train(cfg, tmp_path, config_name=f"test_{adapter}")
    m = results["metrics"]
    assert m["steps"] == 20
    assert m["val_loss_after"] < m["val_loss_before"], m  # fixed-noise loss on the training images falls
    assert (tmp_path / "results.json").is_file()
    for f in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
        assert (tmp_path / f).is_file()
    # Base weights: bitwise equal to the model on disk once the adapter layers are taken out.
    module.adapters.remove()
    fresh = load_tiny()
    trained, original = module.unet.state_dict(), fresh.unet.state_dict()
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[k], original[k]) for k in original)
    te_trained, te_original = module.text_encoder.state_dict(), fresh.text_encoder.state_dict()
    assert all(torch.equal(te_trained[k], te_original[k]) for k in te_original)


def test_gradient_clipping_really_clips(tiny_model_dir, tmp_path):
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "trainer.gradient_clip_val=1e-4", "exports=[]",
                   "data.val_samples=0"], tmp_path)
    _, module = train(cfg, tmp_path)
    assert module.grad_norm_before_clip > 1e-4
    assert module.grad_norm_after_clip <= 1e-4 * (1 + 1e-4)


def test_prior_preservation_and_logging(tiny_model_dir, toy_images, tmp_path):
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=3), "data=dreambooth", f"data.path={toy_images}",
                   f"data.class_data_dir={toy_images}", "data.class_prompt=a shape", "data.batch_size=2",
                   "trainer.log_every_n_steps=1", "exports=[]", "data.val_samples=0"], tmp_path)
    results, _ = train(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("train/prior_loss") for r in rows) and any(r.get("train/loss") for r in rows)
    hparams = (tmp_path / "csv" / "hparams.yaml").read_text()
    assert "class_prompt: a shape" in hparams  # the resolved config is logged


def test_v_prediction_follows_scheduler(tiny_model_dir, tmp_path):
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "model.prediction_type=v_prediction", "exports=[]",
                   "data.val_samples=0"], tmp_path)
    results, module = train(cfg, tmp_path)
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    assert results["metrics"]["train_loss_last"] > 0


def test_adapter_only_checkpoint(tiny_model_dir, tmp_path):
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "trainer.enable_checkpointing=true", "exports=[]",
                   "data.val_samples=0"], tmp_path)
    _, module = train(cfg, tmp_path)
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(module.adapters.state_dict())
    assert ckpt["lorabench_adapter"]["name"] == "lora"


def test_tokens_only_checkpoint(tiny_model_dir, tmp_path):
    """Textual inversion alone (no adapter) with checkpointing on, as trainer=gpu has it: the checkpoint holds
    the new token rows and their config (the H200 run of 2026-12-04 crashed here on the missing adapter)."""
    from omegaconf import open_dict

    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "embeddings=textual_inversion",
                   "embeddings.token='<sks>'", "embeddings.bind=red", "trainer.enable_checkpointing=true",
                   "exports=[]", "data.val_samples=0"], tmp_path)
    with open_dict(cfg):
        cfg.adapter = None  # the tokens alone, as a protocol's textual-inversion cell trains them
    _, module = train(cfg, tmp_path)
    [ckpt_file] = list(tmp_path.rglob("*.ckpt"))
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    assert ckpt["lorabench_adapter"] is None and ckpt["lorabench_embeddings"]["token"] == "<sks>"
    rows = {id(p) for p in module.trainable_parameters("embeddings")}
    assert set(ckpt["state_dict"]) == {n for n, p in module.named_parameters() if id(p) in rows}


def test_sdxl_shaped_model_trains(tmp_path):
    """SDXL plumbing: two text encoders, pooled embeddings and time ids, through save/load."""
    from lorabench.models import build_tiny_components, load_components, save_components
    from lorabench.training import DiffusionFineTuner

    save_components(build_tiny_components(sdxl=True, with_vae=True), tmp_path / "sdxl")
    comps = load_components(str(tmp_path / "sdxl"), resolution=16)
    assert comps.is_sdxl and type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    module = DiffusionFineTuner(comps, {"name": "lora", "rank": 2, "text_encoder_targets": ["q_proj"]},
                                {"lr": 1e-3})
    assert any(k.startswith("text_encoder_2.") for k in module.adapters.layers)
    from lorabench.data import toy_datamodule

    dm = toy_datamodule(str(tmp_path / "data"), n=4, resolution=16, batch_size=2)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.adapters.trainable_parameters())


def test_val_loss_ignores_batching_and_padded_duplicates(load_tiny, toy_images):
    """DistributedSampler pads the eval set with duplicates; they must not bias the loss."""
    from torch.utils.data import DataLoader, Subset

    from lorabench.data import ImageFolderDataModule, collate
    from lorabench.training import DiffusionFineTuner

    module = DiffusionFineTuner(load_tiny(), {"name": "lora", "rank": 2})
    dm = ImageFolderDataModule(str(toy_images), resolution=16, val_samples=4).prepare()
    ds = dm._dataset(dm.items[:4], train=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    def val(loader):
        trainer.validate(module, dataloaders=loader, verbose=False)
        return module.val_history[-1]

    whole = val(DataLoader(ds, batch_size=4, collate_fn=collate))
    assert val(DataLoader(ds, batch_size=1, collate_fn=collate)) == pytest.approx(whole, rel=1e-6)
    padded = Subset(ds, [0, 1, 2, 3, 0, 1])  # what a 4-example set looks like padded for 3 ranks
    assert val(DataLoader(padded, batch_size=3, collate_fn=collate)) == pytest.approx(whole, rel=1e-6)


def test_full_training_mode_pretrains_the_world_model(tmp_path):
    """adapter=null trains every UNet (and text-encoder) weight and saves the model folder."""
    cfg = compose(["experiment=world_pretrain", "trainer.max_steps=3", "optim.warmup_steps=1", "data.n=64",
                   "data.val_samples=8", "data.num_workers=0", "trainer.enable_checkpointing=false",
                   "trainer.enable_progress_bar=false"], tmp_path)
    from lorabench.models import load_components
    from lorabench.world.build import build_world_model

    results, module = train(cfg, tmp_path, config_name="world_pretrain")
    assert results["adapter"] == "full" and module.adapters is None
    init = build_world_model()
    trained = load_components(str(tmp_path / "model"), resolution=16)
    changed = [k for k, v in trained.unet.state_dict().items() if not torch.equal(v, init.unet.state_dict()[k])]
    assert len(changed) > 0.9 * len(init.unet.state_dict())
    te_changed = [k for k, v in trained.text_encoder.state_dict().items()
                  if not torch.equal(v, init.text_encoder.state_dict()[k])]
    assert te_changed


def test_a_captured_step_needs_cuda_and_says_so():
    """CapturedStep (CUDA graphs) on a machine without CUDA: one clear error, before anything runs."""
    from lorabench.training.cuda_graph import CapturedStep

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_gpu.py::test_captured_step_trains_like_eager_steps runs it")
    with pytest.raises(RuntimeError, match="CapturedStep needs a CUDA device"):
        CapturedStep(lambda x: x.sum(), {"x": torch.zeros(2)}, graph=True)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_cuda_graph_option_trains_the_same_adapter(schedule, tiny_model_dir, tmp_path):
    """module.cuda_graph=true runs each step through a CapturedStep (eager on the CPU) and the optimiser
    and schedule by hand: bit for bit the adapter, losses, gradient norms and logged rates of a plain run
    (clipping active, a warm-up and cosine schedule in one case)."""
    out = {}
    for graph in (False, True):
        d = tmp_path / str(graph)
        cfg = compose([*tiny_overrides(tiny_model_dir, steps=6), "data.batch_size=4", "optim.lr=3e-3",
                       f"optim.lr_scheduler={schedule}", f"optim.warmup_steps={2 * (schedule != 'constant')}",
                       "trainer.gradient_clip_val=0.01",
                       "trainer.log_every_n_steps=1", "exports=[]", "data.val_samples=0",
                       f"module.cuda_graph={str(graph).lower()}"], d)
        results, module = train(cfg, d, config_name="graph")
        rows = list(csv.DictReader(open(d / "csv" / "metrics.csv")))
        out[graph] = (results, module, rows)
    (r0, m0, rows0), (r1, m1, rows1) = out[False], out[True]
    assert r1["metrics"]["steps"] == r0["metrics"]["steps"] == 6
    assert r1["metrics"]["train_loss_first"] == r0["metrics"]["train_loss_first"]
    assert r1["metrics"]["train_loss_last"] == r0["metrics"]["train_loss_last"]
    assert m1.grad_norm_before_clip == m0.grad_norm_before_clip > 0.01  # clipping was active
    for k, v in m0.adapters.state_dict().items():
        assert torch.equal(v, m1.adapters.state_dict()[k]), k
    logged = [[(r.get("train/lr"), r.get("train/grad_norm")) for r in rows if r.get("train/lr")]
              for rows in (rows0, rows1)]
    assert logged[0] == logged[1] and len(logged[0]) == 6
    assert m1.automatic_optimization is False
    assert m1.graph_stats == {"graphs": 0, "eager_shapes": 1, "replayed_steps": 0, "eager_steps": 6}


def test_cuda_graph_conflicts_are_one_line_errors(tmp_path):
    from helpers import assert_one_line_error
    from lorabench.errors import ConfigError
    from lorabench.training.module import check_cuda_graph

    base = ["experiment=quickstart", "trainer.max_steps=1", "module.cuda_graph=true"]
    for extra, want in ((["module.gradient_checkpointing=true"], "cannot run with module.gradient_checkpointing"),
                        (["+trainer.accumulate_grad_batches=2"], "accumulate_grad_batches must be 1")):
        assert_one_line_error(run_here([*base, *extra], tmp_path), tmp_path, "module.cuda_graph", want)
    # fp16 on a GPU (on the CPU, trainer.precision=16-mixed is refused first: test_cli.py)
    with pytest.raises(ConfigError, match="module.cuda_graph: cannot run under fp16 mixed precision"):
        check_cuda_graph({"cuda_graph": True}, {"accelerator": "gpu", "devices": 1, "precision": "16-mixed"})


def test_the_offered_lr_schedules_are_diffusers_own():
    """checks.LR_SCHEDULES is written out (the CLI checks it before importing diffusers): each must be a schedule
    diffusers' get_scheduler builds from an lr, a warm-up and a step count alone."""
    from diffusers.optimization import SchedulerType, get_scheduler

    from lorabench.checks import LR_SCHEDULES

    assert set(LR_SCHEDULES) < {s.value for s in SchedulerType}
    for name in LR_SCHEDULES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10)
        assert sched.get_last_lr()[0] == (1.0 if name == "constant" else 0.0), name
