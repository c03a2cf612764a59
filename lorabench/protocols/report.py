"""What every protocol reports: summaries (mean +- population std), markdown tables, verdict lines,
the run's output files and logger entries, and the command line that rebuilds a paper's tables from
finished runs' results.json files without re-running them."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from lorabench.checks import check_writable
from lorabench.errors import ConfigError
from lorabench.loggers import build_loggers, finish_wandb, previous_wandb_id
from lorabench.protocols import base, sizes
from lorabench.protocols.base import mean_std, pm
from lorabench.sampling import save_grid
from lorabench.utils.console import CellProgress
from lorabench.utils.io import write_json, write_text
from lorabench.utils.tables import Column, markdown


def summarise_rows(rows: list[dict], metrics: Sequence[str], per_seed: bool = False) -> dict[str, dict[str, dict]]:
    """``{method: {metric: {mean, std, n}}}`` over the rows of each method (population std); with
    ``per_seed``, over each seed's mean (a seed's rows are its concepts: the spread is the seeds')."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        groups = [[r for r in sel if r["seed"] == s] for s in dict.fromkeys(r["seed"] for r in sel)] if per_seed \
            else [[r] for r in sel]
        out[method] = {m: v for m in metrics if (v := mean_std([statistics.fmean(xs) for g in groups if (
            xs := [r[m] for r in g if r.get(m) is not None])]))}
    return out


class LayerMeans:
    """Per-layer measures gathered by group (a method, an adapter type) over many adapters or merges;
    :meth:`means` gives ``{group: {layer: {measure: mean}}}``."""

    def __init__(self):
        self.values: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(self, group: str, per_layer: Mapping[str, Mapping[str, float]]) -> None:
        """Record one ``{layer: {measure: value}}`` under ``group``."""
        for layer, row in per_layer.items():
            acc = self.values.setdefault(group, {}).setdefault(layer, {})
            for k, v in row.items():
                acc.setdefault(k, []).append(v)

    def means(self) -> dict[str, dict[str, dict[str, float]]]:
        """Each group's per-layer means, layers in the order they were first recorded."""
        return {g: {layer: {k: statistics.fmean(v) for k, v in acc.items()} for layer, acc in per.items()}
                for g, per in self.values.items()}


def markdown_table(summary: dict, metrics: Sequence[str], labels: Mapping[str, str], note: str = "") -> str:
    """A markdown table of ``summary`` (rows: methods; cells: mean +- std), then ``note``."""
    columns = [Column("method", str)] + [Column(labels.get(m, m), lambda method, m=m: pm(
        summary[method].get(m), "{:.1f}" if m.endswith("_s") else "{:.3f}")) for m in metrics]
    return markdown(columns, list(summary)) + (f"\n\n{note}" if note else "")


def headline(summary: Mapping[str, Mapping], metrics: Sequence[str], labels: Mapping[str, str],
             methods: Optional[Sequence[str]] = None) -> list[list]:
    """The table's gist a sweep's summary shows per job (:mod:`lorabench.sweeps`): ``[label method, mean]``
    pairs, metric by metric, for each of ``methods`` (default: every method of ``summary``) that has it. A list
    of pairs, as JSON keeps their order."""
    return [[f"{labels.get(k, k)} {m}", summary[m][k]["mean"]] for k in metrics
            for m in (summary if methods is None else methods) if k in summary.get(m, {})]


def format_verdicts(items: Sequence[Mapping]) -> str:
    """One markdown bullet per verdict: ``- **verdict**: claim. detail``."""
    return "\n".join(f"- **{v['verdict']}**: {v['claim']}. {v['detail']}" for v in items)


