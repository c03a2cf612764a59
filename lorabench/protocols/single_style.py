"""Single-style personalisation: fine-tune each style on its few images with each adapter, then ask
for objects the style set never showed, and retrieve the samples' style among every experiment style.

The base model gets the same prompts without the style word (it has never seen the word): its
retrieval rate is the chance level a style adapter must beat.

    lorabench experiment=world_style                           # LoRA on 3 styles x 3 seeds
    lorabench experiment=world_style protocol.styles=[vango] protocol.adapters.lora.rank=8

One replicate = one (method, style, seed); the seed drives training and the initial latents.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.protocols.toolkit import (derive_seed_list, eval_setup, markdown_table, protocol_inputs,
                                         sample_prompts, summarise_rows, train_cells, training_note,
                                         write_protocol_outputs)
from lorabench.utils.console import CellProgress, quiet_cells

METRICS = ("style_top1", "style_similarity", "train_s")
LABELS = {"style_top1": "style top-1", "style_similarity": "style sim.", "train_s": "train s"}


def cell_line(row: dict) -> str:
    line = f"{row['method']:>8} {row['style']} seed {row['seed']}: style top-1 {row['style_top1']:.2f}, " \
           f"sim. {row['style_similarity']:.3f}"
    return line + training_note(row)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md and samples.png."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    adapters, styles, seeds = protocol_inputs(cfg, "styles", "vango, monex")
    _, sets, scorer, sampler_cfg, n_img, device = eval_setup(cfg, styles, "styles", "style_scorer")

    def seeds_of(seed):
        return derive_seed_list("single-style-samples", seed, n_img)

    rows: list[dict] = []
    grids = {s: [] for s in styles}
    progress = CellProgress(len(styles) * len(seeds) * (1 + len(adapters)), desc="single_style")
    with quiet_cells():
        base = instantiate(cfg.model, _convert_="all")
        for s in styles:
            for seed in seeds:
                imgs = sample_prompts(base, sampler_cfg, sets[s].base_prompts, seeds_of(seed), device)
                rows.append({"method": "base", "style": s, "seed": seed, **scorer(imgs, s)})
                if seed == seeds[0]:
                    grids[s].append(imgs)
                progress.done(cell_line(rows[-1]))
        del base

        def evaluate(components, s, seed):
            imgs = sample_prompts(components, sampler_cfg, sets[s].prompts, seeds_of(seed), device)
            if seed == seeds[0]:
                grids[s].append(imgs)
            return scorer(imgs, s)

        rows += train_cells(cfg, run_dir, adapters, styles, seeds, "style", evaluate, progress, cell_line)
    progress.close()

    summary = summarise_rows(rows, METRICS)
    note = (f"mean +- std over {len(styles)} style(s) x {len(seeds)} seed(s), {len(sets[styles[0]].prompts)} new "
            f"objects x {n_img} samples each. style top-1: share of samples whose nearest style (style evaluator, "
            f"{len(scorer.names)} experiment styles; chance {1 / len(scorer.names):.3f}) is the trained one. The base "
            "model is asked the same prompts without the style word.")
    table = markdown_table(summary, METRICS, LABELS, note)
    out = {"protocol": "single_style", "styles": styles, "seeds": seeds, "methods": ["base", *adapters],
           "prompts": {s: sets[s].prompts for s in styles}, "base_prompts": {s: sets[s].base_prompts for s in styles},
           "images_per_prompt": n_img, "sampler": sampler_cfg, "rows": rows, "summary": summary,
           "summary_by_style": {s: summarise_rows([r for r in rows if r["style"] == s], METRICS) for s in styles},
           "total_s": time.perf_counter() - t0, "config": OmegaConf.to_container(cfg, resolve=True)}
    write_protocol_outputs(cfg, run_dir, "single_style", out, table, [img for s in styles for img in grids[s]])
    out["table"] = table
    return out
