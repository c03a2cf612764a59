"""The train task: build everything from the composed config, fit, write ``results.json``."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.adapters import read_safetensors
from lorabench.errors import ConfigError
from lorabench.loggers import build_loggers, finish_wandb
from lorabench.training import DiffusionFineTuner, SaveArtifacts
from lorabench.utils.io import write_json


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"lorabench": __import__("lorabench").__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "lightning": L.__version__, "python": platform.python_version()}


def _mean(xs: list[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


class LossHistory(L.Callback):
    """Per-step training losses and the step count, handed back through ``trainer.callback_metrics``:
    under a spawning strategy (ddp_spawn) the fit runs in worker processes and ``callback_metrics`` (with
    the weights) is the state Lightning returns from rank zero, so one code path serves both."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float().cpu())

    def on_train_end(self, trainer, pl_module):
        trainer.callback_metrics["run/steps"] = torch.tensor(float(trainer.global_step))
        trainer.callback_metrics["run/train_losses"] = torch.stack(self.losses) if self.losses else torch.zeros(0)


def train(cfg: DictConfig, run_dir: str | Path, config_name: str = "train", components=None,
          prepare: Optional[Callable[[DiffusionFineTuner], None]] = None,
          callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], DiffusionFineTuner]:
    """Fine-tune one adapter as ``cfg`` says; writes and returns the results dict, and the trained module.

    ``components``: train on this model instead of building ``cfg.model`` (a protocol that changes the
    base weights between runs, e.g. a continual sequence); ``prepare(module)`` runs after the adapter is
    injected and before fitting (e.g. to initialise it); ``callbacks`` join the trainer's."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    if components is None:
        components = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare()  # fail on bad data before anything heavy happens
    adapter = cfg.get("adapter")
    module = DiffusionFineTuner(components, adapter=OmegaConf.to_container(adapter, resolve=True) if adapter else None,
                                optim=OmegaConf.to_container(cfg.optim, resolve=True), seed=int(cfg.seed),
                                **OmegaConf.to_container(cfg.get("module", {}) or {}, resolve=True))
    if cfg.get("init_adapter"):
        if module.adapters is None:
            raise ConfigError("init_adapter", "needs an adapter (adapter is null: full training)")
        tensors, _ = read_safetensors(cfg.init_adapter)
        module.adapters.load_state_dict(tensors, source=f"init_adapter {str(cfg.init_adapter)!r}")
    if prepare is not None:
        prepare(module)
    t_loaded = time.perf_counter()

    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"{config_name}-seed{cfg.seed}",
                            resolved_config=resolved)
    saver = SaveArtifacts(str(run_dir), exports=list(cfg.get("exports") or []), base_model=components.model_id)
    history = LossHistory()
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=[saver, history, *callbacks], default_root_dir=str(run_dir),
                          _convert_="all")
    # Validation (the fixed-noise loss) runs before and after fitting only: on few-image datasets an
    # epoch is a step or two, and Lightning's per-epoch validation would cost as much as training.
    has_val = bool(getattr(datamodule, "val_samples", 0))
    if "spawn" in str(cfg.trainer.get("strategy", "")):
        # spawned workers receive the module by pickling; the default file-descriptor sharing fails on
        # the second spawn of a run (validate, then fit) with "unable to resize file"
        torch.multiprocessing.set_sharing_strategy("file_system")
    val_losses = []

    def validate():  # the metric is synced over ranks in the module and returned via callback_metrics
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
        val_losses.append(float(trainer.callback_metrics["val/loss"]))

    try:
        if has_val:
            validate()
        t_fit = time.perf_counter()
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        fit_s = time.perf_counter() - t_fit
        fitted = dict(trainer.callback_metrics)  # read before validate() resets them
        if has_val:
            validate()
    finally:
        if (cfg.get("logger") or {}).get("wandb"):
            finish_wandb()  # this run's own W&B run (a protocol's run stays open)

    losses = [float(x) for x in fitted.get("run/train_losses", torch.zeros(0))]
    k = max(1, min(5, len(losses) // 4))
    steps = int(fitted["run/steps"]) if "run/steps" in fitted else 0
    results = {
        "config_name": config_name,
        "seed": int(cfg.seed),
        "model": components.name,
        "model_id": components.model_id,
        "adapter": module.adapters.adapter_type if module.adapters else "full",
        "adapter_config": module.adapters.config if module.adapters else None,
        "metrics": {
            "trainable_params": sum(p.numel() for pre in ("unet", "text_encoder", "text_encoder_2")
                                    for p in module.trainable_parameters(pre)),
            "steps": steps,
            "train_loss_first": _mean(losses[:k]),
            "train_loss_last": _mean(losses[-k:]),
            "val_loss_before": val_losses[0] if val_losses else None,
            "val_loss_after": val_losses[-1] if len(val_losses) > 1 else None,
        },
        "timings": {
            "load_s": t_loaded - t_start,
            "fit_s": fit_s,
            "s_per_step": fit_s / steps if steps else None,
            "total_s": time.perf_counter() - t_start,
        },
        "artifacts": saver.expected_files(full=module.adapters is None) if steps else [],
        "device": str(module.device) if steps else "cpu",
        "versions": _versions(),
    }
    if trainer.is_global_zero:
        write_json(run_dir / "results.json", results)
    return results, module


def format_summary(results: dict[str, Any]) -> str:
    m, t = results["metrics"], results["timings"]

    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    rows = [("config", results["config_name"]), ("model", results["model"]),
            ("adapter", f"{results['adapter']} (rank {results['adapter_config'].get('rank')})"
                        if results["adapter_config"] else results["adapter"]),
            ("trainable params", f"{m['trainable_params']:,}"), ("steps", str(m["steps"])),
            ("train loss first -> last", f"{f(m['train_loss_first'])} -> {f(m['train_loss_last'])}"),
            ("val loss (fixed noise) before -> after", f"{f(m['val_loss_before'])} -> {f(m['val_loss_after'])}"),
            ("s / step", f(t["s_per_step"], "{:.3f}")), ("total s", f(t["total_s"], "{:.1f}"))]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a:<{width}}  {b}" for a, b in rows)
