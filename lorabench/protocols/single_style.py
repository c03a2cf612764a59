"""Single-style personalisation: fine-tune each style on its few images with each adapter, then ask
for objects the style set never showed, and retrieve the samples' style among every experiment style.

The base model gets the same prompts without the style word (it has never seen the word): its
retrieval rate is the chance level a style adapter must beat.

    lorabench experiment=world_style                           # LoRA on 3 styles x 3 seeds
    lorabench experiment=world_style protocol.styles=[vango] protocol.adapters.lora.rank=8

One replicate = one (method, style, seed); the seed drives training and the initial latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lorabench.protocols import sizes
from lorabench.protocols.cells import protocol_inputs
from lorabench.protocols.report import Session, headline, markdown_table, summarise_rows
from lorabench.protocols.scoring import Evaluation, check_eval_batch, compare_with_base, eval_setup
from lorabench.utils.seeding import derive_seed_list

METRICS = ("style_top1", "style_similarity", "train_s")
LABELS = {"style_top1": "style top-1", "style_similarity": "style sim.", "train_s": "train s"}
CELL_LINE = "{method:>8} {style} seed {seed}: style top-1 {style_top1:.2f}, sim. {style_similarity:.3f}"


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md and samples.png."""
    session = Session(cfg, Path(run_dir), "single_style")
    adapters, styles, seeds = protocol_inputs(cfg, "styles", "vango, monex")
    _, sets, scorer, sampler_cfg, n_img, device = eval_setup(cfg, styles, "styles", "style_scorer")

    evaluation = Evaluation(  # the base model gets the prompts without the style word
        prompts=lambda s, seed, method: (sets[s].base_prompts if method == "base" else sets[s].prompts,
                                         derive_seed_list("single-style-samples", seed, n_img)),
        score=lambda imgs, s, seed, method: scorer(imgs, s),
        sampler=sampler_cfg, device=device, batch=check_eval_batch(cfg.protocol.get("eval_batch", 1)))

    rows, grids, sampling = compare_with_base(session, "style", styles, seeds, adapters, evaluation, CELL_LINE,
                                              lambda s: sets[s].prompts)
    session.grid = [(f"{s}: {what}", img) for s in styles
                    for what, img in zip(("base (no style word)", *adapters), grids[s])]
    summary = summarise_rows(rows, METRICS + sizes.SIZE_FIELDS)
    note = (f"mean +- std over {len(styles)} style(s) x {len(seeds)} seed(s), {len(sets[styles[0]].prompts)} new "
            f"objects x {n_img} samples each. style top-1: share of samples whose nearest style (style evaluator, "
            f"{len(scorer.names)} experiment styles; chance {1 / len(scorer.names):.3f}) is the trained one. The base "
            "model is asked the same prompts without the style word.")
    table = markdown_table(summary, METRICS + ("size_weight_median",), {**LABELS, "size_weight_median": "dW/W0"},
                           note + " dW/W0: ||dW|| / ||W0||, median over adapted layers.")
    out = session.results(styles=styles, seeds=seeds, methods=["base", *adapters],
                          prompts={s: sets[s].prompts for s in styles},
                          base_prompts={s: sets[s].base_prompts for s in styles}, images_per_prompt=n_img,
                          sampler=sampler_cfg, rows=rows, summary=summary,
                          timings={"eval_batch": evaluation.batch, **sampling},
                          summary_by_style={s: summarise_rows([r for r in rows if r["style"] == s], METRICS)
                                            for s in styles},
                          headline=headline(summary, ("style_top1",), LABELS))
    return session.finish(out, table, "single_style: update size per layer",
                          f"seed {seeds[0]}; each row: {len(sets[styles[0]].prompts)} new objects x {n_img} samples")
