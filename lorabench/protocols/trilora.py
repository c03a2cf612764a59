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
    python -m lorabench.protocols rebuild trilora outputs/trilora/world/vango --out experiments/trilora

One replicate = one (adapter, seed); the seed drives the training subset, data order and noise.
Results record the protocol as ``style_finetune`` and log under ``style_finetune/...`` in W&B, the
names runs have always had.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.data.imagefolder import caption_eval_set
from lorabench.errors import ConfigError
from lorabench.protocols import sizes
from lorabench.protocols.base import (
    Paper,
    Rebuilt,
    Settings,
    join_rows,
    load_field,
    mean_std_csv,
    read_settings,
    seedwise,
    setting,
)
from lorabench.protocols.cells import (
    Cell,
    base_model,
    cell_config,
    check_epoch_warmups,
    check_processes,
    protocol_inputs,
    run_cells,
)
from lorabench.protocols.report import Session, headline, mean_std, pm, rebuild_cli, summarise_rows
from lorabench.sampling import eval_device, sample_each
from lorabench.training.callbacks import CheckpointEvaluation
from lorabench.utils.console import quiet_cells
from lorabench.utils.plots import band_panels
from lorabench.utils.seeding import derive_seed_list
from lorabench.utils.tables import Column, csv_of, csv_text, markdown

PROTOCOL = "style_finetune"  # the protocol's name in results.json and its W&B keys
FIXED_ROWS = ("reference", "base")  # rows without training: NFID's reference model, the training base
METRICS = ("nfid", "fid", "kid", "clip_score", "train_s")
LABELS = {"nfid": "NFID", "fid": "FID", "kid": "KID", "clip_score": "CLIP score", "train_s": "train s"}
CURVE_METRICS = ("fid", "nfid", "kid", "clip_score")
# Table 1 of the paper (NFID: lower is better; CLIP score: 100 x cosine, CLIP ViT-L/14).
PUBLISHED = {"base": {"gac_nfid": 1.0, "gac_clip": 32.2, "pokemon_nfid": 1.0, "pokemon_clip": 29.2},
             "lora": {"gac_nfid": 0.923, "gac_clip": 32.5, "pokemon_nfid": 0.867, "pokemon_clip": 30.3},
             "trilora": {"gac_nfid": 0.833, "gac_clip": 32.5, "pokemon_nfid": 0.796, "pokemon_clip": 30.1}}
PAPER_COLUMNS = {"Pokemon NFID": "pokemon_nfid", "Pokemon CLIP": "pokemon_clip", "GAC NFID": "gac_nfid",
                 "GAC CLIP": "gac_clip"}
# "CLIP about equal": within this share of LoRA's CLIP score (the paper's gaps: 0 and 0.2 of ~30 points).
CLIP_TOLERANCE = 0.03
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


# -- inputs ------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TriLoRASettings(Settings):
    """The ``protocol:`` block of Table 1 (besides ``adapters``)."""

    table_epoch: int = setting(minimum=1, doc="the epoch every adapter is read at for the table")
    sample_seed: int = setting(minimum=0, doc="the seed the evaluation samples' seeds derive from (the paper's 30)")
    checkpoints: Any = setting([], doc="epochs scored along the way (the over-training curves)")
    overtrain: list[str] = setting([], doc="adapters trained on to the last checkpoint")
    grid_images: int = setting(16, minimum=1, doc="samples per row of samples.png")
    max_eval_prompts: Optional[int] = setting(None, minimum=2, doc="score the first N captions only")
    reference_model: Any = setting(None, doc="NFID's denominator model (null: the training base)")


