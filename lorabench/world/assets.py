"""The mini world's shipped assets: the pretrained model and the evaluators, and how to rebuild them.

    python -m lorabench.world.assets evaluators            # train the three evaluators, report quality
    lorabench experiment=world_pretrain                    # pretrain the model (a run folder)
    python -m lorabench.world.assets model RUN_DIR         # install that run's model, sample grid, report

Every asset records the world fingerprint it was built for; loading it for another world is an
error (nothing is regenerated behind the user's back).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorabench.errors import ConfigError, choice_error
from lorabench.evaluation import ConceptScorer, StyleScorer
from lorabench.evaluation.fidelity import EmbeddingCLIPScore, FeatureExtractor, FidelityScorer
from lorabench.models import load_components, save_components
from lorabench.sampling import Sampler, image_grid
from lorabench.utils.io import atomic_path, write_json
from lorabench.world.datasets import heldout_scenes, random_scene
from lorabench.world.evaluators import (
    EmbeddingEvaluator,
    TextImageEvaluator,
    attribute_accuracy,
    batch_tensor,
    choose_threshold,
    retrieval_top1,
    train_embedding,
    train_text_image,
)
from lorabench.world.spec import World, make_world
from lorabench.world.tasks import WorldStyleEval

ASSET_DIR = Path(__file__).resolve().parent / "assets"
EVALUATORS = ("text_image", "identity", "style")


def check_fingerprint(recorded: dict, world: World, what: str, seed_field: str = "data.world_seed") -> None:
    """The world an asset was built for (``recorded``) is ``world``; else one line naming the setting that differs:
    ``model.resolution``, the world seed's ``seed_field``, or ``world`` (the world's own make-up)."""
    expected = world.fingerprint()
    if recorded != expected:
        diff = [k for k in expected if recorded.get(k) != expected[k]]
        field = ("model.resolution" if "resolution" in diff else seed_field if "seed" in diff else "world")
        raise ConfigError(field, f"{what} was built for another world (differs in {', '.join(diff)}: it has "
                          f"world_seed {recorded.get('seed')}, resolution {recorded.get('resolution')}; asked: "
                          f"world_seed {world.seed}, resolution {world.resolution}); use its values or rebuild it "
                          "with python -m lorabench.world.assets")


# -- evaluators ----------------------------------------------------------------------------------------
def save_evaluator(model: torch.nn.Module, name: str, world: World, extra: dict, folder: Path = ASSET_DIR) -> Path:
    folder = folder / "evaluators"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"world": json.dumps(world.fingerprint()), "extra": json.dumps(extra)})
    return folder / f"{name}.safetensors"


def load_evaluator(name: str, world: Optional[World] = None, folder: Path = ASSET_DIR):
    """Load a shipped evaluator for ``world`` (default: the shipped world, seed 0)."""
    if name not in EVALUATORS:
        raise choice_error("eval.evaluator", name, EVALUATORS)
    path = folder / "evaluators" / f"{name}.safetensors"
    if not path.is_file():
        raise ConfigError("world", f"evaluator file {str(path)!r} is missing; build it with "
                          "python -m lorabench.world.assets evaluators")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["world"])
    world = world or make_world(recorded["seed"], recorded["resolution"])
    check_fingerprint(recorded, world, f"evaluator {name!r}")
    state = load_file(str(path))
    if name == "text_image":
        model = TextImageEvaluator(world.vocabulary())
    else:
        model = EmbeddingEvaluator(state["classes"].shape[0])
    model.load_state_dict(state)
    model.extra = json.loads(meta.get("extra", "{}"))
    return model.eval()


def concept_scorer(world_seed: int = 0, resolution: int = 16, folder: Path = ASSET_DIR):
    """The mini world's ConceptScorer: the text-image evaluator for CLIP-T/I, the identity evaluator
    (with its recorded threshold) for identity similarity and alignment."""
    world = make_world(world_seed, resolution)
    identity = load_evaluator("identity", world, folder)
    return ConceptScorer(load_evaluator("text_image", world, folder), identity,
                         identity.extra["threshold"]["threshold"])


def style_scorer(world_seed: int = 0, resolution: int = 16, n_references: int = 8, reference_seed: int = 1000,
                 folder: Path = ASSET_DIR):
    """The mini world's StyleScorer: the style evaluator (CSD stand-in) over a gallery of every
    experiment style (``WorldStyleEval.gallery``)."""
    world = make_world(world_seed, resolution)
    gallery = WorldStyleEval(world_seed, resolution, n_references=n_references, reference_seed=reference_seed).gallery()
    return StyleScorer(load_evaluator("style", world, folder), gallery)


def fidelity_scorer(world_seed: int = 0, resolution: int = 16, kid_subset_size: int = 100, kid_subsets: int = 100,
                    folder: Path = ASSET_DIR):
    """The mini world's FidelityScorer: the text-image evaluator's pooled image features (128-d) as the
    FID / KID feature space (the Inception stand-in), and its image and text towers for CLIP score."""
    model = load_evaluator("text_image", make_world(world_seed, resolution), folder)
    features = FeatureExtractor(model.fid_features, model.image.num_features, owner=model)
    return FidelityScorer(features, EmbeddingCLIPScore(model), kid_subset_size, kid_subsets)


def evaluator_quality(models: dict, world: World, seed: int = 1234) -> dict:
    """Quality on held-out data: experiment identities and styles (never trained on), fresh renders."""
    rng = np.random.default_rng(seed)
    res = world.resolution
    out = {}
    if "identity" in models:
        groups = [[random_scene(rng, identity=i) for _ in range(11)] for i in world.experiment_identities]
        out["identity_top1_heldout_identities"] = retrieval_top1(models["identity"].embed_images, groups, res, rng)
    if "style" in models:
        groups = [[random_scene(rng, style=s) for _ in range(11)] for s in world.experiment_styles]
        out["style_top1_heldout_styles"] = retrieval_top1(models["style"].embed_images, groups, res, rng)
    if "text_image" in models:
        # The kinds of scene the model's attribute accuracy is judged on: held-out combinations.
        scenes = heldout_scenes(world, 600, seed)
        acc = attribute_accuracy(models["text_image"], batch_tensor(scenes, res, rng), scenes)
        out["text_image_attribute_accuracy_renders"] = acc
        # Identities among the experiment concepts: CLIP-I top-1 (image-image) as a sanity check.
        groups = [[random_scene(rng, identity=i) for _ in range(11)] for i in world.experiment_identities]
        out["text_image_clip_i_top1_heldout_identities"] = retrieval_top1(
            models["text_image"].embed_images, groups, res, rng)
    return out


def build_evaluators(world_seed: int = 0, steps: int = 1500, batch: int = 192, seed: int = 0,
                     folder: Path = ASSET_DIR, text_image_steps: int = 4000) -> dict:
    """Train the three evaluators. The text-image one gets its own step count: since world v2 its
    captions also name markings and styles (ten attributes instead of five)."""
    world = make_world(world_seed)
    t0 = time.perf_counter()
    models, timings, step_counts = {}, {}, {}
    for name in EVALUATORS:
        t = time.perf_counter()
        step_counts[name] = text_image_steps if name == "text_image" else steps
        if name == "text_image":
            models[name] = train_text_image(world, steps=text_image_steps, batch=batch, seed=seed)
        else:
            models[name] = train_embedding(world, name, steps=steps, batch=batch, seed=seed)
        timings[name] = time.perf_counter() - t
    threshold_seed = 99
    rng = np.random.default_rng(threshold_seed)
    threshold = choose_threshold(models["identity"].embed_images, world.evaluator_identities[-60:], world.resolution,
                                 rng)
    quality = evaluator_quality(models, world)
    for name, model in models.items():
        extra = {"steps": step_counts[name], "batch": batch, "seed": seed, "train_s": timings[name]}
        if name == "identity":
            extra["threshold"] = threshold
        save_evaluator(model, name, world, extra, folder)
    report = {"world_seed": world_seed, "steps": step_counts, "batch": batch, "seed": seed, "train_s": timings,
              "identity_threshold": threshold, "threshold_seed": threshold_seed, "quality": quality,
              "total_s": time.perf_counter() - t0, "torch": torch.__version__}
    write_json(folder / "evaluators" / "quality.json", report)
    return report


# -- the pretrained model -------------------------------------------------------------------------------
def load_world_model(world_seed: int = 0, resolution: int = 16, dtype: str = "float32",
                     folder: Path = ASSET_DIR, name: str = "world"):
    """The shipped pretrained mini-world model, through the same loader as SD (``load_components``)."""
    path = folder / "model"
    if not (path / "world.json").is_file():
        raise ConfigError("model.pretrained", f"the mini-world model {str(path)!r} is missing; pretrain it "
                          "(lorabench experiment=world_pretrain) and install it "
                          "(python -m lorabench.world.assets model RUN_DIR)")
    check_fingerprint(json.loads((path / "world.json").read_text()), make_world(world_seed, resolution),
                      "the shipped mini-world model", seed_field="model.world_seed")
    return load_components(str(path), name=name, dtype=dtype, resolution=resolution)


@torch.no_grad()
def model_quality(components, world: World, n_prompts: int = 300, seed: int = 4321, steps: int = 25,
                  guidance: float = 3.0, scheduler: str = "dpm", folder: Path = ASSET_DIR) -> dict:
    """Attribute accuracy of the model's samples for combinations held out of pretraining (a third each:
    plain objects, markings, styles; ``heldout_scenes``), judged zero-shot by the text-image evaluator."""
    scenes = heldout_scenes(world, n_prompts, seed)
    sampler = Sampler(components, scheduler, num_inference_steps=steps, guidance_scale=guidance, batch_size=100)
    t0 = time.perf_counter()
    images = sampler([s.caption() for s in scenes], seeds=list(range(n_prompts)))
    sample_s = time.perf_counter() - t0
    acc = attribute_accuracy(load_evaluator("text_image", world, folder), images, scenes)
    return {"attribute_accuracy": acc, "n_prompts": n_prompts, "prompt_seed": seed, "steps": steps,
            "guidance_scale": guidance, "scheduler": scheduler, "images_per_s": n_prompts / sample_s}


def install_model(run_dir: Path, world_seed: int = 0, folder: Path = ASSET_DIR,
                  grid_path: Optional[Path] = None, n_prompts: int = 300) -> dict:
    """Copy a pretraining run's model into the package (float16 weights), record the world, report quality."""
    world = make_world(world_seed)
    src = Path(run_dir) / "model"
    if not (src / "unet").is_dir():
        raise ConfigError("run_dir", f"{str(run_dir)!r} holds no model/ folder; give a world_pretrain run folder")
    comps = load_components(str(src), name="world", resolution=world.resolution)
    comps.unet.half()
    comps.text_encoder.half()
    dest = folder / "model"
    save_components(comps, dest)
    (dest / "world.json").write_text(json.dumps(world.fingerprint(), indent=1, sort_keys=True) + "\n")
    results_file = Path(run_dir) / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    model = load_world_model(world_seed, folder=folder)
    quality = model_quality(model, world, n_prompts=n_prompts, folder=folder)
    quality["pretraining"] = {k: results.get(k) for k in ("metrics", "timings", "seed")}
    write_json(dest / "quality.json", quality)
    if grid_path is not None:
        scenes = heldout_scenes(world, 9, seed=7)
        prompts = [s.caption() for s in scenes for _ in range(4)]
        images = Sampler(model, "dpm", num_inference_steps=25, guidance_scale=3.0)(prompts, seeds=[0, 1, 2, 3] * 9)
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, rows=9, scale=4).save(grid_path)
        captions = "".join(f"row {i + 1}: {s.caption()}\n" for i, s in enumerate(scenes))
        grid_path.with_suffix(".txt").write_text(captions)
    return quality


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lorabench.world.assets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluators", help="train the world evaluators and write their quality report")
    ev.add_argument("--world-seed", type=int, default=0)
    ev.add_argument("--steps", type=int, default=1500)
    ev.add_argument("--text-image-steps", type=int, default=4000)
    ev.add_argument("--batch", type=int, default=192)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", type=Path, default=ASSET_DIR)
    mo = sub.add_parser("model", help="install a world_pretrain run's model and report its attribute accuracy")
    mo.add_argument("run_dir", type=Path)
    mo.add_argument("--world-seed", type=int, default=0)
    mo.add_argument("--out", type=Path, default=ASSET_DIR)
    mo.add_argument("--grid", type=Path, default=Path("docs") / "world_samples.png")
    args = ap.parse_args(argv)
    if args.cmd == "model":
        print(json.dumps(install_model(args.run_dir, args.world_seed, args.out, args.grid), indent=2))
        return
    if args.cmd == "evaluators":
        report = build_evaluators(args.world_seed, args.steps, args.batch, args.seed, args.out, args.text_image_steps)
        print(json.dumps(report["quality"], indent=2))


if __name__ == "__main__":
    main()
