"""The callbacks every training run has: :class:`SaveArtifacts` (the adapter files), :class:`LossHistory`
(the losses results.json reports), and :class:`CheckpointEvaluation` (scores at chosen epochs). A user's
own callbacks come from the ``callbacks`` config group."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lorabench.adapters import ADAPTER_FILE, EXPORT_FILES, write_adapter_files
from lorabench.adapters.custom_diffusion import CUSTOM_DIFFUSION_FILE, export_custom_diffusion
from lorabench.errors import choice_error
from lorabench.models import save_components
from lorabench.sampling import save_grid

EXPORTS = {**EXPORT_FILES, "custom_diffusion": (CUSTOM_DIFFUSION_FILE, export_custom_diffusion)}


class SaveArtifacts(L.Callback):
    """At the end of training write ``adapter.safetensors`` (lorabench format) and the asked
    exports into ``dirpath``, from rank zero only, each file atomically; new tokens go to
    ``embeddings.safetensors`` (diffusers' textual-inversion format). In full training (no adapter,
    no tokens) write the whole model as a diffusers folder ``model/`` instead."""

    def __init__(self, dirpath: str, exports: Sequence[str] = ("diffusers",), base_model: str = ""):
        for e in exports:
            if e not in EXPORTS:
                raise choice_error("exports", e, EXPORTS)
        self.dirpath, self.exports, self.base_model = Path(dirpath), list(exports), base_model

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


class LossHistory(L.Callback):
    """Per-step training losses and the step count, handed back through ``trainer.callback_metrics``:
    under a spawning strategy (ddp_spawn) the fit runs in worker processes and ``callback_metrics`` (with
    the weights) is the state Lightning returns from rank zero, so one code path serves both."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float())  # on the device: moved once at the end, not a wait a step

    def on_train_end(self, trainer, pl_module):
        trainer.callback_metrics["run/steps"] = torch.tensor(float(trainer.global_step))
        trainer.callback_metrics["run/train_losses"] = \
            torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)


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