def resolve_plan(cfg: DictConfig) -> tuple[dict, TriLoRASettings]:
    """``(adapters, settings)``, checked before any work; ``settings.checkpoints`` sorted, with table_epoch."""
    adapters, _, _ = protocol_inputs(cfg, "adapters", "lora")
    st = read_settings(TriLoRASettings, cfg.protocol)
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in st.checkpoints or []):
        raise ConfigError("protocol.checkpoints", f"must be a list of epochs (integers), got {st.checkpoints}")
    st.checkpoints = sorted({int(e) for e in (st.checkpoints or [st.table_epoch])} | {st.table_epoch})
    if st.checkpoints[0] < 1:
        raise ConfigError("protocol.checkpoints", f"epochs must be >= 1, got {st.checkpoints}")
    unknown = [a for a in st.overtrain if a not in adapters]
    if unknown:
        raise ConfigError("protocol.overtrain", f"{unknown} are not in protocol.adapters ({', '.join(adapters)})")
    if st.overtrain and st.checkpoints[-1] == st.table_epoch:
        raise ConfigError("protocol.checkpoints",
                          f"over-training needs a checkpoint after table_epoch={st.table_epoch}")
    schedule = cfg.optim.get("lr_scheduler", "constant")
    if st.overtrain and schedule not in CONSTANT_SCHEDULES:
        raise ConfigError("optim.lr_scheduler", f"{schedule!r}: the over-training runs are read at table_epoch, which "
                          f"equals a shorter run only with {' or '.join(CONSTANT_SCHEDULES)}; drop protocol.overtrain")
    if int(cfg.eval.get("images_per_prompt", 1)) != 1:
        raise ConfigError("eval.images_per_prompt", "this protocol draws one image per dataset caption; set it to 1")
    check_processes(cfg, "trilora", "one")  # rank zero scores between epochs, with metrics that sync over ranks
    # each cell trains table_epoch epochs (over-training: to the last checkpoint), whatever the trainer's limits
    for at, trainer in [("trainer", cfg.get("trainer") or {}),
                        *((f"protocol.adapters.{n}.recipe.trainer", (a.get("recipe") or {}).get("trainer") or {})
                          for n, a in adapters.items())]:
        for key, free in (("max_steps", (-1, None)), ("max_epochs", (-1, None, st.table_epoch))):
            if trainer.get(key) not in free:
                raise ConfigError(f"{at}.{key}", f"{trainer.get(key)}: the trilora protocol trains each adapter "
                                  f"protocol.table_epoch={st.table_epoch} epochs (those in protocol.overtrain to the "
                                  f"last of protocol.checkpoints), whatever the trainer's limit; set those instead")
    return adapters, st


def cell_epochs(adapters: Mapping[str, Any], st: TriLoRASettings) -> dict[str, int]:
    """The epochs each adapter's cells train: ``table_epoch``, or the last checkpoint for those over-trained."""
    return {name: st.checkpoints[-1] if name in st.overtrain else st.table_epoch for name in adapters}


