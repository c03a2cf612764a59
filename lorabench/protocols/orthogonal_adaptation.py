"""Orthogonal Adaptation's Table 2 (Po et al., CVPR 2024): modular customisation. Train each concept
once, alone; then merge groups of independently trained concepts and score every concept alone and
inside its merged model.

    lorabench experiment=orthogonal_adaptation/world                    # the world Table 2, 3 seeds
    lorabench experiment=orthogonal_adaptation/world protocol.only=[dblora_fedavg,ortha_disjoint]
    python -m lorabench.protocols rebuild orthogonal_adaptation outputs/.../run1 outputs/.../run2   # rebuild the table

Stages, per seed:
1. **Single** (:func:`single_stage`). Every (adapter type, concept) is trained once (cached under
   ``protocol.cache_dir`` by a hash of its training config, so a sweep over merge methods or a rerun
   never trains a concept twice), loaded into the base model, scored with the single-concept
   protocol's prompts, initial latents and scorer, and its layers' input statistics are captured
   (:mod:`lorabench.merging.capture`) from the concept's training prompt, for gradient fusion and the
   crosstalk measures (kept beside the cell). ``protocol.eval_batch`` settings are sampled a pass, and as
   many captures (:class:`~lorabench.protocols.scoring.EvalBatch`).
2. **Groups** (:func:`draw_groups`). Each concept is merged with ``group_size - 1`` others drawn with
   the seed, concepts of its own class first (the paper merges faces with faces). A group two
   concepts drew is merged once and its measured merge time recorded for both.
3. **Merged** (:func:`merged_stage`). For each method (an adapter type and a merge config), each
   concept's group is merged (timed), folded into the base model's weights, and the concept is scored
   again from the same initial latents. Crosstalk diagnostics of the group's updates go beside it.

A row is one (method, concept, seed); the table shows single -> merged means +- std over seeds (each
seed's mean over concepts). Methods with new tokens (P+, Mix-of-Show's ED-LoRA, OrthA as the paper trains
it: :mod:`lorabench.adapters.tokens`) load every group member's tokens side by side in the merged model
(their embeddings never sum; the load time counts as merge time). Custom Diffusion's merge reads each
concept's target-word features (the text states at its tokens in its training prompt) and a Gram of
regularisation prompts (``protocol.reg_prompts``; default: every concept's evaluation prompts without
their tokens). Results record the protocol as ``modular`` and log under ``modular/...`` in W&B, the
names runs have always had.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from lorabench.adapters.ortho import concept_configs
from lorabench.adapters.tokens import load_tokens
from lorabench.checks import check_counts
from lorabench.errors import ConfigError, choice_error
from lorabench.evaluation.scores import score_samples
from lorabench.merging import (
    AdapterUpdate,
    check_merge,
    concept_crosstalk,
    group_crosstalk,
    layer_means,
    load_stats,
    merge,
    save_stats,
    text_gram,
    token_features,
    updates_from_adapters,
)
from lorabench.protocols import sizes
from lorabench.protocols.base import (
    Paper,
    Rebuilt,
    Settings,
    join_rows,
    mean_std_csv,
    pick,
    pm,
    read_settings,
    setting,
    verdict,
)
from lorabench.protocols.cells import (
    Trained,
    base_model,
    cached,
    check_cell_tokens,
    loaded_cell,
    protocol_inputs,
    run_cells,
)
from lorabench.protocols.report import LayerMeans, Session, format_verdicts, headline, rebuild_cli, summarise_rows
from lorabench.protocols.scoring import EvalBatch, EvalSetup, check_eval_batch, concept_seeds, eval_setup
from lorabench.utils.console import quiet_cells
from lorabench.utils.plots import layer_lines, paired_bars
from lorabench.utils.seeding import derive_seed, derive_seed_list
from lorabench.utils.tables import Column, csv_of, duration, markdown

PROTOCOL = "modular"  # the protocol's name in results.json and its W&B keys
# Table 2's columns: text alignment (CLIP-T, the concept in context prompts), image alignment (CLIP-I)
# and identity alignment (share of samples within the identity threshold), single -> merged.
SCORES = ("context_text_alignment", "image_alignment", "identity_alignment")
SCORE_LABELS = {"context_text_alignment": "text align.", "image_alignment": "image align.",
                "identity_alignment": "identity align."}
CROSSTALK = ("weight_crosstalk", "subspace_overlap", "interference", "subspace_interference", "output_error",
             "subspace_output_error")
# what the table summarises per method (each seed's mean over concepts, then over seeds), in table2.csv's order
SUMMARY_KEYS = ("merge_s", *(f"{w}_{s}" for s in SCORES for w in ("single", "merged", "delta")), *CROSSTALK)

# Orthogonal Adaptation, Table 2 (12 faces, each merged with 2 others): single -> merged.
PUBLISHED = [
    ("P+", "<1 s", ".643 -> .643", ".683 -> .683", ".515 -> .515"),
    ("Custom Diffusion", "~2 s", ".668 -> .673", ".648 -> .623", ".504 -> .408"),
    ("DB-LoRA (FedAvg)", "<1 s", ".613 -> .682", ".744 -> .531", ".683 -> .098"),
    ("Mix-of-Show (FedAvg)", "<1 s", ".625 -> .621", ".745 -> .735", ".728 -> .706"),
    ("Mix-of-Show (gradient fusion)", "~15 min", ".625 -> .631", ".745 -> .729", ".728 -> .717"),
    ("Orthogonal Adaptation", "<1 s", ".624 -> .644", ".748 -> .741", ".740 -> .745"),
]
UNCHANGED_FLOOR = 0.02  # P+'s "unchanged by merging": |merged - single| within max(2 x seed std, this)
BETTER_RETENTION = 0.1  # "holds identity better": merged/single identity alignment higher by at least this


# -- inputs ------------------------------------------------------------------------------------------
def select_methods(p: DictConfig, adapters: Mapping) -> dict[str, dict]:
    """The protocol's methods (``protocol.only`` picks some), each checked: a known adapter, a merge."""
    methods = {k: OmegaConf.to_container(v, resolve=True) for k, v in (p.get("methods") or {}).items()}
    if not methods:
        raise ConfigError("protocol.methods", "no merge methods; add e.g. /merge@protocol.methods.fedavg.merge: sum")
    methods = pick(methods, p.get("only"), "protocol.only", "method")
    for name, m in methods.items():
        if m.get("adapter") not in adapters:
            raise ConfigError(f"protocol.methods.{name}.adapter",
                              f"unknown adapter {m.get('adapter')!r}; valid: {', '.join(adapters)}")
        if not m.get("merge"):
            raise ConfigError(f"protocol.methods.{name}.merge",
                              "missing; e.g. /merge@protocol.methods.<name>.merge: sum")
        check_merge(m["merge"], f"protocol.methods.{name}.merge")
    return methods


