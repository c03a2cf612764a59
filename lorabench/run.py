"""The train task: build everything from the composed config, fit, write ``results.json``."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import diffusers
import lightning as L
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lorabench
from lorabench.adapters import read_safetensors
from lorabench.adapters.tokens import for_concept
from lorabench.errors import ConfigError
from lorabench.loggers import build_loggers, finish_wandb
from lorabench.training import DiffusionFineTuner, LossHistory, SaveArtifacts
from lorabench.utils.io import write_json


def _versions() -> dict[str, str]:
    return {"lorabench": lorabench.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "lightning": L.__version__, "python": platform.python_version()}


def _mean(xs: list[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def check_callbacks(callbacks: Optional[Mapping]) -> None:
    """Every entry of the ``callbacks`` group must be null or a config with a ``_target_``."""
    for name, spec in (callbacks or {}).items():
        if spec is not None and (not hasattr(spec, "get") or not spec.get("_target_")):
            raise ConfigError(f"callbacks.{name}", "needs a _target_ (a Lightning callback class) and its arguments, "
                              "e.g. callbacks=lr_monitor, or null to drop it")


def build_callbacks(callbacks: Optional[Mapping]) -> list[L.Callback]:
    """The user's Lightning callbacks from the ``callbacks`` config group (null entries dropped)."""
    check_callbacks(callbacks)
    return [instantiate(spec, _convert_="all") for spec in (callbacks or {}).values() if spec is not None]


def train(cfg: DictConfig, run_dir: str | Path, config_name: str = "train", components=None,
          prepare: Optional[Callable[[DiffusionFineTuner], None]] = None,
          callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], DiffusionFineTuner]:
    """Fine-tune one adapter as ``cfg`` says; writes and returns the results dict, and the trained module.

    ``components``: train on this model instead of building ``cfg.model`` (a protocol that changes the
    base weights between runs, e.g. a continual sequence); ``prepare(module)`` runs after the adapter is
    injected and before fitting (e.g. to initialise it); ``callbacks`` join the trainer's, and those of the
    ``callbacks`` config group."""
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
                                embeddings=for_concept(OmegaConf.to_container(cfg.embeddings, resolve=True),
                                                       cfg.data.get("concept")) if cfg.get("embeddings") else None,
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
    trainer = instantiate(cfg.trainer, logger=loggers, default_root_dir=str(run_dir), _convert_="all",
                          callbacks=[saver, history, *callbacks, *build_callbacks(cfg.get("callbacks"))])
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
        "adapter": module.adapters.adapter_type if module.adapters else ("none" if module.tokens else "full"),
        "adapter_config": module.adapters.config if module.adapters else None,
        "embeddings_config": module.tokens.config if module.tokens else None,
        "metrics": {
            "trainable_params": sum(p.numel() for pre in ("unet", "text_encoder", "text_encoder_2", "embeddings")
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
        "artifacts": saver.expected(module) if steps else [],
        "device": str(trainer.strategy.root_device) if steps else "cpu",  # the module is on the CPU after fit
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
