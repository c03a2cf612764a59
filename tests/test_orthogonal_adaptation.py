"""The modular (merge) protocol: world runs shrunk to seconds, its one-line errors, the Table 2 renderer,
and the full-scale config's dry run on a tiny saved model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import DEVICES, SMALL, assert_one_line_error, compose, crashed, run_here, scrfd_outputs, write_tiny_scrfd

pytestmark = pytest.mark.integration  # end to end: out of the fast tier


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """LoRA and disjoint OrthA on two concepts, 10 steps, merged by plain summation (lam 1). (40 steps until
    2026-12-06: the same picture, LoRA weight crosstalk 0.66 and subspace error 0.98 against OrthA's 0, in a
    third of the time.)"""
    from lorabench.protocols.orthogonal_adaptation import run

    out = tmp_path_factory.mktemp("modular")
    cfg = compose([*SMALL, "trainer.max_steps=10",
                   "protocol.only=[dblora_fedavg,ortha_disjoint,lora_fusion_closed_form]",
                   "protocol.methods.dblora_fedavg.merge.lam=1.0", "protocol.methods.ortha_disjoint.merge.lam=1.0"],
                  out)
    return run(cfg, out / "run"), out


def test_rows_pair_single_and_merged_scores_and_record_merge_time(world_run):
    res, out = world_run
    assert [(r["method"], r["concept"]) for r in res["rows"]] == [
        (m, c) for m in ("dblora_fedavg", "ortha_disjoint", "lora_fusion_closed_form") for c in ("sks", "twt")]
    for r in res["rows"]:
        assert r["group"] == ["sks", "twt"] and r["merge_s"] > 0
        for k in ("identity_alignment", "image_alignment", "context_text_alignment"):
            assert r[f"delta_{k}"] == pytest.approx(r[f"merged_{k}"] - r[f"single_{k}"])
    # each (adapter, concept) trained once, scored alone once; the merged columns reuse it
    assert sorted((s["adapter"], s["concept"]) for s in res["single_rows"]) == [
        ("lora", "sks"), ("lora", "twt"), ("ortha_disjoint", "sks"), ("ortha_disjoint", "twt")]
    run_dir = out / "run"
    for f in ("results.json", "table.md", "table2.csv", "samples.png", "crosstalk.png", "update_size.png"):
        assert (run_dir / f).is_file(), f
    assert "not yet implemented" not in res["table"] and "Published" in res["table"]  # every row has a method
    # a sweep's summary row (lorabench.sweeps): each method's merged identity alignment, its summary's mean
    assert res["headline"] == [[f"merged identity {m}", res["summary"][m]["merged_identity_alignment"]["mean"]]
                               for m in ("dblora_fedavg", "ortha_disjoint", "lora_fusion_closed_form")]
    # update sizes on the statistics captured for the merges: per cell, and per adapter type and layer
    for s in res["single_rows"]:
        assert 0 < s["size_weight_median"] <= s["size_weight_max"]
        assert 0 < s["size_output_median"] <= s["size_output_max"]
    sizes = res["update_size"]
    assert set(sizes) == {"lora", "ortha_disjoint"} and sizes["lora"]["adapters"] == 2
    assert len(sizes["lora"]["layers"]) == len(res["crosstalk_layers"]["dblora_fedavg"])


def test_disjoint_ortha_keeps_concept_outputs_where_lora_does_not(world_run):
    """On concept i's captured inputs, projected on the input directions its update reads (P_i X_i), the
    merged model's layer outputs equal concept i's own to 1e-4 (relative to ||dW_i X_i||) for OrthA in
    disjoint mode; trained LoRA shows clearly more (>= 0.05), on the same measure and the same data."""
    res, _ = world_run
    rows = {(r["method"], r["concept"]): r for r in res["rows"]}
    for c in ("sks", "twt"):
        ortha, lora = rows["ortha_disjoint", c], rows["dblora_fedavg", c]
        assert ortha["subspace_output_error"] < 1e-4 and ortha["weight_crosstalk"] < 1e-6
        assert lora["subspace_output_error"] > 0.05 and lora["weight_crosstalk"] > 0.05
    layers = res["crosstalk_layers"]["ortha_disjoint"]
    assert max(v["subspace_interference"] for v in layers.values()) < 1e-4


def test_cached_cells_are_not_trained_again(world_run, tmp_path):
    from lorabench.protocols.orthogonal_adaptation import run

    _, out = world_run
    cfg = compose([*SMALL, "trainer.max_steps=10", "protocol.only=lora_svd",
                   f"protocol.cache_dir={out / 'cache' / 'orthogonal_adaptation'}"], tmp_path)
    res = run(cfg, tmp_path / "again")
    assert all(s["reused"] for s in res["single_rows"])


def test_cells_train_in_parallel_processes_then_the_loop_uses_them(tmp_path, monkeypatch, capfd):
    """protocol.train_workers=2: the uncached cells train first in two spawned one-thread processes; the
    protocol then scores those cells (marked trained in this run, not cached), and a second run reuses them.
    What the workers print (here Lightning's banners, which `lorabench -v` shows) is in the job's cli.log too."""
    from lorabench.protocols.orthogonal_adaptation import run
    from lorabench.utils.console import VERBOSE_ENV, record_console

    args = [*SMALL, "trainer.max_steps=3", "protocol.only=[dblora_fedavg,ortha_disjoint]", "protocol.train_workers=2",
            f"protocol.cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with record_console(tmp_path / "cli.log"):
        first = run(compose(args, tmp_path / "a"), tmp_path / "a")
    monkeypatch.delenv(VERBOSE_ENV)
    shown = capfd.readouterr()
    # on the console a worker's line may follow the job's cell bar on its line (the bar ends in no newline, and
    # another process's write does not clear it, as on a terminal); in cli.log each process writes whole lines
    banners = re.findall(r"GPU available: \w+, used: \w+", shown.out + shown.err)
    assert len(banners) >= 4  # one a cell, at least, from the two workers
    assert [ln for ln in (tmp_path / "cli.log").read_text().splitlines() if ln.startswith("GPU available")] == banners
    assert len(first["single_rows"]) == 4 and not any(s["reused"] for s in first["single_rows"])
    assert all(s["steps"] == 3 for s in first["single_rows"])
    assert len(list((tmp_path / "cache").glob("*/adapter.safetensors"))) == 4
    second = run(compose(args, tmp_path / "b"), tmp_path / "b")
    assert all(s["reused"] for s in second["single_rows"])
    assert [r["merged_identity_alignment"] for r in second["rows"]] == [r["merged_identity_alignment"]
                                                                        for r in first["rows"]]


def test_bad_input_met_in_a_cell_worker_is_one_line_and_leaves_no_cell_folder(tmp_path):
    """A cell training in a worker process that meets bad input (here a callback refusing its options when the fit
    starts) raised a ConfigError that could not be unpickled (rebuilt from one argument of two): the pool read as
    broken and the run ended in a BrokenProcessPool traceback, with the run folder and the cache's half-written
    cells left behind. Now one line, and nothing under outputs/, cache included."""
    args = [*SMALL, "trainer.max_steps=2", "protocol.only=[dblora_fedavg,ortha_disjoint]", "protocol.train_workers=2",
            "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
            "+callbacks.swa.swa_lrs=1e-4"]
    assert_one_line_error(run_here(args, tmp_path), tmp_path,
                          "callbacks.swa: SWA with `swa_epoch_start` as a float is not supported")


def test_table_rebuilds_from_results_files(world_run, tmp_path):
    from lorabench.protocols.__main__ import main

    _, out = world_run
    main(["rebuild", "orthogonal_adaptation", str(out / "run"), "--out", str(tmp_path)])
    md = (tmp_path / "table2.md").read_text()
    assert "DB-LoRA (FedAvg)" in md and "OrthA, disjoint slots (sum)" in md and "crosstalk" in md
    lines = (tmp_path / "table2.csv").read_text().splitlines()
    assert lines[0].startswith("method,merge_s_mean") and len(lines) == 4


@pytest.mark.parametrize("args, fragments", [
    (["protocol.group_size=3"], ["protocol.group_size", "2 to 2"]),
    (["protocol.concepts=[sks,sks]"], ["protocol.concepts", "twice"]),
    (["protocol.slots={sks:0,twt:0}"], ["protocol.slots", "share slot 0"]),
    (["protocol.only=[nope]"], ["protocol.only", "dblora_fedavg"]),
    (["protocol.methods.lora_ties.merge.name=avg"], ["merge.name", "unknown value 'avg'"]),
    # a merge option out of range is found before any cell trains, not when the merge runs
    (["protocol.methods.lora_ties.merge.density=2"],
     ["protocol.methods.lora_ties.merge.density: must be a number in (0, 1], got 2"]),
    (["protocol.methods.lora_dare.merge.seed=x"],
     ["protocol.methods.lora_dare.merge.seed: expected an integer, got 'x'"]),
    (["protocol.group_size=two"], ["protocol.group_size: expected an integer, got 'two'"]),
    (["protocol.concepts=[sks]"], ["protocol.concepts: lists 1 concept; merging needs at least 2"]),  # "2 to 1"
    (["protocol.seeds=[0,-1]"], ["protocol.seeds[1]: must be an integer from 0 to 4294967295, got -1"]),
    # each ran: seeds [0, 0] pooled one seed's cells as two replicates; a role naming no method skipped its claims
    (["protocol.seeds=[0,0]"], ["protocol.seeds: lists a seed twice: [0, 0]; each seed is one replicate"]),
    (["protocol.roles.ortha=bogus"], ["protocol.roles.ortha: unknown value 'bogus'; valid: ", "ortha_disjoint"]),
    # an adapter's own options, before the first cell (which named them adapter.<key>); a disjoint entry's slot
    # is the protocol's to give
    (["protocol.adapters.lora.rank=0"], ["protocol.adapters.lora.rank: must be a positive integer, got 0"]),
    (["+protocol.adapters.ortha_disjoint.rnak=2"], ["protocol.adapters.ortha_disjoint.rnak: not an option of "
                                                    "adapter 'ortho'; valid: "]),
    # a list for the map: a TypeError traceback; a slot below 0: adapter.slot, after other cells trained
    (["protocol.only=[ortha_disjoint]", "protocol.slots=[0,1]"], ["protocol.slots: must map each concept to its slot"]),
    (["protocol.only=[ortha_disjoint]", "protocol.slots={sks:0,twt:-1}"],
     ["protocol.slots.twt: must be an integer >= 0, got -1"]),
    # raised at injection in the cell, as adapter.<key> after other cells trained: named where this config sets them,
    # before any cell (the base model takes each adapter once first)
    (["protocol.only=[dblora_fedavg]", "protocol.adapters.lora.rank=64"],
     ["protocol.adapters.lora.rank: 64 exceeds min(in, out) = 32"]),
    (["protocol.only=[ortha_disjoint]", "protocol.slots={sks:0,twt:9}"],
     ["protocol.adapters.ortha_disjoint.num_slots: rank * num_slots = 4 * 10 = 40 exceeds input width 32"]),
    (["protocol.capture.num_inference_steps=0"], ["protocol.capture.num_inference_steps: must be an integer >= 1"]),
    # a baseline's own trainer: torch clipped to -1 by flipping every gradient (the cell climbed its loss)
    (["+protocol.adapters.lora.recipe.trainer.gradient_clip_val=-1"],
     ["protocol.adapters.lora.recipe.trainer.gradient_clip_val: must be null or 0 (no clipping) or a number > 0"]),
    # a baseline's own schedule: a warm-up as long as its budget (the learning rate never reached its lr)
    (["+protocol.adapters.lora.recipe.trainer.max_steps=3", "+protocol.adapters.lora.recipe.optim.warmup_steps=3",
      "+protocol.adapters.lora.recipe.optim.lr_scheduler=linear"],
     ["protocol.adapters.lora.recipe.optim.warmup_steps: 3 warm-up steps in a run of 3 optimiser steps"]),
    (["+protocol.adapters.lora.recipe.data.batch_size=0"],
     ["protocol.adapters.lora.recipe.data.batch_size: must be an integer >= 1, got 0"]),
    # found when the first cell built its data, after the base model was scored, as an empty data.path
    (["data.n=0"], ["data.n: must be an integer >= 1, got 0"]),
    # merged side by side, two concepts need two tokens and two words
    (["protocol.only=[pplus]", "protocol.adapters.pplus.embeddings.token='<x>'"],
     ["protocol.adapters.pplus.embeddings.token: 'sks' and 'twt' both get '<x>'"]),
    (["protocol.only=[ortha_paper]", "protocol.adapters.ortha_paper.embeddings.bind=circle"],
     ["protocol.adapters.ortha_paper.embeddings.bind: 'sks' and 'twt' both get 'circle'"]),
    (["protocol.only=[pplus]", "protocol.adapters.pplus.embeddings.num_vectors=0"],
     ["protocol.adapters.pplus.embeddings.num_vectors: must be an integer >= 1"]),
])
def test_bad_protocol_input_is_one_line_before_training(tmp_path, args, fragments):
    assert_one_line_error(run_here([*SMALL, *args], tmp_path), tmp_path, *fragments)


def test_full_scale_config_composes_as_the_paper_says(tmp_path):
    cfg = compose(["experiment=orthogonal_adaptation/chilloutmix"], tmp_path)
    p = cfg.protocol
    assert cfg.model.name == "chilloutmix" and len(p.concepts) == 12 and p.group_size == 3
    assert p.adapters.lora.rank == 20 and p.adapters.ortha.rank == 20 and cfg.optim.lr == 1e-5
    # the paper's OrthA and Mix-of-Show's ED-LoRA train two layer-wise tokens per concept at 1e-3
    assert p.adapters.ortha.embeddings.name == "pplus" and p.adapters.ortha.embeddings.num_vectors == 2
    assert p.adapters.edlora.embeddings.name == "pplus" and p.adapters.edlora.rank == 4
    assert cfg.optim.embedding_lr == 1e-3 and "embeddings" not in p.adapters.ortha_no_embeddings
    assert p.concept_data.person2.word == "zwz" and p.roles.gradient_fusion == "edlora_fusion_lbfgs"
    # CLIP scores on the GPU the samples are drawn on (it was the CPU under trainer=gpu); on the CPU's trainer, the CPU
    assert cfg.trainer.accelerator == "gpu" and cfg.eval.scorer.device == "cuda"
    on_cpu = compose(["experiment=orthogonal_adaptation/chilloutmix", "trainer=cpu"], tmp_path)
    assert on_cpu.eval.scorer.device == "cpu"
    assert p.methods.dblora_fedavg.merge.lam == 0.6 and p.methods.ortha.merge.name == "sum"
    assert list(p.adapters.ortha.text_encoder_targets) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert set(cfg.eval.concepts.concepts) == set(p.concepts)


@pytest.mark.parametrize("trainer", DEVICES)
def test_full_scale_config_dry_run_on_a_scaled_down_sd15(tmp_path, scaled_down_models, tiny_metric_models,
                                                         tiny_arcface, trainer):
    """The chilloutmix config end to end on an SD1.5-architecture model with tiny widths (saved as a
    diffusers folder), toy face folders, a tiny CLIP and a tiny ArcFace ONNX graph behind eval=faces:
    only sizes are overridden."""
    from lorabench.data import write_toy_dataset

    data = tmp_path / "faces"
    for i in (1, 2, 3):
        write_toy_dataset(data / f"person{i}", n=2, resolution=64, seed=i)
    clip_dir, _ = tiny_metric_models
    args = ["experiment=orthogonal_adaptation/chilloutmix", f"model.pretrained={scaled_down_models['sd15']}",
            "model.resolution=64", f"trainer={trainer}", "trainer.max_steps=2",
            "protocol.concepts=[person1,person2,person3]",
            "protocol.seeds=[0]",
            "protocol.only=[dblora_fedavg,ortha,lora_fusion_closed_form,pplus,custom_diffusion,edlora_fedavg]",
            "protocol.adapters.lora.rank=2", "protocol.adapters.ortha.rank=2",
            # the baselines' own recipes, shortened: Custom Diffusion's 250 steps, ED-LoRA's 500 epochs (fp16)
            "protocol.adapters.custom_diffusion.recipe.trainer.max_steps=2",
            "protocol.adapters.edlora.recipe.trainer.max_epochs=1",
            *(["protocol.adapters.edlora.recipe.trainer.precision=32"] if trainer == "cpu" else []),
            "protocol.capture.num_inference_steps=2", "protocol.capture.images_per_prompt=1",
            f"eval.scorer.clip={clip_dir}", "eval.sampler.num_inference_steps=2", "eval.sampler.progress=false",
            "eval.images_per_prompt=1",
            # on the CPU the samples go three settings a pass: the batched path on SD1.5's architecture (P+'s
            # routed layers, text-encoder LoRA, Custom Diffusion's K/V); trainer=gpu keeps the config's 1
            *(["protocol.eval_batch=3"] if trainer == "cpu" else [])]
    # a detector that finds one face in every frame (landmarks at the template's layout, scaled)
    outs = scrfd_outputs()
    for s in range(3):
        outs[s][:] = 0.1
    outs[0][10 + 1], outs[3][11] = 0.9, [1.0, 1.0, 1.5, 1.5]
    outs[6][11] = [0.25, 0.0, 0.75, 0.0, 0.5, 0.5, 0.25, 0.75, 0.75, 0.75]
    env = {"ORTHA_DATA": str(data), "ARCFACE_ONNX": str(tmp_path / "missing.onnx"),
           "FACE_DETECTOR_ONNX": str(write_tiny_scrfd(tmp_path / "det.onnx", 32, outs))}
    # without the ArcFace file: one line naming the key and what to download, before any training
    assert_one_line_error(run_here(args, tmp_path, env_extra=env), tmp_path, "eval.scorer.identity",
                          "give the ArcFace ONNX file")
    # a detector file that is not ONNX: one line naming the key, nothing left behind
    (tmp_path / "det.txt").write_text("not a model")
    assert_one_line_error(run_here(args, tmp_path, env_extra={**env, "ARCFACE_ONNX": str(tiny_arcface),
                                                             "FACE_DETECTOR_ONNX": str(tmp_path / "det.txt")}),
                          tmp_path, "eval.scorer.face_detector", "det.txt is not an ONNX model")
    proc = run_here(args, tmp_path, env_extra={**env, "ARCFACE_ONNX": str(tiny_arcface)})
    assert proc.returncode == 0, crashed(proc)
    [results] = list((tmp_path / "outputs").glob("orthogonal_adaptation_chilloutmix/*/results.json"))
    res = json.loads(results.read_text())
    assert {r["method"] for r in res["rows"]} == {"dblora_fedavg", "ortha", "lora_fusion_closed_form", "pplus",
                                                  "custom_diffusion", "edlora_fedavg"}
    # 5 adapter types x 3 concepts, then 6 methods x 3 concepts, three settings a pass on the CPU
    assert res["timings"]["passes"] == ([3] * 11 if trainer == "cpu" else []) and res["timings"]["alone"] == \
        (0 if trainer == "cpu" else 33)
    # identity on detected faces: every frame had one here, and the rule is written down
    assert res["faces"]["frames"] > 0 and res["faces"]["no_face"] == 0 and "zero embedding" in res["faces"]["rule"]
    # ED-LoRA trained on Mix-of-Show's recipe (batch 2, linear decay), not OrthA's
    [edlora_cfg] = list((tmp_path / "outputs").rglob("edlora-person1-seed0-*/csv/hparams.yaml"))
    ed = OmegaConf.load(edlora_cfg)
    assert ed.optim.lr == 1e-4 and ed.optim.text_encoder_lr == 1e-5 and ed.data.batch_size == 2
    assert ed.adapter.alpha == 4 and ed.adapter.init == "kaiming" and ed.module.noise_offset == 0.01
    # tokens side by side: P+ alone changes nothing on merge (the group's other tokens are not in the prompts)
    assert all(r["delta_identity_alignment"] == 0 for r in res["rows"] if r["method"] == "pplus")
    assert all(0.0 <= r["merged_identity_alignment"] <= 1.0 for r in res["rows"])
    # text-encoder layers are adapted, merged and crosstalk-measured too, and every SD1.5 block kind
    layers = res["crosstalk_layers"]["ortha"]
    assert any(k.startswith("text_encoder.") for k in layers)
    assert {k.split(".")[1] for k in layers if k.startswith("unet.")} == {"down_blocks", "mid_block", "up_blocks"}
    assert Path(results).with_name("table2.csv").is_file()
    # update sizes of every trained adapter at full scale too (P+ trains no layers: none)
    assert set(res["update_size"]) == {"lora", "ortha", "custom_diffusion", "edlora"}
    assert any(k.startswith("text_encoder.") for k in res["update_size"]["ortha"]["layers"])
    assert res["update_size"]["lora"]["output_median"]["mean"] > 0


def test_sweep_over_methods_shares_trained_cells_and_rebuilds_one_table(tmp_path):
    from lorabench.protocols.base import rebuild

    only = "protocol.only=dblora_fedavg,lora_fusion_closed_form"
    proc = run_here(["--multirun", *SMALL, "trainer.max_steps=2", only], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").rglob("results.json"))
    assert len(jobs) == 2
    second = json.loads((jobs[1] / "results.json").read_text())
    assert all(s["reused"] for s in second["single_rows"])  # the LoRA cells of job 0, not trained again
    md = rebuild("orthogonal_adaptation", jobs).console
    assert "DB-LoRA (FedAvg)" in md and "LoRA gradient fusion (closed form)" in md


def test_crosstalk_goes_to_wandb_as_a_table(world_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lorabench.protocols.orthogonal_adaptation import run

    _, out = world_run
    tables = {}
    real = WandbLogger.log_table

    def spy(self, key, columns=None, data=None, **kw):
        tables[key] = (list(columns), len(data))
        return real(self, key=key, columns=columns, data=data, **kw)

    monkeypatch.setattr(WandbLogger, "log_table", spy)
    cfg = compose([*SMALL, "trainer.max_steps=10", "protocol.only=ortha_disjoint", "logger=wandb",
                   f"protocol.cache_dir={out / 'cache' / 'orthogonal_adaptation'}"], tmp_path)
    res = run(cfg, tmp_path / "wb")
    columns, n = tables["modular/crosstalk"]
    assert columns[:2] == ["method", "layer"] and "interference" in columns
    assert n == len(res["crosstalk_layers"]["ortha_disjoint"])
    # the offline run read back: the crosstalk table, the single -> merged bars, the crosstalk plot, the samples
    [offline] = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb"))
    media = offline / "files" / "media"
    assert list((media / "table" / "modular").glob("crosstalk_*.table.json"))
    for key in ("merge_bars", "crosstalk", "samples", "update_size"):
        assert list((media / "images" / "modular").glob(f"{key}_*.png")), key
    history = next(offline.glob("run-*.wandb")).read_bytes()  # protobuf records: keys are stored as plain text
    assert b"modular/update_size/ortha_disjoint/weight_median" in history
    assert (tmp_path / "wb" / "merge_bars.png").is_file()


def test_batched_evaluation_gives_the_table_of_settings_sampled_alone(tmp_path):
    """protocol.eval_batch=8: every adapter type's cells (tokens alone, tokens + UNet and text-encoder LoRA,
    Custom Diffusion's whole K/V and modifier token) and their merges sampled eight settings a pass give the rows
    of eval_batch=1 (each alone, as before) to float rounding, in the same order with the same fields; the
    cells' input statistics, captured in passes too (the same cells, their statistics files removed), equal
    those captured one cell at a time."""
    import shutil

    from lorabench.adapters import read_safetensors
    from lorabench.protocols.orthogonal_adaptation import run

    only = "protocol.only=[pplus,edlora_fedavg,custom_diffusion,ortha_paper,dblora_fedavg]"
    alone = run(compose([*SMALL, "trainer.max_steps=3", f"protocol.cache_dir={tmp_path / 'a-cells'}", only],
                        tmp_path / "a"), tmp_path / "a")
    shutil.copytree(tmp_path / "a-cells", tmp_path / "b-cells")
    captured = sorted(tmp_path.glob("a-cells/**/stats-*.safetensors"))
    for f in captured:
        (tmp_path / "b-cells" / f.relative_to(tmp_path / "a-cells")).unlink()
    together = run(compose([*SMALL, "trainer.max_steps=3", f"protocol.cache_dir={tmp_path / 'b-cells'}", only,
                            "protocol.eval_batch=8"], tmp_path / "b"), tmp_path / "b")
    for key in ("single_rows", "rows"):
        assert len(alone[key]) == len(together[key]) == 10  # 5 adapter types or methods x 2 concepts
        for a, b in zip(alone[key], together[key]):
            assert list(a) == list(b)
            for k, v in a.items():
                if isinstance(v, float) and not k.endswith("_s"):
                    assert b[k] == pytest.approx(v, abs=1e-5), (a.get("method", a.get("adapter")), k)
    assert len({r["merged_image_alignment"] for r in alone["rows"]}) > 1  # the settings differ
    # 10 cells in passes of 8 and 2, then 10 merges likewise; alone, 20 settings one by one
    assert together["timings"]["passes"] == [8, 2, 8, 2] and together["timings"]["alone"] == 0
    assert alone["timings"]["passes"] == [] and alone["timings"]["alone"] == 20
    # 8 captures (P+ has no layers): 6 waiting when the first 8 cells are sampled, then 2; alone one by one
    assert together["timings"]["capture"]["passes"] == [6, 2] and alone["timings"]["capture"]["alone"] == 8
    assert len(captured) == 8
    text_side = 0  # ED-LoRA and the paper's OrthA adapt the text encoder: recorded when a pass encodes
    for f in captured:
        grams, meta = read_safetensors(f)
        again, meta_again = read_safetensors(tmp_path / "b-cells" / f.relative_to(tmp_path / "a-cells"))
        assert sorted(grams) == sorted(again) and json.loads(meta["rows"]) == json.loads(meta_again["rows"])
        text_side += any(k.startswith("text_encoder.") for k in grams)
        for k, g in grams.items():
            assert (again[k] - g).abs().max() <= 1e-5 * g.abs().max(), (f.parent.name, k)
    assert text_side == 4