# -- the run -----------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the protocol ``cfg.protocol`` describes; writes results.json, table.md, samples.png,
    curves.csv and curves.png, and logs the curves and tables to the configured loggers."""
    session = Session(cfg, Path(run_dir), PROTOCOL)
    adapters, st = resolve_plan(cfg)
    seeds, table_epoch, checkpoints, overtrain = st.seeds, st.table_epoch, st.checkpoints, st.overtrain
    sampler_cfg = OmegaConf.to_container(cfg.eval.sampler, resolve=True)
    device = eval_device(cfg)
    with quiet_cells():
        prompts, references = caption_eval_set(OmegaConf.to_container(cfg.data, resolve=True), st.max_eval_prompts)
        epochs = cell_epochs(adapters, st)
        check_epoch_warmups(cfg, adapters, epochs)  # the data is known now, no model is loaded
    scorer = instantiate(cfg.eval.fidelity).to(device).set_references(references())
    # NFID's denominator: the FID of protocol.reference_model (the paper: Stable Diffusion 1.5, whatever base
    # the adapters train on) on the same prompts, seeds, references and features; null: the base. Loaded
    # here, after the data's checks, so a model that does not load stops the run before any sampling.
    ref_cfg = st.reference_model
    ref_model = None if ref_cfg is None else load_field(ref_cfg, "protocol.reference_model")
    latent_seeds = derive_seed_list("style-finetune-samples", st.sample_seed, len(prompts))
    n_grid = min(st.grid_images, len(prompts))
    loggers = session.open_loggers(f"{PROTOCOL}-seed{seeds[0]}")

    def evaluate(components, base_fid=None):
        images = sample_each(components, sampler_cfg, prompts, latent_seeds, device)
        scores = scorer(images, prompts)
        scores["nfid"] = scores["fid"] / (base_fid if base_fid is not None else scores["fid"])
        return scores, images[:n_grid]

    def measurer(name: str, seed: int):
        def measure(module) -> dict[str, float]:
            measured = sizes.measure(module.components, module.adapters, prompts, sampler_cfg, device, seed=seed)
            if module.current_epoch + 1 == table_epoch:  # the table's adapter (the callback runs at epoch end)
                session.size_log.add(name, measured)
            return sizes.row_fields(measured)
        return measure

    base = base_model(cfg, [(f"protocol.adapters.{n}", cell_config(cfg, a, {}, seeds[0], Path(".")).adapter)
                            for n, a in adapters.items()])  # before the progress bar and any model's scores
    session.count(1 + len(adapters) * len(seeds))
    rows = []
    with quiet_cells():
        if ref_model is not None:
            ref_scores, _ = evaluate(ref_model)
            rows.append({"method": "reference", "seed": None, "epoch": 0, "step": 0, **ref_scores})
            ref_model = None
        base_scores, base_images = evaluate(base, ref_scores["fid"] if ref_cfg is not None else None)
        del base
    base_fid = ref_scores["fid"] if ref_cfg is not None else base_scores["fid"]  # every row's NFID denominator
    rows.append({"method": "base", "seed": None, "epoch": 0, "step": 0, **base_scores})
    session.done(f"    base: FID {base_scores['fid']:.3f}, KID {base_scores['kid']:.4f}, CLIP "
                  f"{base_scores['clip_score']:.2f}" + (f"; reference model FID {base_fid:.3f}" if ref_cfg else ""))
    session.grid = [("base model", base_images[:n_grid])]

    cells = []  # one per (adapter, seed); the seeds of one adapter train together with protocol.batch_cells > 1
    for name, acfg in adapters.items():
        last = epochs[name]
        for seed in seeds:
            folder = session.run_dir / "cells" / f"{name}-seed{seed}"
            cell = cell_config(cfg, acfg, {}, seed, folder)
            with open_dict(cell):
                cell.trainer.max_epochs, cell.trainer.max_steps = last, -1
            scored = CheckpointEvaluation([e for e in checkpoints if e <= last], lambda comp: evaluate(comp, base_fid),
                                          loggers, prefix=f"curves/{name}/seed{seed}", grid_dir=str(folder / "samples"),
                                          measure=measurer(name, seed))
            cells.append(Cell(cell, folder, f"{name}/seed{seed}", callbacks=[scored], key=(name, seed),
                              source=f"protocol.adapters.{name}"))

    def done(t) -> None:
        name, seed = t.cell.key
        history, res = t.cell.callbacks[0].history, t.results
        at = next(r for r in history if r["epoch"] == table_epoch)
        session.done(f"{name:>8} seed {seed}: NFID {at['nfid']:.3f} (FID {at['fid']:.3f}), CLIP "
                      f"{at['clip_score']:.2f} at epoch {table_epoch}; last NFID {history[-1]['nfid']:.3f} at epoch "
                      f"{history[-1]['epoch']} ({res['timings']['fit_s']:.0f} s)")

    for t in run_cells(cells, st.batch_cells, scratch=session.run_dir / "cells", on_done=done):
        (name, seed), callback = t.cell.key, t.cell.callbacks[0]
        rows += [{"method": name, "seed": seed, **point, "train_s": t.results["timings"]["fit_s"],
                  "steps": t.results["metrics"]["steps"]} for point in callback.history]
        if seed == seeds[0]:
            session.grid.append((f"{name}, epoch {table_epoch}", callback.images[table_epoch]))

    out = session.results(
        dataset=str(cfg.data.get("name")), seeds=seeds,
        methods=[*(["reference"] if ref_cfg is not None else []), "base", *adapters],
        reference_model=None if ref_cfg is None else str(ref_cfg.get("name") or ref_cfg.get("pretrained")),
        adapters={k: OmegaConf.to_container(v, resolve=True) for k, v in adapters.items()}, table_epoch=table_epoch,
        checkpoints=checkpoints, overtrain=overtrain, prompts=prompts, n_references=scorer.n_references,
        sample_seed=st.sample_seed, sampler=sampler_cfg, rows=rows)
    out.update(summaries(out))
    out["headline"] = headline(out["summary"], ("nfid", "clip_score"), LABELS, list(adapters))
    data = [[m, *[s.get(k, {}).get("mean") for k in METRICS]] for m, s in out["summary"].items()]
    return session.finish(out, render_table(out), f"update size per layer at epoch {table_epoch}, mean over seeds",
                          f"seed {seeds[0]}; one sample per caption, the dataset's first {n_grid} captions",
                          files=files(out), images={"curves": session.run_dir / "curves.png"},
                          step=table_epoch, tables={"table1": (["method", *METRICS], data)})


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
    res["nfid_order"] = {"claim": "TriLoRA NFID < LoRA NFID < 1", "verdict": seedwise(ma < mb < 1, all(holds)),
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
        verdict = "not observed (LoRA does not over-train here)" if mrb <= 0 else \
            seedwise(mra < mrb, all(ra[s] < rb[s] for s in seeds))
        res["overtraining"] = {
            "claim": "TriLoRA resists over-training (its NFID rises less than LoRA's when trained long)",
            "verdict": verdict, "rule": f"NFID rise from epoch {te} to {last}; reproduced: LoRA rises, TriLoRA "
            "rises less in the mean and in every seed; mixed: in the mean only",
            "trilora_rise": mra, "lora_rise": mrb, "from_epoch": te, "to_epoch": last}
    return res


def columns(out: dict) -> list[Column]:
    """Table 1's columns (markdown and table.csv): the world's NFID / FID / KID / CLIP score (mean +- std over
    seeds) beside the paper's."""
    s = out["summary"]
    names = {"base": "base model", "reference": f"reference model ({out.get('reference_model')})"}
    return [Column("method", lambda m: names[m] if m in FIXED_ROWS else f"{m} ({describe(out, m)})",
                   (("method", str), ("adapter", lambda m: describe(out, m) if m not in FIXED_ROWS else m),
                    ("n_seeds", lambda m: s[m]["nfid"]["n"]))),
            *(Column(LABELS[k], lambda m, k=k, f=f: pm(s[m].get(k), f), mean_std_csv(s, [k]))
              for k, f in (("nfid", "{:.3f}"), ("fid", "{:.2f}"), ("kid", "{:.4f}"), ("clip_score", "{:.2f}"))),
            *(Column(f"paper {label}", lambda m, k=k: _paper(out, m, k),
                     ((f"paper_{k}", lambda m, k=k: published(out, m).get(k)),)) for label, k in PAPER_COLUMNS.items())]


