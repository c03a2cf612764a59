"""The sampler: seeded per image, batch-invariant, guidance, schedulers, pixel and latent models."""

from __future__ import annotations

import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.sampling import Sampler, image_grid


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_seeded_and_batch_invariant(load_tiny, scheduler):
    model = load_tiny()
    prompts = ["a photo of sks dog", "a dog", "a photo", ""]
    a = Sampler(model, scheduler, num_inference_steps=4, batch_size=4, progress=False)(prompts, seeds=[0, 1, 2, 3])
    b = Sampler(model, scheduler, num_inference_steps=4, batch_size=1, progress=False)(prompts, seeds=[0, 1, 2, 3])
    assert a.shape == (4, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The same seed under another prompt starts from the same latents (the protocol's "same 8 latents").
    s = Sampler(model, scheduler, num_inference_steps=4, progress=False)
    assert torch.equal(s.initial_latents([5, 5])[0], s.initial_latents([5])[0])


def test_guidance_changes_images_and_one_means_conditional_only(load_tiny):
    model = load_tiny()
    g1 = Sampler(model, num_inference_steps=3, guidance_scale=1.0, progress=False)(["a dog"], [0])
    g5 = Sampler(model, num_inference_steps=3, guidance_scale=5.0, progress=False)(["a dog"], [0])
    assert (g1 - g5).abs().max() > 1e-4


def test_latent_model_decodes_through_the_vae(tiny_latent_model_dir):
    from lorabench.models import load_components

    model = load_components(str(tiny_latent_model_dir), resolution=16)
    images = Sampler(model, "dpm", num_inference_steps=2, progress=False)(["a", "b"], [0, 1])
    assert images.shape == (2, 3, 16, 16)


def test_bad_input(load_tiny):
    model = load_tiny()
    with pytest.raises(ConfigError, match="sampler.scheduler: unknown value 'plms'"):
        Sampler(model, "plms")
    with pytest.raises(ConfigError, match="sampler.seeds: 1 seeds for 2 prompts"):
        Sampler(model, progress=False)(["a", "b"], [0])


def test_image_grid():
    grid = image_grid(torch.rand(6, 3, 4, 4), rows=2, scale=3)
    assert grid.size == (3 * 4 * 3, 2 * 4 * 3)


def test_sample_grid_names_its_rows_and_columns(tmp_path):
    from PIL import Image

    from lorabench.sampling import save_grid

    panels = [torch.rand(3, 3, 8, 8), torch.rand(2, 3, 8, 8)]
    save_grid(tmp_path / "plain.png", panels)
    save_grid(tmp_path / "labelled.png", panels, ["sks: references", "sks: lora merged with twt"], "4 prompts x 1")
    plain, labelled = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "labelled.png")
    assert plain.size == (3 * 32, 2 * 32)
    assert labelled.width > plain.width + 50 and labelled.height > plain.height  # a label margin and a title line
    # the images are pasted unchanged at the bottom right
    w, h = plain.size
    assert list(labelled.crop((labelled.width - w, labelled.height - h, labelled.width, labelled.height)).getdata()) \
        == list(plain.convert("RGB").getdata())
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        save_grid(tmp_path / "bad.png", panels, ["one"])