ROLES = ("lora_fedavg", "ortha", "gradient_fusion", "pplus", "ortha_no_embeddings")  # what verdicts() judges


def check_roles(p: DictConfig) -> None:
    """``protocol.roles``: each a role :func:`verdicts` knows, naming one of ``protocol.methods`` (a method that
    ``protocol.only`` leaves out skips its claims; a name that is no method skipped them without a word)."""
    names = list(p.get("methods") or {})
    for role, method in (OmegaConf.to_container(p.get("roles") or {}, resolve=True)).items():
        if role not in ROLES:
            raise ConfigError(f"protocol.roles.{role}", f"not a role of the verdicts; valid: {', '.join(ROLES)}")
        if method is not None and method not in names:
            raise choice_error(f"protocol.roles.{role}", method, names)


def draw_groups(concepts: Sequence[str], classes: Mapping[str, str], group_size: int, seed: int,
                same_class: bool = True) -> dict[str, list[str]]:
    """``{concept: its group}``: the concept and ``group_size - 1`` others drawn with ``seed``, those of
    its own class first when ``same_class``. Groups list concepts in the protocol's order."""
    rng = random.Random(derive_seed("modular-groups", seed))
    order = {c: i for i, c in enumerate(concepts)}
    groups = {}
    for c in concepts:
        others = [o for o in concepts if o != c]
        same = [o for o in others if same_class and classes.get(o) == classes.get(c)]
        rest = [o for o in others if o not in same]
        rng.shuffle(same)
        rng.shuffle(rest)
        groups[c] = sorted([c] + (same + rest)[:group_size - 1], key=order.get)
    return groups


# -- summaries and the table -------------------------------------------------------------------------
def summarise(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {key: {mean, std, n}}}`` of each seed's mean over concepts, std over seeds (population)."""
    return summarise_rows(list(rows), SUMMARY_KEYS, per_seed=True)


