"""The sampler: seeded per image, batch-invariant, guidance, schedulers, pixel and latent models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.errors import ConfigError
from lorabench.sampling import Sampler, image_grid


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm", "euler_a"])
def test_seeded_and_batch_invariant(load_tiny, scheduler):
    """An image is its prompt's and seed's, whatever batch it is drawn in: DDPM's step noise too (it came from the
    global generator, so a batch of four drew other images than four batches of one)."""
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
    corner = labelled.crop((labelled.width - w, labelled.height - h, labelled.width, labelled.height))
    assert np.array_equal(np.asarray(corner.convert("RGB")), np.asarray(plain.convert("RGB")))
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        save_grid(tmp_path / "bad.png", panels, ["one"])


# -- several settings in one pass ------------------------------------------------------------------------------
def _attention_paths(unet, suffixes=("attn1.to_q", "attn2.to_k", "attn2.to_v")):
    return [n for n, m in unet.named_modules() if n.endswith(suffixes)]


@pytest.mark.parametrize("scheduler", ["dpm", "ddpm"])
def test_settings_in_one_pass_equal_each_alone(load_tiny, scheduler):
    """Three settings (own prompts, seeds and weights on some Linear layers) in one UNet batch equal each one
    sampled alone with its weights in the model, DDPM's step noise from each image's seed; each module's own
    forward is back after the pass."""
    model = load_tiny()
    unet = model.unet
    paths = _attention_paths(unet)
    gen = torch.Generator().manual_seed(0)
    deltas = [{p: 0.05 * torch.randn(unet.get_submodule(p).weight.shape, generator=gen) for p in paths}
              for _ in range(3)]
    prompts = [["a photo of sks dog", "a dog"], ["a photo"] * 2, ["", "a dog on the beach"]]
    seeds = [[0, 1], [0, 1], [2, 3]]
    s = Sampler(model, scheduler, num_inference_steps=3, progress=False)
    alone = []
    for d, ps, ss in zip(deltas, prompts, seeds):
        saved = {p: unet.get_submodule(p).weight.detach().clone() for p in d}
        with torch.no_grad():
            for p in d:
                unet.get_submodule(p).weight += d[p]
        alone.append(s(ps, ss))
        with torch.no_grad():
            for p in d:
                unet.get_submodule(p).weight.copy_(saved[p])
    weights = {p: torch.stack([unet.get_submodule(p).weight.detach() + d[p] for d in deltas]) for p in paths}
    together = s.sample_settings([s.conditions(ps) for ps in prompts], [s.initial_latents(ss) for ss in seeds],
                                 weights, seeds=seeds)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the settings differ, so the test could fail
    assert all("forward" not in vars(unet.get_submodule(p)) for p in paths)
    # one setting with no weights: the sampler's own images, bit for bit
    assert torch.equal(s.sample_settings([s.conditions(prompts[0])], [s.initial_latents(seeds[0])],
                                         seeds=seeds[:1])[0], s(prompts[0], seeds[0]))


def test_per_setting_weights_check_their_layers(load_tiny):
    from lorabench.sampling import setting_weights

    unet = load_tiny().unet
    [path] = _attention_paths(unet, ("attn1.to_q",))[:1]
    w = unet.get_submodule(path).weight
    with pytest.raises(ValueError, match="weights .* for 3 settings"):
        with setting_weights(unet, {path: torch.stack([w, w])}, 3):
            pass
    conv = next(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="needs an nn.Linear, not Conv2d"):
        with setting_weights(unet, {path: torch.stack([w, w]), conv: torch.zeros(2, 1)}, 2):
            pass
    assert "forward" not in vars(unet.get_submodule(path))  # put back after a failed setup too
    with setting_weights(unet, {path: torch.stack([w, w])}, 2):
        with pytest.raises(ValueError, match="5 rows is not 2 settings"):
            unet.get_submodule(path)(torch.zeros(5, 3, w.shape[1]))


def test_layer_wise_states_mix_with_plain_ones():
    """A batch of settings where only some have P+'s layer-wise states: the others read their one state in
    every layer."""
    from lorabench.sampling import cat_conditions

    a = {"encoder_hidden_states": torch.ones(2, 4, 3), "layer_states": (torch.ones(2, 4, 3), 2 * torch.ones(2, 4, 3))}
    b = {"encoder_hidden_states": 5 * torch.ones(1, 4, 3)}
    out = cat_conditions([a, b])
    assert out["encoder_hidden_states"].shape == (3, 4, 3) and len(out["layer_states"]) == 2
    assert torch.equal(out["layer_states"][1][:2], 2 * torch.ones(2, 4, 3))
    assert torch.equal(out["layer_states"][1][2:], 5 * torch.ones(1, 4, 3))
