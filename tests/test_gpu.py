"""lorabench on a GPU: every world experiment end to end with trainer=gpu (bf16 mixed precision), a resumed
continual sequence, the merge job, the compiled UNet against eager mode, bf16 on CUDA against fp32 on the
CPU, and a training step captured as a CUDA graph against eager steps. Run them with ``pytest -m gpu`` on a
CUDA machine (bench/gpu_rows.sh runs them with the GPU benchmarks); elsewhere they are collected and skipped
with that reason. The full-scale dry runs on CUDA are the ``gpu`` cases of the dry-run tests in
test_orthogonal_adaptation.py, test_continual.py and test_trilora_protocol.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import get_method

from helpers import compose

pytestmark = pytest.mark.gpu

EVAL_SMALL = ["eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2"]
OA_SMALL = ["protocol.concepts=[sks,twt]", "protocol.group_size=2", "protocol.seeds=[0]", *EVAL_SMALL,
            "eval.concepts.n_references=2", "protocol.capture.images_per_prompt=1",
            "protocol.capture.num_inference_steps=2", "trainer.max_steps=3"]
CONTINUAL_SMALL = ["sequence.length=2", "trainer.max_steps=3", *EVAL_SMALL, "eval.concepts.n_references=2"]

# Every world experiment, a few steps each (the protocol's logic in full: training, sampling, scoring,
# merging, tables), and every continual method.
WORLD = {
    "quickstart": ["experiment=quickstart", "trainer.max_steps=3"],
    "world_pretrain": ["experiment=world_pretrain", "trainer.max_steps=3", "optim.warmup_steps=1", "data.n=64",
                       "data.val_samples=8", "data.num_workers=0", "trainer.enable_checkpointing=false"],
    "world_concepts": ["experiment=world_concepts", "protocol.concepts=[zwz]", "trainer.max_steps=3", *EVAL_SMALL,
                       "eval.concepts.n_references=2"],
    "world_personalize": ["experiment=world_personalize", "protocol.concepts=[sks]", "protocol.seeds=[0]",
                          "trainer.max_steps=3", *EVAL_SMALL, "eval.concepts.n_references=2"],
    "world_style": ["experiment=world_style", "protocol.styles=[vango]", "protocol.seeds=[0]", "trainer.max_steps=3",
                    *EVAL_SMALL],
    "orthogonal_adaptation/world": ["experiment=orthogonal_adaptation/world", *OA_SMALL,
                                    "protocol.train_workers=1"],
    # every adapter type of the world Table 2 (LoRA, OrthA, P+ tokens, ED-LoRA, Custom Diffusion with its
    # modifier token) trained in batched passes on CUDA: the stacked layers' batched arithmetic and the
    # members' tokens side by side
    "orthogonal_adaptation/world:batched": ["experiment=orthogonal_adaptation/world", *OA_SMALL,
                                            "protocol.train_workers=1", "protocol.batch_cells=auto"],
    # the same with every step replayed as a CUDA graph (module.cuda_graph): tokens and text-encoder
    # adapters train inside the captured step
    "orthogonal_adaptation/world:batched+graph": ["experiment=orthogonal_adaptation/world", *OA_SMALL,
                                                  "protocol.train_workers=1", "protocol.batch_cells=auto",
                                                  "module.cuda_graph=true"],
    # two worker processes training batched passes on one GPU at once, each pass sized to its share of the
    # free memory (gpu_capacity's processes), the cells claimed in the cache as they train
    "orthogonal_adaptation/world:batched+workers": ["experiment=orthogonal_adaptation/world", *OA_SMALL,
                                                    "protocol.train_workers=2", "protocol.batch_cells=auto"],
    # textual inversion and P+ tokens alone, beside a LoRA, one cell at a time
    "world_textual_inversion": ["experiment=world_textual_inversion", "protocol.concepts=[sks]",
                                "trainer.max_steps=3", *EVAL_SMALL, "eval.concepts.n_references=2"],
    "orthogonal_adaptation/world_compact": ["experiment=orthogonal_adaptation/world_compact", *OA_SMALL,
                                            "protocol.train_workers=2"],
    "trilora/world": ["experiment=trilora/world", "data.n=12", "data.max_train_samples=6", "data.batch_size=3",
                      "protocol.seeds=[0]", "protocol.table_epoch=1", "protocol.checkpoints=[1,2]",
                      "~protocol.adapters.trilora_svd_u", "eval.sampler.num_inference_steps=2",
                      "protocol.grid_images=4"],
    **{f"continual/world_objects:{m}": ["experiment=continual/world_objects", *CONTINUAL_SMALL,
                                        f"protocol.method.name={m}"]
       for m in ("naive", "merge_init", "ortho_init", "magmax", "merge:ties")},
    "continual/world_objects:ortha": ["experiment=continual/world_objects", *CONTINUAL_SMALL,
                                      "adapter@protocol.adapter=ortho", "protocol.method.name=ortha"],
    "continual/world_styles:naive": ["experiment=continual/world_styles", "sequence.length=2",
                                     "trainer.max_steps=3", *EVAL_SMALL],
}


def run_job(overrides: list[str], out: Path) -> dict:
    """What the CLI does for one job, in this process: compose, preflight, then the protocol or the train task."""
    from lorabench.cli import preflight
    from lorabench.run import train

    cfg = compose([*overrides, "trainer=gpu", "trainer.enable_progress_bar=false"], out)
    preflight(cfg)
    if cfg.get("protocol"):
        return get_method(cfg.protocol._target_)(cfg, out / "run")
    return train(cfg, out / "run", config_name="gpu")[0]


@pytest.mark.parametrize("name", list(WORLD))
def test_world_experiment_runs_end_to_end_on_cuda(name, tmp_path):
    res = run_job(WORLD[name], tmp_path)
    assert (tmp_path / "run" / "results.json").is_file()
    if res.get("protocol") == "continual":
        assert len(res["tasks"]) == 2 and all(row[-1] is not None for row in res["matrices"][res["metrics"][0]])
    elif "metrics" in res:  # a plain training run: it trained on the GPU
        assert res["metrics"]["steps"] == 3 and res["device"].startswith("cuda")


def test_a_continual_sequence_resumes_on_cuda(tmp_path):
    """A finished task's state is kept; with the second task's state gone, the same job resumes there."""
    args = ["experiment=continual/world_objects", *CONTINUAL_SMALL, "protocol.method.name=ortho_init"]
    first = run_job(args, tmp_path)
    state = tmp_path / "run" / "state"
    shutil.rmtree(state / "task_001")
    again = run_job(args, tmp_path)
    assert again["tasks"] == first["tasks"]
    assert again["matrices"]["clip_i"][0][0] == first["matrices"]["clip_i"][0][0]  # task 1's row, from the state
    assert all(row[-1] is not None for row in again["matrices"]["clip_i"])


def test_merge_job_fuses_gradients_on_cuda(tmp_path):
    """Two world concepts trained on the GPU, merged by gradient fusion with statistics captured on the GPU."""
    files = []
    for concept in ("sks", "twt"):
        out = tmp_path / concept
        run_job(["experiment=quickstart", "model=world", "data=world", f"data.concept={concept}", "data.n=4",
                 "data.val_samples=0", "trainer.max_steps=3", "exports=[]"], out)
        files.append(out / "run" / "adapter.safetensors")
    res = run_job(["experiment=merge_adapters", "model=world", "merge=gradient_fusion",
                   f"protocol.inputs=[{files[0]},{files[1]}]", "protocol.prompts=['a sks circle','a twt circle']",
                   "protocol.capture.num_inference_steps=2", "protocol.capture.images_per_prompt=1"], tmp_path / "m")
    assert Path(res["output"]).is_file() and res["layers"] > 0


def _train_world_lora(device: str, out: Path, steps: int = 30):
    from lorabench.run import train

    trainer = ["trainer=gpu"] if device == "cuda" else ["trainer=cpu"]
    cfg = compose(["experiment=quickstart", "model=world", "data=world", "data.concept=sks", "data.n=8",
                   "data.batch_size=8", "data.val_samples=0", "data.caption_mode=context", "optim.lr=3e-3",
                   f"trainer.max_steps={steps}", "exports=[]", *trainer, "trainer.enable_progress_bar=false"], out)
    _, module = train(cfg, out, config_name=device)
    return module


def test_bf16_on_cuda_and_fp32_on_the_cpu_train_the_same_adapter(tmp_path):
    """The same 30 steps (same data order, noise and timesteps: the noise stream is drawn on the CPU) in
    bf16 mixed precision on CUDA and in fp32 on the CPU. Tolerances: the adapter's update within 10%
    (relative Frobenius norm, summed over layers), and the identity similarity of 8 samples of the concept
    prompt within 0.05 (cosine). On the CPU, bf16 autocast against fp32 (same noise) differed by 2.9% in the
    update after 30 steps and by 0.008 in identity similarity (measured when the tolerances were set)."""
    from lorabench.evaluation.scores import score_samples
    from lorabench.protocols.scoring import concept_seeds
    from lorabench.sampling import sample_prompts
    from lorabench.world.assets import concept_scorer
    from lorabench.world.tasks import WorldConceptEval

    modules = {d: _train_world_lora(d, tmp_path / d) for d in ("cpu", "cuda")}
    deltas = {d: {k: v.detach().cpu() for k, v in m.adapters.delta_weights().items()} for d, m in modules.items()}
    num = sum(float((deltas["cuda"][k] - deltas["cpu"][k]).norm() ** 2) for k in deltas["cpu"]) ** 0.5
    den = sum(float(v.norm() ** 2) for v in deltas["cpu"].values()) ** 0.5
    assert num / den < 0.10, f"update differs by {num / den:.3f}"
    eval_set, scorer = WorldConceptEval()("sks"), concept_scorer()
    scores = {}
    for d, m in modules.items():
        imgs = sample_prompts(m.components, {"num_inference_steps": 10, "progress": False}, eval_set.prompts[:1],
                              concept_seeds(0, 8), torch.device(d))
        scores[d] = score_samples(scorer, imgs, type(eval_set)(eval_set.prompts[:1], eval_set.texts[:1],
                                                               eval_set.references), 8)
    assert abs(scores["cuda"]["identity_similarity"] - scores["cpu"]["identity_similarity"]) < 0.05, scores


def test_compiled_unet_trains_like_eager_mode(tmp_path):
    """module.compile=true: the same first losses as eager mode to bf16 tolerance."""
    from lorabench.run import train

    losses = {}
    for compiled in (False, True):
        cfg = compose(["experiment=quickstart", "model=world", "data=world", "data.concept=sks", "data.n=8",
                       "data.val_samples=0", "trainer.max_steps=4", "exports=[]", "trainer=gpu",
                       f"module.compile={str(compiled).lower()}", "trainer.enable_progress_bar=false"],
                      tmp_path / str(compiled))
        res, _ = train(cfg, tmp_path / str(compiled), config_name="compile")
        losses[compiled] = res["metrics"]["train_loss_first"]
    assert losses[True] == pytest.approx(losses[False], rel=0.02), losses


def _lora_unets(n: int, dev: torch.device):
    """``n`` identical small UNets (float32) with LoRA on their attention projections, their adapters, and
    five batches of inputs for them."""
    from diffusers import UNet2DConditionModel

    from lorabench.adapters import Adapters

    unets, adapters = [], []
    for _ in range(n):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                                    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).requires_grad_(False).to(dev)
        adapters.append(Adapters.inject({"unet": unet}, {"name": "lora", "rank": 4,
                                                         "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}))
        unets.append(unet)
    cfg = unets[0].config
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dev),
                "t": torch.randint(0, 1000, (4,), generator=g).to(dev),
                "e": torch.randn(4, 8, cfg.cross_attention_dim, generator=g).to(dev),
                "target": torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dev)}
               for _ in range(5)]
    return unets, adapters, batches


def test_captured_step_trains_like_eager_steps():
    """CapturedStep (one CUDA graph per step: forward, backward, clipping, fused capturable AdamW) gives the
    eager steps' losses and weights: its warm-up leaves the parameters and optimiser state as they were."""
    from lorabench.training.cuda_graph import CapturedStep

    dev = torch.device("cuda")
    unets, adapters, batches = _lora_unets(2, dev)
    params = [ad.trainable_parameters() for ad in adapters]

    def loss_fn(unet):
        return lambda x, t, e, target: torch.nn.functional.mse_loss(unet(x, t, e).sample, target)

    opt_e = torch.optim.AdamW(params[0], lr=1e-2, fused=True)
    eager = []
    for b in batches:
        opt_e.zero_grad(set_to_none=True)
        loss = loss_fn(unets[0])(**b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params[0], 0.5)
        opt_e.step()
        eager.append(float(loss))
    opt_g = torch.optim.AdamW(params[1], lr=1e-2, fused=True, capturable=True)
    step = CapturedStep(loss_fn(unets[1]), batches[0], opt_g, clip_norm=0.5)
    graphed = [float(step(**b)) for b in batches]
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-6)
    # The weights to float rounding, as AdamW amplifies it: where a gradient is near zero its normalised step
    # (up to lr = 1e-2 an element) follows the rounding of the gradient, and the UNet's backward has
    # atomic (run-to-run varying) kernels. Measured on an H200 (2026-12-04): largest difference 5.1e-5.
    for a, b in zip(params[0], params[1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-4)


def test_factors_cast_once_trains_like_each_layers_own_casts_on_cuda():
    """Under bf16 autocast on CUDA, a step whose adapter factors are cast in one go (factors_cast_once, as
    DiffusionFineTuner.training_step does) gives each layer's own casts' loss exactly and their gradients to the
    backward's rounding, dispatches at least three operators a layer fewer, and, captured as a CUDA graph,
    casts the current masters at every replay."""
    from lorabench.adapters.base import factors_cast_once
    from lorabench.training.cuda_graph import CapturedStep
    from lorabench.utils.launches import count_ops

    dev = torch.device("cuda")
    unets, adapters, batches = _lora_unets(3, dev)
    for ad in adapters:  # the same non-zero updates in all three
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in ad.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def loss_fn(unet, layers):
        def fn(x, t, e, target):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False), factors_cast_once(layers):
                out = unet(x, t, e).sample
            return torch.nn.functional.mse_loss(out.float(), target)
        return fn

    def grads_of(i, once):
        for p in adapters[i].trainable_parameters():
            p.grad = None
        loss = loss_fn(unets[i], adapters[i].layers.values() if once else [])(**batches[0])
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in adapters[i].trainable_parameters()]

    (l0, g0), (l1, g1) = grads_of(0, False), grads_of(1, True)
    assert l0 == l1
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-5)
    n_layers = len(adapters[0])
    fewer = count_ops(lambda: grads_of(0, False)) - count_ops(lambda: grads_of(1, True))
    assert fewer >= 3 * n_layers, (fewer, n_layers)
    # captured as a CUDA graph: a replay's loss is that of the masters as they are now, not as captured
    fn = loss_fn(unets[2], adapters[2].layers.values())
    step = CapturedStep(fn, batches[0], torch.optim.AdamW(adapters[2].trainable_parameters(), lr=1e-2, fused=True,
                                                          capturable=True))
    assert step.graphed
    probe = batches[4]
    with torch.no_grad():
        before = float(fn(**probe))
    for b in batches[:4]:
        step(**b)
    with torch.no_grad():
        now = float(fn(**probe))
    assert abs(now - before) > 1e-3 * abs(before)  # four steps moved the loss: stale casts would show
    assert float(step(**probe)) == pytest.approx(now, rel=1e-4)


