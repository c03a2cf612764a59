"""Single-concept personalisation: fine-tune each concept with each adapter, sample, score, and
compare with the base model given the same prompts and the same initial noise.

This is the "single-concept" column of the Orthogonal Adaptation table and the main job of the
mini world (``lorabench`` with no arguments, conf/experiment/world_concepts.yaml):

    lorabench                                                  # 3 concepts x {lora, ortho, trilora}
    lorabench experiment=world_personalize                     # LoRA, 3 seeds (the acceptance check)
    lorabench protocol.concepts=[sks,uwu] protocol.adapters.lora.rank=8

One replicate = one (method, concept, seed): the seed drives training (noise, timesteps, adapter
init) and the initial latents of the samples, so the base model's rows vary with the seed too.
Every prompt of a replicate reuses the same ``images_per_prompt`` latents.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_path, write_json
from lorabench.utils.seeding import derive_seed

# Scores on the concept prompt itself ("a sks circle": does the model draw the identity?) and on the
# context prompts ("a sks circle at left on black": does it still follow the rest of the prompt?).
METRICS = ("identity_similarity", "identity_alignment", "image_alignment", "context_identity_similarity",
           "context_text_alignment")
LABELS = {"identity_similarity": "identity sim.", "identity_alignment": "identity align.",
          "image_alignment": "CLIP-I", "context_identity_similarity": "identity sim. in context",
          "context_text_alignment": "CLIP-T in context"}


def sample_seeds(seed: int, n: int) -> list[int]:
    """The initial-latent seeds of replicate ``seed``: the same for every prompt and every method."""
    return [derive_seed("single-concept-samples", seed, k) for k in range(n)]


def cell_config(cfg: DictConfig, adapter_cfg: DictConfig, concept: str, seed: int, cell_dir: Path) -> DictConfig:
    """The plain training config of one (adapter, concept, seed): the protocol's config with its adapter
    group swapped in. W&B stays with the protocol's own run; each cell logs to CSV in its folder."""
    cell = copy.deepcopy(cfg)
    with open_dict(cell):
        cell.adapter = copy.deepcopy(adapter_cfg)
        cell.data.concept = concept
        cell.seed = seed
        cell.paths.output_dir = str(cell_dir)
        cell.logger = {"wandb": None}
        cell.protocol = None
    return cell


def eval_device(cfg: DictConfig) -> torch.device:
    """Sample where the trainer trains (Lightning moves the module back to the CPU after fit)."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    return torch.device("cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")


def _sample(components, sampler_cfg: dict, prompts: list[str], seeds: list[int],
            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    from lorabench.sampling import Sampler

    for part in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        if part is not None:
            part.to(device).eval()
    sampler = Sampler(components, **sampler_cfg)
    return sampler([p for p in prompts for _ in seeds], seeds=[s for _ in prompts for s in seeds])


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {mean, std, n}}}`` over all replicates (concepts x seeds); population std."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        out[method] = {}
        for m in METRICS + ("train_s",):
            xs = [r[m] for r in sel if r.get(m) is not None]
            if xs:
                out[method][m] = {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "n": len(xs)}
    return out


def format_table(summary: dict, n_concepts: int, n_seeds: int) -> str:
    head = ["method"] + [LABELS[m] for m in METRICS] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [method]
        for m in METRICS + ("train_s",):
            v = s.get(m)
            fmt = "{:.1f}" if m == "train_s" else "{:.3f}"
            cells.append("-" if v is None else f"{fmt.format(v['mean'])} +- {fmt.format(v['std'])}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nmean +- std over {n_concepts} concept(s) x {n_seeds} seed(s); cosine similarities. First three "
                 "columns: the concept prompt (identity align. = share of samples within the identity threshold); "
                 "'in context': the concept in context prompts (CLIP-T against the prompt without the token).")
    return "\n".join(lines)


def score_samples(scorer, images: torch.Tensor, eval_set, n_img: int, references=None) -> dict[str, float]:
    """Scores of one replicate: the first prompt's ``n_img`` images (the concept prompt) and the
    context prompts' images (prefixed ``context_``). ``images`` is prompt-major, as _sample draws them.
    ``references``: the eval set's reference embeddings (``scorer.embed_references``), if already made."""
    texts = [t for t in eval_set.texts for _ in range(n_img)]
    refs = references if references is not None else scorer.embed_references(eval_set.references)
    out = scorer(images[:n_img], refs, texts[:n_img])
    if len(eval_set.prompts) > 1:
        ctx = scorer(images[n_img:], refs, texts[n_img:])
        out.update({f"context_{k}": v for k, v in ctx.items()})
    return out


