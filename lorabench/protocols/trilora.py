"""TriLoRA's Table 1 (Feng et al. 2024, arXiv 2405.11236): style fine-tuning on a caption dataset,
with the over-training study. The method itself is :mod:`lorabench.adapters.trilora`.

The protocol, as the paper runs it with diffusers' text-to-image LoRA script:

1. Every adapter in ``protocol.adapters`` (LoRA, TriLoRA with each Sigma initialisation) trains on
   the dataset's captioned images (``data.max_train_samples``: a seeded subset, as the paper's 100 of
   833 Pokemon) for ``protocol.table_epoch`` epochs; the adapters in ``protocol.overtrain`` keep going
   to the last of ``protocol.checkpoints`` (the over-training study).
2. At every checkpoint epoch (a callback; sampling does not change the training run), one image per
   caption of the *whole* dataset, each from its own fixed seed (derived from ``protocol.sample_seed``,
   the paper's 30): FID and KID against every dataset image, CLIP score of each image with its caption.
3. The base model draws the same prompts from the same seeds: NFID = FID(method) / FID(base) uses one
   reference set, one feature extractor and one resizing for both terms, so the base model's NFID is
   exactly 1.

The table reads every adapter at ``table_epoch``. With a constant learning rate (required when
``overtrain`` is set) a run read at epoch e equals a run stopped at e, so the long runs serve both.

    lorabench experiment=trilora/world                     # 4 adapters x 3 seeds, table + curves
    python -m lorabench.protocols.trilora outputs/trilora/world/vango --out experiments/trilora

One replicate = one (adapter, seed); the seed drives the training subset, data order and noise.
Results record the protocol as ``style_finetune`` and log under ``style_finetune/...`` in W&B, the
names runs have always had.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.data import load_image
from lorabench.errors import ConfigError, check_int, find_config_error
from lorabench.loggers import build_loggers
from lorabench.protocols import sizes
from lorabench.protocols.cells import cell_config, check_batch_cells, plan_passes, protocol_inputs
from lorabench.protocols.report import mean_std, rebuild_cli, summarise_rows, write_protocol_outputs
from lorabench.run import train, train_batched
from lorabench.sampling import eval_device, sample_each
from lorabench.training.callbacks import CheckpointEvaluation
from lorabench.utils.console import CellProgress, quiet_cells
from lorabench.utils.io import write_json, write_text
from lorabench.utils.plots import figure, save_figure
from lorabench.utils.seeding import derive_seed_list

PROTOCOL = "style_finetune"  # the protocol's name in results.json and its W&B keys
FIXED_ROWS = ("reference", "base")  # rows without training: NFID's reference model, the training base
METRICS = ("nfid", "fid", "kid", "clip_score", "train_s")
LABELS = {"nfid": "NFID", "fid": "FID", "kid": "KID", "clip_score": "CLIP score", "train_s": "train s"}
CURVE_METRICS = ("fid", "nfid", "kid", "clip_score")
# Table 1 of the paper (NFID: lower is better; CLIP score: 100 x cosine, CLIP ViT-L/14).
PUBLISHED = {"base": {"gac_nfid": 1.0, "gac_clip": 32.2, "pokemon_nfid": 1.0, "pokemon_clip": 29.2},
             "lora": {"gac_nfid": 0.923, "gac_clip": 32.5, "pokemon_nfid": 0.867, "pokemon_clip": 30.3},
             "trilora": {"gac_nfid": 0.833, "gac_clip": 32.5, "pokemon_nfid": 0.796, "pokemon_clip": 30.1}}
# "CLIP about equal": within this share of LoRA's CLIP score (the paper's gaps: 0 and 0.2 of ~30 points).
CLIP_TOLERANCE = 0.03
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


# -- inputs ------------------------------------------------------------------------------------------
def resolve_plan(cfg: DictConfig) -> tuple[dict, list[int], int, list[int], list[str]]:
    """``(adapters, seeds, table_epoch, checkpoints, overtrain)``, checked before any work."""
    adapters, _, seeds = protocol_inputs(cfg, "adapters", "lora")
    p = cfg.protocol
    table_epoch = check_int(p.get("table_epoch"), "protocol.table_epoch", minimum=1)
    check_int(p.get("sample_seed"), "protocol.sample_seed")
    check_int(p.get("grid_images", 16), "protocol.grid_images", minimum=1)
    check_int(p.get("max_eval_prompts"), "protocol.max_eval_prompts", minimum=2, allow_none=True)
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in (p.get("checkpoints") or [])):
        raise ConfigError("protocol.checkpoints", f"must be a list of epochs (integers), got {list(p.checkpoints)}")
    checkpoints = sorted({int(e) for e in (p.get("checkpoints") or [table_epoch])} | {table_epoch})
    if checkpoints[0] < 1:
        raise ConfigError("protocol.checkpoints", f"epochs must be >= 1, got {checkpoints}")
    overtrain = list(p.get("overtrain") or [])
    unknown = [a for a in overtrain if a not in adapters]
    if unknown:
        raise ConfigError("protocol.overtrain", f"{unknown} are not in protocol.adapters ({', '.join(adapters)})")
    if overtrain and checkpoints[-1] == table_epoch:
        raise ConfigError("protocol.checkpoints", f"over-training needs a checkpoint after table_epoch={table_epoch}")
    schedule = cfg.optim.get("lr_scheduler", "constant")
    if overtrain and schedule not in CONSTANT_SCHEDULES:
        raise ConfigError("optim.lr_scheduler", f"{schedule!r}: the over-training runs are read at table_epoch, which "
                          f"equals a shorter run only with {' or '.join(CONSTANT_SCHEDULES)}; drop protocol.overtrain")
    if int(cfg.eval.get("images_per_prompt", 1)) != 1:
        raise ConfigError("eval.images_per_prompt", "this protocol draws one image per dataset caption; set it to 1")
    return adapters, seeds, table_epoch, checkpoints, overtrain


def dataset_eval_set(cfg: DictConfig, max_prompts: int | None, batch_size: int = 64):
    """Every caption of the dataset (the paper's evaluation prompts), and the FID reference set: every
    image at the model's resolution in [0, 1], center-cropped, as batches loaded on demand (833 images
    at 512 px do not need to sit in memory at once). Uses the data config with no training subset."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("max_train_samples", None)
    dm = instantiate(data_cfg, _convert_="all").prepare()
    items = dm.all_items[:max_prompts] if max_prompts else dm.all_items
    if len(items) < 2:
        raise ConfigError("data", f"the dataset has {len(items)} image(s); FID needs at least 2")

    def references():
        for i in range(0, len(items), batch_size):
            batch = torch.stack([load_image(src, dm.resolution, center_crop=True)
                                 for src, _ in items[i:i + batch_size]])
            yield (batch + 1) / 2

    return [text for _, text in items], references


