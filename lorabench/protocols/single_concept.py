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

import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.protocols.toolkit import (derive_seed_list, eval_setup, markdown_table, sample_prompts,
                                         protocol_inputs, summarise_rows, train_cells, training_note,
                                         write_protocol_outputs)
from lorabench.utils.console import CellProgress, quiet_cells

# Scores on the concept prompt itself ("a sks circle": does the model draw the identity?) and on the
# context prompts ("a sks circle at left on black": does it still follow the rest of the prompt?).
METRICS = ("identity_similarity", "identity_alignment", "image_alignment", "context_identity_similarity",
           "context_identity_alignment", "context_text_alignment")
LABELS = {"identity_similarity": "identity sim.", "identity_alignment": "identity align.",
          "image_alignment": "CLIP-I", "context_identity_similarity": "identity sim. in context",
          "context_identity_alignment": "identity align. in context",
          "context_text_alignment": "CLIP-T in context"}


def sample_seeds(seed: int, n: int) -> list[int]:
    """The initial-latent seeds of replicate ``seed``: the same for every prompt and every method."""
    return derive_seed_list("single-concept-samples", seed, n)


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {mean, std, n}}}`` over all replicates (concepts x seeds); population std."""
    return summarise_rows(rows, METRICS + ("train_s",))


def format_table(summary: dict, n_concepts: int, n_seeds: int) -> str:
    note = (f"mean +- std over {n_concepts} concept(s) x {n_seeds} seed(s); cosine similarities. First three "
            "columns: the concept prompt (identity align. = share of samples within the identity threshold); "
            "'in context': the concept in context prompts (CLIP-T against the prompt without the token).")
    return markdown_table(summary, METRICS + ("train_s",), {**LABELS, "train_s": "train s"}, note)


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


def cell_line(row: dict) -> str:
    """The one line a finished cell prints."""
    line = (f"{row['method']:>8} {row['concept']} seed {row['seed']}: identity sim. {row['identity_similarity']:.3f}, "
            f"align. {row['identity_alignment']:.2f}; in context {row['context_identity_similarity']:.3f}")
    return line + training_note(row)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md and samples.png."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    adapters, concepts, seeds = protocol_inputs(cfg, "concepts", "sks, zwz")
    _, sets, scorer, sampler_cfg, n_img, device = eval_setup(cfg, concepts, "concepts", "scorer")
    refs = {c: scorer.embed_references(sets[c].references) for c in concepts}

    rows: list[dict] = []
    grids: dict[str, list[torch.Tensor]] = {c: [sets[c].references] for c in concepts}
    progress = CellProgress(len(concepts) * len(seeds) * (1 + len(adapters)), desc="single_concept")
    with quiet_cells():
        base = instantiate(cfg.model, _convert_="all")
        for c in concepts:
            for seed in seeds:
                imgs = sample_prompts(base, sampler_cfg, sets[c].prompts, sample_seeds(seed, n_img), device)
                rows.append({"method": "base", "concept": c, "seed": seed,
                             **score_samples(scorer, imgs, sets[c], n_img, refs[c])})
                if seed == seeds[0]:
                    grids[c].append(imgs)
                progress.done(cell_line(rows[-1]))
        del base

        def evaluate(components, c, seed):
            imgs = sample_prompts(components, sampler_cfg, sets[c].prompts, sample_seeds(seed, n_img), device)
            if seed == seeds[0]:
                grids[c].append(imgs)
            return score_samples(scorer, imgs, sets[c], n_img, refs[c])

        rows += train_cells(cfg, run_dir, adapters, concepts, seeds, "concept", evaluate, progress, cell_line)
    progress.close()

    summary = summarise(rows)
    by_concept = {c: summarise([r for r in rows if r["concept"] == c]) for c in concepts}
    table = format_table(summary, len(concepts), len(seeds))
    out = {"protocol": "single_concept", "concepts": concepts, "seeds": seeds, "methods": ["base", *adapters],
           "prompts": {c: sets[c].prompts for c in concepts}, "images_per_prompt": n_img, "sampler": sampler_cfg,
           "rows": rows, "summary": summary, "summary_by_concept": by_concept, "total_s": time.perf_counter() - t0,
           "config": OmegaConf.to_container(cfg, resolve=True)}
    write_protocol_outputs(cfg, run_dir, "single_concept", out, table, [img for c in concepts for img in grids[c]])
    out["table"] = table
    return out