def _grid(path: Path, panels: list[torch.Tensor]) -> None:
    from lorabench.sampling import image_grid

    width = max(len(p) for p in panels)
    rows = [torch.cat([p, torch.ones(width - len(p), *p.shape[1:])]) if len(p) < width else p for p in panels]
    with atomic_path(path) as tmp:
        image_grid(torch.cat(rows), rows=len(rows), scale=4).save(tmp, format="PNG")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md and samples.png."""
    from lorabench.loggers import build_loggers, finish_wandb
    from lorabench.run import train

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    p = cfg.protocol
    if cfg.get("adapter"):
        raise ConfigError("adapter", "this protocol trains protocol.adapters.<name>, not adapter; override "
                          "those instead (e.g. protocol.adapters.lora.rank=8)")
    adapters = dict(p.get("adapters") or {})
    if not adapters:
        raise ConfigError("protocol.adapters", "no adapters to compare; add e.g. /adapter@protocol.adapters.lora: lora")
    concepts, seeds = list(p.concepts or []), [int(s) for s in (p.seeds or [])]
    if not concepts:
        raise ConfigError("protocol.concepts", "empty; give at least one concept name")
    if not seeds:
        raise ConfigError("protocol.seeds", "empty; give at least one seed")
    ev = cfg.eval
    eval_sets = instantiate(ev.concepts)
    sets = {c: eval_sets(c) for c in concepts}  # unknown concept names fail here, before any training
    scorer = instantiate(ev.scorer)
    refs = {c: scorer.embed_references(sets[c].references) for c in concepts}
    sampler_cfg = OmegaConf.to_container(ev.sampler, resolve=True)
    n_img = int(ev.images_per_prompt)
    device = eval_device(cfg)

    rows: list[dict] = []
    base_identity: dict[tuple[str, int], float] = {}
    grids: dict[str, list[torch.Tensor]] = {c: [sets[c].references] for c in concepts}
    base = instantiate(cfg.model, _convert_="all")
    for c in concepts:
        for seed in seeds:
            imgs = _sample(base, sampler_cfg, sets[c].prompts, sample_seeds(seed, n_img), device)
            rows.append({"method": "base", "concept": c, "seed": seed,
                         **score_samples(scorer, imgs, sets[c], n_img, refs[c])})
            base_identity[c, seed] = rows[-1]["identity_similarity"]
            if seed == seeds[0]:
                grids[c].append(imgs)
    del base

    # Lightning's per-trainer banners ("GPU available", tips) would repeat for every cell.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    total = len(adapters) * len(concepts) * len(seeds)
    k = 0
    for name, acfg in adapters.items():
        for c in concepts:
            for seed in seeds:
                k += 1
                cell_dir = run_dir / "cells" / f"{name}-{c}-seed{seed}"
                results, module = train(cell_config(cfg, acfg, c, seed, cell_dir), cell_dir, config_name=f"{name}/{c}")
                imgs = _sample(module.components, sampler_cfg, sets[c].prompts, sample_seeds(seed, n_img), device)
                scores = score_samples(scorer, imgs, sets[c], n_img, refs[c])
                rows.append({"method": name, "concept": c, "seed": seed, **scores,
                             "steps": results["metrics"]["steps"], "train_s": results["timings"]["fit_s"],
                             "s_per_step": results["timings"]["s_per_step"]})
                if seed == seeds[0]:
                    grids[c].append(imgs)
                print(f"[{k}/{total}] {name} {c} seed {seed}: identity sim. {scores['identity_similarity']:.3f} "
                      f"(base {base_identity[c, seed]:.3f}), {results['metrics']['steps']} steps in "
                      f"{results['timings']['fit_s']:.0f} s", flush=True)
                del module

    summary = summarise(rows)
    by_concept = {c: summarise([r for r in rows if r["concept"] == c]) for c in concepts}
    table = format_table(summary, len(concepts), len(seeds))
    out = {"protocol": "single_concept", "concepts": concepts, "seeds": seeds, "methods": ["base", *adapters],
           "prompts": {c: sets[c].prompts for c in concepts}, "images_per_prompt": n_img, "sampler": sampler_cfg,
           "rows": rows, "summary": summary, "summary_by_concept": by_concept, "total_s": time.perf_counter() - t0,
           "config": OmegaConf.to_container(cfg, resolve=True)}
    write_json(run_dir / "results.json", out)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table + "\n")
    _grid(run_dir / "samples.png", [img for c in concepts for img in grids[c]])
    loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"single_concept-seed{seeds[0]}",
                            resolved_config=out["config"])
    try:
        flat = {f"single_concept/{m}/{k}": v["mean"] for m, s in summary.items() for k, v in s.items()}
        for lg in loggers:
            lg.log_metrics(flat, step=0)
            lg.save()
    finally:
        finish_wandb()
    out["table"] = table
    return out
