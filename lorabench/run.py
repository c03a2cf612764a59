"""The train task: build everything from the composed config, fit, write ``results.json``."""

from __future__ import annotations

import json
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import diffusers
import lightning as L
import torch
import transformers
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

import lorabench
from lorabench.adapters import inject_adapters, load_init_adapter
from lorabench.adapters.stacked import StackedAdapters, take_out
from lorabench.adapters.tokens import ConceptTokens, check_tokens_config, for_concept, inject_tokens
from lorabench.checks import adapter_file, check_callbacks, check_validation
from lorabench.errors import ConfigError, raised_by
from lorabench.loggers import build_loggers, finish_wandb, join_csv, previous_wandb_id, set_aside_csv
from lorabench.training import (
    AdapterEMA,
    DiffusionFineTuner,
    LossHistory,
    QuietSpawnedWorkers,
    SaveArtifacts,
    StepProgressBar,
    ValidationSamples,
)
from lorabench.training.batched import BatchedFineTuner, MemberEpochCallbacks, member_loaders
from lorabench.training.module import check_cuda_graph, check_tokens_reached
from lorabench.utils.console import first_process, note, share_console
from lorabench.utils.io import write_json


def _versions() -> dict[str, str]:
    return {"lorabench": lorabench.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "lightning": L.__version__, "python": platform.python_version()}