def render_table(out: dict) -> str:
    """Table 1 in markdown, with its note."""
    n = len(out["seeds"])
    note = (f"Mean +- std (population) over {n} training seed(s) at epoch {out['table_epoch']}; one image per caption "
            f"of the dataset ({len(out['prompts'])} prompts, seeds derived from {out['sample_seed']}), FID and KID "
            f"against all {out['n_references']} dataset images. NFID = FID / FID("
            + (f"reference model {out['reference_model']}, same prompts, seeds, references and features); the base "
               "and reference models are deterministic here (one row each)." if out.get("reference_model") else
               "base model, same prompts, seeds, references and features); the base model is deterministic here "
               "(one row).")
            + " Paper: Feng et al. 2024, Table 1 (SD v1.5 / AnyLoRA, Inception FID, CLIP ViT-L/14).")
    return markdown(columns(out), list(out["summary"])) + "\n\n" + note


def _paper(out: dict, method: str, key: str) -> str:
    pub = published(out, method)
    return f"{pub[key]:g}" if key in pub else "-"


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


def curves_csv(out: dict) -> str:
    """Every checkpoint's scores, one row per (method, seed, epoch)."""
    cols = ["method", "seed", "epoch", "step", *CURVE_METRICS, "kid_std"]
    return csv_text([cols, *[[r.get(c) for c in cols] for r in out["rows"]]])


