"""Single-concept personalisation: fine-tune each concept with each adapter, sample, score, and
compare with the base model given the same prompts and the same initial noise.

This is the "single-concept" column of the Orthogonal Adaptation table
(conf/experiment/world_concepts.yaml, world_personalize.yaml):

    lorabench experiment=world_concepts                         # 3 concepts x {lora, ortho, trilora}
    lorabench experiment=world_personalize                      # LoRA, 3 seeds (the acceptance check)
    lorabench experiment=world_concepts protocol.concepts=[sks,uwu] protocol.adapters.lora.rank=8

One replicate = one (method, concept, seed): the seed drives training (noise, timesteps, adapter
init) and the initial latents of the samples, so the base model's rows vary with the seed too.
Every prompt of a replicate reuses the same ``images_per_prompt`` latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lorabench.evaluation.scores import score_samples
from lorabench.protocols import sizes
from lorabench.protocols.cells import protocol_inputs
from lorabench.protocols.report import Session, headline, markdown_table, summarise_rows
from lorabench.protocols.scoring import Evaluation, check_eval_batch, compare_with_base, concept_seeds, eval_setup

# Scores on the concept prompt itself ("a sks circle": does the model draw the identity?) and on the
# context prompts ("a sks circle at left on black": does it still follow the rest of the prompt?).
METRICS = ("identity_similarity", "identity_alignment", "image_alignment", "context_identity_similarity",
           "context_identity_alignment", "context_text_alignment")
LABELS = {"identity_similarity": "identity sim.", "identity_alignment": "identity align.",
          "image_alignment": "CLIP-I", "context_identity_similarity": "identity sim. in context",
          "context_identity_alignment": "identity align. in context",
          "context_text_alignment": "CLIP-T in context"}
# The line a finished cell prints.
CELL_LINE = ("{method:>8} {concept} seed {seed}: identity sim. {identity_similarity:.3f}, align. "
             "{identity_alignment:.2f}; in context {context_identity_similarity:.3f}")


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {mean, std, n}}}`` over all replicates (concepts x seeds); population std."""
    return summarise_rows(rows, METRICS + ("train_s",) + sizes.SIZE_FIELDS)


def format_table(summary: dict, n_concepts: int, n_seeds: int) -> str:
    """The markdown table of :func:`summarise`'s output, with a note on what was averaged."""
    note = (f"mean +- std over {n_concepts} concept(s) x {n_seeds} seed(s); cosine similarities. First three "
            "columns: the concept prompt (identity align. = share of samples within the identity threshold); "
            "'in context': the concept in context prompts (CLIP-T against the prompt without the token).")
    note += " dW/W0: the update's ||dW|| / ||W0||, median over adapted layers (lorabench/protocols/sizes.py)."
    return markdown_table(summary, METRICS + ("train_s", "size_weight_median"),
                          {**LABELS, "train_s": "train s", "size_weight_median": "dW/W0"}, note)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md and samples.png."""
    session = Session(cfg, Path(run_dir), "single_concept")
    adapters, concepts, seeds = protocol_inputs(cfg, "concepts", "sks, zwz")
    _, sets, scorer, sampler_cfg, n_img, device = eval_setup(cfg, concepts, "concepts", "scorer")
    refs = {c: scorer.embed_references(sets[c].references) for c in concepts}

    evaluation = Evaluation(
        prompts=lambda c, seed, method: (sets[c].prompts, concept_seeds(seed, n_img)),
        score=lambda imgs, c, seed, method: score_samples(scorer, imgs, sets[c], n_img, refs[c]),
        sampler=sampler_cfg, device=device, batch=check_eval_batch(cfg.protocol.get("eval_batch", 1)))

    rows, grids, sampling = compare_with_base(session, "concept", concepts, seeds, adapters, evaluation, CELL_LINE,
                                              lambda c: sets[c].prompts)
    session.grid = [(f"{c}: {what}", img) for c in concepts
                    for what, img in zip(("references", "base", *adapters), [sets[c].references, *grids[c]])]
    summary = summarise(rows)
    out = session.results(concepts=concepts, seeds=seeds, methods=["base", *adapters],
                          prompts={c: sets[c].prompts for c in concepts}, images_per_prompt=n_img, sampler=sampler_cfg,
                          rows=rows, summary=summary, timings={"eval_batch": evaluation.batch, **sampling},
                          summary_by_concept={c: summarise([r for r in rows if r["concept"] == c]) for c in concepts},
                          headline=headline(summary, ("identity_alignment", "context_text_alignment"), LABELS))
    return session.finish(out, format_table(summary, len(concepts), len(seeds)),
                          "single_concept: update size per layer",
                          f"seed {seeds[0]}; each row: {len(sets[concepts[0]].prompts)} prompts x {n_img} samples "
                          f"({concepts[0]}'s: {' | '.join(sets[concepts[0]].prompts)})")