@dataclass
class Session:
    """One protocol run as its stages see it: the config and folder, the clock, the progress bar
    (:meth:`count`, :meth:`done`), the sample grid's rows (``grid``: ``(label, images)``) and the adapters'
    update sizes (``size_log``), the loggers (:meth:`open_loggers`). :meth:`results` starts results.json's
    content; :meth:`finish` writes what every protocol writes and logs it."""

    cfg: DictConfig
    run_dir: Path
    protocol: str  # the protocol's name in results.json and its W&B keys
    t0: float = field(default_factory=time.perf_counter)
    grid: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    size_log: sizes.SizeLog = field(default_factory=sizes.SizeLog)
    progress: Optional[CellProgress] = None
    loggers: Optional[list] = None

    def open_loggers(self, run_name: str, resumed: bool = False) -> list:
        """The configured loggers, opened now (as a ``job_type="eval"`` W&B run named ``run_name``) for a protocol
        that logs along the way (curves, per-task scores); :meth:`finish` logs the summary to them and ends
        the W&B run. A protocol that does not call this gets them at :meth:`finish`. ``resumed``: the run goes
        on from its folder's state, and an online W&B run goes on in the one that logged it so far."""
        self.loggers = build_loggers(self.cfg.get("logger"), self.run_dir, run_name=run_name, job_type="eval",
                                     resolved_config=OmegaConf.to_container(self.cfg, resolve=True),
                                     resume_id=previous_wandb_id(self.run_dir) if resumed else None)
        return self.loggers

    def count(self, total: int, desc: str = "") -> None:
        """A progress bar of ``total`` cells (named ``desc``, else the protocol)."""
        self.progress = CellProgress(total, desc=desc or self.protocol)

    def done(self, line: str) -> None:
        """One cell done: its line on the console."""
        self.progress.done(line)

    def results(self, **fields: Any) -> dict[str, Any]:
        """results.json's content: the protocol's name, ``fields``, update sizes, total time, the config."""
        return {"protocol": self.protocol, **fields, "update_size": self.size_log.results(),
                "total_s": time.perf_counter() - self.t0, "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def finish(self, out: dict, table: str, size_title: str, grid_title: str = "", *,
               files: Optional[Mapping[str, Any]] = None, images: Optional[Mapping[str, Path]] = None,
               tables: Optional[Mapping[str, tuple]] = None, step: int = 0, job_type: str = "eval") -> dict[str, Any]:
        """Close the progress bar and write results.json (``out``), table.md (``table``), the protocol's other
        ``files`` (:func:`lorabench.protocols.base.write_files`), samples.png (the ``grid``'s rows, columns
        titled ``grid_title``) and update_size.png (titled ``size_title``); then log the summary means and
        update sizes at ``step`` to the loggers (:meth:`open_loggers`'s, else opened now as a ``job_type`` W&B
        run), with ``tables`` (``{key: (columns, rows)}``) and ``images`` (``{key: png}``, the sample grid and
        update_size.png added) where a logger takes them (W&B), and end the W&B run. ``out["table"]`` is
        ``table``."""
        if self.progress is not None:
            self.progress.close()
        run_dir, name = self.run_dir, self.protocol
        images = {"samples": run_dir / "samples.png", **(images or {})}
        if sizes.size_plot(run_dir / "update_size.png", out.get("update_size") or {}, size_title):
            images["update_size"] = run_dir / "update_size.png"
        write_json(run_dir / "results.json", out)
        write_text(run_dir / "table.md", table + "\n")
        base.write_files(files or {}, run_dir)
        save_grid(run_dir / "samples.png", [img for _, img in self.grid], [label for label, _ in self.grid], grid_title)
        loggers = self.loggers if self.loggers is not None else build_loggers(
            self.cfg.get("logger"), run_dir, run_name=f"{name}-seed{out['seeds'][0]}", resolved_config=out["config"],
            job_type=job_type)
        try:
            flat = {f"{name}/{m}/{k}": v["mean"] for m, s in out["summary"].items() for k, v in s.items()}
            flat.update({f"{name}/update_size/{g}/{k}": v["mean"] for g, e in (out.get("update_size") or {}).items()
                         for k, v in e.items() if isinstance(v, dict) and "mean" in v})
            for lg in loggers:
                lg.log_metrics(flat, step=step)
                if hasattr(lg, "log_table"):
                    for key, (columns, data) in (tables or {}).items():
                        lg.log_table(key=f"{name}/{key}", columns=list(columns), data=[list(r) for r in data])
                if hasattr(lg, "log_image"):
                    for key, path in images.items():
                        lg.log_image(key=f"{name}/{key}", images=[str(path)])
                lg.save()
        finally:
            finish_wandb()
        out["table"] = table
        return out


def rebuild_cli(paper: str, argv: Optional[Sequence[str]] = None) -> None:
    """The rebuild command of a paper (:func:`lorabench.protocols.base.rebuild`): ``RUNS... [--out DIR]``
    prints the tables and writes them into DIR. Bad input (a folder without results, runs that do not
    belong in one table) is one line and exit status 2."""
    p = base.paper(paper)
    parser = argparse.ArgumentParser(prog=f"lorabench rebuild {paper}",
                                     description=f"Rebuild {paper}'s tables from its runs' results.json files "
                                     "(folders searched recursively); nothing re-runs.")
    parser.add_argument("paths", nargs="+", help="run folders or results.json files")
    parser.add_argument("--out", required=p.out_required, help=p.outputs)
    args = parser.parse_args(argv)
    try:
        if args.out:  # before any reading: a folder it cannot write in was a traceback after the work
            check_writable(args.out, "--out")
        print(base.rebuild(paper, list(args.paths), args.out).console)
    except (ConfigError, ValueError) as err:
        print(f"lorabench: error: {err}", file=sys.stderr)
        sys.exit(2)


def render_card(card: Mapping) -> str:
    """A protocol card (``experiments/<paper>/protocol.yaml``) as the Markdown table beside it."""
    def cell(v) -> str:
        text = "null" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
        return text

    lines = [f"# Protocol card: {card['paper']}", "",
             "Generated from `protocol.yaml` (`python -m lorabench.protocols.report --card protocol.yaml`); "
             "`tests/test_cards.py` composes " + ", ".join(f"`experiment={e}`" for e in card["experiments"])
             + " and fails when a carded key differs.", "",
             "| setting | value | config key | source | note |", "|---|---|---|---|---|"]
    for line in card["settings"]:
        key = line.get("key")
        where = f"`{key}`" + (f" (`.{line['field']}` of each)" if line.get("field") else "") if key else "-"
        if line.get("experiments"):
            where += " in " + ", ".join(line["experiments"])
        lines.append(f"| {cell(line['setting'])} | {cell(line.get('value')) if key else '-'} | {where} | "
                     f"{cell(line['source'])} | {cell(line.get('note', ''))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lorabench.protocols.report --card experiments/*/protocol.yaml``: render the cards."""
    parser = argparse.ArgumentParser(prog="python -m lorabench.protocols.report",
                                     description="Render protocol cards (protocol.yaml -> protocol.md).")
    parser.add_argument("--card", nargs="+", type=Path, required=True)
    for path in parser.parse_args(argv).card:
        write_text(path.with_suffix(".md"), render_card(yaml.safe_load(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
