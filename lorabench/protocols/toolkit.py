"""What every protocol shares: cell configs, sampling with fixed seeds, summaries, tables and grids.

A protocol (single concept, single style, and the merge and continual protocols after them) is a
loop over *cells*, each one adapter trained on one dataset with one seed, followed by sampling
prompts from fixed initial latents and scoring them. The pieces of that loop that do not depend on
what is scored live here, so no protocol copies another.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from omegaconf import DictConfig, open_dict

from lorabench.utils.io import atomic_path
from lorabench.utils.seeding import derive_seed


def derive_seed_list(tag: str, seed: int, n: int) -> list[int]:
    """``n`` initial-latent seeds of replicate ``seed``: the same for every prompt and every method."""
    return [derive_seed(tag, seed, k) for k in range(n)]


def cell_config(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cell_dir: Path) -> DictConfig:
    """The plain training config of one cell: the protocol's config with its adapter group swapped in
    and ``data`` (e.g. ``{"concept": "sks"}``) set. W&B stays with the protocol's own run; each cell
    logs to CSV in its folder."""
    cell = copy.deepcopy(cfg)
    with open_dict(cell):
        cell.adapter = copy.deepcopy(adapter_cfg)
        for key, value in data.items():
            cell.data[key] = value
        cell.seed = seed
        cell.paths.output_dir = str(cell_dir)
        cell.logger = {"wandb": None}
        cell.protocol = None
    return cell


class EvalSetup(NamedTuple):
    """What a protocol scores with, built from ``cfg.eval`` before any training."""

    eval_sets: Any          # callable: item name -> its eval set (prompts, references)
    sets: dict[str, Any]    # {item: eval set}
    scorer: Any
    sampler: dict
    images_per_prompt: int
    device: torch.device


def eval_setup(cfg: DictConfig, items: Sequence[str], sets_key: str, scorer_key: str) -> EvalSetup:
    """Instantiate ``eval.<sets_key>`` and ``eval.<scorer_key>`` and build every item's eval set, so an
    unknown item name fails here, before any training."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ev = cfg.eval
    eval_sets = instantiate(ev[sets_key])
    sets = {i: eval_sets(i) for i in items}
    return EvalSetup(eval_sets, sets, instantiate(ev[scorer_key]), OmegaConf.to_container(ev.sampler, resolve=True),
                     int(ev.images_per_prompt), eval_device(cfg))


def eval_device(cfg: DictConfig) -> torch.device:
    """Sample where the trainer trains (Lightning moves the module back to the CPU after fit)."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    return torch.device("cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")


def sample_prompts(components, sampler_cfg: dict, prompts: Sequence[str], seeds: Sequence[int],
                   device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Every prompt from every seed's initial latents, prompt-major: (len(prompts) * len(seeds), 3, H, W)."""
    return sample_each(components, sampler_cfg, [p for p in prompts for _ in seeds],
                       [s for _ in prompts for s in seeds], device)


def sample_each(components, sampler_cfg: dict, prompts: Sequence[str], seeds: Sequence[int],
                device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """One image per prompt, prompt ``i`` from seed ``seeds[i]``'s initial latents: (len(prompts), 3, H, W)."""
    from lorabench.sampling import Sampler

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    eval_mode(components, device)
    return Sampler(components, **sampler_cfg)(list(prompts), seeds=list(seeds))


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    """``{mean, std, n}`` with the population std; empty for no values."""
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "n": len(xs)} if xs else {}


def summarise_rows(rows: list[dict], metrics: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {mean, std, n}}}`` over all rows of each method; population std."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        out[method] = {m: v for m in metrics if (v := mean_std([r[m] for r in sel if r.get(m) is not None]))}
    return out


