"""Config checks that need no model, no data and no torch: the CLI runs them on the composed config
before the heavy imports, so a bad value is one line within a second (``lorabench.cli.precheck``); the
run repeats the ones its objects need (a protocol or a test may call them without the CLI)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from lorabench.errors import ConfigError, check_int, choice_error

OPTIMIZERS = ("adamw", "adamw8bit")
DEFAULT_OPTIM = {"name": "adamw", "lr": 1e-4, "text_encoder_lr": None, "embedding_lr": None, "weight_decay": 1e-2,
                 "betas": (0.9, 0.999), "eps": 1e-8, "lr_scheduler": "constant", "warmup_steps": 0}


# diffusers' learning-rate schedules that its training scripts offer (diffusers.optimization.SchedulerType less
# piecewise_constant, whose step rules no lorabench config passes: it failed inside the run with an AttributeError)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_optim(optim: Mapping, field: str = "optim", steps: Any = None) -> None:
    """Optimiser options that make no sense, as one-line errors (``<field>.<key>``) before any work;
    keys not given take DEFAULT_OPTIM's values. ``steps``: the run's ``trainer.max_steps`` as configured, against
    which the warm-up is checked (:func:`check_warmup`)."""
    optim = {**DEFAULT_OPTIM, **dict(optim)}

    def bad(key, what):
        return ConfigError(f"{field}.{key}", f"{what}, got {optim.get(key)!r}")

    def number(key):
        v = optim.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if optim.get("name", "adamw") not in OPTIMIZERS:
        raise choice_error(f"{field}.name", optim.get("name"), OPTIMIZERS)
    if not (number("lr") or 0) > 0:
        raise bad("lr", "must be a number > 0")
    for key in ("text_encoder_lr", "embedding_lr"):
        if optim.get(key) is not None and not (number(key) or 0) > 0:
            raise bad(key, "must be null (same as lr) or a number > 0")
    if number("weight_decay") is None or optim["weight_decay"] < 0:
        raise bad("weight_decay", "must be a number >= 0")
    if number("eps") is None or optim["eps"] <= 0:
        raise bad("eps", "must be a number > 0")
    betas = optim.get("betas")
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise bad("betas", "must be two numbers in [0, 1)")
    if not isinstance(optim.get("warmup_steps"), int) or optim["warmup_steps"] < 0:
        raise bad("warmup_steps", "must be an integer >= 0")
    if optim["lr_scheduler"] not in LR_SCHEDULES:
        raise choice_error(f"{field}.lr_scheduler", optim["lr_scheduler"], LR_SCHEDULES)
    if optim["warmup_steps"] and optim["lr_scheduler"] == "constant":  # diffusers' constant schedule drops it
        raise ConfigError(f"{field}.warmup_steps", f"{optim['warmup_steps']} with lr_scheduler constant, which has no "
                          f"warm-up (it would be ignored); use {field}.lr_scheduler=constant_with_warmup, or leave "
                          "warmup_steps at 0")
    check_warmup(optim, steps, field)


def check_warmup(optim: Mapping, steps: Any, field: str = "optim") -> None:
    """A warm-up as long as the run (``warmup_steps >= steps``) ends training before the learning rate reaches
    ``lr`` (and a decaying schedule never decays): a one-line ``<field>.warmup_steps`` error. ``steps`` that is no
    integer of at least 1 (null, -1: no step limit, the run counts them from its epochs and checks again; an
    interpolation): nothing to check."""
    warmup = optim.get("warmup_steps") or 0
    if isinstance(steps, int) and steps > 0 and warmup >= steps:
        run = f"{steps} optimiser step{'s' * (steps > 1)}"
        raise ConfigError(f"{field}.warmup_steps", f"{warmup} warm-up steps in a run of {run}: the learning rate "
                          f"would never reach {field}.lr; give fewer warm-up steps or more steps")


def check_group_rates(cfg: Mapping) -> None:
    """A run's ``optim.text_encoder_lr`` when it trains no text-encoder weights, or ``optim.embedding_lr`` when it
    learns no new tokens: the rate applied to nothing, without a word. Not for a protocol, whose one optim serves
    methods with and without them (e.g. Orthogonal Adaptation's token rate, unused by its plain LoRA)."""
    protocol, optim = cfg.get("protocol"), cfg.get("optim") or {}
    if protocol and protocol.get("_target_"):
        return
    adapter, embeddings, module = cfg.get("adapter"), cfg.get("embeddings"), cfg.get("module") or {}
    if optim.get("text_encoder_lr") is not None:
        trains = adapter.get("text_encoder_targets") if adapter else not embeddings and module.get("train_text_encoder")
        if not trains:
            raise ConfigError("optim.text_encoder_lr", "set, but this run trains no text-encoder weights; adapt them "
                              "(adapter.text_encoder_targets=[q_proj,k_proj,v_proj,out_proj]) or, with no adapter, "
                              "train them in full (module.train_text_encoder=true), or leave it null")
    if optim.get("embedding_lr") is not None and not embeddings:
        raise ConfigError("optim.embedding_lr", "set, but this run learns no new tokens (embeddings=textual_inversion "
                          "or embeddings=pplus adds them); leave it null")


# the sampling schedulers by name (lorabench.sampling builds them), and "pipeline": the model's own
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


def check_counts(options: Mapping, field: str) -> None:
    """Each ``options[key]`` that is set must be an integer >= 1 (a one-line ``<field>.<key>`` error)."""
    for key, v in options.items():
        if v is not None:
            check_int(v, f"{field}.{key}", minimum=1)


def check_sampler(sampler: Optional[Mapping], field: str) -> None:
    """A sampler's options, named where the config sets them (``<field>.scheduler``, ...): a scheduler
    lorabench builds, and step and batch counts >= 1."""
    sampler = sampler or {}
    name = sampler.get("scheduler")
    if name is not None and name not in (*SCHEDULERS, "pipeline"):
        raise choice_error(f"{field}.scheduler", name, (*SCHEDULERS, "pipeline"))
    check_counts({k: sampler.get(k) for k in ("num_inference_steps", "batch_size")}, field)


def check_protocol_groups(cfg: Mapping) -> None:
    """A protocol takes its adapters from its own block: a top-level ``adapter`` or ``embeddings`` group
    beside it would be trained by no cell (or silently ignored), so either is a one-line error naming
    where this protocol's adapters are set: ``protocol.adapter`` (one per task), ``protocol.adapters.<name>``
    (one per compared method) or the adapter files it reads (``protocol.adapters`` / ``protocol.inputs``). So is
    a single run's ``resume`` or ``eval.validation.prompts``, which no cell takes."""
    protocol = cfg.get("protocol")
    if not protocol or not protocol.get("_target_"):  # no protocol runs (a block without one is checked by parts)
        return
    adapters = protocol.get("adapters")
    if "adapter" in protocol:
        what, advice = "trains protocol.adapter", "override that instead (e.g. protocol.adapter.rank=8)"
    elif hasattr(adapters, "items"):
        what, advice = "trains protocol.adapters.<name>", "override those instead (e.g. protocol.adapters.lora.rank=8)"
    else:
        files = "protocol.inputs" if "inputs" in protocol else "protocol.adapters"
        what, advice = f"reads adapter files ({files}=[a.safetensors,...])", "leave the group out"
    for key in ("adapter", "embeddings"):
        if cfg.get(key):
            raise ConfigError(key, f"this protocol {what}, not {key}; {advice}")
    # a single training run's options that no cell takes (cell_config sets both to null): they changed nothing
    if cfg.get("resume") is not None:
        raise ConfigError("resume", "continues a single training run from its checkpoint; a protocol's run has none: "
                          "the same command again keeps its finished cells (a sequence: its finished tasks), and with "
                          "callbacks=checkpoints a stopped cell resumes in its own folder")
    if ((cfg.get("eval") or {}).get("validation") or {}).get("prompts"):
        raise ConfigError("eval.validation.prompts", "samples while a single run trains; a protocol's cells are "
                          "sampled and scored by the protocol (its table and samples.png); leave it empty")


def check_callbacks(callbacks: Optional[Mapping]) -> None:
    """Every entry of the ``callbacks`` group must be null or a config with a ``_target_``."""
    for name, spec in (callbacks or {}).items():
        if spec is not None and (not hasattr(spec, "get") or not spec.get("_target_")):
            raise ConfigError(f"callbacks.{name}", "needs a _target_ (a Lightning callback class) and its arguments, "
                              "e.g. callbacks=lr_monitor, or null to drop it")


# The data groups' counts and their least values: checked from the config, before any work (a protocol's cells
# build their data only after the base model is scored: data.n=0 was found there, as an empty data.path)
DATA_MINIMUMS = {"n": 1, "batch_size": 1, "val_samples": 0, "repeats": 1, "num_workers": 0, "max_train_samples": 1}


def check_data_counts(data: Optional[Mapping], field: str = "data") -> None:
    """Each count of :data:`DATA_MINIMUMS` the data group (at ``field``) has: an integer at least its least value
    (or null)."""
    for key, minimum in DATA_MINIMUMS.items():
        if data is not None and data.get(key) is not None:
            check_int(data.get(key), f"{field}.{key}", minimum=minimum)


def check_trainer_limits(trainer: Mapping, field: str = "trainer") -> None:
    """What Lightning's Trainer takes but trains wrongly with: ``gradient_clip_val`` below 0 (torch clips to a
    negative norm by flipping every gradient: each step climbs the loss), and no step limit with no epoch limit
    (``max_steps: -1`` with ``max_epochs: -1``: training without end, whose schedule raised OverflowError)."""
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (_kind(clip) is None or clip < 0):
        raise ConfigError(f"{field}.gradient_clip_val",
                          f"must be null or 0 (no clipping) or a number > 0, got {clip!r}")
    if trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs") == -1:
        raise ConfigError(f"{field}.max_steps", "-1 (no step limit) with max_epochs=-1 (no epoch limit) trains without "
                          f"end; give a step budget ({field}.max_steps=N) or an epoch budget ({field}.max_epochs=N)")


def _kind(value) -> Optional[str]:
    """``"integer"`` or ``"number"`` for a numeric config value (booleans are not numbers), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "integer"
    return "number" if isinstance(value, float) else None


# Numeric fields that also take a word; their own checks (after the imports) say which words.
WORD_VALUES = {"protocol.batch_cells": ("auto",), "protocol.eval_batch": ("auto",), "trainer.devices": ("auto",)}


def check_override_types(base: DictConfig, overrides: Iterable[tuple[str, list[Any]]]) -> None:
    """Each ``(key, values)`` given on the command line against the type of ``key``'s value in ``base`` (the
    config composed without them): a numeric field does not take a word (``trainer.max_steps: expected an
    integer, got 'ten'``), except the words of :data:`WORD_VALUES`, and a switch takes true or false (or null):
    ``data.center_crop=maybe`` cropped, being a non-empty word; a group of options does not take one value
    (``protocol.method=magmax`` for ``protocol.method.name=magmax``: before, a traceback). Numbers of the
    other kind (a float for an integer field) are left to the field's own check, since some take both
    (``trainer.limit_train_batches``)."""
    for key, values in overrides:
        default = OmegaConf.select(base, key, default=None, throw_on_resolution_failure=False)
        if isinstance(default, DictConfig) and len(default):  # a group of options: a word would replace them all
            wrong = [v for v in values if isinstance(v, (str, int, float))]
            if wrong:
                first = next(iter(default))
                raise ConfigError(key, f"holds options ({', '.join(map(str, default))}), not one value: set one "
                                       f"of them, e.g. {key}.{first}={wrong[0]}")
            continue
        if isinstance(default, bool):  # a switch: a word or number would be taken as its truth value
            wrong = [v for v in values if v is not None and not isinstance(v, bool)]
            if wrong:
                raise ConfigError(key, f"expected true or false, got {wrong[0]!r}")
            continue
        want = _kind(default)
        if want is None or key in WORD_VALUES:
            continue
        for v in values:
            if isinstance(v, str):
                raise ConfigError(key, f"expected an {want}, got {v!r}" if want == "integer"
                                  else f"expected a {want}, got {v!r}")


def check_validation(validation: Optional[Mapping], field: str = "eval.validation") -> Optional[dict]:
    """``eval.validation`` as a dict of the sample callback's arguments, or None when it asks for no samples:
    prompts a list of strings, seeds a non-empty list of integers, every_n_steps null or an integer >= 1."""
    if not validation:
        return None
    v = OmegaConf.to_container(validation, resolve=True) if OmegaConf.is_config(validation) else dict(validation)
    prompts = v.get("prompts") or []
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{field}.prompts", f"must be a list of prompts (strings), got {prompts!r}")
    if not prompts:  # no samples (prompts=[] turns the quickstart's off: its every_n_steps stays)
        return None
    seeds = v.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(_kind(s) == "integer" for s in seeds):
        raise ConfigError(f"{field}.seeds", f"must be a non-empty list of integers, got {seeds!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # one grid column and one image file per seed: a repeated seed overwrote its own image
        raise ConfigError(f"{field}.seeds", f"lists seed {twice[0]} twice; each seed is one grid column, got {seeds!r}")
    check_sampler(v.get("sampler"), f"{field}.sampler")
    every = v.get("every_n_steps")
    if every is not None and (_kind(every) != "integer" or every < 1):
        raise ConfigError(f"{field}.every_n_steps", f"must be null (at the end only) or an integer >= 1, got {every!r}")
    return {"prompts": list(prompts), "seeds": list(seeds), "every_n_steps": every,
            "sampler": dict(v.get("sampler") or {})}


def check_snr_ema(snr_gamma, ema_decay) -> None:
    """``module.snr_gamma`` (null or a number > 0) and ``module.ema_decay`` (null or a number in (0, 1))."""
    if snr_gamma is not None and not (_kind(snr_gamma) and snr_gamma > 0):
        raise ConfigError("module.snr_gamma", f"must be null (off) or a number > 0 (5.0 in the paper), "
                          f"got {snr_gamma!r}")
    if ema_decay is not None and not (_kind(ema_decay) and 0 < ema_decay < 1):
        raise ConfigError("module.ema_decay", f"must be null (off) or a number in (0, 1), e.g. 0.999, "
                          f"got {ema_decay!r}")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_model_source(pretrained: str) -> None:
    """``model.pretrained``: a diffusers model folder (with ``unet/``) or a hub id ``owner/name``."""
    if not pretrained:
        raise ConfigError("model.pretrained", "empty; give a hub id (owner/name) or a local folder")
    if os.path.exists(pretrained):
        if not os.path.isdir(pretrained):
            raise ConfigError("model.pretrained", f"{pretrained!r} is a file; expected a diffusers model folder")
        if not (Path(pretrained) / "unet").is_dir():
            raise ConfigError("model.pretrained",
                              f"folder {pretrained!r} has no unet/ subfolder; expected a diffusers model folder")
        return
    if pretrained.startswith((".", "/", "~")) or not _HUB_ID.match(pretrained):
        raise ConfigError("model.pretrained",
                          f"{pretrained!r} is neither an existing folder nor a hub id of the form owner/name")


def check_part_source(source: str, field: str, hint: str) -> None:
    """A model part in place of the model's own (``model.vae``, ``model.unet``): a folder with ``config.json``, or
    a hub id ``owner/name``; else a ConfigError naming ``field``, then ``hint`` (what to give)."""
    if os.path.exists(source) or str(source).startswith((".", "/", "~")):
        if not os.path.isdir(source):
            raise ConfigError(field, f"{source!r} {'is a file' if os.path.exists(source) else 'does not exist'}; "
                                     f"{hint}")
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(field, f"folder {source!r} has no config.json; {hint}")
    elif not _HUB_ID.match(str(source)):
        raise ConfigError(field, f"{source!r} is neither an existing folder nor a hub id of the form owner/name; "
                                 f"{hint}")


def check_data_path(path, field: str = "data.path") -> Path:
    """An image folder or a ``.parquet`` file that exists."""
    if not path:
        raise ConfigError(field, "not set; give a folder of images (e.g. data.path=/path/to/images)")
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise ConfigError(field, f"parquet file {str(path)!r} does not exist")
    elif not path.is_dir():
        raise ConfigError(field, f"image folder {str(path)!r} does not exist (give a folder or a .parquet file)")
    return path


ADAPTER_FILE = "adapter.safetensors"  # lorabench's own file in a run folder (lorabench.adapters.io writes it)
# diffusers' default LoRA file name: a diffusers training script's output folder holds it, load_lora_weights reads it
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"  # a run's new tokens (lorabench.adapters.tokens writes it)
EMBEDDINGS_DIR = "embeddings"  # a merge run's: its inputs' token files, one per concept
DIFFUSERS_EMBEDDINGS_FILE = "learned_embeds.safetensors"  # diffusers' textual-inversion script's output folder's


def run_embeddings(path) -> list[Path]:
    """A run folder's new tokens: a training run's ``embeddings.safetensors``, a merge run's token files (its inputs',
    under ``embeddings/``), else a diffusers textual-inversion output folder's ``learned_embeds.safetensors``; none
    where ``path`` is a file or a folder without them."""
    run = Path(os.path.expanduser(str(path)))
    if not run.is_dir():
        return []
    own = [run / EMBEDDINGS_FILE] if (run / EMBEDDINGS_FILE).is_file() else []
    found = own + sorted(p for p in (run / EMBEDDINGS_DIR).glob("*.safetensors") if p.is_file())
    return found or ([run / DIFFUSERS_EMBEDDINGS_FILE] if (run / DIFFUSERS_EMBEDDINGS_FILE).is_file() else [])


def folder_adapter(folder) -> Optional[Path]:
    """The adapter file a folder stands for: a lorabench run's ``adapter.safetensors``, else diffusers'
    ``pytorch_lora_weights.safetensors`` (a diffusers training script's output folder, as ``load_lora_weights``
    reads a folder); None where it holds neither."""
    folder = Path(os.path.expanduser(str(folder)))
    return next((folder / name for name in (ADAPTER_FILE, DIFFUSERS_LORA_FILE) if (folder / name).is_file()), None)


def adapter_file(path, field: str) -> Path:
    """An adapter file (lorabench, diffusers or kohya ``.safetensors``) or a folder, which stands for its
    :func:`folder_adapter`: the file, checked to exist and to start with a safetensors header (read here without
    torch, so a wrong file is one line naming ``field`` before a model loads)."""
    given = str(path)
    p = Path(os.path.expanduser(given))
    if p.is_dir():
        found = folder_adapter(p)
        if found is None:
            raise ConfigError(field, f"{given!r} is a folder without {ADAPTER_FILE} or {DIFFUSERS_LORA_FILE}: give an "
                                     "adapter file (lorabench, diffusers or kohya .safetensors) or a run folder that "
                                     "holds one")
        p = found
    elif not p.is_file():
        raise ConfigError(field, f"adapter file {given!r} does not exist")
    try:
        with open(p, "rb") as f:
            size = int.from_bytes(f.read(8), "little")  # the format: 8 bytes of header length, then a JSON header
            if not 2 <= size <= p.stat().st_size - 8:
                raise ValueError(size)
            if not isinstance(json.loads(f.read(size)), dict):
                raise ValueError("header")
    except (OSError, ValueError) as exc:  # a JSON or UTF-8 decoding error is a ValueError
        raise ConfigError(field, f"{str(p)!r} is not a safetensors file ({type(exc).__name__} reading its header): "
                                 "give an adapter file (lorabench, diffusers or kohya .safetensors)") from None
    return p


def check_writable(path, field: str, hint: str = "") -> Path:
    """A folder a job writes in (``paths.output_root``, a cell cache): a folder, or one that can be made, where
    this user can write. Tried by writing a scratch file in the folder, or in the nearest folder above it that
    exists (a folder it made itself another job could be using); nothing is left behind. ``hint``: where else
    the value may come from (an environment variable)."""
    folder = Path(os.path.expanduser(str(path)))
    there = folder
    while not there.exists() and there != there.parent:
        there = there.parent
    also = f" ({hint})" if hint else ""
    if not there.is_dir():
        raise ConfigError(field, f"{str(there)!r} is a file, not a folder: give a folder to write in{also}")
    try:
        handle, scratch = tempfile.mkstemp(dir=there, prefix=".lorabench-write-check-")
        os.close(handle)
        os.unlink(scratch)
    except OSError as exc:
        what = "" if there == folder else f"cannot make {str(folder)!r}: "
        raise ConfigError(field, f"{what}cannot write in {str(there)!r} ({exc.strerror}): give a folder this user "
                                 f"can write in{also}") from None
    return folder


def check_weights(weights, n: int, files: str = "protocol.inputs") -> list[float] | None:
    """``protocol.weights`` (the merge and sample jobs): null (each of the ``n`` files of the field ``files`` as
    it is) or one number per file."""
    if weights is None:
        return None
    if isinstance(weights, (int, float)) or not hasattr(weights, "__len__") or isinstance(weights, str) \
            or len(weights) != n or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        given = OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights
        if n == 0:
            raise ConfigError("protocol.weights", f"scales the files of {files}, which lists none: give those "
                                                  f"files, or leave the weights null (got {given!r})")
        raise ConfigError("protocol.weights", f"must be null or a list of {n} numbers, one per file of {files}, "
                                              f"got {given!r}")
    return [float(w) for w in weights]
