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
from safetensors.torch import load_file, save_file

from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_path, write_json
from lorabench.world.evaluators import (EmbeddingEvaluator, TextImageEvaluator, attribute_accuracy, choose_threshold,
                                        retrieval_top1, train_embedding, train_text_image)
from lorabench.world.spec import World, make_world

ASSET_DIR = Path(__file__).resolve().parent / "assets"
EVALUATORS = ("text_image", "identity", "style")


def check_fingerprint(recorded: dict, world: World, what: str) -> None:
    expected = world.fingerprint()
    if recorded != expected:
        diff = [k for k in expected if recorded.get(k) != expected[k]]
        raise ConfigError("world", f"{what} was built for another world (differs in {', '.join(diff)}: "
                          f"world_seed {recorded.get('seed')}, resolution {recorded.get('resolution')}); "
                          f"use world_seed={recorded.get('seed')} or rebuild it with python -m lorabench.world.assets")


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
    from safetensors import safe_open

    if name not in EVALUATORS:
        from lorabench.errors import choice_error

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


def evaluator_quality(models: dict, world: World, seed: int = 1234) -> dict:
    """Quality on held-out data: experiment identities and styles (never trained on), fresh renders."""
    from lorabench.world.datasets import random_scene
    from lorabench.world.evaluators import _batch

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
        scenes = [random_scene(rng) for _ in range(400)]
        acc = attribute_accuracy(models["text_image"], _batch(scenes, res, rng), scenes)
        out["text_image_attribute_accuracy_renders"] = acc
        # Identities among the experiment concepts: CLIP-I top-1 (image-image) as a sanity check.
        groups = [[random_scene(rng, identity=i) for _ in range(11)] for i in world.experiment_identities]
        out["text_image_clip_i_top1_heldout_identities"] = retrieval_top1(
            models["text_image"].embed_images, groups, res, rng)
    return out


def build_evaluators(world_seed: int = 0, steps: int = 1500, batch: int = 192, seed: int = 0,
                     folder: Path = ASSET_DIR) -> dict:
    world = make_world(world_seed)
    t0 = time.perf_counter()
    models, timings = {}, {}
    for name in EVALUATORS:
        t = time.perf_counter()
        if name == "text_image":
            models[name] = train_text_image(world, steps=steps, batch=batch, seed=seed)
        else:
            models[name] = train_embedding(world, name, steps=steps, batch=batch, seed=seed)
        timings[name] = time.perf_counter() - t
    threshold_seed = 99
    rng = np.random.default_rng(threshold_seed)
    threshold = choose_threshold(models["identity"].embed_images, world.evaluator_identities[-60:], world.resolution, rng)
    quality = evaluator_quality(models, world)
    for name, model in models.items():
        extra = {"steps": steps, "batch": batch, "seed": seed, "train_s": timings[name]}
        if name == "identity":
            extra["threshold"] = threshold
        save_evaluator(model, name, world, extra, folder)
    report = {"world_seed": world_seed, "steps": steps, "batch": batch, "seed": seed, "train_s": timings,
              "identity_threshold": threshold, "threshold_seed": threshold_seed, "quality": quality,
              "total_s": time.perf_counter() - t0, "torch": torch.__version__}
    write_json(folder / "evaluators" / "quality.json", report)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lorabench.world.assets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluators", help="train the world evaluators and write their quality report")
    ev.add_argument("--world-seed", type=int, default=0)
    ev.add_argument("--steps", type=int, default=1500)
    ev.add_argument("--batch", type=int, default=192)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", type=Path, default=ASSET_DIR)
    args = ap.parse_args(argv)
    if args.cmd == "evaluators":
        report = build_evaluators(args.world_seed, args.steps, args.batch, args.seed, args.out)
        print(json.dumps(report["quality"], indent=2))


if __name__ == "__main__":
    main()