def markdown_table(summary: dict, metrics: Sequence[str], labels: Mapping[str, str], note: str = "") -> str:
    """A markdown table of ``summary`` (rows: methods; cells: mean +- std), then ``note``."""
    head = ["method"] + [labels.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method]
        for m in metrics:
            v = s.get(m)
            fmt = "{:.1f}" if m.endswith("_s") else "{:.3f}"
            cells.append("-" if v is None else f"{fmt.format(v['mean'])} +- {fmt.format(v['std'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def save_grid(path: Path, panels: list[torch.Tensor]) -> None:
    """Rows of images (each panel one row, padded with white) as one PNG, written atomically."""
    from lorabench.sampling import image_grid

    width = max(len(p) for p in panels)
    rows = [torch.cat([p, torch.ones(width - len(p), *p.shape[1:])]) if len(p) < width else p for p in panels]
    with atomic_path(path) as tmp:
        image_grid(torch.cat(rows), rows=len(rows), scale=4).save(tmp, format="PNG")


def training_note(row: dict) -> str:
    """`` (400 steps, 55 s)`` for a trained cell's line, nothing for the base model's."""
    return f" ({row['steps']} steps, {row['train_s']:.0f} s)" if "train_s" in row else ""


def train_cells(cfg: DictConfig, run_dir: Path, adapters: Mapping[str, DictConfig], items: Sequence[str],
                seeds: Sequence[int], data_key: str, evaluate, progress, line) -> list[dict]:
    """Train every (adapter, item, seed) cell and score it.

    ``data_key``: the data field each item sets (``concept``, ``style``). ``evaluate(components, item,
    seed)`` returns the cell's scores; ``line(row)`` the line printed when it is done (``progress``).
    Each cell trains in ``run_dir/cells/<adapter>-<item>-seed<seed>`` and is dropped after scoring."""
    from lorabench.run import train

    rows = []
    for name, acfg in adapters.items():
        for item in items:
            for seed in seeds:
                cell_dir = run_dir / "cells" / f"{name}-{item}-seed{seed}"
                results, module = train(cell_config(cfg, acfg, {data_key: item}, seed, cell_dir), cell_dir,
                                        config_name=f"{name}/{item}")
                rows.append({"method": name, data_key: item, "seed": seed, **evaluate(module.components, item, seed),
                             "steps": results["metrics"]["steps"], "train_s": results["timings"]["fit_s"],
                             "s_per_step": results["timings"]["s_per_step"]})
                progress.done(line(rows[-1]))
                del module
    return rows


def config_hash(cfg: DictConfig, keys: Sequence[str], length: int = 12, extra: Mapping | None = None) -> str:
    """A hash of the config groups ``keys`` (resolved) and ``extra``, leaving out the trainer's display
    options: what decides a result, not where it is written or how it is shown."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys if k in cfg}
    keep["trainer"] = {k: v for k, v in (keep.get("trainer") or {}).items()
                       if k not in ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")}
    keep.update(extra or {})
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cell_key(cell: DictConfig) -> str:
    """A hash of everything that decides what a cell trains (model, adapter, data, optimiser, trainer,
    module, seed), not where it is written or logged: equal keys train equal adapters."""
    return config_hash(cell, ("model", "adapter", "data", "optim", "trainer", "module", "seed", "init_adapter"))


def eval_mode(components, device: torch.device | None = None) -> None:
    """Every part of the model in eval mode (and on ``device``), before sampling."""
    for part in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        if part is not None:
            (part.to(device) if device is not None else part).eval()


def cached_cell(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cache_root: Path,
                name: str) -> tuple[Path, bool]:
    """``(cell_dir, finished)``: where the cell trains (``cache_root/<name>-<key>/``) and whether a
    finished one is there (its results.json, the last thing training writes, and its adapter)."""
    probe = cell_config(cfg, adapter_cfg, data, seed, Path("."))
    cell_dir = Path(cache_root) / f"{name}-{cell_key(probe)}"
    return cell_dir, (cell_dir / "results.json").is_file() and (cell_dir / "adapter.safetensors").is_file()


def trained_cell(cfg: DictConfig, adapter_cfg: DictConfig, data: Mapping, seed: int, cache_root: Path,
                 name: str) -> tuple[Path, dict, bool]:
    """Train one cell into ``cache_root/<name>-<key>/`` unless a finished one is there already.

    Returns ``(cell_dir, training results, reused)``. An interrupted cell is trained again. Protocols and
    sweep jobs that share ``cache_root`` train each (adapter, concept, seed) once."""
    import json

    from lorabench.run import train

    cell_dir, finished = cached_cell(cfg, adapter_cfg, data, seed, cache_root, name)
    if finished:
        return cell_dir, json.loads((cell_dir / "results.json").read_text()), True
    results, module = train(cell_config(cfg, adapter_cfg, data, seed, cell_dir), cell_dir, config_name=name)
    del module
    return cell_dir, results, False


def _train_in_worker(resolved: dict, cell_dir: str, name: str, threads: int) -> str:
    from omegaconf import OmegaConf

    from lorabench.run import train
    from lorabench.utils.console import quiet_cells

    torch.set_num_threads(threads)
    with quiet_cells():
        train(OmegaConf.create(resolved), Path(cell_dir), config_name=name)
    return name


def pretrain_cells(cfg: DictConfig, cells: Sequence[tuple[DictConfig, Mapping, int, str]], cache_root: Path,
                   workers: int) -> set[str]:
    """Train the unfinished ``(adapter_cfg, data, seed, name)`` cells into the cache, ``workers`` at a
    time in spawned processes with ``cores // workers`` threads each (never more threads than cores:
    oversubscribed OpenMP runs several times slower). On 2 cores, two 1-thread processes train 1.4x the
    steps per second of one 2-thread process (docs/benchmarks.md). Returns the names trained here; the
    protocol then finds them finished, as :func:`trained_cell` does any cached cell. ``workers <= 1``
    trains nothing here (the protocol trains each cell when it reaches it)."""
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from omegaconf import OmegaConf

    if workers <= 1:
        return set()
    pending = []
    for adapter_cfg, data, seed, name in cells:
        cell_dir, finished = cached_cell(cfg, adapter_cfg, data, seed, cache_root, name)
        if not finished:
            resolved = OmegaConf.to_container(cell_config(cfg, adapter_cfg, data, seed, cell_dir), resolve=True)
            pending.append((resolved, str(cell_dir), name))
    if len(pending) < 2:
        return set()
    from lorabench.utils.console import CellProgress

    threads = max(1, (os.cpu_count() or 2) // workers)
    done = set()
    progress = CellProgress(len(pending), desc=f"training in {workers} processes")
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_train_in_worker, *job, threads) for job in pending]
            for fut in as_completed(futures):
                done.add(fut.result())
                progress.done(f"{fut.result():>24}: trained")
    finally:
        progress.close()
    return done


def protocol_inputs(cfg: DictConfig, items_key: str, example: str) -> tuple[dict, list[str], list[int]]:
    """The protocol's adapters, items (``protocol.<items_key>``) and seeds, checked before any work."""
    from lorabench.errors import ConfigError

    p = cfg.protocol
    if cfg.get("adapter"):
        raise ConfigError("adapter", "this protocol trains protocol.adapters.<name>, not adapter; override "
                          "those instead (e.g. protocol.adapters.lora.rank=8)")
    adapters = dict(p.get("adapters") or {})
    if not adapters:
        raise ConfigError("protocol.adapters", "no adapters to compare; add e.g. /adapter@protocol.adapters.lora: lora")
    items, seeds = list(p.get(items_key) or []), [int(s) for s in (p.get("seeds") or [])]
    if not items:
        raise ConfigError(f"protocol.{items_key}", f"empty; give at least one name (e.g. [{example}])")
    if len(set(items)) < len(items):
        raise ConfigError(f"protocol.{items_key}", f"lists a name twice: {items}")
    if not seeds:
        raise ConfigError("protocol.seeds", "empty; give at least one seed")
    return adapters, items, seeds


