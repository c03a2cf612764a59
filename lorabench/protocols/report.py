"""What every protocol reports: summaries (mean +- population std), markdown tables, verdict lines,
the run's output files and logger entries, and the command line that rebuilds a paper's tables from
finished runs' results.json files without re-running them."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import yaml
from omegaconf import DictConfig

from lorabench.errors import ConfigError
from lorabench.loggers import build_loggers, finish_wandb
from lorabench.sampling import save_grid
from lorabench.utils.io import write_json, write_text


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


def format_verdicts(items: Sequence[Mapping]) -> str:
    """One markdown bullet per verdict: ``- **verdict**: claim. detail``."""
    return "\n".join(f"- **{v['verdict']}**: {v['claim']}. {v['detail']}" for v in items)


def write_protocol_outputs(cfg: DictConfig, run_dir: Path, name: str, out: dict, table: str,
                           panels: list[torch.Tensor], tables: Mapping[str, tuple] | None = None,
                           loggers: Sequence | None = None, step: int = 0,
                           images: Mapping[str, Path] | None = None, job_type: str = "eval",
                           labels: Sequence[str] | None = None, grid_title: str = "") -> None:
    """results.json, table.md, samples.png (rows named by ``labels``, columns by ``grid_title``), and the
    summary means to every configured logger (built here as a ``job_type`` W&B run, or the run's own
    ``loggers`` if it logged along the way, at ``step``), then the W&B run ends; ``tables``
    (``{key: (columns, rows)}``) and ``images`` (``{key: png}``, plus the sample grid as
    ``<name>/samples``) go to loggers that take them (W&B)."""
    write_json(run_dir / "results.json", out)
    write_text(run_dir / "table.md", table + "\n")
    save_grid(run_dir / "samples.png", panels, labels, grid_title)
    if loggers is None:
        loggers = build_loggers(cfg.get("logger"), run_dir, run_name=f"{name}-seed{out['seeds'][0]}",
                                resolved_config=out["config"], job_type=job_type)
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
                for key, path in {"samples": run_dir / "samples.png", **(images or {})}.items():
                    lg.log_image(key=f"{name}/{key}", images=[str(path)])
            lg.save()
    finally:
        finish_wandb()


def rebuild_cli(argv: Optional[Sequence[str]], prog: str, description: str,
                rebuild: Callable[[list[str], Optional[str]], str], out_help: str, out_required: bool = True) -> None:
    """The ``python -m lorabench.protocols.<paper> RUNS... --out DIR`` command every paper's protocol has:
    ``rebuild(paths, out)`` writes the tables and returns what to print. Bad input (a folder without
    results, runs that do not belong in one table) is one line and exit status 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("paths", nargs="+", help="run folders or results.json files")
    parser.add_argument("--out", required=out_required, help=out_help)
    args = parser.parse_args(argv)
    try:
        print(rebuild(list(args.paths), args.out))
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
