"""Callbacks that write the run's artefacts."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from lorabench.adapters import export_diffusers, export_kohya, save_adapter
from lorabench.errors import choice_error
from lorabench.models import save_components

EXPORTS = {"diffusers": ("pytorch_lora_weights.safetensors", export_diffusers),
           "kohya": ("kohya_lora.safetensors", export_kohya)}


class SaveArtifacts(L.Callback):
    """At the end of training write ``adapter.safetensors`` (lorabench format) and the asked
    exports into ``dirpath``, from rank zero only, each file atomically. In full training
    (no adapter) write the whole model as a diffusers folder ``model/`` instead."""

    def __init__(self, dirpath: str, exports: Sequence[str] = ("diffusers",), base_model: str = ""):
        for e in exports:
            if e not in EXPORTS:
                raise choice_error("callbacks.save_adapter.exports", e, EXPORTS)
        self.dirpath, self.exports, self.base_model = Path(dirpath), list(exports), base_model
        self.written: list[Path] = []

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        adapters = pl_module.adapters
        if adapters is None:
            self.written = [save_components(pl_module.components, self.dirpath / "model")]
            return
        self.written = [save_adapter(adapters, self.dirpath / "adapter.safetensors", base_model=self.base_model,
                                     extra={"global_step": trainer.global_step})]
        for e in self.exports:
            filename, fn = EXPORTS[e]
            self.written.append(fn(adapters, self.dirpath / filename))