def table2(rows: Sequence[dict], labels: Mapping[str, str]) -> tuple[str, str]:
    """(markdown, csv) of Table 2 from protocol rows: one line per method, single -> merged (delta)."""
    s = summarise(rows)
    seeds = sorted({r["seed"] for r in rows})
    concepts = sorted({r["concept"] for r in rows})

    def change(score: str) -> Column:
        def cell(m):
            a, b, d = (s[m].get(f"{k}_{score}") for k in ("single", "merged", "delta"))
            return f"{a['mean']:.3f} -> {b['mean']:.3f} ({d['mean']:+.3f} +- {d['std']:.3f})" if a and b and d else "-"
        return Column(SCORE_LABELS[score] + " single -> merged (delta)", cell,
                      mean_std_csv(s, [f"{k}_{score}" for k in ("single", "merged", "delta")]))

    # table2.csv holds every summary key's mean and std, in SUMMARY_KEYS' order; the markdown shows four of the six
    # crosstalk measures
    columns = [Column("method", lambda m: labels.get(m, m), (("method", str),)),
               Column("merge time", lambda m: duration(s[m]["merge_s"]["mean"]) if "merge_s" in s[m] else "-",
                      mean_std_csv(s, ["merge_s"])),
               *map(change, SCORES), *(Column(label, lambda m, c=c: pm(s[m].get(c))) for c, label in (
                   ("weight_crosstalk", "weight crosstalk"), ("interference", "interference"),
                   ("subspace_interference", "interference in own subspace"), ("output_error", "output error"))),
               Column(None, csv=(*mean_std_csv(s, CROSSTALK),
                                 ("n_seeds", lambda m: s[m].get("merge_s", {}).get("n", ""))))]
    md = [markdown(columns, list(s)), "",
          f"Mean over {len(concepts)} concepts per seed, then mean (delta: +- std) over {len(seeds)} seed(s) "
          f"{seeds}. Crosstalk (lorabench.merging.crosstalk): weight = ||dW_i dW_j^T|| / (||dW_i|| ||dW_j||); "
          "interference = ||dW_j X_i|| / ||dW_i X_i||, in own subspace: on P_i X_i (X_i projected on the rows of "
          "down_i); output error = ||(D - dW_i) X_i|| / ||dW_i X_i|| of the merged update D; layer means over the "
          "group's pairs.", "", "Published (Po et al. 2024, Table 2; 12 faces, ArcFace identity):", "",
          markdown(["method", "merge time", "text align.", "image align.", "identity align."], PUBLISHED)]
    return "\n".join(md), csv_of(columns, list(s))


MIN_SINGLE_IDENTITY = 0.2  # below this the single models never learned the identity: nothing can collapse