def write_protocol_outputs(cfg: DictConfig, run_dir: Path, name: str, out: dict, table: str,
                           panels: list[torch.Tensor], tables: Mapping[str, tuple] | None = None,
                           loggers: Sequence | None = None, step: int = 0,
                           images: Mapping[str, Path] | None = None) -> None:
    """results.json, table.md, samples.png, and the summary means to every configured logger (built
    here, or the run's own ``loggers`` if it logged along the way, at ``step``), then the W&B run ends;
    ``tables`` (``{key: (columns, rows)}``) and ``images`` (``{key: png}``, plus the sample grid as
    ``<name>/samples``) go to loggers that take them (W&B)."""
    from lorabench.loggers import build_loggers, finish_wandb
    from lorabench.utils.io import write_json

    write_json(run_dir / "results.json", out)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table + "\n")
    save_grid(run_dir / "samples.png", panels)
    if loggers is None:
        loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"{name}-seed{out['seeds'][0]}",
                                resolved_config=out["config"], job_type="merge" if name == "modular" else "eval")
    try:
        flat = {f"{name}/{m}/{k}": v["mean"] for m, s in out["summary"].items() for k, v in s.items()}
        for lg in loggers:
            lg.log_metrics(flat, step=step)
            if hasattr(lg, "log_table"):
                for key, (columns, data) in (tables or {}).items():
                    lg.log_table(key=f"{name}/{key}", columns=list(columns), data=[list(r) for r in data])
            if hasattr(lg, "log_image"):
                for key, path in {"samples": run_dir / "samples.png", **(images or {})}.items():
                    lg.log_image(key=f"{name}/{key}", images=[str(path)])
            lg.save()
    finally:
        finish_wandb()