def test_cuda_graph_option_trains_like_eager_steps_on_cuda(tmp_path):
    """module.cuda_graph=true on CUDA (each step's forward, backward and clipping one graph replay): a world
    LoRA cell's 30 steps against eager steps. Tolerances as bf16 on CUDA against fp32 on the CPU (the update
    within 10%, relative Frobenius norm), the first losses within 2%; a graph was captured and replayed."""
    from lorabench.run import train

    out = {}
    for graph in (False, True):
        cfg = compose(["experiment=quickstart", "model=world", "data=world", "data.concept=sks", "data.n=8",
                       "data.batch_size=8", "data.val_samples=0", "data.caption_mode=context", "optim.lr=3e-3",
                       "trainer.max_steps=30", "exports=[]", "trainer=gpu", "trainer.enable_progress_bar=false",
                       f"module.cuda_graph={str(graph).lower()}"], tmp_path / str(graph))
        out[graph] = train(cfg, tmp_path / str(graph), config_name="graph")
    (r0, m0), (r1, m1) = out[False], out[True]
    assert r1["metrics"]["steps"] == 30 and m1.graph_stats["graphs"] == 1 and m1.graph_stats["replayed_steps"] == 30
    assert r1["metrics"]["train_loss_first"] == pytest.approx(r0["metrics"]["train_loss_first"], rel=0.02)
    d0 = {k: v.detach().cpu() for k, v in m0.adapters.delta_weights().items()}
    d1 = {k: v.detach().cpu() for k, v in m1.adapters.delta_weights().items()}
    num = sum(float((d1[k] - d0[k]).norm() ** 2) for k in d0) ** 0.5
    den = sum(float(v.norm() ** 2) for v in d0.values()) ** 0.5
    assert num / den < 0.10, f"update differs by {num / den:.3f}"