def load_reference(ref_cfg: DictConfig):
    """NFID's reference model, or a one-line error naming ``protocol.reference_model``."""
    try:
        with quiet_cells():
            return instantiate(ref_cfg, _convert_="all")
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the loader's error: one line naming the field
        raise ConfigError("protocol.reference_model", f"could not load it ({find_config_error(exc) or exc})") from exc


# -- the run -----------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md, samples.png,
    curves.csv and curves.png, and logs the curves and tables to the configured loggers."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    p = cfg.protocol
    adapters, seeds, table_epoch, checkpoints, overtrain = resolve_plan(cfg)
    sampler_cfg = OmegaConf.to_container(cfg.eval.sampler, resolve=True)
    device = eval_device(cfg)
    with quiet_cells():
        prompts, references = dataset_eval_set(cfg, p.get("max_eval_prompts"))
    scorer = instantiate(cfg.eval.fidelity).to(device).set_references(references())
    # NFID's denominator: the FID of protocol.reference_model (the paper: Stable Diffusion 1.5, whatever base
    # the adapters train on) on the same prompts, seeds, references and features; null: the base. Loaded
    # here, after the data's checks, so a model that does not load stops the run before any sampling.
    ref_cfg = p.get("reference_model")
    ref_model = None if ref_cfg is None else load_reference(ref_cfg)
    latent_seeds = derive_seed_list("style-finetune-samples", int(p.sample_seed), len(prompts))
    n_grid = min(int(p.get("grid_images", 16)), len(prompts))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"{PROTOCOL}-seed{seeds[0]}",
                            resolved_config=resolved, job_type="eval")

    def evaluate(components, base_fid=None):
        images = sample_each(components, sampler_cfg, prompts, latent_seeds, device)
        scores = scorer(images, prompts)
        scores["nfid"] = scores["fid"] / (base_fid if base_fid is not None else scores["fid"])
        return scores, images[:n_grid]

    size_log = sizes.SizeLog()

    def measurer(name: str, seed: int):
        def measure(module) -> dict[str, float]:
            measured = sizes.measure(module.components, module.adapters, prompts, sampler_cfg, device, seed=seed)
            if module.current_epoch + 1 == table_epoch:  # the table's adapter (the callback runs at epoch end)
                size_log.add(name, measured)
            return sizes.row_fields(measured)
        return measure

    n_cells = len(adapters) * len(seeds)
    progress = CellProgress(1 + n_cells, desc=PROTOCOL)
    rows = []
    with quiet_cells():
        if ref_model is not None:
            ref_scores, _ = evaluate(ref_model)
            rows.append({"method": "reference", "seed": None, "epoch": 0, "step": 0, **ref_scores})
            ref_model = None
        base_model = instantiate(cfg.model, _convert_="all")
        base_scores, base_images = evaluate(base_model, ref_scores["fid"] if ref_cfg is not None else None)
        del base_model
    base_fid = ref_scores["fid"] if ref_cfg is not None else base_scores["fid"]  # every row's NFID denominator
    rows.append({"method": "base", "seed": None, "epoch": 0, "step": 0, **base_scores})
    progress.done(f"    base: FID {base_scores['fid']:.3f}, KID {base_scores['kid']:.4f}, CLIP "
                  f"{base_scores['clip_score']:.2f}" + (f"; reference model FID {base_fid:.3f}" if ref_cfg else ""))
    panels, labels = [base_images[:n_grid]], ["base model"]
    batch_cells = check_batch_cells(p.get("batch_cells", 1))
    for name, acfg in adapters.items():
        final = checkpoints[-1] if name in overtrain else table_epoch
        epochs = [e for e in checkpoints if e <= final]
        cells = {}
        for seed in seeds:
            cell_dir = run_dir / "cells" / f"{name}-seed{seed}"
            cell = cell_config(cfg, acfg, {}, seed, cell_dir)
            with open_dict(cell):
                cell.trainer.max_epochs, cell.trainer.max_steps = final, -1
            cells[seed] = (cell, cell_dir)
        # the seeds of one method train one by one, or protocol.batch_cells at a time in one pass
        jobs = [(OmegaConf.to_container(c, resolve=True), str(d), f"{name}/seed{seed}")
                for seed, (c, d) in cells.items()]
        seed_of = {str(d): seed for seed, (_, d) in cells.items()}
        passes = plan_passes(jobs, batch_cells, 1, run_dir / "cells" / ".probe") if batch_cells != 1 else \
            [[job] for job in jobs]
        for batch in passes:
            batch_seeds = [seed_of[d] for _, d, _ in batch]
            callbacks = {seed: CheckpointEvaluation(epochs, lambda comp: evaluate(comp, base_fid), loggers,
                                                    prefix=f"curves/{name}/seed{seed}",
                                                    grid_dir=str(cells[seed][1] / "samples"),
                                                    measure=measurer(name, seed)) for seed in batch_seeds}
            with quiet_cells():
                if len(batch) == 1:
                    (seed,) = batch_seeds
                    results = [train(cells[seed][0], cells[seed][1], config_name=f"{name}/seed{seed}",
                                     callbacks=[callbacks[seed]])[0]]
                else:
                    results = train_batched([cells[s][0] for s in batch_seeds], [cells[s][1] for s in batch_seeds],
                                            [f"{name}/seed{s}" for s in batch_seeds],
                                            member_callbacks=[[callbacks[s]] for s in batch_seeds])
            for seed, res in zip(batch_seeds, results):
                callback = callbacks[seed]
                for point in callback.history:
                    rows.append({"method": name, "seed": seed, **point, "train_s": res["timings"]["fit_s"],
                                 "steps": res["metrics"]["steps"]})
                at = next(r for r in callback.history if r["epoch"] == table_epoch)
                progress.done(f"{name:>8} seed {seed}: NFID {at['nfid']:.3f} (FID {at['fid']:.3f}), CLIP "
                              f"{at['clip_score']:.2f} at epoch {table_epoch}; last NFID "
                              f"{callback.history[-1]['nfid']:.3f} at epoch {callback.history[-1]['epoch']} "
                              f"({res['timings']['fit_s']:.0f} s)")
                if seed == seeds[0]:
                    panels.append(callback.images[table_epoch])
                    labels.append(f"{name}, epoch {table_epoch}")
    progress.close()

    out = {"protocol": PROTOCOL, "dataset": str(cfg.data.get("name")), "seeds": seeds,
           "methods": [*(["reference"] if ref_cfg is not None else []), "base", *adapters],
           "reference_model": None if ref_cfg is None else str(ref_cfg.get("name") or ref_cfg.get("pretrained")),
           "adapters": {k: OmegaConf.to_container(v, resolve=True) for k, v in adapters.items()},
           "table_epoch": table_epoch, "checkpoints": checkpoints, "overtrain": overtrain,
           "prompts": prompts, "n_references": scorer.n_references, "sample_seed": int(p.sample_seed),
           "sampler": sampler_cfg, "rows": rows, "update_size": size_log.results(), "total_s": time.perf_counter() - t0,
           "config": resolved}
    out.update(summaries(out))
    out["table"] = finish(cfg, run_dir, out, loggers, panels, labels,
                          f"seed {seeds[0]}; one sample per caption, the dataset's first {n_grid} captions")
    return out


