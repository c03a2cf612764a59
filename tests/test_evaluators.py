"""World evaluators: train (a few steps here), save, load back for the right world only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.world import make_world
from lorabench.world.assets import load_evaluator, save_evaluator
from lorabench.world.datasets import heldout_scenes, random_scene
from lorabench.world.evaluators import (
    attribute_accuracy,
    batch_tensor,
    choose_threshold,
    retrieval_top1,
    train_embedding,
    train_text_image,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    world = make_world(0)
    folder = tmp_path_factory.mktemp("assets")
    quiet = lambda *_: None  # noqa: E731
    models = {"text_image": train_text_image(world, steps=3, batch=16, log=quiet),
              "identity": train_embedding(world, "identity", steps=3, batch=16, log=quiet),
              "style": train_embedding(world, "style", steps=3, batch=16, log=quiet)}
    for name, m in models.items():
        save_evaluator(m, name, world, {"steps": 3}, folder)
    return world, folder, models


def test_round_trip_and_embeddings(trained):
    world, folder, models = trained
    rng = np.random.default_rng(0)
    images = batch_tensor([random_scene(rng) for _ in range(4)], 16, rng)
    for name, model in models.items():
        loaded = load_evaluator(name, world, folder)
        e = loaded.embed_images(images)
        assert e.shape == (4, 64)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(e, model.embed_images(images))
    ti = load_evaluator("text_image", world, folder)
    assert ti.embed_texts(["a small red circle at left on white"]).shape == (1, 64)
    assert ti.fid_features(images).shape == (4, ti.image.num_features)
    assert ti.fid_features(torch.rand(1, 3, 299, 299)).shape == (1, 128)  # any input size (FID tools probe 299 px)


def test_mismatched_world_is_an_error(trained):
    _, folder, _ = trained
    with pytest.raises(ConfigError, match=r"data.world_seed: evaluator 'identity' was built for another world .* it "
                                          r"has world_seed 0, resolution 16; asked: world_seed 1, resolution 16"):
        load_evaluator("identity", make_world(1), folder)
    with pytest.raises(ConfigError, match=r"model.resolution: evaluator 'identity' was built for another world"):
        load_evaluator("identity", make_world(0, resolution=32), folder)
    with pytest.raises(ConfigError, match="evaluator file .* is missing"):
        load_evaluator("identity", make_world(0), folder / "nowhere")
    with pytest.raises(ConfigError, match="eval.evaluator: unknown value 'fid'"):
        load_evaluator("fid", make_world(0), folder)


def test_quality_measures_run(trained):
    world, _, models = trained
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(6)]
    acc = attribute_accuracy(models["text_image"], batch_tensor(scenes, 16, rng), scenes)
    # Plain objects: only the five placement attributes apply.
    assert set(acc) == {"size", "colour", "cls", "position", "background", "mean", "n"}
    assert all(0 <= v <= 1 for k, v in acc.items() if k != "n") and set(acc["n"].values()) == {6}
    mixed = heldout_scenes(world, 9)  # plain, marked, styled in turn
    acc = attribute_accuracy(models["text_image"], batch_tensor(mixed, 16, rng), mixed)
    assert acc["n"] == {"size": 9, "colour": 9, "cls": 9, "position": 9, "background": 9, "pattern": 3, "mark": 3,
                        "palette": 3, "texture": 3, "outline": 3}
    groups = [[random_scene(rng, identity=i) for _ in range(3)] for i in world.experiment_identities[:4]]
    assert 0 <= retrieval_top1(models["identity"].embed_images, groups, 16, rng) <= 1
    thr = choose_threshold(models["identity"].embed_images, world.evaluator_identities[:4], 16, rng, per=3)
    assert 0 <= thr["threshold"] <= 1


def test_install_and_load_world_model(trained, tmp_path):
    """Plumbing of `python -m lorabench.world.assets model RUN_DIR` on an untrained world model."""
    from lorabench.models import save_components
    from lorabench.world.assets import install_model, load_world_model
    from lorabench.world.build import build_world_model

    world, folder, _ = trained
    save_components(build_world_model(), tmp_path / "run" / "model")
    quality = install_model(tmp_path / "run", folder=folder, grid_path=None, n_prompts=4)
    assert set(quality["attribute_accuracy"]) >= {"colour", "cls", "mean"} and quality["images_per_s"] > 0
    assert (folder / "model" / "quality.json").is_file() and (folder / "model" / "world.json").is_file()
    model = load_world_model(folder=folder)
    assert model.unet.dtype == torch.float32 and model.resolution == 16
    with pytest.raises(ConfigError, match="model.world_seed: the shipped mini-world model was built for another"):
        load_world_model(world_seed=1, folder=folder)
    with pytest.raises(ConfigError, match="model.pretrained: the mini-world model .* is missing"):
        load_world_model(folder=tmp_path / "empty")


def test_shipped_assets_load_for_the_default_world():
    from lorabench.world.assets import ASSET_DIR, load_world_model

    model = load_world_model()
    assert model.name == "world" and model.unet.config.sample_size == 16
    rng = np.random.default_rng(0)
    images = batch_tensor([random_scene(rng) for _ in range(2)], 16, rng)
    for name in ("text_image", "identity", "style"):
        assert load_evaluator(name).embed_images(images).shape == (2, 64)
    assert 0 < load_evaluator("identity").extra["threshold"]["threshold"] < 1
    assert (ASSET_DIR / "evaluators" / "quality.json").is_file() and (ASSET_DIR / "model" / "quality.json").is_file()
