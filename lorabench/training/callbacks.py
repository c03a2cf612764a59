"""The callbacks every training run has: :class:`SaveArtifacts` (the adapter files), :class:`LossHistory`
(the losses results.json reports), :class:`StepProgressBar`; and those a config asks for:
:class:`ValidationSamples` (``eval.validation``: images while training), :class:`AdapterEMA`
(``module.ema_decay``), :class:`CheckpointEvaluation` (scores at chosen epochs). A user's own callbacks
come from the ``callbacks`` config group."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf
from lightning.pytorch.utilities import rank_zero_only

from lorabench.adapters import ADAPTER_FILE, EXPORT_FILES, write_adapter_files
from lorabench.adapters.custom_diffusion import (
    CUSTOM_DIFFUSION_FILE,
    check_custom_diffusion_export,
    export_custom_diffusion,
)
from lorabench.errors import choice_error
from lorabench.models import save_components
from lorabench.sampling import sample_prompts, save_grid
from lorabench.utils.console import quiet_worker, record_worker_console
from lorabench.utils.cpus import end_with_parent

EXPORTS = {**EXPORT_FILES, "custom_diffusion": (CUSTOM_DIFFUSION_FILE, export_custom_diffusion)}


class SaveArtifacts(L.Callback):
    """At the end of training write ``adapter.safetensors`` (lorabench format) and the asked
    exports into ``dirpath``, from rank zero only, each file atomically; new tokens go to
    ``embeddings.safetensors`` (diffusers' textual-inversion format). In full training (no adapter,
    no tokens) write the whole model as a diffusers folder ``model/`` instead."""

    def __init__(self, dirpath: str, exports: Sequence[str] | str = ("diffusers",), base_model: str = ""):
        exports = [exports] if isinstance(exports, str) else list(exports)  # exports=kohya: one name ("k" before)
        for e in exports:
            if e not in EXPORTS:
                raise choice_error("exports", e, EXPORTS)
        self.dirpath, self.exports, self.base_model = Path(dirpath), list(exports), base_model

    def check(self, adapters) -> None:
        """Before training: each export can hold ``adapters`` (a Custom Diffusion file: UNet to_k/to_v only)."""
        if adapters is not None and "custom_diffusion" in self.exports:
            check_custom_diffusion_export(adapters)

    def expected_files(self, full: bool = False) -> list[str]:
        """The files ``on_train_end`` writes, relative to ``dirpath`` (what the main process reports,
        also when rank zero wrote them in a spawned worker)."""
        if full:
            return ["model"]
        return [ADAPTER_FILE, *(EXPORTS[e][0] for e in self.exports)]

    def expected(self, module) -> list[str]:
        """:meth:`expected_files` for a module: adapter files, ``embeddings.safetensors`` with new tokens."""
        if module.adapters is None and module.tokens is None:
            return ["model"]
        files = self.expected_files() if module.adapters is not None else []
        return files + (["embeddings.safetensors"] if module.tokens is not None else [])

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        self.write(pl_module.components, pl_module.adapters, pl_module.tokens, trainer.global_step)

    def write(self, components, adapters, tokens, global_step: int) -> None:
        """Write the files of one trained run (also each member of a batched run)."""
        if tokens is not None:  # diffusers' textual-inversion format
            tokens.save(self.dirpath / "embeddings.safetensors",
                        {"base_model": self.base_model, "global_step": str(global_step)})
        if adapters is None:
            if tokens is None:
                save_components(components, self.dirpath / "model")
            return
        write_adapter_files(adapters, self.dirpath, self.exports, base_model=self.base_model,
                            extra={"global_step": global_step}, export_files=EXPORTS)


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimiser steps (``train: 12/30``, with the loss). Lightning's own counts the
    batches of each epoch, and reads ``Epoch 29/-2`` when ``max_steps`` alone bounds a run of one-batch
    epochs. The fixed-noise validation before and after fitting (a second or two) has no bar."""

    @property
    def train_description(self) -> str:
        return "train"

    @staticmethod
    def total_steps(trainer) -> int | float:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else \
            convert_inf(trainer.estimated_stepping_batches)

    def init_train_tqdm(self) -> Tqdm:
        # as Lightning's, over the run's steps; a resumed run starts where it stopped
        return Tqdm(desc=self.train_description, total=self.total_steps(self.trainer), initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


class AdapterEMA(L.Callback):
    """An exponential moving average of the trained parameters (adapter factors, new tokens' rows; the
    optimiser's parameters): after each optimiser step ``ema <- decay * ema + (1 - decay) * param``
    (diffusers' ``EMAModel`` with a fixed decay, no warm-up), started from the initial values. When training
    ends the averages replace the weights, so the saved files, the after-fit validation loss and the last
    samples use them. Comes first among the callbacks (lorabench.run), before those that write files."""

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.shadow: list[torch.Tensor] = []
        self._step = -1

    def _params(self, trainer) -> list[torch.Tensor]:
        return [p for g in trainer.optimizers[0].param_groups for p in g["params"]]

    def on_train_start(self, trainer, pl_module) -> None:
        params = self._params(trainer)
        if len(self.shadow) != len(params):  # not restored from a checkpoint
            self.shadow = [p.detach().clone() for p in params]
        self.shadow = [s.to(p.device) for s, p in zip(self.shadow, params)]
        self._step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:  # an optimiser step happened (not only an accumulated batch)
            self._step = trainer.global_step
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self._params(trainer)], 1.0 - self.decay)

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        for p, s in zip(self._params(trainer), self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = list(state["shadow"])


class QuietSpawnedWorkers(L.Callback):
    """The main process's quiet console (:func:`lorabench.utils.console.quiet_cells`) in the workers of a
    spawning strategy (ddp_spawn), which start as new interpreters. Lightning pickles the trainer, its
    callbacks with it, into each worker; unpickling this one there, before the worker sets up its process
    group and logs its banners, silences the same expected warnings and joins the worker to the job's
    console log (:func:`lorabench.utils.console.record_worker_console`: rank zero's progress bar is in
    cli.log too), and makes the worker end with the process that spawned it
    (:func:`lorabench.utils.cpus.end_with_parent`: a job stopped by kill or timeout left its ranks waiting on
    each other, orphaned, holding the console's pipe). In the main process (a copy made by ``copy.deepcopy``
    included) it does nothing."""

    def __reduce__(self):  # unpickled by a call (pickle skips __setstate__ for an object with no attributes)
        return _unpickled_quiet, (os.getpid(),)


def _unpickled_quiet(pickled_in: int) -> QuietSpawnedWorkers:
    if os.getpid() != pickled_in:  # another process: a spawned worker
        end_with_parent(pickled_in)  # the process that pickled this spawned it (it may be gone already)
        record_worker_console()  # its bars, banners and warnings are the job's console: its cli.log too
        quiet_worker()
    return QuietSpawnedWorkers()


class LossHistory(L.Callback):
    """Per-step training losses and the step count, handed back through ``trainer.callback_metrics``:
    under a spawning strategy (ddp_spawn) the fit runs in worker processes and ``callback_metrics`` (with
    the weights) is the state Lightning returns from rank zero, so one code path serves both."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.start_step = 0

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step  # > 0 in a run resumed from a checkpoint

    def state_dict(self) -> dict:  # a resumed run reports the losses of its first part too
        return {"losses": torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"].unbind(0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float())  # on the device: moved once at the end, not a wait a step

    def on_train_end(self, trainer, pl_module):
        trainer.callback_metrics["run/steps"] = torch.tensor(float(trainer.global_step))
        trainer.callback_metrics["run/start_step"] = torch.tensor(float(self.start_step))
        trainer.callback_metrics["run/epoch"] = torch.tensor(float(trainer.current_epoch))
        trainer.callback_metrics["run/train_losses"] = \
            torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)


class ValidationSamples(L.Callback):
    """Images from fixed prompts and seeds while training (diffusers' ``validation_prompt``, kohya's
    ``--sample_prompts``): every ``every_n_steps`` optimiser steps (``None``: only at the end) and at the end
    of training, rank zero samples each prompt from each seed's initial latents (the same latents every
    time, so grids compare across steps) and writes ``<folder>/step<NNNNNN>.png``, one row per prompt and
    one column per seed, labelled; loggers that take images (W&B) get it too. Sampling uses its own
    generators and puts the model back in training mode: a run with samples trains the same adapter as
    one without."""

    def __init__(self, prompts: Sequence[str], seeds: Sequence[int], sampler: dict, folder: str | Path,
                 every_n_steps: int | None = None):
        self.prompts, self.seeds, self.sampler = list(prompts), list(seeds), dict(sampler)
        self.folder, self.every = Path(folder), every_n_steps
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step != self._last:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last:
            self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> None:
        step = self._last = trainer.global_step
        if not trainer.is_global_zero:
            return
        with torch.no_grad():
            images = sample_prompts(pl_module.components, {"progress": False, **self.sampler}, self.prompts,
                                    self.seeds, pl_module.device).cpu()
        pl_module.train()
        n = len(self.seeds)
        path = self.folder / f"step{step:06d}.png"
        save_grid(path, [images[i * n:(i + 1) * n] for i in range(len(self.prompts))], labels=self.prompts,
                  title=f"step {step}; columns: seeds {self.seeds}")
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="validation/samples", images=[str(path)], step=step, caption=[f"step {step}"])


class CheckpointEvaluation(L.Callback):
    """Evaluate the model being trained at chosen epochs, without changing the training run.

    ``evaluate(components) -> (scores, images)`` samples and scores the current model (e.g. FID, NFID
    and CLIP score of a style fine-tune). At the end of each epoch in ``epochs`` (1-based), rank zero
    evaluates, appends ``{"epoch", "step", **scores}`` to ``history``, logs the scores as
    ``<prefix>/<name>`` at step = epoch to ``loggers`` (the protocol's CSV / W&B, so every cell's curve
    lands in one run), keeps the images in ``images[epoch]`` and writes them as ``grid_dir/epoch<e>.png``.
    Sampling uses its own seeded generators and puts the model back in training mode, so a run evaluated
    at checkpoints trains the same weights as one that is not. ``measure(pl_module) -> {name: value}``,
    if given, adds diagnostics of the module itself (e.g. its update size) to each checkpoint's scores.
    """

    def __init__(self, epochs, evaluate, loggers=(), prefix: str = "checkpoints", grid_dir: str | None = None,
                 measure=None):
        self.epochs = sorted({int(e) for e in epochs})
        if not self.epochs or self.epochs[0] < 1:
            raise ValueError(f"checkpoint epochs must be >= 1, got {list(epochs)}")
        self.evaluate, self.loggers, self.prefix, self.measure = evaluate, list(loggers), prefix, measure
        self.grid_dir = Path(grid_dir) if grid_dir else None
        self.history: list[dict] = []
        self.images: dict = {}  # epoch -> images

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs or not trainer.is_global_zero:
            return
        with torch.no_grad():
            scores, images = self.evaluate(pl_module.components)
            if self.measure is not None:
                scores = {**scores, **self.measure(pl_module)}
        pl_module.train()
        self.images[epoch] = images
        self.history.append({"epoch": epoch, "step": int(trainer.global_step), **scores})
        for lg in self.loggers:
            lg.log_metrics({f"{self.prefix}/{k}": v for k, v in scores.items()}, step=epoch)
        if self.grid_dir is not None:
            path = self.grid_dir / f"epoch{epoch:04d}.png"
            save_grid(path, [images])
            for lg in self.loggers:
                if hasattr(lg, "log_image"):
                    lg.log_image(key=f"{self.prefix}/samples", images=[str(path)], step=epoch,
                                 caption=[f"epoch {epoch}"])
