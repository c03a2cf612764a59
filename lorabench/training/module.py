"""Noise-prediction fine-tuning of a diffusers UNet with pluggable adapters."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from lorabench.adapters import Adapters, inject_adapters
from lorabench.adapters.base import factors_cast_once
from lorabench.adapters.tokens import ConceptTokens, inject_tokens
from lorabench.checks import DEFAULT_OPTIM, check_optim, check_snr_ema, check_warmup
from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.models import ModelComponents, denoise, encode_prompts, encode_tokens, tokenize_prompts
from lorabench.training.cuda_graph import CapturedStep
from lorabench.utils.seeding import generator, rng_state, set_rng_state

# A run captures at most this many step graphs (one per batch shape, e.g. the last, shorter batch of an
# epoch); steps of any further shape run eagerly.
MAX_GRAPHS = 4


def check_cuda_graph(module: Mapping, trainer: Mapping) -> None:
    """``module.cuda_graph`` with options it cannot run with, as one-line errors before any work."""
    if not module.get("cuda_graph"):
        return
    for key in ("gradient_checkpointing", "compile"):
        if module.get(key):
            raise ConfigError("module.cuda_graph", f"cannot run with module.{key} (a captured step replays "
                              "one fixed sequence of kernels); set one of them to false")
    if str(trainer.get("precision", "")).startswith("16"):
        raise ConfigError("module.cuda_graph", "cannot run under fp16 mixed precision (its gradient scaler works "
                          f"outside the captured step), got trainer.precision={trainer.get('precision')}; "
                          "use bf16-mixed or 32-true")
    devices = trainer.get("devices", 1)
    if devices not in (1, "1", [0]) or "ddp" in str(trainer.get("strategy", "")):
        raise ConfigError("module.cuda_graph", "captures one device's step; train on one device (trainer.devices=1)")
    if (trainer.get("accumulate_grad_batches") or 1) != 1:
        raise ConfigError("module.cuda_graph", "replays a whole step; trainer.accumulate_grad_batches must be 1")
    if module.get("snr_gamma") is not None:
        raise ConfigError("module.cuda_graph", "captures the unweighted loss; min-SNR weighting (module.snr_gamma) "
                          "runs without it")


def check_tokens_reached(components: ModelComponents, tokens: ConceptTokens, prompts: Sequence[str],
                         field: str = "embeddings") -> None:
    """New tokens that no training prompt holds, as the text encoder reads it (bound words rewritten, cut at the
    tokenizer's length), get no gradient and train nothing: a one-line error before the fit. Before, a run with
    ``embeddings.token='<sks>'`` on the prompt 'a photo of sks dog' ended with its validation loss unchanged."""
    texts = list(dict.fromkeys(prompts))
    if not texts:
        return
    ids = set(components.tokenizer.convert_tokens_to_ids(tokens.names))
    if any(ids & set(row) for row in tokenize_prompts(components, texts, "cpu")["ids"].tolist()):
        return
    bind, token = tokens.config.get("bind"), tokens.config["token"]
    what = f"{token!r}, nor its bound word {bind!r}," if bind else f"{token!r}"
    raise ConfigError(f"{field}.bind" if bind else f"{field}.token",
                      f"{what} is in no training prompt (e.g. {texts[0]!r}): the new tokens would train nothing; "
                      "write the token into the prompts (data.instance_prompt or the captions), or bind a word they "
                      "hold (embeddings.bind=<word>)")


def unique_mean(losses: torch.Tensor, index: torch.Tensor) -> float:
    """The mean of per-example ``losses`` counting each dataset ``index`` once (DistributedSampler pads
    the last batch with repeated examples)."""
    unique: dict[int, float] = {}
    for i, v in zip(index.tolist(), losses.tolist()):
        unique.setdefault(i, v)
    return sum(unique.values()) / len(unique)


class DiffusionFineTuner(L.LightningModule):
    """Fine-tune a text-to-image model with the DDPM noise-prediction loss: adapters on a frozen
    model, or (``adapter=None``) the whole UNet, e.g. to pretrain the mini world's model.

    Args:
        components: the model (from :func:`lorabench.models.load_components`).
        adapter: adapter config (``name``, ``rank``, targets, options), see :mod:`lorabench.adapters`;
            ``None`` trains every UNet weight instead (unless ``embeddings`` is given: then only those train).
        embeddings: new-token config (textual inversion, :mod:`lorabench.adapters.tokens`), trained beside
            the adapter at ``optim.embedding_lr``; ``None``: none.
        train_text_encoder: with ``adapter=None``, train the (first) text encoder's weights too.
        caption_dropout: probability of replacing a training prompt by "" (classifier-free guidance).
        optim: ``name`` (adamw | adamw8bit), ``lr``, ``text_encoder_lr``, ``embedding_lr``, ``weight_decay``, ``betas``,
            ``eps``, ``lr_scheduler`` (a diffusers schedule of ``checks.LR_SCHEDULES``), ``warmup_steps``.
        prior_loss_weight: weight of the class-image loss when the batch carries prior examples.
        noise_offset: diffusers' noise offset (0 disables).
        seed: seeds the noise and timestep stream, separately for every DDP rank.
        val_timesteps: number of evenly spaced timesteps every validation image is noised at.
        gradient_checkpointing: recompute the UNet's (and trained text encoders') block activations in the
            backward pass instead of keeping them: less memory, about one more forward of time; the
            gradients are the same.
        compile: ``torch.compile`` the UNet (adapters included) in place: its first steps compile (minutes
            at SD size), then elementwise work is fused and kernel launches drop; the loss matches eager
            mode to float tolerance (tests/test_gpu.py).
        snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023, as diffusers' training scripts): each
            example's training loss times ``min(SNR(t), gamma) / SNR(t)`` (``/ (SNR(t) + 1)`` under
            v-prediction); ``None``: off. The fixed-noise validation loss stays unweighted.
        ema_decay: keep an exponential moving average of the trained parameters and save it
            (:class:`~lorabench.training.callbacks.AdapterEMA`); ``None``: off.
        cuda_graph: on CUDA, capture each step's forward, loss, backward and gradient clipping as one CUDA
            graph (:class:`~lorabench.training.cuda_graph.CapturedStep`) and replay it: no kernel launches
            from Python (an SD1.5 LoRA step on an H200: 0.29x the eager step's time). The optimiser steps
            eagerly after it. On the CPU the same step runs eagerly, the same adapter as without it.
    """

    def __init__(self, components: ModelComponents, adapter: Optional[Mapping], optim: Optional[Mapping] = None, *,
                 prior_loss_weight: float = 1.0, noise_offset: float = 0.0, seed: int = 0, val_timesteps: int = 8,
                 train_text_encoder: bool = False, caption_dropout: float = 0.0, gradient_checkpointing: bool = False,
                 compile: bool = False, cuda_graph: bool = False, embeddings: Optional[Mapping] = None,
                 snr_gamma: Optional[float] = None, ema_decay: Optional[float] = None, injected=None):
        super().__init__()
        self.components = components
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.vae = components.vae
        if injected is not None:  # ``(adapters, tokens)`` already in the model (lorabench.training.batched)
            self.adapters, self.tokens = injected
        else:
            self.adapters: Optional[Adapters] = inject_adapters(components, dict(adapter)) if adapter else None
            self.tokens: Optional[ConceptTokens] = inject_tokens(components, dict(embeddings)) if embeddings else None
        check_int(val_timesteps, "module.val_timesteps", minimum=1)  # 0 ended in an IndexError in the tokenizer
        if not prior_loss_weight >= 0:  # a negative weight pushed the class images' loss up: it trained as asked
            raise ConfigError("module.prior_loss_weight", f"must be a number >= 0, got {prior_loss_weight!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError("module.caption_dropout", f"must be in [0, 1), got {caption_dropout!r}")
        check_snr_ema(snr_gamma, ema_decay)
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.ema_decay = ema_decay  # applied by lorabench.training.callbacks.AdapterEMA (lorabench.run adds it)
        self.caption_dropout = caption_dropout
        if self.adapters is None and self.tokens is None:
            self.unet.requires_grad_(True)
            if train_text_encoder:
                self.text_encoder.requires_grad_(True)
        self.optim_cfg = {**DEFAULT_OPTIM, **dict(optim or {})}
        check_optim(self.optim_cfg)
        self.prior_loss_weight, self.noise_offset = prior_loss_weight, noise_offset
        self.seed, self.val_timesteps = seed, val_timesteps
        self.train_text_encoder = (train_text_encoder if self.adapters is None and self.tokens is None
                                   else any(k.startswith("text_encoder") for k in getattr(self.adapters, "layers", {})))
        if train_text_encoder and not self.train_text_encoder:  # it was ignored: the text encoder stayed frozen
            raise ConfigError("module.train_text_encoder", "trains the text encoder's weights in full training only "
                              "(adapter=null, no embeddings); with an adapter, adapt the text encoder's layers: "
                              "adapter.text_encoder_targets=[q_proj,k_proj,v_proj,out_proj]")
        # new tokens train through the (frozen, eval-mode) text encoders
        self.text_grad = self.train_text_encoder or self.tokens is not None
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            # non-reentrant checkpoints (diffusers' default): gradients reach the adapters even though no
            # input of a frozen block requires grad
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                for te in components.text_encoders().values():
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compiled = bool(compile)
        if compile:
            self.unet.compile()  # nn.Module.compile: in place, so parameter names and adapter layers stay
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:
            check_cuda_graph({"cuda_graph": True, "gradient_checkpointing": gradient_checkpointing,
                              "compile": compile}, {})
            if self.adapters is None and self.tokens is None:
                raise ConfigError("module.cuda_graph", "captures adapter and token training; full fine-tuning "
                                  "(adapter: null) runs without it")
            self.automatic_optimization = False  # the step runs the forward, backward and clipping itself
        # the trainer's gradient clipping, handed over by lorabench.run (Lightning clips only in automatic mode)
        self.graph_clip: tuple[Optional[float], Optional[str]] = (None, None)
        self._captured: dict[tuple, CapturedStep] = {}
        # what the captured steps did: graphs captured, batch shapes run eagerly, steps replayed as graphs
        self.graph_stats = {"graphs": 0, "eager_shapes": 0, "replayed_steps": 0, "eager_steps": 0}
        self._noise_gen: Optional[torch.Generator] = None
        self._grad_norms: Optional[torch.Tensor] = None  # (before, after) the last clipping, on the device
        self.val_history: list[float] = []
        self._val_losses: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    # -- mode handling: frozen parts stay in eval mode (no dropout, no BN statistics updates) --------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        if not self.train_text_encoder:
            self.text_encoder.eval()
            if self.text_encoder_2 is not None:
                self.text_encoder_2.eval()
        return self

    # -- the diffusion loss ------------------------------------------------------------------------
    @property
    def noise_scheduler(self):
        return self.components.noise_scheduler

    def _generator(self) -> torch.Generator:
        """The training noise stream: one per rank (ranks must not draw the same noise for different
        images), on the CPU whatever the device, so a GPU run draws the same noise and timesteps as a
        CPU run (the draws are moved to the device, a few KB a step)."""
        if self._noise_gen is None:
            self._noise_gen = generator("noise", self.seed, self.global_rank)
        return self._noise_gen

    def to_latents(self, pixels: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.vae is None:
            return pixels
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            latents = dist.sample(generator=gen) if gen is not None else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def conditioning(self, prompts: list[str], time_ids: Optional[torch.Tensor] = None) -> dict:
        ctx = torch.enable_grad() if (self.text_grad and self.training) else torch.no_grad()
        with ctx:
            return encode_prompts(self.components, prompts, self.device, time_ids)

    def factor_casts(self) -> AbstractContextManager:
        """For a training step's forward and loss: on CUDA under autocast, every fused (or stacked) adapter
        layer's factors cast in one go (:func:`~lorabench.adapters.base.factors_cast_once`), not layer by layer.
        Nothing on the CPU, without adapters, or with a compiled UNet (its graph would guard on the casts)."""
        if self.adapters is None or self.compiled:
            return nullcontext()
        return factors_cast_once(self.adapters.layers.values())

    def diffusion_loss(self, batch: Mapping[str, Any], noise: torch.Tensor, timesteps: torch.Tensor,
                       latents: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The loss of ``batch`` (its ``prompts`` and, with ``data.size_conditioning``, SDXL ``time_ids``)."""
        cond = self.conditioning(batch["prompts"], batch.get("time_ids"))
        return self.noise_loss(cond, noise, timesteps, latents, reduce)

    def noise_loss(self, cond: dict, noise: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor,
                   reduce: bool = True) -> torch.Tensor:
        """The noise-prediction loss under the conditioning ``cond`` (:func:`lorabench.models.encode_prompts`)."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise choice_error("model.prediction_type", sched.config.prediction_type, ("epsilon", "v_prediction"))
        unet_dtype = next(self.unet.parameters()).dtype
        pred = denoise(self.unet, noisy, timesteps, cond, unet_dtype)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return loss.mean() if reduce else loss

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma weights of ``timesteps`` (diffusers' ``compute_snr``): ``min(SNR, gamma) / SNR``
        for epsilon prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction."""
        snr = compute_snr(self.noise_scheduler, timesteps).float()
        weights = snr.clamp(max=self.snr_gamma)
        return weights / (snr + 1) if self.noise_scheduler.config.prediction_type == "v_prediction" else weights / snr

    def trainable_parameters(self, prefix: str) -> list[torch.nn.Parameter]:
        """Trainable parameters of ``unet`` or the text encoders, adapters or full weights; ``embeddings``:
        the new tokens' rows."""
        if prefix == "embeddings":
            return self.tokens.parameters() if self.tokens is not None else []
        if self.adapters is not None:
            return self.adapters.trainable_parameters(prefix)
        if self.tokens is not None:
            return []
        module = getattr(self, prefix, None)
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def draw(self, batch: Mapping[str, Any], gen: torch.Generator):
        """A training step's random draws from the noise stream ``gen``, in a fixed order (caption dropout,
        the VAE's latent sample, noise, noise offset, timesteps): ``(batch, latents, noise, timesteps)``."""
        if self.caption_dropout:
            drop = torch.rand(len(batch["prompts"]), generator=gen) < self.caption_dropout
            batch = {**batch, "prompts": ["" if d else p for p, d in zip(batch["prompts"], drop.tolist())]}
        latents = self.to_latents(batch["pixel_values"], gen)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(self.device)
        return batch, latents, noise, timesteps

    def reduce_loss(self, per_example: torch.Tensor, n_prior: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(loss, prior loss or None)`` of one run's batch: the instance mean, plus the class examples'
        mean (the last ``n_prior``) times ``prior_loss_weight``."""
        if n_prior:
            inst, prior = per_example[:-n_prior].mean(), per_example[-n_prior:].mean()
            return inst + self.prior_loss_weight * prior, prior
        return per_example.mean(), None

    def training_step(self, batch, batch_idx):
        if self.cuda_graph:
            return self.captured_training_step(batch)
        batch, latents, noise, timesteps = self.draw(batch, self._generator())
        with self.factor_casts():
            per_example = self.diffusion_loss(batch, noise, timesteps, latents, reduce=False)
        if self.snr_gamma is not None:
            per_example = per_example * self.snr_weights(timesteps)
        n_prior = int(batch.get("num_prior", 0))
        loss, prior = self.reduce_loss(per_example, n_prior)
        if prior is not None:
            self.log("train/prior_loss", prior, on_step=True, batch_size=n_prior)
        bs = latents.shape[0] - n_prior
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=bs)
        return loss

    # -- module.cuda_graph: the step as a CapturedStep (forward, loss, backward, clipping), then the optimiser --
    def step_inputs(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prompts: list[str], time_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """A step's tensors, the captured step's inputs: the draws and the prompts' tokens (``tok_*``)."""
        tokens = tokenize_prompts(self.components, prompts, self.device, time_ids)
        return {"latents": latents, "noise": noise, "timesteps": timesteps,
                **{f"tok_{k}": v for k, v in tokens.items()}}

    def encode_step_tokens(self, inputs: Mapping[str, torch.Tensor]) -> dict:
        """The conditioning from :meth:`step_inputs`'s tokens (with gradient where tokens or text-encoder
        adapters train), as :meth:`conditioning` computes it from the prompts."""
        ctx = torch.enable_grad() if self.text_grad else torch.no_grad()
        with ctx:
            return encode_tokens(self.components, {k[4:]: v for k, v in inputs.items() if k.startswith("tok_")})

    def captured_loss(self, n_prior: int, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured step's loss from tensors alone, and (loss, prior loss or the loss) to report."""
        with self.factor_casts():
            cond = self.encode_step_tokens(inputs)
            per_example = self.noise_loss(cond, inputs["noise"], inputs["timesteps"], inputs["latents"],
                                          reduce=False)
        loss, prior = self.reduce_loss(per_example, n_prior)
        return loss, torch.stack([loss.detach(), (prior if prior is not None else loss).detach()])

    def run_captured(self, static: tuple, loss_fn, inputs: dict, after_backward) -> CapturedStep:
        """Run one step of ``loss_fn`` through the CapturedStep of its inputs' shapes and of ``static`` (the
        Python values ``loss_fn`` is bound to), captured the first time (on the CPU, or past
        :data:`MAX_GRAPHS` of them, an eager one); then the optimiser and the schedule, Lightning counting the
        optimiser step."""
        key = (static, tuple((k, tuple(v.shape)) for k, v in inputs.items()))
        step = self._captured.get(key)
        if step is None:
            graphed = self.device.type == "cuda" and sum(c.graphed for c in self._captured.values()) < MAX_GRAPHS
            optimizer = self.trainer.optimizers[0]
            params = [p for g in optimizer.param_groups for p in g["params"]]
            step = CapturedStep(loss_fn, inputs, params=params, after_backward=after_backward, graph=graphed)
            self._captured[key] = step
            self.graph_stats["graphs" if graphed else "eager_shapes"] += 1
        step(**inputs)
        self.graph_stats["replayed_steps" if step.graphed else "eager_steps"] += 1
        self.optimizers().step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return step

    def captured_training_step(self, batch):
        """:meth:`training_step` under ``module.cuda_graph``: the same draws, loss, clipping and optimiser
        step, the forward-to-clipping part through a :class:`CapturedStep`."""
        batch, latents, noise, timesteps = self.draw(batch, self._generator())
        n_prior = int(batch.get("num_prior", 0))
        inputs = self.step_inputs(latents, noise, timesteps, batch["prompts"], batch.get("time_ids"))
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # this step's, before the schedule moves it
        step = self.run_captured((n_prior,), partial(self.captured_loss, n_prior), inputs,
                                 lambda: self.clip_grads(self.graph_params(), *self.graph_clip))
        reported = step.aux.clone()
        if step.hook_out is not None:
            self._grad_norms = step.hook_out.clone()
            self.log("train/grad_norm", self._grad_norms[0], on_step=True)
        if n_prior:
            self.log("train/prior_loss", reported[1], on_step=True, batch_size=n_prior)
        bs = latents.shape[0] - n_prior
        self.log("train/loss", reported[0], on_step=True, prog_bar=True, batch_size=bs)
        self.log("train/lr", lr, on_step=True, batch_size=bs)
        return reported[0]

    def on_train_end(self) -> None:
        """A run's captured steps end with its fit: their graphs, memory pools and the gradients they wrote
        are let go (a protocol samples and scores the trained cell next, on the same GPU)."""
        if self._captured:
            for g in (self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []):
                for p in g["params"]:
                    p.grad = None
            self._captured = {}

    def graph_params(self) -> list[torch.nn.Parameter]:
        """The optimiser's parameters that have a gradient, in its order (what the trainer clips)."""
        return [p for g in self.trainer.optimizers[0].param_groups for p in g["params"] if p.grad is not None]

    def validation_step(self, batch, batch_idx):
        """Loss at fixed noise and evenly spaced timesteps, comparable across steps and runs.

        The noise of each example is seeded by its dataset index, so the loss does not depend on
        batching or on the number of ranks; per-example losses are kept with their index so that
        the duplicates DistributedSampler pads the last batch with are counted once.
        """
        self._val_losses.append(self.val_example_losses(*self.val_inputs(batch, self.seed)).detach())
        self._val_index.append(batch["index"].to(self.device))

    def val_inputs(self, batch: Mapping[str, Any], seed: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A validation batch's UNet inputs ``(prompts, noise, timesteps, latents)``: every example repeated
        at ``val_timesteps`` evenly spaced timesteps, its noise seeded by ``(seed, its dataset index)``."""
        k = self.val_timesteps
        latents = self.to_latents(batch["pixel_values"]).repeat_interleave(k, dim=0)
        noise = torch.cat([torch.randn((k, *latents.shape[1:]), generator=generator("val", seed, int(i)))
                           for i in batch["index"]]).to(self.device)
        T = self.noise_scheduler.config.num_train_timesteps
        t = ((torch.arange(k) + 0.5) * T / k).long().clamp(max=T - 1).repeat(len(batch["index"])).to(self.device)
        return {"prompts": [p for p in batch["prompts"] for _ in range(k)]}, noise, t, latents

    def val_example_losses(self, rep: dict, noise: torch.Tensor, t: torch.Tensor,
                           latents: torch.Tensor) -> torch.Tensor:
        """Each example's loss averaged over its timesteps, from :meth:`val_inputs`."""
        per = self.diffusion_loss(rep, noise, t, latents, reduce=False)
        return per.view(-1, self.val_timesteps).mean(dim=1)

    def on_validation_epoch_start(self):
        self._val_losses, self._val_index = [], []

    def on_validation_epoch_end(self):
        if not self._val_losses:
            return
        losses, index = torch.cat(self._val_losses), torch.cat(self._val_index)
        if self.trainer.world_size > 1:  # every rank holds the same number of (padded) examples
            losses, index = self.all_gather(losses).flatten(), self.all_gather(index).flatten()
        value = unique_mean(losses, index)
        self.log("val/loss", value, prog_bar=True, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.val_history.append(value)

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = [{"params": self.trainable_parameters("unet"), "lr": cfg["lr"]}]
        te_params = [p for pre in ("text_encoder", "text_encoder_2") for p in self.trainable_parameters(pre)]
        if te_params:
            groups.append({"params": te_params, "lr": cfg["text_encoder_lr"] or cfg["lr"]})
        groups.append({"params": self.trainable_parameters("embeddings"), "lr": cfg["embedding_lr"] or cfg["lr"]})
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("adapter", "has no trainable parameters (and no embeddings train)")
        kwargs = dict(betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        if cfg["name"] == "adamw8bit":
            try:  # an optional dependency, for the continual paper's 8-bit Adam
                import bitsandbytes as bnb  # noqa: PLC0415
            except ImportError as exc:
                raise ConfigError("optim.name", "adamw8bit needs bitsandbytes (pip install bitsandbytes)") from exc
            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            # CUDA: the fused kernel updates every adapter tensor in one launch; the CPU keeps the default
            # implementation (and its results). Not under fp16's gradient scaler: Lightning cannot clip the
            # gradients of an optimizer that unscales them inside its own step.
            scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None)
            fused = scaler is None and all(p.is_cuda for g in groups for p in g["params"])
            optimizer = torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {}))
        # the steps the run takes: max_steps, or its epochs' batches, the fewer where both are set (the schedule
        # spanned max_steps when max_epochs ended the run first: a cosine run barely decayed)
        total = self.trainer.estimated_stepping_batches
        check_warmup(cfg, int(total))  # a run of epochs: its steps are known only now
        scheduler = get_scheduler(cfg["lr_scheduler"], optimizer, num_warmup_steps=cfg["warmup_steps"],
                                  num_training_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip over the adapter parameters themselves (a list, not an exhausted iterator: diffusers'
        LoRA script hands ``clip_grad_norm_`` a spent generator, so it never clips) and log the norm."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = self.clip_grads(params, gradient_clip_val, gradient_clip_algorithm)
        if norms is not None:
            # kept as tensors (read back when asked): a float() here would wait for a GPU at every step
            self._grad_norms = norms
            self.log("train/grad_norm", norms[0], on_step=True)

    @staticmethod
    def clip_grads(params: list[torch.Tensor], gradient_clip_val=None,
                   gradient_clip_algorithm=None) -> Optional[torch.Tensor]:
        """Clip ``params``' gradients as the trainer's settings say; returns their norm before and after
        clipping (None when clipping by value, or without gradients). Tensor arithmetic only: it also runs
        inside a captured step."""
        if not params:
            return None
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return None
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        before = torch.nn.utils.clip_grad_norm_(params, max_norm)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                      for p in params]))
        return torch.stack([before.detach().float(), after.detach()])

    @property
    def grad_norm_before_clip(self) -> Optional[float]:
        """The adapter gradients' norm at the last step, before clipping (None before the first)."""
        return None if self._grad_norms is None else float(self._grad_norms[0])

    @property
    def grad_norm_after_clip(self) -> Optional[float]:
        """The same norm after clipping."""
        return None if self._grad_norms is None else float(self._grad_norms[1])

    # -- checkpoints hold adapter weights only (or, in full training, the trained parts) -----------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the noise and timestep stream where it stands: a resumed run draws what the uninterrupted one would;
        # and the global stream, which the adapters' dropout draws from (Lightning keeps no RNG state). Every
        # rank calls this hook and rank zero alone writes the file: under DDP the file keeps each rank's streams
        # (gathered), or a resumed run's ranks would all draw rank zero's noise for their different images.
        meta, tensors = rng_state(self.device if self.device.type == "cuda" else None)
        own = {"noise": self._generator().get_state(), "global": {"meta": meta, **tensors}}
        checkpoint["lorabench_noise_state"], checkpoint["lorabench_global_rng"] = own["noise"], own["global"]
        if self.trainer.world_size > 1:
            ranks: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, own)
            checkpoint["lorabench_rank_rng"] = ranks
        if self.adapters is None and self.tokens is None:
            return
        rows = {id(p) for p in self.trainable_parameters("embeddings")}
        keys = {n for n, p in self.named_parameters() if id(p) in rows}
        keys |= set(self.adapters.state_dict()) if self.adapters is not None else set()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        # a run that trains new tokens alone (textual inversion, P+) has no adapter config to store
        checkpoint["lorabench_adapter"] = self.adapters.config if self.adapters is not None else None
        if self.tokens is not None:
            checkpoint["lorabench_embeddings"] = self.tokens.config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        ranks = checkpoint.get("lorabench_rank_rng") or [{"noise": checkpoint.get("lorabench_noise_state"),
                                                          "global": checkpoint.get("lorabench_global_rng")}]
        world, rank = (self.trainer.world_size if self._trainer is not None else 1), self.global_rank
        if len(ranks) != world and rank == 0:
            warnings.warn(f"resume: a checkpoint {len(ranks)} process(es) wrote, resumed on {world} (trainer.devices):"
                          " the ranks shard the data otherwise, so this run does not train what the uninterrupted"
                          " one would", stacklevel=1)
        if rank >= len(ranks):  # a rank the checkpoint had not: its own stream from its start, not another's
            return
        if ranks[rank]["noise"] is not None:
            self._generator().set_state(ranks[rank]["noise"])
        states = dict(ranks[rank]["global"] or {})
        if states:
            set_rng_state(states.pop("meta"), states)
