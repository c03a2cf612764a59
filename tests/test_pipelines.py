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
                                                     ("ddpm", 5.0), ("euler_a", 7.5)])
@torch.no_grad()
def test_sd15_sampler_draws_what_stable_diffusion_pipeline_draws(tiny_latent_model_dir, scheduler, guidance):
    """SD1.5's classes: lorabench's sampler and ``StableDiffusionPipeline`` with the same scheduler, steps and
    guidance (an empty negative prompt, encoded), from the same latents; DDPM's and Euler ancestral's step noise
    from the same per-image generators (lorabench's drew DDPM's from the global generator: 0.35 apart)."""
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


# The scheduler configs the models ship (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 and of
# stabilityai/stable-diffusion-xl-base-1.0): PNDM without its Runge-Kutta warm-up, Euler with leading spacing.
REAL_SCHEDULERS = {
    "sd15": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
             "use_karras_sigmas": False},
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@torch.no_grad()
def test_scheduler_pipeline_with_the_models_own_scheduler_config_draws_as_its_pipeline(scaled_down_models, tmp_path,
                                                                                       arch):
    """``scheduler: pipeline`` (TriLoRA's and the continual paper's full-scale sampling: the pipeline's own
    scheduler) on a model whose scheduler folder is the real one: lorabench reads it as a DDPMScheduler (its
    training noise) and builds the pipeline's class from that config, which must keep the other class's options
    (PNDM's ``skip_prk_steps``, ``set_alpha_to_one``); its images are the pipeline's."""
    import json
    import shutil

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = tmp_path / arch
    shutil.copytree(scaled_down_models[arch], path)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(REAL_SCHEDULERS[arch]))
    size = 64 if arch == "sd15" else 32
    ours = load_components(str(path), resolution=size)
    guidance = 7.5 if arch == "sd15" else 5.0  # each pipeline's default
    sampler = Sampler(ours, scheduler="pipeline", num_inference_steps=5, guidance_scale=guidance, progress=False)
    latents = sampler.initial_latents([0, 1])
    mine = sampler(["a photo of sks dog", "a dog"], seeds=[0, 1], latents=latents)
    pipe = _with_our_modules(StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline, path, ours)
    assert type(pipe.scheduler) is type(sampler.scheduler)
    assert {k: sampler.scheduler.config[k] for k in REAL_SCHEDULERS[arch] if not k.startswith("_")} == \
        {k: v for k, v in REAL_SCHEDULERS[arch].items() if not k.startswith("_")}
    theirs = pipe(["a photo of sks dog", "a dog"], latents=latents.clone(), num_inference_steps=5, height=size,
                  width=size, output_type="pt").images
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@torch.no_grad()
def test_a_negative_prompt_is_encoded_as_the_pipeline_encodes_it(scaled_down_models, arch):
    """``sampler.negative_prompt``: the unconditional half encodes it (SDXL: both encoders and the pooled
    embedding, no zeros), as the pipelines do with ``negative_prompt=``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = scaled_down_models[arch]
    size = 64 if arch == "sd15" else 32
    ours = load_components(str(path), resolution=size)
    sampler = Sampler(ours, scheduler="ddim", num_inference_steps=4, guidance_scale=6.0, progress=False,
                      negative_prompt="a photo of a cat")
    assert not sampler.zero_negative
    latents = sampler.initial_latents([5, 6])
    mine = sampler(["a photo of sks dog"] * 2, seeds=[5, 6], latents=latents)
    pipe = _with_our_modules(StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline, path, ours)
    pipe.scheduler = type(sampler.scheduler).from_config(sampler.scheduler.config)
    theirs = pipe(["a photo of sks dog"] * 2, negative_prompt=["a photo of a cat"] * 2, latents=latents.clone(),
                  num_inference_steps=4, guidance_scale=6.0, height=size, width=size, output_type="pt").images
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)


@torch.no_grad()
def test_weighted_adapters_sample_as_the_pipelines_set_adapters(tiny_latent_model_dir, tmp_path):
    """The sample job's ``protocol.weights``: each adapter's update times its weight added to the model's weights
    (``lorabench.protocols.sample``), as diffusers' ``set_adapters(names, weights)`` scales two loaded LoRAs (UNet
    and text encoder), from the same latents; the merged weights against PEFT's separate low-rank path differ by
    float rounding alone."""
    import contextlib

    from diffusers import StableDiffusionPipeline

    from lorabench.adapters import export_diffusers, inject_adapters
    from lorabench.merging import merged_into, model_weights, read_update

    ours = load_components(str(tiny_latent_model_dir), resolution=16)
    files = []
    for i in range(2):
        adapters = inject_adapters(ours, {"name": "lora", "rank": 4, "target_modules": ["to_q", "to_k", "to_v",
                                          "to_out.0"], "text_encoder_targets": ["q_proj", "v_proj"]})
        g = torch.Generator().manual_seed(i)
        for p in adapters.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        files.append(export_diffusers(adapters, tmp_path / f"a{i}" / "pytorch_lora_weights.safetensors"))
        adapters.remove()
    weights = [0.8, -0.5]
    sampler = Sampler(ours, scheduler="ddim", num_inference_steps=4, guidance_scale=5.0, progress=False)
    latents = sampler.initial_latents([0, 1])
    updates = [read_update(ours, f) for f in files]
    with contextlib.ExitStack() as stack:
        for u, w in zip(updates, weights):
            deltas = u.deltas(w)
            stack.enter_context(merged_into(model_weights(ours, list(deltas)), deltas))
        mine = sampler(["a photo of a dog"] * 2, seeds=[0, 1], latents=latents)
    plain = sampler(["a photo of a dog"] * 2, seeds=[0, 1], latents=latents)
    pipe = _with_our_modules(StableDiffusionPipeline, tiny_latent_model_dir, ours)
    pipe.scheduler = type(sampler.scheduler).from_config(sampler.scheduler.config)
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), adapter_name=f"a{i}")
    pipe.set_adapters(["a0", "a1"], weights)
    theirs = pipe(["a photo of a dog"] * 2, latents=latents.clone(), num_inference_steps=4, guidance_scale=5.0,
                  height=16, width=16, output_type="pt").images.float()
    assert (mine - plain).abs().max() > 1e-2  # the adapters change the images
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