def _mean(xs: list[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def hand_over_clipping(module: DiffusionFineTuner, trainer_cfg: Mapping) -> dict[str, Any]:
    """With ``module.cuda_graph`` the module clips inside its captured step (Lightning clips only under
    automatic optimisation and refuses a clip value otherwise): the trainer's clipping moves to the module;
    returns the trainer keyword arguments that take it off the trainer."""
    if not module.cuda_graph:
        return {}
    module.graph_clip = (trainer_cfg.get("gradient_clip_val"), trainer_cfg.get("gradient_clip_algorithm"))
    return {"gradient_clip_val": None, "gradient_clip_algorithm": None}


def build_callbacks(callbacks: Optional[Mapping]) -> dict[str, L.Callback]:
    """The user's Lightning callbacks from the ``callbacks`` config group, by name (null entries dropped)."""
    check_callbacks(callbacks)
    return {name: instantiate(spec, _convert_="all") for name, spec in (callbacks or {}).items() if spec is not None}


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
    check_cuda_graph(cfg.get("module") or {}, cfg.trainer)
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
    if module.tokens is not None:
        check_tokens_reached(components, module.tokens, [caption for _, caption in datamodule.items])
    if module.prior_loss_weight != 1.0 and getattr(datamodule, "class_items", None) is None:
        # the weight of a loss no batch has (no class images): it changed nothing, without a word
        raise ConfigError("module.prior_loss_weight", f"{module.prior_loss_weight!r} with no class images: it weighs "
                                                      "the prior-preservation loss, which needs data.class_data_dir "
                                                      "and data.class_prompt; give them, or leave it 1.0")
    if cfg.get("init_adapter"):
        if module.adapters is None:
            raise ConfigError("init_adapter", "needs an adapter (adapter is null: full training)")
        load_init_adapter(module.adapters, adapter_file(cfg.init_adapter, "init_adapter"))
    if prepare is not None:
        prepare(module)
    t_loaded = time.perf_counter()

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume = resume_checkpoint(cfg.get("resume"), run_dir)
    wandb_id = None  # the W&B run of this run folder's part before it resumed
    if resume:
        own_folder = cfg.get("resume") is None
        wandb_id = previous_wandb_id(run_dir) if own_folder else None
        at = check_resume(resume, module, own_folder=own_folder)
        done = None if at is None else nothing_left(resume, at, cfg.trainer.get("max_steps"),
                                                    run_dir if own_folder else None)
        if done is not None:  # the same command again after the run ended: what it recorded, untouched
            note(f"lorabench: {run_dir} was trained to trainer.max_steps={at} already; nothing to do")
            return done, module
    saver = SaveArtifacts(str(run_dir), exports=cfg.get("exports") or [], base_model=components.model_id)
    saver.check(module.adapters)  # an export that cannot hold what trains: before the loggers and the fit
    # the first process only (under Lightning's ddp launcher each rank runs this with its LOCAL_RANK)
    earlier_csv = set_aside_csv(run_dir) if resume and first_process() else None
    loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"{config_name}-seed{cfg.seed}",
                            resolved_config=resolved, resume_id=wandb_id)
    history = LossHistory()
    validation = check_validation(OmegaConf.select(cfg, "eval.validation"))
    samples = ValidationSamples(folder=run_dir / "samples", **validation) if validation else None
    configured = build_callbacks(cfg.get("callbacks"))
    user = [*callbacks, *configured.values(), *([samples] if samples else [])]
    bar = [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) and \
        not any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in user) else []
    ema = [AdapterEMA(module.ema_decay)] if module.ema_decay is not None else []  # before the files are written
    spawn = spawning(cfg.trainer)
    quiet = [QuietSpawnedWorkers()] if spawn else []  # first: unpickled first in each worker
    # callbacks=checkpoints alone turns checkpointing on (Lightning refuses a ModelCheckpoint otherwise)
    checkpointing = {"enable_checkpointing": True} if any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint)
                                                           for c in user) else {}
    trainer = instantiate(cfg.trainer, logger=loggers, default_root_dir=str(run_dir), _convert_="all",
                          callbacks=[*quiet, *ema, saver, history, *user, *bar], **checkpointing,
                          **hand_over_clipping(module, cfg.trainer))
    # Validation (the fixed-noise loss) runs before and after fitting only: on few-image datasets an
    # epoch is a step or two, and Lightning's per-epoch validation would cost as much as training.
    has_val = bool(getattr(datamodule, "val_samples", 0))
    if spawn:
        # spawned workers receive the module by pickling; the default file-descriptor sharing fails on
        # the second spawn of a run (validate, then fit) with "unable to resize file"
        torch.multiprocessing.set_sharing_strategy("file_system")
        share_console()  # the workers add their console (rank zero's bar, warnings) to the run's cli.log
    val_losses = []

    def validate():  # the metric is synced over ranks in the module and returned via callback_metrics
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
        val_losses.append(float(trainer.callback_metrics["val/loss"]))

    try:
        if has_val:
            validate()
        t_fit = time.perf_counter()
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader(), ckpt_path=resume)
        fit_s = time.perf_counter() - t_fit
        fitted = dict(trainer.callback_metrics)  # read before validate() resets them
        if spawn and "run/steps" in fitted:
            follow_the_workers(trainer, fitted)
        if has_val:
            validate()
    except (MisconfigurationException, RuntimeError) as exc:
        # a configured callback refusing its options when the fit starts, or a metric it monitors that no step
        # logs (EarlyStopping on val/loss: lorabench validates before and after fitting only)
        name = raised_by(exc, configured)
        if name is None:
            raise
        raise ConfigError(f"callbacks.{name}", " ".join(str(exc).split())) from exc
    finally:
        if (cfg.get("logger") or {}).get("wandb"):  # this run's own W&B run (a protocol's run stays open),
            finish_wandb(exit_code=1 if sys.exc_info()[0] is not None else 0)  # failed when the run raised

    losses = [float(x) for x in fitted.get("run/train_losses", torch.zeros(0))]
    steps = int(fitted["run/steps"]) if "run/steps" in fitted else 0
    results = run_results(
        cfg, config_name, components, module.adapters, module.tokens,
        sum(p.numel() for pre in ("unet", "text_encoder", "text_encoder_2", "embeddings")
            for p in module.trainable_parameters(pre)),
        steps, losses, val_losses,
        {"load_s": t_loaded - t_start, "fit_s": fit_s, "s_per_step": fit_s / steps if steps else None,
         "total_s": time.perf_counter() - t_start,
         **({"cuda_graph": dict(module.graph_stats)} if module.cuda_graph else {})},
        saver.expected(module) if steps else [],
        str(trainer.strategy.root_device) if steps else "cpu")  # the module is on the CPU after fit
    if samples is not None:  # from the folder: under ddp_spawn the callback that wrote them ran in a worker
        results["samples"] = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "samples").glob("step*.png"))
    if trainer.is_global_zero:
        join_csv(run_dir, earlier_csv, int(fitted.get("run/start_step", 0)))
        write_json(run_dir / "results.json", results)
    return results, module


def spawning(trainer_cfg: Mapping) -> bool:
    """Whether a Trainer config's strategy starts new worker processes for each fit and validate (ddp_spawn)."""
    return "spawn" in str(trainer_cfg.get("strategy") or "")


