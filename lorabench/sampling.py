"""Sampling with classifier-free guidance and diffusers schedulers, and what protocols draw with it.

Each image's initial noise comes from its own seed, so an image does not depend on the batch
it was drawn in, and protocols that reuse "the same 8 initial latents" for every prompt pass the
same 8 seeds. A stochastic scheduler's noise at each step (DDPM's, an ancestral sampler's) comes from the
image's seed too (:meth:`Sampler.step_generators`, a generator per image, as diffusers' pipelines take a list of
generators): before, it came from the global generator, so a DDPM image depended on its batch and on what ran
before. Works for pixel-space models (no VAE) and latent models, SD and SDXL; ``tests/test_pipelines.py`` holds
the images to diffusers' pipelines'.

- :class:`Sampler`: ``Sampler(model)(prompts, seeds)`` -> float images in [0, 1];
- :func:`sample_prompts` (every prompt from every seed) and :func:`sample_each` (prompt i from seed i):
  the model in eval mode on a device first;
- :meth:`Sampler.sample_settings`: several settings (each its prompts, seeds and weights on some Linear
  layers, :func:`setting_weights`) in one UNet batch, as each alone to float rounding;
- :func:`image_grid` and :func:`save_grid`: images as one PNG.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Iterator, Mapping, Optional, Sequence

import diffusers
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from lorabench.adapters.tokens import layer_routing
from lorabench.checks import SCHEDULERS, check_sampler
from lorabench.errors import ConfigError, check_int
from lorabench.models import ModelComponents, denoise, encode_prompts
from lorabench.utils.io import atomic_path
from lorabench.utils.seeding import generator

MAX_LATENT_BATCH = 4096  # latent_seed: the largest batch of initial latents drawn at once


def make_scheduler(components: ModelComponents, name: str):
    """A sampling scheduler of type ``name`` configured like the model's noise scheduler; ``pipeline``:
    the class the model's own pipeline ships (its model_index.json, e.g. Euler for SDXL base), what
    ``StableDiffusionXLPipeline(...)(prompt)`` samples with when no scheduler is passed."""
    if name == "pipeline":
        cls = components.pipeline_defaults.get("scheduler")
        if not cls or not hasattr(diffusers, cls):
            raise ConfigError("sampler.scheduler", f"'pipeline' needs the model's model_index.json to name a diffusers "
                              f"scheduler (got {cls!r}); choose one of {', '.join(SCHEDULERS)}")
        return getattr(diffusers, cls).from_config(components.noise_scheduler.config)
    check_sampler({"scheduler": name}, "sampler")
    return getattr(diffusers, SCHEDULERS[name]).from_config(components.noise_scheduler.config)


class Sampler:
    """Draw images for prompts: ``Sampler(model)(prompts, seeds)`` -> float images in [0, 1], (N, 3, H, W).

    Args:
        scheduler: ddim | dpm (DPM-Solver++) | ddpm | euler | euler_a (Euler ancestral) | pipeline (the model's
            own pipeline's). DDPM and Euler ancestral add noise at each step, each image's from its seed.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance weight (1.0 = conditional only).
        batch_size: images per UNet call (each call also runs the unconditional half).
        progress: show a progress bar over batches and steps.
        negative_prompt: the unconditional half's prompt.
        zero_negative: encode the unconditional half as zeros; ``None``: as the model's pipeline does
            (SDXL base's ``force_zeros_for_empty_prompt``, when ``negative_prompt`` is empty).
        latent_seed: ``None``: each seed's own initial latents, drawn on the CPU (identical on every
            device); an int: the reference code's way, one ``torch.randn`` of ``max(seeds) + 1`` latents
            from ``torch.Generator(device).manual_seed(latent_seed)`` on the sampling device, image ``i``
            taking latent ``seeds[i]`` (so seeds are indices there).
    """

    def __init__(self, components: ModelComponents, scheduler: str = "ddim", num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, batch_size: int = 64, progress: bool = True,
                 negative_prompt: str = "", zero_negative: Optional[bool] = None, latent_seed: Optional[int] = None):
        check_sampler({"scheduler": scheduler, "num_inference_steps": num_inference_steps, "batch_size": batch_size},
                      "sampler")
        if latent_seed is not None:
            check_int(latent_seed, "sampler.latent_seed", minimum=0)
        if zero_negative is None:
            forced = components.pipeline_defaults.get("force_zeros_for_empty_prompt")
            zero_negative = not negative_prompt and bool(forced)
        self.zero_negative, self.latent_seed = bool(zero_negative), latent_seed
        self.components = components
        self.scheduler_name = scheduler
        self.scheduler = make_scheduler(components, scheduler)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.batch_size, self.progress, self.negative_prompt = batch_size, progress, negative_prompt

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.components.unet.config
        return cfg.in_channels, cfg.sample_size, cfg.sample_size

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """One noise tensor per seed, drawn on the CPU so they are identical on every device (or, with
        ``latent_seed``, rows of one batch drawn on the sampling device)."""
        shape = self.latent_shape()
        if self.latent_seed is not None:
            idx = [check_int(s, "sampler seeds (indices with latent_seed)", minimum=0) for s in seeds]
            if max(idx, default=0) >= MAX_LATENT_BATCH:
                raise ConfigError("sampler.latent_seed", f"with a latent seed, seeds index one batch of latents "
                                  f"(< {MAX_LATENT_BATCH}); got {max(idx)}: unset latent_seed for per-seed latents")
            g = torch.Generator(self.device).manual_seed(int(self.latent_seed))
            batch = torch.randn((max(idx, default=-1) + 1, *shape), generator=g, device=self.device)
            return batch[idx].cpu()
        return torch.stack([torch.randn(shape, generator=generator("sample-latents", int(s))) for s in seeds])

    def step_generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One generator per image, seeded by its seed, for a stochastic scheduler's noise at each step (what a
        diffusers pipeline takes as ``generator=[...]``, one per image); fresh ones on each call."""
        return [generator("sample-steps", int(s)) for s in seeds]

    def _parts_to_device(self) -> None:
        comps = self.components
        for part in (comps.text_encoder, comps.text_encoder_2, comps.vae):  # they follow the UNet's device
            if part is not None:
                part.to(self.device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Optional[Sequence[int]] = None,
                 latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompts = list(prompts)
        if seeds is None:
            seeds = list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ConfigError("sampler.seeds", f"{len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        if latents is None:
            latents = self.initial_latents(seeds)
        out = []
        batches = range(0, len(prompts), self.batch_size)
        bar = tqdm(total=len(batches) * self.num_inference_steps, desc="sampling", unit="step",
                   disable=not self.progress, leave=False)
        for start in batches:
            cond = self.conditions(prompts[start:start + self.batch_size])
            noise = self.step_generators(seeds[start:start + self.batch_size])
            out.append(self.decode(self._denoise(latents[start:start + self.batch_size], cond, 1, bar, noise=noise))
                       .cpu())
        bar.close()
        return torch.cat(out) if out else torch.empty(0, 3, *self.latent_shape()[1:])

    @torch.no_grad()
    def conditions(self, prompts: Sequence[str]) -> dict:
        """What the UNet is conditioned on for ``prompts``: their text states, after the unconditional half's
        when guided, encoded under the model's current state (its loaded tokens and text-encoder weights). The
        text encoders and the VAE are moved to the UNet's device first."""
        self._parts_to_device()
        cond = encode_prompts(self.components, list(prompts), self.device)
        if self.guidance_scale == 1.0:
            return cond
        # zero_negative: diffusers' SDXL pipeline's zeros (pooled embedding included), nothing encoded
        uncond = _zeros_like(cond) if self.zero_negative else \
            encode_prompts(self.components, [self.negative_prompt] * len(prompts), self.device)
        return cat_conditions([uncond, cond])

    @torch.no_grad()
    def sample_settings(self, conds: Sequence[dict], latents: Sequence[torch.Tensor],
                        weights: Optional[Mapping[str, torch.Tensor]] = None,
                        seeds: Optional[Sequence[Sequence[int]]] = None) -> list[torch.Tensor]:
        """Several settings in one pass: setting ``s`` is ``conds[s]`` (from :meth:`conditions`) and its initial
        latents ``latents[s]`` (every setting as many), drawn from ``seeds[s]`` (its images' seeds, for a stochastic
        scheduler's steps), its UNet Linear layers at the paths of ``weights`` taking ``weights[path][s]``
        (:func:`setting_weights`). Each setting's images, as :meth:`__call__` draws them one setting at a time, to
        float rounding (the UNet runs on a batch of every setting's rows)."""
        n = len(latents[0]) if latents else 0
        if seeds is not None and (len(seeds) != len(latents) or any(len(s) != n for s in seeds)):
            raise ValueError(f"seeds for {[len(s) for s in seeds]} images, latents for {[len(x) for x in latents]}")
        noise = None if seeds is None else [g for own in seeds for g in self.step_generators(own)]
        bar = tqdm(total=self.num_inference_steps, desc=f"sampling {len(conds)} settings", unit="step",
                   disable=not self.progress, leave=False)
        with self._settings_pass(conds, latents, weights) as (x, cond):
            x = self._denoise(x, cond, len(conds), bar, noise=noise)
        bar.close()
        return list(self.decode(x).cpu().split(n))

    @torch.no_grad()
    def probe(self, conds: Sequence[dict], latents: Sequence[torch.Tensor],
              weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """The first UNet call of :meth:`sample_settings`'s pass alone, e.g. to measure its peak memory."""
        with self._settings_pass(conds, latents, weights) as (x, cond):
            self._denoise(x, cond, len(conds), None, steps=1)

    @contextlib.contextmanager
    def _settings_pass(self, conds: Sequence[dict], latents: Sequence[torch.Tensor],
                       weights: Optional[Mapping[str, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, dict]]:
        if not conds or len(conds) != len(latents):
            raise ValueError(f"{len(conds)} conditions for {len(latents)} latent batches")
        if any(len(x) != len(latents[0]) for x in latents):
            raise ValueError(f"settings sampled together need as many images each, got {[len(x) for x in latents]}")
        self._parts_to_device()
        cond = cat_conditions(conds)
        routing = layer_routing(self.components.unet) if "layer_states" in cond else contextlib.nullcontext()
        with routing, setting_weights(self.components.unet, weights or {}, len(conds)):
            yield torch.cat(list(latents)), cond

    def _denoise(self, x: torch.Tensor, cond: dict, settings: int, bar, steps: Optional[int] = None,
                 noise: Optional[list[torch.Generator]] = None) -> torch.Tensor:
        """The sampling loop from initial latents ``x`` ((settings * n, ...), setting-major) under ``cond`` (per
        setting: its unconditional rows, then its conditional rows, when guided); ``steps``: stop after so many;
        ``noise``: a generator per row for the scheduler's step noise (None: the global generator)."""
        comps, dev = self.components, self.device
        dtype = next(comps.unet.parameters()).dtype
        guided = self.guidance_scale != 1.0
        sched = self.scheduler
        takes = noise is not None and "generator" in inspect.signature(sched.step).parameters
        step_kwargs = {"generator": noise} if takes else {}
        sched.set_timesteps(self.num_inference_steps, device=dev)
        x = x.to(dev, torch.float32) * sched.init_noise_sigma
        for t in sched.timesteps[:steps]:
            if guided:  # per setting, its rows twice: [x_s, x_s] (one setting: torch.cat([x, x]))
                inp = x.view(settings, 1, -1, *x.shape[1:]).expand(-1, 2, -1, *x.shape[1:]).reshape(-1, *x.shape[1:])
            else:
                inp = x
            inp = sched.scale_model_input(inp, t)
            pred = denoise(comps.unet, inp, t, cond, dtype).float()
            if guided:
                pairs = pred.view(settings, 2, -1, *pred.shape[1:])
                p_uncond, p_cond = pairs[:, 0], pairs[:, 1]
                pred = (p_uncond + self.guidance_scale * (p_cond - p_uncond)).reshape(-1, *pred.shape[1:])
            x = sched.step(pred, t, x, **step_kwargs).prev_sample
            if bar is not None:
                bar.update(1)
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        if vae is not None:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            x = vae.decode((x / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
        return ((x.clamp(-1, 1) + 1) / 2).float()


def _zeros_like(cond: dict) -> dict:
    """``cond`` with every text embedding zeroed (SDXL's size / crop time ids kept)."""
    out = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else tuple(torch.zeros_like(x) for x in v))
           for k, v in cond.items() if k != "added_cond_kwargs"}
    if "added_cond_kwargs" in cond:
        added = dict(cond["added_cond_kwargs"])
        added["text_embeds"] = torch.zeros_like(added["text_embeds"])
        out["added_cond_kwargs"] = added
    return out


def cat_conditions(conds: Sequence[dict]) -> dict:
    """Several batches' conditions as one, in the order given. Layer-wise text states (P+) are kept when any
    batch has them; a batch without takes its ``encoder_hidden_states`` for every layer (what the attention
    layers read without them)."""
    out = {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds])}
    layered = [c["layer_states"] for c in conds if "layer_states" in c]
    if layered:
        n = len(layered[0])
        if any(len(s) != n for s in layered):
            raise ValueError(f"layer-wise text states of different lengths: {sorted({len(s) for s in layered})}")
        per = [c.get("layer_states") or (c["encoder_hidden_states"],) * n for c in conds]
        out["layer_states"] = tuple(torch.cat(states) for states in zip(*per))
    if "added_cond_kwargs" in conds[0]:
        out["added_cond_kwargs"] = {k: torch.cat([c["added_cond_kwargs"][k] for c in conds])
                                    for k in conds[0]["added_cond_kwargs"]}
    return out


def _per_setting_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    settings = weight.shape[0]
    if x.shape[0] % settings:
        raise ValueError(f"a batch of {x.shape[0]} rows is not {settings} settings of equal size")
    xs = x.reshape(settings, -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    y = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.to(xs.dtype), xs, wt)
    return y.reshape(*x.shape[:-1], weight.shape[1])


def per_setting_ready(module: torch.nn.Module) -> bool:
    """Whether :func:`setting_weights` can give ``module`` a weight per setting (a plain ``nn.Linear``)."""
    return type(module) is torch.nn.Linear


@contextlib.contextmanager
def setting_weights(unet: torch.nn.Module, weights: Mapping[str, torch.Tensor], settings: int) -> Iterator[None]:
    """For the ``with`` block, the ``nn.Linear`` at each path of ``weights`` computes its input's rows as
    ``settings`` equal, contiguous parts (the leading dimension, setting-major), part ``s`` with
    ``weights[path][s]`` ((settings, out, in), the layer's bias shared): several models that differ in a few
    layers' weights, in one batch. The modules' own forward is restored after."""
    patched = []
    try:
        for path, w in weights.items():
            module = unet.get_submodule(path)
            if not per_setting_ready(module):
                raise ValueError(f"{path}: a weight per setting needs an nn.Linear, not {type(module).__name__}")
            if tuple(w.shape) != (settings, *module.weight.shape):
                raise ValueError(f"{path}: weights {tuple(w.shape)} for {settings} settings of "
                                 f"{tuple(module.weight.shape)}")
            module.forward = functools.partial(_per_setting_linear, w, module.bias)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def image_grid(images: torch.Tensor, rows: int, scale: int = 1):
    """A PIL image of ``images`` ((N, 3, H, W), [0, 1]) laid out in ``rows`` rows, upscaled by ``scale``."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(3, rows * h, cols * w)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    pil = Image.fromarray(to_uint8(canvas[None])[0].numpy())
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_grid(path: str | os.PathLike, panels: list[torch.Tensor], labels: Optional[Sequence[str]] = None,
              title: str = "") -> None:
    """Rows of images (each panel one row, padded with white) as one PNG, written atomically; ``labels``
    name the rows (in a left margin), ``title`` (lines) says what the columns are."""
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"save_grid: {len(labels)} labels for {len(panels)} rows")
    width = max(len(p) for p in panels)
    rows = [torch.cat([p, torch.ones(width - len(p), *p.shape[1:])]) if len(p) < width else p for p in panels]
    grid = image_grid(torch.cat(rows), rows=len(rows), scale=4)
    if labels or title:
        font = ImageFont.load_default()
        measure = ImageDraw.Draw(grid)
        margin = 8 + max((measure.textlength(t, font=font) for t in labels or ()), default=0)
        lines = title.splitlines() if title else []
        top = 4 + 12 * len(lines) if lines else 0
        canvas = Image.new("RGB", (grid.width + int(margin), grid.height + top), "white")
        canvas.paste(grid, (int(margin), top))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            draw.text((4, 2 + 12 * i), line, fill="black", font=font)
        row_h = grid.height / len(rows)
        for i, text in enumerate(labels or ()):
            draw.text((4, top + (i + 0.5) * row_h - 6), text, fill="black", font=font)
        grid = canvas
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def eval_device(cfg) -> torch.device:
    """Where a run samples: where its trainer trains (``cfg.trainer.accelerator``), since Lightning moves
    the module back to the CPU after fit."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    return torch.device("cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")


def eval_mode(components: ModelComponents, device: torch.device | None = None) -> None:
    """Every part of the model in eval mode (and on ``device``), before sampling."""
    for part in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        if part is not None:
            (part.to(device) if device is not None else part).eval()


def sample_prompts(components: ModelComponents, sampler_cfg: dict, prompts: Sequence[str], seeds: Sequence[int],
                   device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Every prompt from every seed's initial latents, prompt-major: (len(prompts) * len(seeds), 3, H, W)."""
    return sample_each(components, sampler_cfg, [p for p in prompts for _ in seeds],
                       [s for _ in prompts for s in seeds], device)


def sample_each(components: ModelComponents, sampler_cfg: dict, prompts: Sequence[str], seeds: Sequence[int],
                device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """One image per prompt, prompt ``i`` from seed ``seeds[i]``'s initial latents: (len(prompts), 3, H, W)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    eval_mode(components, device)
    return Sampler(components, **sampler_cfg)(list(prompts), seeds=list(seeds))