def plot_curves(path: Path, out: dict) -> None:
    """FID, NFID and CLIP score against epoch (mean +- std over seeds), the base model as a line."""
    base = next(r for r in out["rows"] if r["method"] == "base")
    metrics = ("fid", "nfid", "clip_score")
    panels = {LABELS[k] + (" (lower is better)" if k != "clip_score" else " (higher is better)"): {
        f"{m} ({describe(out, m)})": (list(by), [v[k]["mean"] for v in by.values()], [v[k]["std"] for v in by.values()])
        for m, by in out["curves"].items()} for k in metrics}

    def decorate(ax, i: int) -> bool:
        ax.axhline(base[metrics[i]], color="gray", ls="--", label="base model")
        ax.axvline(out["table_epoch"], color="black", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        return i == 0  # one legend

    band_panels(path, panels, "epoch", title=f"Over-training study on {out['dataset']}: mean +- std over "
                f"{len(out['seeds'])} seeds; dotted line: the table's epoch {out['table_epoch']}", width=13 / 3,
                legend_size=7, decorate=decorate)


def files(out: dict) -> dict:
    """What every protocol's outputs do not cover: table.csv, curves.csv, verdicts.json and curves.png."""
    return {"table.csv": csv_of(columns(out), list(out["summary"])), "curves.csv": curves_csv(out),
            "verdicts.json": out["verdicts"], "curves.png": lambda path: plot_curves(path, out)}


SAME_ACROSS_RUNS = ("dataset", "prompts", "sample_seed", "sampler", "table_epoch", "n_references")


def collect(outs: Sequence[dict]) -> dict:
    """One results dict from the results of several runs of one setup (e.g. a multirun with one seed per
    job): rows joined, the base model's row kept once (it must agree across runs)."""
    out = {k: v for k, v in outs[0].items() if k != "_path"}

    def repeated(row: dict, first: dict) -> Optional[str]:  # the fixed rows are every run's: the same in each
        if row["method"] not in FIXED_ROWS:
            return f"{row['method']} seed {row['seed']} epoch {row['epoch']} appears in two runs"
        return None if row["fid"] == first["fid"] else "the base model's FID differs from another run's; these " \
            "runs are not one table"

    rows = join_rows(outs, SAME_ACROSS_RUNS, lambda r: (r["method"], r["seed"], r["epoch"]), repeated)
    out["rows"] = rows
    out["seeds"] = sorted({r["seed"] for r in rows if r["seed"] is not None})
    out["methods"] = list(dict.fromkeys(m for o in outs for m in o["methods"]))
    out["adapters"] = {k: v for o in outs for k, v in o["adapters"].items()}
    out["overtrain"] = sorted({m for o in outs for m in o["overtrain"]})
    out["checkpoints"] = sorted({e for o in outs for e in o["checkpoints"]})
    out["runs"] = [str(Path(o["_path"]).parent) if "_path" in o else "" for o in outs]
    out.update(summaries(out))
    return out


def rebuild(results: list[dict]) -> Rebuilt:
    """Table, CSVs, verdicts, curves plot and the joined results.json from runs' results (no model needed)."""
    out = collect(results)
    table = render_table(out)
    return Rebuilt({**files(out), "results.json": out, "table.md": table + "\n"},
                   table + "\n" + "\n".join(f"- {v['claim']}: {v['verdict']}" for v in out["verdicts"].values()))


PAPER = Paper("trilora", PROTOCOL, rebuild, "where to write table.md, table.csv, curves.*, verdicts.json")

if __name__ == "__main__":  # the command before `python -m lorabench.protocols rebuild trilora`
    rebuild_cli(PAPER.name)