# -- summaries, tables, curves and verdicts ------------------------------------------------------------
def table_rows(out: dict) -> list[dict]:
    """The reference model's and the base's rows and every adapter's row at the table epoch."""
    return [r for r in out["rows"] if r["method"] in FIXED_ROWS or r["epoch"] == out["table_epoch"]]


def curves(out: dict) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """``{method: {epoch: {metric: {mean, std, n}}}}`` over seeds, for every checkpoint."""
    res: dict[str, dict[int, dict]] = {}
    for r in out["rows"]:
        if r["method"] not in FIXED_ROWS:
            res.setdefault(r["method"], {}).setdefault(int(r["epoch"]), []).append(r)
    return {m: {e: {k: mean_std([r[k] for r in rs]) for k in CURVE_METRICS} for e, rs in sorted(by.items())}
            for m, by in res.items()}


def summaries(out: dict) -> dict:
    """The table's summary, the curves and the verdicts of a results dict."""
    return {"summary": summarise_rows(table_rows(out), METRICS + sizes.SIZE_FIELDS), "curves": curves(out),
            "verdicts": verdicts(out)}


def _by_seed(out: dict, method: str, epoch: int, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in out["rows"] if r["method"] == method and r["epoch"] == epoch}


def verdicts(out: dict, lora: str = "lora", trilora: str = "trilora") -> dict[str, dict]:
    """The paper's three claims, each with its rule and numbers (``out`` holds both adapters)."""
    if lora not in out["methods"] or trilora not in out["methods"]:
        return {}
    te = out["table_epoch"]
    res: dict[str, dict] = {}
    # 1. TriLoRA NFID < LoRA NFID < 1 at the paper's training length.
    a, b = _by_seed(out, trilora, te, "nfid"), _by_seed(out, lora, te, "nfid")
    seeds = sorted(set(a) & set(b))
    ma, mb = statistics.fmean(a[s] for s in seeds), statistics.fmean(b[s] for s in seeds)
    holds = [a[s] < b[s] < 1 for s in seeds]
    verdict = ("reproduced" if ma < mb < 1 and all(holds) else
               "mixed" if ma < mb < 1 else "not reproduced")
    res["nfid_order"] = {"claim": "TriLoRA NFID < LoRA NFID < 1", "verdict": verdict,
                         "rule": "reproduced: the seed means and every seed satisfy it; mixed: the means only",
                         "trilora_nfid": ma, "lora_nfid": mb, "seeds_holding": sum(holds), "seeds": len(seeds)}
    # 2. CLIP score about equal.
    a, b = _by_seed(out, trilora, te, "clip_score"), _by_seed(out, lora, te, "clip_score")
    ma, mb = statistics.fmean(a[s] for s in seeds), statistics.fmean(b[s] for s in seeds)
    res["clip_equal"] = {"claim": "CLIP score about equal (TriLoRA vs LoRA)",
                         "verdict": "reproduced" if abs(ma - mb) <= CLIP_TOLERANCE * abs(mb) else "not reproduced",
                         "rule": f"|mean difference| <= {CLIP_TOLERANCE:.0%} of LoRA's CLIP score",
                         "trilora_clip": ma, "lora_clip": mb, "difference": ma - mb}
    # 3. Over-training: from table_epoch to the last checkpoint, TriLoRA's NFID rises less than LoRA's.
    last = out["checkpoints"][-1]
    if lora in out["overtrain"] and trilora in out["overtrain"]:
        def rise(m):
            end, at = _by_seed(out, m, last, "nfid"), _by_seed(out, m, te, "nfid")
            return {s: end[s] - at[s] for s in seeds}

        ra, rb = rise(trilora), rise(lora)
        mra, mrb = statistics.fmean(ra.values()), statistics.fmean(rb.values())
        if mrb <= 0:
            verdict = "not observed (LoRA does not over-train here)"
        elif mra < mrb and all(ra[s] < rb[s] for s in seeds):
            verdict = "reproduced"
        elif mra < mrb:
            verdict = "mixed"
        else:
            verdict = "not reproduced"
        res["overtraining"] = {
            "claim": "TriLoRA resists over-training (its NFID rises less than LoRA's when trained long)",
            "verdict": verdict, "rule": f"NFID rise from epoch {te} to {last}; reproduced: LoRA rises, TriLoRA "
            "rises less in the mean and in every seed; mixed: in the mean only",
            "trilora_rise": mra, "lora_rise": mrb, "from_epoch": te, "to_epoch": last}
    return res