def follow_the_workers(trainer: L.Trainer, fitted: dict) -> None:
    """Under ddp_spawn the fit's loops advance in the worker processes; Lightning sends back the weights and
    ``callback_metrics`` but not the loops' progress, so the main process's trainer would log the validation
    after fitting at step 0, epoch 0. Set the two counters its loggers read (private to Lightning: the step
    of a logged row, the epoch column) to where the workers ended, as in one process."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = int(fitted["run/steps"])
    trainer.fit_loop.epoch_progress.current.completed = int(fitted.get("run/epoch", 0))


def resume_checkpoint(resume, run_dir: Path) -> Optional[str]:
    """The Lightning checkpoint a run continues from: ``resume`` (a run folder, whose
    ``checkpoints/last.ckpt`` it takes, or a ``.ckpt`` file); with ``resume`` null, the run's own folder's
    ``checkpoints/last.ckpt`` when there is one (a rerun of the same command into a fixed
    ``hydra.run.dir``), else None (a fresh start)."""
    if resume is None:
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(str(resume))
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError("resume", f"{str(path)!r} does not exist; give a run folder with checkpoints/last.ckpt "
                          "(written with callbacks=checkpoints) or a .ckpt file")
    return str(path)


def nothing_left(path: str, at: int, max_steps, own_folder: Optional[Path]) -> Optional[dict[str, Any]]:
    """A resumed run whose checkpoint is at step ``at`` and that trains to ``max_steps``: None when steps are left
    (or the run counts epochs: ``max_steps`` -1); the results a finished run recorded in its ``own_folder`` when the
    same command runs again there (it wrote results.json with no step, no train loss and no files, and cut its
    metrics.csv to the validation rows); else a one-line error: a checkpoint past ``max_steps`` trains nothing."""
    if max_steps is None or int(max_steps) < 0 or at < int(max_steps):
        return None
    recorded = own_folder / "results.json" if own_folder is not None else None
    if recorded is not None and at == int(max_steps) and recorded.is_file():
        return json.loads(recorded.read_text())
    raise ConfigError("trainer.max_steps", f"{path!r} is at step {at}, so trainer.max_steps={max_steps} leaves nothing "
                                           f"to train: raise it to train on (e.g. trainer.max_steps={at + 100})")


def check_resume(path: str, module: DiffusionFineTuner, own_folder: bool = False) -> Optional[int]:
    """The checkpoint a run resumes from holds what this run trains: a file Lightning can read, the same adapter
    (type, rank, layers) and new tokens, each tensor of this run's shape. Lightning's own load said
    ``IndexError: pop from empty list`` for a file that is no checkpoint and raised torch's size mismatch, after the
    run folder was made, for another rank; another adapter type or fewer target layers loaded nothing of it (the
    module loads non-strictly: checkpoints hold the trained weights only) and failed on the optimiser's state.
    Read memory-mapped: the tensors' shapes, not their data. ``own_folder``: the run's own folder's last.ckpt,
    resumed because ``resume`` is null (the same command again). Returns the checkpoint's step; None for a file
    holding Python objects beyond those, which is not unpickled here."""
    where = (f"{path!r}, this run folder's own checkpoint (resume=null takes it)" if own_folder else repr(path))
    fresh = "; or train afresh in another folder (hydra.run.dir)" if own_folder else ""
    try:  # tensors, numbers, strings and containers: what lorabench's Lightning checkpoints hold
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return None  # other Python objects too (another tool's checkpoint): Lightning's own load judges it
    except Exception as exc:  # a zip or I/O error: no checkpoint
        fix = ("delete it to train from the start" if own_folder else
               "give a run folder with checkpoints/last.ckpt or a Lightning .ckpt file")
        raise ConfigError("resume", f"{where} is not a checkpoint torch can read ({type(exc).__name__}): "
                                    f"{fix}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError("resume", f"{where} is not a Lightning checkpoint (it holds no state_dict)")

    def trains(adapter, embeddings) -> str:
        what = (f"{adapter.get('name')} (rank {adapter.get('rank')})" if adapter.get("rank") else
                str(adapter.get("name"))) if adapter else "no adapter"
        return what + (f" with new tokens ({embeddings.get('name')})" if embeddings else "")

    mine = (module.adapters.config if module.adapters is not None else None,
            module.tokens.config if module.tokens is not None else None)
    theirs = (ckpt.get("lorabench_adapter"), ckpt.get("lorabench_embeddings"))
    kind = [((a or {}).get("name"), (a or {}).get("rank"), bool(e)) for a, e in (theirs, mine)]
    if "lorabench_adapter" in ckpt and kind[0] != kind[1]:  # a full fine-tune's checkpoint has no such key
        raise ConfigError("resume", f"{where} trained {trains(*theirs)}, this run trains {trains(*mine)}: resume "
                                    f"with the adapter it was trained with{fresh}")
    own = module.state_dict()
    other = [k for k in ckpt["state_dict"] if k not in own]
    if other:
        raise ConfigError("resume", f"{where} holds weights this run has no layer for ({len(other)}, e.g. "
                                    f"{other[0]!r}): resume with the targets it was trained with{fresh}")
    for key, value in ckpt["state_dict"].items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError("resume", f"{where}: {key!r} is {tuple(value.shape)}, this run's is "
                                        f"{tuple(own[key].shape)}: resume with the config it was trained with{fresh}")
    return int(ckpt.get("global_step", 0))


def run_results(cfg: DictConfig, config_name: str, components, adapters, tokens, trainable: int, steps: int,
                losses: Sequence[float], val_losses: Sequence[float], timings: dict, artifacts: list[str],
                device: str) -> dict[str, Any]:
    """The ``results.json`` of one trained run (also of each member of a batched one)."""
    k = max(1, min(5, len(losses) // 4))
    return {
        "config_name": config_name,
        "seed": int(cfg.seed),
        "model": components.name,
        "model_id": components.model_id,
        "adapter": adapters.adapter_type if adapters else ("none" if tokens else "full"),
        "adapter_config": adapters.config if adapters else None,
        "data": {k: v for k, v in (OmegaConf.to_container(cfg.data, resolve=True) or {}).items()
                 if k in ("name", "path", "folder", "concept", "instance_prompt")} if cfg.get("data") else None,
        "embeddings_config": tokens.config if tokens else None,
        "metrics": {
            "trainable_params": trainable,
            "steps": steps,
            "train_loss_first": _mean(list(losses[:k])),
            "train_loss_last": _mean(list(losses[-k:])),
            "val_loss_before": val_losses[0] if val_losses else None,
            "val_loss_after": val_losses[-1] if len(val_losses) > 1 else None,
        },
        "timings": timings,
        "artifacts": artifacts,
        "device": device,
        "versions": _versions(),
    }


def _peak_memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device))}
    import resource  # noqa: PLC0415  (POSIX; the process's peak resident set, in KiB on Linux)
    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def member_tokens(components, cfg: DictConfig, k: int) -> tuple[ConceptTokens, dict[str, str], dict]:
    """Member ``k``'s new tokens in a batched run: its run's tokens, renamed ``<name>#k`` so members that
    learn one concept (several seeds) sit side by side, and bound to no word: ``(tokens, rewrites, its
    run's token config)``, ``rewrites`` being what the member's own prompts get (its word -> its tokens).
    Their rows start as its run's do (from the init word, whatever the tokens are called); its file takes
    its run's config, so it names them as its run does."""
    own = check_tokens_config(for_concept(OmegaConf.to_container(cfg.embeddings, resolve=True),
                                          cfg.data.get("concept")))
    tokens = inject_tokens(components, {**own, "token": f"{own['token']}#{k}", "bind": False})
    return tokens, {own["bind"]: tokens.names[0]}, own  # the model reads a multi-vector token as all its vectors


def train_batched(cfgs: Sequence[DictConfig], run_dirs: Sequence[str | Path], config_names: Sequence[str],
                  member_callbacks: Optional[Sequence[Sequence[L.Callback]]] = None) -> list[dict[str, Any]]:
    """Train the runs ``cfgs`` (one adapter or new tokens each, of one batch: lorabench.protocols.cells.batch_key)
    in one pass, their K adapters stacked in one model (:mod:`lorabench.training.batched`). Each run's folder
    gets what :func:`train` writes (adapter.safetensors, its exports, its CSV log, results.json last) and
    the same adapter, to float rounding. ``member_callbacks[k]``: run ``k``'s own epoch-end callbacks, called
    with it alone in the model (:class:`~lorabench.training.batched.MemberEpochCallbacks`). Returns the runs'
    results; a run's ``timings.fit_s`` is its share of the pass (``timings.batched`` holds the whole pass
    and its peak memory). Lightning checkpoints are not written (they would hold every member at once)."""
    if not cfgs:
        return []
    t_start = time.perf_counter()
    check_cuda_graph(cfgs[0].get("module") or {}, cfgs[0].trainer)
    for key in ("snr_gamma", "ema_decay"):
        if (cfgs[0].get("module") or {}).get(key) is not None:
            raise ConfigError(f"module.{key}", "is for single runs; batched cells train without it (set it null or "
                              "train one cell at a time: protocol.batch_cells=1)")
    if (cfgs[0].get("module") or {}).get("gradient_checkpointing"):
        # the recomputed forward runs in backward, after the step's routing of samples to members has ended
        raise ConfigError("module.gradient_checkpointing", "batched cells cannot recompute activations (the "
                          "members' routing ends before backward); set it false or train one cell at a time "
                          "(protocol.batch_cells=1)")
    run_dirs = [Path(d) for d in run_dirs]
    cfg0 = cfgs[0]
    # the data first (checked before anything heavy; it draws nothing from the global RNG): members whose
    # data have different numbers of batches per epoch train in separate passes, one per length
    datamodules = [instantiate(cfg.data, _convert_="all").prepare() for cfg in cfgs]
    lengths = [len(dm.train_dataloader()) for dm in datamodules]
    if len(set(lengths)) > 1:
        out: list[Optional[dict]] = [None] * len(cfgs)
        for n in dict.fromkeys(lengths):
            idx = [i for i, m in enumerate(lengths) if m == n]
            part = train_batched([cfgs[i] for i in idx], [run_dirs[i] for i in idx], [config_names[i] for i in idx],
                                 [member_callbacks[i] for i in idx] if member_callbacks else None)
            for i, res in zip(idx, part):
                out[i] = res
        return out
    components, model_draws, members, states = None, False, [], []
    tokens, rewrites, own_tokens = [], [], []
    for i, cfg in enumerate(cfgs):
        # each member starts as its own run does: seeded, the model built, its data checked, its adapter
        # injected (initialised from the global RNG) and loaded, its tokens added; the RNG state it then
        # has, it keeps. Its adapter is taken out again to be stacked; its tokens stay, beside the others'.
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        if components is None:
            seeded = torch.get_rng_state()
            components = instantiate(cfg.model, _convert_="all")
            model_draws = not torch.equal(seeded, torch.get_rng_state())
        elif model_draws:  # building this model draws from the global RNG: draw what each run's build does
            instantiate(cfg.model, _convert_="all")
        adapters = inject_adapters(components, OmegaConf.to_container(cfg.adapter, resolve=True)) \
            if cfg.get("adapter") else None
        made = member_tokens(components, cfg, i) if cfg.get("embeddings") else (None, {}, None)
        tokens.append(made[0])
        rewrites.append(made[1])
        own_tokens.append(made[2])
        if cfg.get("init_adapter"):
            load_init_adapter(adapters, adapter_file(cfg.init_adapter, "init_adapter"))
        if adapters is not None:
            take_out(adapters)
            members.append(adapters)
        states.append(torch.get_rng_state())
    if members and len(members) != len(cfgs):
        raise ConfigError("adapter", "the members of a batched run all train an adapter, or none does")
    stacked = StackedAdapters(members) if members else None
    module = BatchedFineTuner(components, stacked, tokens, optim=OmegaConf.to_container(cfg0.optim, resolve=True),
                              seeds=[int(c.seed) for c in cfgs], rewrites=rewrites,
                              **OmegaConf.to_container(cfg0.get("module", {}) or {}, resolve=True))
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        module.step_loggers[i] = build_loggers(cfg.get("logger"), run_dir, run_name=f"{config_names[i]}-seed{cfg.seed}",
                                               resolved_config=OmegaConf.to_container(cfg, resolve=True))
    t_loaded = time.perf_counter()
    extra = [MemberEpochCallbacks(member_callbacks)] if member_callbacks else []
    trainer = instantiate(cfg0.trainer, logger=False, enable_checkpointing=False, default_root_dir=str(run_dirs[0]),
                          _convert_="all", callbacks=extra, **hand_over_clipping(module, cfg0.trainer))
    train_loaders = member_loaders([dm.train_dataloader() for dm in datamodules], states, train=True)
    has_val = all(getattr(dm, "val_samples", 0) for dm in datamodules)
    val_loaders = member_loaders([dm.val_dataloader() for dm in datamodules], states, train=False) if has_val else None
    device = trainer.strategy.root_device
    if device.type == "cuda":
        # CUDA is initialised lazily: in a process whose first CUDA call this is, the caching allocator has no
        # devices yet and resetting its statistics fails ("Invalid device argument", seen on an H200)
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    if has_val:
        trainer.validate(module, dataloaders=val_loaders, verbose=False)
    t_fit = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loaders)
    fit_s = time.perf_counter() - t_fit
    if has_val:
        trainer.validate(module, dataloaders=val_loaders, verbose=False)
    memory = _peak_memory(device)
    steps, k = int(trainer.global_step), len(cfgs)
    module.cpu()
    out = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        adapters = stacked.unstack(i) if stacked is not None else None
        saver = SaveArtifacts(str(run_dir), exports=cfg.get("exports") or [], base_model=components.model_id)
        if tokens[i] is not None:
            tokens[i].config = own_tokens[i]  # its file names the tokens as its run does
        saver.write(components, adapters, tokens[i], steps)
        for lg in module.step_loggers[i]:
            lg.save()
            lg.finalize("success")
        share = fit_s / k
        timings = {"load_s": (t_loaded - t_start) / k, "fit_s": share, "s_per_step": share / steps if steps else None,
                   "total_s": (time.perf_counter() - t_start) / k,
                   "batched": {"members": k, "fit_s": fit_s, "s_per_step": fit_s / steps if steps else None,
                               **memory, **({"cuda_graph": dict(module.graph_stats)} if module.cuda_graph else {})}}
        trainable = [*(adapters.trainable_parameters() if adapters is not None else []),
                     *(tokens[i].parameters() if tokens[i] is not None else [])]
        files = (saver.expected_files() if adapters is not None else []) + \
            (["embeddings.safetensors"] if tokens[i] is not None else [])
        results = run_results(cfg, config_names[i], components, adapters, tokens[i], sum(p.numel() for p in trainable),
                              steps, module.member_losses[i], module.member_val[i], timings,
                              files if steps else [], str(device) if steps else "cpu")
        write_json(run_dir / "results.json", results)
        out.append(results)
    if stacked is not None:
        stacked.remove()
    for t in reversed(tokens):
        if t is not None:
            t.remove()
    return out


