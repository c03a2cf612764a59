"""lorabench's sampler against diffusers' pipelines: the same images from the same initial latents.

Every protocol scores images from :class:`lorabench.sampling.Sampler` (its own guidance loop over diffusers
schedulers), and the papers' code samples with diffusers' pipelines (the continual paper's
``eval/sample_images.py`` calls ``StableDiffusionXLPipeline`` with its own scheduler and guidance defaults). The
pipeline here runs lorabench's own modules (UNet, text encoders, VAE): two copies of a random UNet round a GEMM
differently by their memory's alignment alone (5e-7), which the scaled-down SDXL's 5 Euler steps grew to 0.08 in
the latents, so sharing the modules leaves the loops as the only difference.
"""

from __future__ import annotations

import pytest
import torch

from lorabench.models import load_components
from lorabench.sampling import Sampler


def _with_our_modules(cls, path, ours):
    """``cls.from_pretrained(path)`` running ``ours``' modules (its scheduler from the folder)."""
    parts = {"unet": ours.unet, "vae": ours.vae, "text_encoder": ours.text_encoder, "tokenizer": ours.tokenizer}
    if ours.text_encoder_2 is not None:
        parts.update(text_encoder_2=ours.text_encoder_2, tokenizer_2=ours.tokenizer_2)
    else:
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(str(path), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("scheduler", "guidance"), [("ddim", 7.5), ("euler", 3.0), ("dpm", 7.5), ("ddpm", 1.0),
                                                     ("ddpm", 5.0)])
@torch.no_grad()
def test_sd15_sampler_draws_what_stable_diffusion_pipeline_draws(tiny_latent_model_dir, scheduler, guidance):
    """SD1.5's classes: lorabench's sampler and ``StableDiffusionPipeline`` with the same scheduler, steps and
    guidance (an empty negative prompt, encoded), from the same latents; DDPM's step noise from the same
    per-image generators (lorabench's drew it from the global generator: 0.35 apart)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from lorabench.checks import SCHEDULERS

    ours = load_components(str(tiny_latent_model_dir), resolution=16)
    sampler = Sampler(ours, scheduler=scheduler, num_inference_steps=6, guidance_scale=guidance, progress=False)
    seeds = [0, 1]
    latents = sampler.initial_latents(seeds)
    mine = sampler(["a photo of a dog"] * 2, seeds=seeds, latents=latents)
    pipe = _with_our_modules(StableDiffusionPipeline, tiny_latent_model_dir, ours)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    theirs = pipe(["a photo of a dog"] * 2, latents=latents.clone(), num_inference_steps=6, guidance_scale=guidance,
                  height=16, width=16, output_type="pt", generator=sampler.step_generators(seeds)).images
    assert theirs.shape == mine.shape
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)


@torch.no_grad()
def test_sdxl_sampler_draws_what_the_sdxl_pipeline_draws_with_its_own_defaults(scaled_down_models):
    """SDXL's classes, as the continual paper samples: ``StableDiffusionXLPipeline`` with no scheduler and no
    guidance passed (its own scheduler from model_index.json, guidance 5.0, zeros for the empty negative prompt,
    the size conditioning of the image's size) against lorabench's ``scheduler: pipeline`` sampler at guidance
    5.0, from the same latents."""
    from diffusers import StableDiffusionXLPipeline

    path = scaled_down_models["sdxl"]
    ours = load_components(str(path), resolution=32)
    sampler = Sampler(ours, scheduler="pipeline", num_inference_steps=5, guidance_scale=5.0, progress=False)
    latents = sampler.initial_latents([3, 4])
    mine = sampler(["a photo of sks dog"] * 2, seeds=[3, 4], latents=latents)
    pipe = _with_our_modules(StableDiffusionXLPipeline, path, ours)
    theirs = pipe(["a photo of sks dog"] * 2, latents=latents.clone(), num_inference_steps=5, height=32, width=32,
                  output_type="pt").images
    assert type(pipe.scheduler).__name__ == type(sampler.scheduler).__name__ == "EulerDiscreteScheduler"
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)