def render_table(out: dict) -> str:
    """Table 1: the world's NFID / FID / KID / CLIP score (mean +- std over seeds) beside the paper's."""
    head = ["method", "NFID", "FID", "KID", "CLIP score", "paper Pokemon NFID", "paper Pokemon CLIP",
            "paper GAC NFID", "paper GAC CLIP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in out["summary"].items():
        cells = [f"{method} ({describe(out, method)})" if method not in FIXED_ROWS else
                 {"base": "base model", "reference": f"reference model ({out.get('reference_model')})"}[method]]
        for m, fmt in (("nfid", "{:.3f}"), ("fid", "{:.2f}"), ("kid", "{:.4f}"), ("clip_score", "{:.2f}")):
            v = s.get(m)
            cells.append("-" if v is None else f"{fmt.format(v['mean'])} +- {fmt.format(v['std'])}")
        pub = published(out, method)
        cells += [f"{pub[k]:g}" if k in pub else "-" for k in ("pokemon_nfid", "pokemon_clip", "gac_nfid", "gac_clip")]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(out["seeds"])
    note = (f"Mean +- std (population) over {n} training seed(s) at epoch {out['table_epoch']}; one image per caption "
            f"of the dataset ({len(out['prompts'])} prompts, seeds derived from {out['sample_seed']}), FID and KID "
            f"against all {out['n_references']} dataset images. NFID = FID / FID("
            + (f"reference model {out['reference_model']}, same prompts, seeds, references and features); the base "
               "and reference models are deterministic here (one row each)." if out.get("reference_model") else
               "base model, same prompts, seeds, references and features); the base model is deterministic here "
               "(one row).")
            + " Paper: Feng et al. 2024, Table 1 (SD v1.5 / AnyLoRA, Inception FID, CLIP ViT-L/14).")
    return "\n".join(lines) + "\n\n" + note


def published(out: dict, method: str) -> dict:
    """The paper's Table 1 entries for a row: its "SD v1.5" row (NFID 1) is the NFID reference model's
    row when there is one (the full-scale configs), else the training base's (the world)."""
    if out.get("reference_model"):
        return PUBLISHED["base"] if method == "reference" else {} if method == "base" else PUBLISHED.get(method, {})
    return PUBLISHED.get(method, {})


def describe(out: dict, method: str) -> str:
    """An adapter's short description for tables and legends (``trilora r4, Sigma svd_w0``)."""
    a = out["adapters"].get(method, {})
    text = f"{a.get('name')} r{a.get('rank')}"
    if a.get("name") == "trilora":
        text += f", Sigma {a.get('sigma_init')}" + (" normalised" if a.get("sigma_normalize") else "")
    return text


def _csv_text(rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def write_curves_csv(path: Path, out: dict) -> None:
    """Every checkpoint's scores, one row per (method, seed, epoch)."""
    cols = ["method", "seed", "epoch", "step", *CURVE_METRICS, "kid_std"]
    write_text(path, _csv_text([cols, *[[r.get(c) for c in cols] for r in out["rows"]]]))


def write_table_csv(path: Path, out: dict) -> None:
    """Table 1 as CSV, the paper's numbers beside the measured ones."""
    cols = ["method", "adapter", "n_seeds"] + [f"{m}_{k}" for m in ("nfid", "fid", "kid", "clip_score")
                                              for k in ("mean", "std")] \
        + ["paper_pokemon_nfid", "paper_pokemon_clip", "paper_gac_nfid", "paper_gac_clip"]
    rows = [cols]
    for method, s in out["summary"].items():
        pub = published(out, method)
        rows.append([method, describe(out, method) if method not in FIXED_ROWS else method, s["nfid"]["n"]]
                    + [s[m][k] for m in ("nfid", "fid", "kid", "clip_score") for k in ("mean", "std")]
                    + [pub.get(k) for k in ("pokemon_nfid", "pokemon_clip", "gac_nfid", "gac_clip")])
    write_text(path, _csv_text(rows))


def plot_curves(path: Path, out: dict) -> None:
    """FID, NFID and CLIP score against epoch (mean +- std over seeds), the base model as a line."""
    base = next(r for r in out["rows"] if r["method"] == "base")
    fig, axes = figure(3, figsize=(13, 3.8))
    for ax, metric in zip(axes[0], ("fid", "nfid", "clip_score")):
        for method, by in out["curves"].items():
            epochs = sorted(by)
            mean = [by[e][metric]["mean"] for e in epochs]
            std = [by[e][metric]["std"] for e in epochs]
            line, = ax.plot(epochs, mean, marker="o", label=f"{method} ({describe(out, method)})")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.axhline(base[metric], color="gray", ls="--", label="base model")
        ax.axvline(out["table_epoch"], color="black", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epoch")
        ax.set_title(LABELS[metric] + (" (lower is better)" if metric != "clip_score" else " (higher is better)"))
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Over-training study on {out['dataset']}: mean +- std over {len(out['seeds'])} seeds; "
                 f"dotted line: the table's epoch {out['table_epoch']}", fontsize=9)
    save_figure(fig, path)


def finish(cfg: DictConfig, run_dir: Path, out: dict, loggers, panels: Sequence[torch.Tensor],
           labels: Optional[Sequence[str]] = None, grid_title: str = "") -> str:
    """This protocol's own files (table.csv, curves.csv / curves.png, verdicts.json) and the curves plot
    to the loggers, then every protocol's outputs (results.json, table.md, samples.png, the summary and
    Table 1 to the loggers, the W&B run ended); returns the table."""
    table = render_table(out)
    write_extras(run_dir, out)
    columns = ["method", *METRICS]
    data = [[m, *[s.get(k, {}).get("mean") for k in METRICS]] for m, s in out["summary"].items()]
    images = {"curves": run_dir / "curves.png"}
    if sizes.size_plot(run_dir / "update_size.png", out.get("update_size") or {},
                       f"update size per layer at epoch {out['table_epoch']}, mean over seeds"):
        images["update_size"] = run_dir / "update_size.png"
    write_protocol_outputs(cfg, run_dir, PROTOCOL, out, table, list(panels),
                           tables={"table1": (columns, data)}, loggers=loggers, step=out["table_epoch"], images=images,
                           labels=labels, grid_title=grid_title)
    return table


def write_extras(out_dir: Path, out: dict) -> None:
    """What every protocol's outputs do not cover: table.csv, curves.csv, curves.png and verdicts.json."""
    write_table_csv(out_dir / "table.csv", out)
    write_curves_csv(out_dir / "curves.csv", out)
    write_json(out_dir / "verdicts.json", out["verdicts"])
    plot_curves(out_dir / "curves.png", out)


SAME_ACROSS_RUNS = ("dataset", "prompts", "sample_seed", "sampler", "table_epoch", "n_references")


def collect(run_dirs: Sequence[str | Path]) -> dict:
    """One results dict from the results.json of several runs of one setup (e.g. a multirun with one
    seed per job): rows joined, the base model's row kept once (it must agree across runs)."""
    outs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    out = dict(outs[0])
    rows, seen = [], {}
    for d, o in zip(run_dirs, outs):
        for key in SAME_ACROSS_RUNS:
            if o.get(key) != out.get(key):
                raise ValueError(f"{d}: {key} differs from {run_dirs[0]}; these runs are not one table")
        for r in o["rows"]:
            k = (r["method"], r["seed"], r["epoch"])
            if k in seen:
                if r["method"] in FIXED_ROWS:
                    if r["fid"] == seen[k]["fid"]:
                        continue
                    raise ValueError(f"{d}: the base model's FID differs from another run's; these runs are not "
                                     "one table")
                raise ValueError(f"{d}: {r['method']} seed {r['seed']} epoch {r['epoch']} appears in two runs")
            seen[k] = r
            rows.append(r)
    out["rows"] = rows
    out["seeds"] = sorted({r["seed"] for r in rows if r["seed"] is not None})
    out["methods"] = list(dict.fromkeys(m for o in outs for m in o["methods"]))
    out["adapters"] = {k: v for o in outs for k, v in o["adapters"].items()}
    out["overtrain"] = sorted({m for o in outs for m in o["overtrain"]})
    out["checkpoints"] = sorted({e for o in outs for e in o["checkpoints"]})
    out["runs"] = [str(d) for d in run_dirs]
    out.update(summaries(out))
    return out


def rebuild(run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path) -> dict:
    """Table, CSVs, verdicts and curves plot rebuilt from runs' results.json (no model needed)."""
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    for d in run_dirs:
        if not (Path(d) / "results.json").is_file():
            raise ConfigError("run_dirs", f"{str(d)!r} holds no results.json")
    out = collect(run_dirs)
    out_dir = Path(out_dir)
    write_extras(out_dir, out)
    write_json(out_dir / "results.json", out)
    write_text(out_dir / "table.md", render_table(out) + "\n")
    return out


def report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """:func:`rebuild`, and the table and verdicts as text for the console."""
    out = rebuild(run_dirs, out_dir)
    return render_table(out) + "\n" + "\n".join(f"- {v['claim']}: {v['verdict']}" for v in out["verdicts"].values())


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lorabench.protocols.trilora RUN... --out DIR``: rebuild Table 1, its CSVs, verdicts and curves."""
    rebuild_cli(argv, "python -m lorabench.protocols.trilora",
                "Rebuild Table 1, its CSVs, verdicts and the curves plot from run folders (e.g. the jobs of a "
                "multirun over seeds).", report, "where to write table.md, table.csv, curves.*, verdicts.json")


if __name__ == "__main__":
    main()