def test_batched_evaluation_on_cuda_sizes_its_passes_by_memory_and_equals_settings_alone(tmp_path):
    """The world Table 2's evaluation with protocol.eval_batch=auto on CUDA: the settings go in passes the
    memory probe sizes (more than one setting each), and every row's scores equal eval_batch=1's (each setting
    alone on the same GPU) to the GPU's rounding; so do the cells' input statistics, captured in passes too (the
    same cells, their statistics files removed)."""
    from lorabench.adapters import read_safetensors
    from lorabench.protocols.orthogonal_adaptation import run

    args = ["experiment=orthogonal_adaptation/world", *OA_SMALL, "trainer=gpu", "protocol.train_workers=1",
            "protocol.only=[pplus,edlora_fedavg,custom_diffusion,ortha_paper,dblora_fedavg]"]
    alone = run(compose([*args, f"protocol.cache_dir={tmp_path / 'a-cells'}"], tmp_path / "a"), tmp_path / "a")
    shutil.copytree(tmp_path / "a-cells", tmp_path / "b-cells")
    captured = sorted(tmp_path.glob("a-cells/**/stats-*.safetensors"))
    for f in captured:
        (tmp_path / "b-cells" / f.relative_to(tmp_path / "a-cells")).unlink()
    together = run(compose([*args, f"protocol.cache_dir={tmp_path / 'b-cells'}", "protocol.eval_batch=auto"],
                           tmp_path / "b"), tmp_path / "b")
    assert together["timings"]["alone"] == 0 and max(together["timings"]["passes"]) > 1
    assert together["timings"]["capture"]["alone"] == 0 and max(together["timings"]["capture"]["passes"]) > 1
    # The GPU's kernels (TF32 convolutions by default) round by batch size, so the continuous scores are compared
    # to 5e-3 (the world table's settings differ from one another by hundredths to tenths) and the thresholded
    # identity shares not; the statistics to 5e-3 of each layer's largest entry.
    for key in ("single_rows", "rows"):
        for a, b in zip(alone[key], together[key], strict=True):
            for k, v in a.items():
                if isinstance(v, float) and not k.endswith("_s") and "identity_alignment" not in k:
                    assert b[k] == pytest.approx(v, abs=5e-3), (a.get("method", a.get("adapter")), k)
    assert captured
    for f in captured:
        grams, _ = read_safetensors(f)
        again, _ = read_safetensors(tmp_path / "b-cells" / f.relative_to(tmp_path / "a-cells"))
        assert sorted(grams) == sorted(again)
        for k, g in grams.items():
            assert (again[k] - g).abs().max() <= 5e-3 * g.abs().max(), (f.parent.name, k)