def verdicts(rows: Sequence[dict], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """The paper's directional claims, judged on per-seed means with criteria fixed in advance:
    *collapses* = merged identity alignment at most half of single; *holds* = at least 0.8x single;
    *far more merge time* = at least 10x FedAvg's; *far below* = at most half. A claim about identity
    is inconclusive when the single models' identity alignment is below ``MIN_SINGLE_IDENTITY``.
    ``roles`` names the methods: ``lora_fedavg``, ``ortha``, ``gradient_fusion``, ``pplus`` and
    ``ortha_no_embeddings`` (absent roles are skipped). Crosstalk is judged on the paper's measure (the
    weight product) and, separately, on the interference of the updates on captured inputs. Two more,
    fixed before their first run: P+ is *unchanged by merging* when every score's mean change is within
    ``max(2 x the seed std of its single score, UNCHANGED_FLOOR)``; OrthA with layer-wise embeddings
    *holds identity better* than without them when its retention (merged / single identity alignment)
    is higher by at least ``BETTER_RETENTION``, reported beside both methods' interference."""
    s = summarise(rows)
    out = []

    def ident(m):
        return s[m]["single_identity_alignment"], s[m]["merged_identity_alignment"]

    def weak(*singles):
        low = [x for x in singles if x["mean"] < MIN_SINGLE_IDENTITY]
        return (f"single-concept identity alignment below {MIN_SINGLE_IDENTITY}: the adapters never learned "
                "the identity") if low else ""

    lf, oa, gf = roles.get("lora_fedavg"), roles.get("ortha"), roles.get("gradient_fusion")
    if lf in s and oa in s:
        (ls, lm), (os_, om) = ident(lf), ident(oa)
        ok = lm["mean"] <= 0.5 * ls["mean"] and om["mean"] >= 0.8 * os_["mean"]
        out.append(verdict("DB-LoRA FedAvg identity collapses on merge, while OrthA's holds", ok,
                            f"identity align. {lf}: {pm(ls)} -> {pm(lm)}; {oa}: {pm(os_)} -> {pm(om)} "
                            "(collapse: merged <= 0.5x single; hold: merged >= 0.8x single)", weak(ls, os_)))
    if gf in s and lf in s:
        gs, gm = ident(gf)
        t_gf, t_lf = s[gf]["merge_s"], s[lf]["merge_s"]
        ok = gm["mean"] >= 0.8 * gs["mean"] and t_gf["mean"] >= 10 * t_lf["mean"]
        out.append(verdict("gradient fusion holds identity but costs far more merge time", ok,
                            f"identity align. {gf}: {pm(gs)} -> {pm(gm)}; merge time {duration(t_gf['mean'])} "
                            f"vs {duration(t_lf['mean'])} ({t_gf['mean'] / max(t_lf['mean'], 1e-12):.0f}x; "
                            "hold: >= 0.8x single; far more: >= 10x)", weak(gs)))
    pp, ab = roles.get("pplus"), roles.get("ortha_no_embeddings")
    if pp in s:
        parts, ok = [], True
        for score in SCORES:
            d, single = s[pp].get(f"delta_{score}"), s[pp].get(f"single_{score}")
            if d and single:
                tol = max(2 * single["std"], UNCHANGED_FLOOR)
                ok = ok and abs(d["mean"]) <= tol
                parts.append(f"{SCORE_LABELS[score]} change {d['mean']:+.3f} (within +-{tol:.3f})")
        out.append(verdict("P+ is unchanged by merging (embeddings do not interact)", ok, "; ".join(parts)))
    if oa in s and ab in s:
        (ps, pm_), (as_, am) = ident(oa), ident(ab)
        keep = {m: mm["mean"] / ss["mean"] if ss["mean"] > 0 else float("nan")
                for m, (ss, mm) in ((oa, (ps, pm_)), (ab, (as_, am)))}
        inter = "; ".join(f"interference {m} {pm(s[m]['interference'])}" for m in (oa, ab) if "interference" in s[m])
        out.append(verdict("OrthA with layer-wise embeddings holds identity better than OrthA without them",
                            keep[oa] - keep[ab] >= BETTER_RETENTION,
                            f"identity align. {oa}: {pm(ps)} -> {pm(pm_)} (kept {keep[oa]:.2f}); {ab}: {pm(as_)} -> "
                            f"{pm(am)} (kept {keep[ab]:.2f}); better: kept at least {BETTER_RETENTION} more; {inter}",
                            weak(ps, as_)))
    if lf in s and oa in s:
        for c, what in (("weight_crosstalk", "the paper's measure, the normalised weight product"),
                        ("interference", "interference on captured inputs"),
                        ("subspace_interference", "interference on the inputs concept i's update reads")):
            a, b = s[oa].get(c), s[lf].get(c)
            if a and b:
                out.append(verdict(f"OrthA's crosstalk is far below LoRA's ({what})", a["mean"] <= 0.5 * b["mean"],
                                    f"{c} {oa} {pm(a)} vs {lf} {pm(b)} (far below: at most 0.5x)"))
    return out


# -- the protocol ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OrthASettings(Settings):
    """The ``protocol:`` block of Table 2 (besides ``adapters``, ``methods``, ``only``, ``slots``,
    ``concept_data`` and ``roles``, checked by :func:`make_plan`)."""

    concepts: list[str] = setting([], doc="the concepts (the world's tokens, or names of protocol.concept_data)")
    group_size: int = setting(3, minimum=2, doc="concepts merged together: each one and group_size - 1 others")
    same_class: bool = setting(True, doc="draw a concept's group from its own class first (faces with faces)")
    capture: dict = setting({}, doc="input statistics: images_per_prompt (4) x num_inference_steps (10)")
    cache_dir: Optional[str] = setting(None, doc="the cell cache shared by runs and sweep jobs (default: run/cells)")
    reg_prompts: list[str] = setting([], doc="custom_diffusion's regularisation prompts (default: the eval texts)")
    eval_batch: Any = setting(1, doc="settings (a cell alone, a merge) sampled in one pass: 1 (each alone, as before) "
                                     "or auto (what a GPU's memory holds; 1 on a CPU)")


@dataclass
class Plan:
    """What :func:`run` settles from the config before any work; every stage reads it."""

    settings: OrthASettings
    concepts: list[str]
    seeds: list[int]
    methods: dict[str, dict]
    used: list[str]                          # adapter types some method merges
    cell_cfgs: dict[str, dict[str, Any]]     # {adapter: {concept: its adapter config}}
    concept_data: dict[str, dict]            # {concept: the data fields its cells set}
    ev: EvalSetup
    classes: dict[str, str]
    refs: dict[str, dict]                    # {concept: reference embeddings}
    capture_sampler: dict
    n_cap: int
    cache_root: Path
    labels: dict[str, str]
    features_for: set[str] = field(default_factory=set)  # adapters merged by custom_diffusion (token features)
    reg_prompts: list[str] = field(default_factory=list)  # custom_diffusion's regularisation prompts


def make_plan(cfg: DictConfig, run_dir: Path) -> Plan:
    """Check the protocol's inputs and build the eval setup (one-line errors, before any training)."""
    p = cfg.protocol
    adapters, concepts, seeds = protocol_inputs(cfg, "concepts", "sks, twt, vlx")
    methods = select_methods(p, adapters)
    check_roles(p)
    settings = read_settings(OrthASettings, p)
    check_eval_batch(settings.eval_batch)
    group_size = settings.group_size
    if len(concepts) < 2:  # no group fits ("valid: 2 to 1")
        raise ConfigError("protocol.concepts", f"lists {len(concepts)} concept; merging needs at least 2 (a concept "
                          "and k = group_size - 1 others), e.g. protocol.concepts=[sks,twt]")
    if group_size > len(concepts):
        raise ConfigError("protocol.group_size", f"{group_size} does not fit {len(concepts)} concepts; "
                          f"valid: 2 to {len(concepts)} (a concept and k = group_size - 1 others)")
    used = list(dict.fromkeys(m["adapter"] for m in methods.values()))
    ev = eval_setup(cfg, concepts, "concepts", "scorer")
    cap = settings.capture or {}
    check_counts({k: cap.get(k) for k in ("images_per_prompt", "num_inference_steps")}, "protocol.capture")
    # What each concept's training data sets: the world names it (data.concept); the real path gives
    # each concept its folder and instance prompt (protocol.concept_data.<name>: {path, instance_prompt}).
    concept_data = {c: dict(OmegaConf.to_container(p.concept_data[c], resolve=True))
                    if p.get("concept_data") and c in p.concept_data else {"concept": c} for c in concepts}
    check_cell_tokens(cfg, {a: adapters[a] for a in used}, concepts, concept_data)
    features_for = {m["adapter"] for m in methods.values() if m["merge"]["name"] == "custom_diffusion"}
    for name, m in methods.items():
        if m["adapter"] in features_for and not (adapters[m["adapter"]].get("embeddings") or {}):
            raise ConfigError(f"protocol.methods.{name}.merge", "custom_diffusion keeps each concept's target-word "
                              f"features, and adapter {m['adapter']!r} trains no new tokens; give it embeddings "
                              "(e.g. /embeddings@protocol.adapters.<name>.embeddings: textual_inversion)")
    # the regularisation prompts: every concept's evaluation prompts without their tokens
    reg_prompts = settings.reg_prompts or list(dict.fromkeys(t for c in concepts for t in ev.sets[c].texts))
    return Plan(
        settings=settings, concepts=concepts, seeds=seeds, methods=methods, used=used,
        cell_cfgs={a: concept_configs(adapters[a], concepts, p.get("slots"), a) for a in used},
        concept_data=concept_data, ev=ev,
        classes={c: ev.eval_sets.concept_class(c) if hasattr(ev.eval_sets, "concept_class") else "" for c in concepts},
        refs={c: ev.scorer.embed_references(ev.sets[c].references) for c in concepts},
        capture_sampler={**ev.sampler, "num_inference_steps": int(cap.get("num_inference_steps", 10))},
        n_cap=int(cap.get("images_per_prompt", 4)), cache_root=Path(settings.cache_dir or run_dir / "cells"),
        labels={k: m.get("label", k) for k, m in methods.items()}, features_for=features_for,
        reg_prompts=reg_prompts)


@dataclass
class SeedSingles:
    """Stage 1's output for one seed, keyed by (adapter type, concept)."""

    updates: dict[tuple[str, str], AdapterUpdate]
    stats: dict[tuple[str, str], dict]
    scores: dict[tuple[str, str], dict]
    rows: list[dict]
    tokens: dict[tuple[str, str], Path] = field(default_factory=dict)  # the cell's token file, if it has one
    features: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # custom_diffusion's target rows


def single_stage(plan: Plan, session: Session, base, seed: int, latents: list[int],
                 trained: Mapping[str, Trained], evals: EvalBatch, captures: EvalBatch) -> SeedSingles:
    """Score every trained (adapter type, concept) cell of ``seed`` alone, capture its input statistics
    (cached beside the cell) and measure its update size on them (the session's size log). The cells'
    samples are drawn by ``evals``, their captures by ``captures``, ``protocol.eval_batch`` settings a pass."""
    ev, out = plan.ev, SeedSingles({}, {}, {}, [])
    n_steps = plan.capture_sampler["num_inference_steps"]
    measured: dict[tuple[str, str], dict] = {}

    def score(a: str, c: str, imgs: torch.Tensor) -> None:  # the cell's row, once its images are drawn
        t = trained[f"{a}-{c}-seed{seed}"]
        res, reused = t.results, t.reused
        s = out.scores[a, c] = score_samples(ev.scorer, imgs, ev.sets[c], ev.images_per_prompt, plan.refs[c])
        out.rows.append({"adapter": a, "concept": c, "seed": seed, **s, **sizes.row_fields(measured[a, c]),
                         "train_s": res["timings"]["fit_s"], "steps": res["metrics"]["steps"], "reused": reused})
        if seed == plan.seeds[0] and a == plan.used[0]:
            session.grid.append((f"{c}: {a} alone", imgs))
        session.done(f"{a:>15} {c} seed {seed}: single identity align. {s['identity_alignment']:.2f}" +
                     (" (cached)" if reused else f" ({res['timings']['fit_s']:.0f} s)"))

    def stats_ready(a: str, c: str, weights: Mapping[str, torch.Tensor], grams: dict) -> None:
        out.stats[a, c] = grams
        measured[a, c] = sizes.measure_update(out.updates[a, c], weights, grams)

    def captured(a: str, c: str, path: Path, weights: Mapping[str, torch.Tensor], fingerprint: str,
                 stats: tuple[dict, dict]) -> None:  # a capture's statistics, kept beside its cell
        grams, rows = stats
        save_stats(path, grams, rows, fingerprint, ev.sets[c].prompts[:1], {"concept": c, "adapter": a, "seed": seed})
        stats_ready(a, c, weights, grams)

    def flush() -> None:  # captures first: a cell's row carries its update size on the captured inputs
        captures.sample()
        evals.sample()

    for a in plan.used:
        for c in plan.concepts:
            cell_dir = trained[f"{a}-{c}-seed{seed}"].cell.folder
            with loaded_cell(base, cell_dir) as (ad, tokens):
                # concept i's own model, its tokens included, reads its inputs X_i (kept beside the cell); new
                # tokens alone (P+): no layers, nothing to capture, merge or measure
                out.updates[a, c] = (updates_from_adapters(ad, c, base_model=base.model_id) if ad is not None
                                     else AdapterUpdate(c, {}))
                deltas = out.updates[a, c].deltas()  # the cell's UNet update, for a pass's own weights
                if ad is None:
                    out.stats[a, c], measured[a, c] = {}, {}
                else:
                    path = cell_dir / f"stats-{plan.n_cap}x{n_steps}.safetensors"
                    if path.is_file():
                        stats_ready(a, c, ad.base_weights(), load_stats(path, ad))
                    else:  # alone: captured here; in a pass: its text encoder read here, its UNet in the pass
                        captures.capture(("capture", seed, a, c), ad, ev.sets[c].prompts[:1],
                                         derive_seed_list("modular-capture", seed, plan.n_cap), deltas,
                                         functools.partial(captured, a, c, path, ad.base_weights(),
                                                           ad.base_fingerprint()))
                if tokens is not None:
                    out.tokens[a, c] = cell_dir / "embeddings.safetensors"
                    if a in plan.features_for:  # the text states at the concept's tokens in its training prompt
                        out.features[a, c] = token_features(base, ev.sets[c].prompts[:1], tokens.names, ev.device)
                # alone: sampled here through the injected adapter; in a batch: its tokens and text encoder read
                # here, its UNet update folded into a weight of its own when the batch samples
                evals.add(("single", seed, a, c), ev.sets[c].prompts, latents, deltas,
                          injected=True, then=functools.partial(score, a, c))
            if evals.full:  # the cell is out of the model again
                flush()
    flush()
    for a in plan.used:  # the size log in the cells' order, however their captures were batched
        for c in plan.concepts:
            session.size_log.add(a, measured[a, c])
    return out


def merged_stage(plan: Plan, session: Session, base, seed: int, latents: list[int], singles: SeedSingles,
                 layer_log: LayerMeans, evals: EvalBatch) -> list[dict]:
    """Merge each concept's group with every method, score the concept in the merged model, and measure
    the group's crosstalk (per-layer values gather in ``layer_log`` by method). The merged models' samples
    are drawn by ``evals``, ``protocol.eval_batch`` settings a pass."""
    ev, rows = plan.ev, []
    groups = draw_groups(plan.concepts, plan.classes, plan.settings.group_size, seed, plan.settings.same_class)
    reg = text_gram(base, plan.reg_prompts, ev.device) if plan.features_for else None
    group_ct: dict[tuple[str, tuple[str, ...]], dict] = {}  # the same for every method on these adapters

    def score(row: dict, extra: dict, imgs: torch.Tensor) -> None:  # the row's scores, once its images are drawn
        name, a, c, group = row["method"], row["adapter"], row["concept"], row["group"]
        merged = score_samples(ev.scorer, imgs, ev.sets[c], ev.images_per_prompt, plan.refs[c])
        single = singles.scores[a, c]
        for k in SCORES + ("identity_similarity",):
            row[f"single_{k}"], row[f"merged_{k}"] = single[k], merged[k]
            row[f"delta_{k}"] = merged[k] - single[k]
        row.update(extra)
        if seed == plan.seeds[0]:
            session.grid.append((f"{c}: {name}, merged with {'+'.join(g for g in group if g != c)}", imgs))
        session.done(f"{name:>15} {c} seed {seed}: identity align. {row['single_identity_alignment']:.2f}"
                     f" -> {row['merged_identity_alignment']:.2f}, merge {duration(row['merge_s'])}")

    for name, m in plan.methods.items():
        a = m["adapter"]
        merged_groups: dict[tuple[str, ...], Any] = {}  # a group drawn twice is merged once
        for c in plan.concepts:
            group = tuple(groups[c])
            ups = [singles.updates[a, g] for g in group]
            grams = [singles.stats[a, g] for g in group]
            if group not in merged_groups:
                merge_stats = grams if m["merge"]["name"] != "custom_diffusion" else \
                    [{k: {"rows": singles.features[a, g], "reg": reg} for k in ups[0].layers} for g in group]
                merged_groups[group] = merge(ups, m["merge"], stats=merge_stats)
            result = merged_groups[group]
            t_tokens = time.perf_counter()
            tokens = [load_tokens(base, singles.tokens[a, g]) for g in group if (a, g) in singles.tokens]
            merge_s = result.merge_s + (time.perf_counter() - t_tokens)  # the group's tokens, side by side
            if (a, group) not in group_ct:
                group_ct[a, group] = group_crosstalk(ups, grams)
            per_layer = concept_crosstalk(group_ct[a, group], singles.updates[a, c], result.deltas, singles.stats[a, c])
            layer_log.add(name, per_layer)
            row = {"method": name, "adapter": a, "concept": c, "seed": seed, "group": list(group),
                   "merge_s": merge_s, **layer_means(per_layer)}
            rows.append(row)
            extra = {"dropped_energy": result.info["dropped_energy_mean"]} if "dropped_energy_mean" in result.info \
                else {}
            try:
                evals.add(("merged", seed, name, c), ev.sets[c].prompts, latents, result.deltas,
                          then=functools.partial(score, row, extra))
            finally:
                for t in reversed(tokens):
                    t.remove()
            if evals.full:
                evals.sample()
    evals.sample()
    return rows


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md, table2.csv,
    samples.png, crosstalk.png and merge_bars.png, and logs them to the configured loggers."""
    session = Session(cfg, Path(run_dir), PROTOCOL)
    plan = make_plan(cfg, session.run_dir)
    concepts, seeds, used, ev = plan.concepts, plan.seeds, plan.used, plan.ev
    # Cells not cached yet train first, protocol.train_workers processes at a time, protocol.batch_cells
    # cells a pass where they can.
    cells = {name: cached(cfg, plan.cell_cfgs[a][c], plan.concept_data[c], seed, plan.cache_root, name,
                          source=f"protocol.adapters.{a}")
             for seed in seeds for a in used for c in concepts if (name := f"{a}-{c}-seed{seed}")}
    base = base_model(cfg, [(c.source, c.config.adapter) for c in cells.values()])  # before any cell trains
    trained = dict(zip(cells, run_cells(list(cells.values()), plan.settings.batch_cells,
                                        plan.settings.train_workers, plan.cache_root, progress=True)))
    t_cells = time.perf_counter()
    session.count(len(seeds) * len(concepts) * (len(used) + len(plan.methods)))
    session.grid = [(f"{c}: references", ev.sets[c].references) for c in concepts]
    rows: list[dict] = []
    singles: list[dict] = []
    layer_log = LayerMeans()
    with quiet_cells():
        evals = EvalBatch(base, ev.sampler, ev.device, plan.settings.eval_batch)
        captures = EvalBatch(base, plan.capture_sampler, ev.device, plan.settings.eval_batch)
        for seed in seeds:
            latents = concept_seeds(seed, ev.images_per_prompt)
            seed_singles = single_stage(plan, session, base, seed, latents, trained, evals, captures)
            singles += seed_singles.rows
            rows += merged_stage(plan, session, base, seed, latents, seed_singles, layer_log, evals)
        eval_log = {**evals.log(), "capture": captures.log()}
        del base, evals, captures
    order = {c: i for i, c in enumerate(concepts)}  # the grid's rows concept by concept
    session.grid.sort(key=lambda row: order[row[0].partition(": ")[0]])
    roles = OmegaConf.to_container(cfg.protocol.get("roles") or {}, resolve=True)
    out = session.results(
        concepts=concepts, seeds=seeds, group_size=plan.settings.group_size,
        methods={k: {**m, "label": plan.labels[k]} for k, m in plan.methods.items()}, labels=plan.labels, roles=roles,
        prompts={c: ev.sets[c].prompts for c in concepts}, images_per_prompt=ev.images_per_prompt, sampler=ev.sampler,
        capture={"images_per_prompt": plan.n_cap, "num_inference_steps": plan.capture_sampler["num_inference_steps"]},
        rows=rows, single_rows=singles, summary=summarise(rows), verdicts=verdicts(rows, roles),
        crosstalk_layers=layer_log.means(),
        # where the time went: the cells trained up front (run_cells), then scoring, capture and merging
        timings={"pretrain_cells_s": t_cells - session.t0, "score_and_merge_s": time.perf_counter() - t_cells,
                 "pretrained_cells": sum(not t.reused for t in trained.values()),
                 "eval_batch": plan.settings.eval_batch, **eval_log})
    out["headline"] = headline(out["summary"], ("merged_identity_alignment",),
                               {"merged_identity_alignment": "merged identity"})
    faces = getattr(ev.scorer.identity, "face_report", lambda: None)()  # ArcFace with a face detector
    if faces is not None:
        out["faces"] = faces
    table, table_csv = table2(rows, plan.labels)
    layer_lines(session.run_dir / "crosstalk.png", out["crosstalk_layers"], [
        ("interference", "interference ||dW_j X_i|| / ||dW_i X_i||"),
        ("weight_crosstalk", "weight crosstalk ||dW_i dW_j^T|| (normalised)")])
    paired_bars(session.run_dir / "merge_bars.png", out["summary"],
                [(k, SCORE_LABELS[k] + ": single -> merged") for k in SCORES], ("single", "merged"), plan.labels)
    per_layer = [[m, layer, *[v.get(k) for k in CROSSTALK]] for m, per in out["crosstalk_layers"].items()
                 for layer, v in per.items()]
    c0 = concepts[0]
    return session.finish(
        out, table + "\n\n" + format_verdicts(out["verdicts"]),
        "update size per layer, mean over each adapter type's cells",
        f"seed {seeds[0]}; each row: {len(ev.sets[c0].prompts)} prompts x {ev.images_per_prompt} samples, prompt by "
        f"prompt ({c0}'s: {' | '.join(ev.sets[c0].prompts)})", files={"table2.csv": table_csv}, job_type="merge",
        tables={"crosstalk": (["method", "layer", *CROSSTALK], per_layer)},
        images={k: session.run_dir / f"{k}.png" for k in ("merge_bars", "crosstalk")})


def rebuild(results: list[dict]) -> Rebuilt:
    """Table 2 (table2.md with the verdicts, table2.csv) from the results of one or more runs of this
    protocol (e.g. the jobs of a sweep over methods and seeds)."""
    rows = join_rows(results, (), lambda r: (r["method"], r["concept"], r["seed"]))
    labels = {k: v for res in results for k, v in res.get("labels", {}).items()}
    roles = {k: v for res in results for k, v in res.get("roles", {}).items()}
    md, table_csv = table2(rows, labels)
    md += "\n\n" + format_verdicts(verdicts(rows, roles))
    return Rebuilt({"table2.md": md + "\n", "table2.csv": table_csv}, md)


PAPER = Paper("orthogonal_adaptation", PROTOCOL, rebuild, "write table2.md and table2.csv here", out_required=False)

if __name__ == "__main__":  # the command before `python -m lorabench.protocols rebuild orthogonal_adaptation`
    rebuild_cli(PAPER.name)