def _fmt(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_one_line(results: dict[str, Any]) -> str:
    """A sweep job's result in a few words: a training run's steps and losses, or the protocol it ran."""
    m = results.get("metrics")
    if results.get("protocol") is not None or not isinstance(m, dict):  # a protocol's metrics are its own (a list)
        return f"{results.get('protocol') or 'protocol'} done"
    return (f"{m.get('steps')} steps, train loss {_fmt(m.get('train_loss_first'))} -> "
            f"{_fmt(m.get('train_loss_last'))}, val loss {_fmt(m.get('val_loss_before'))} -> "
            f"{_fmt(m.get('val_loss_after'))}")


def format_summary(results: dict[str, Any]) -> str:
    m, t = results["metrics"], results["timings"]
    f = _fmt

    rows = [("config", results["config_name"]), ("model", results["model"]),
            # Custom Diffusion has no rank (its weights train whole)
            ("adapter", f"{results['adapter']} (rank {results['adapter_config'].get('rank')})"
                        if (results["adapter_config"] or {}).get("rank") else results["adapter"]),
            ("trainable params", f"{m['trainable_params']:,}"), ("steps", str(m["steps"])),
            ("train loss first -> last", f"{f(m['train_loss_first'])} -> {f(m['train_loss_last'])}"),
            ("val loss (fixed noise) before -> after", f"{f(m['val_loss_before'])} -> {f(m['val_loss_after'])}"),
            ("s / step", f(t["s_per_step"], "{:.3f}")), ("total s", f(t["total_s"], "{:.1f}"))]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a:<{width}}  {b}" for a, b in rows)
