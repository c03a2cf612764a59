"""Sweeps as people read them: job folders named after the values they sweep, and one table of every job.

    lorabench -m adapter=lora,trilora seed=0,1       # jobs in outputs/multirun/<task>/<time>/0_adapter=lora,seed=0/ ...
    lorabench summarize outputs/multirun/quickstart/2026-12-04_10-00-00   # the table again, any time

At the end of a multirun, :class:`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in conf/train.yaml)
prints the table and writes ``summary.md``, ``summary.csv`` and ``summary.png`` (a dot per job for each measured
column) into the sweep folder. Nothing here imports torch: summarising is reading JSON.

One job's failure is that job's, not the sweep's: a job that crashes, or that fails on bad input in a field its
swept values set (``optim.warmup_steps=500,0``: 500 is too long a warm-up), writes ``failed.json`` into its folder
(the traceback stays in its ``cli.log``; bad input leaves nothing else) and the sweep goes on; the table shows it,
and the command exits with status 1 (2 where every failure was bad input). Bad input that no swept value sets
(``data.path``) would fail every job alike: it stops the sweep at once, as a single run stops.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lorabench.utils.io import write_text


@lru_cache(maxsize=1)
def _swept_keys(argv: tuple[str, ...]) -> frozenset[str]:
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except OverrideParseException:
        return frozenset()
    return frozenset(o.key_or_group for o in parsed if o.is_sweep_override())


def job_dir_name(num, task: Sequence[str], argv: Optional[Sequence[str]] = None) -> str:
    """A sweep job's folder: its number and the values it sweeps (``3_adapter=trilora,seed=1``), from the
    command line's sweep overrides; its number alone where they are not known (a launcher whose workers do
    not see the command line). Characters other than letters, digits and ``.,=+-_`` become ``-``."""
    swept = _swept_keys(tuple(sys.argv[1:] if argv is None else argv))
    parts = [o for o in task if o.split("=", 1)[0].lstrip("+~") in swept]
    name = f"{num}_{','.join(parts)}" if parts else str(num)
    return re.sub(r"[^\w.,=+-]", "-", name)[:120]


def swept_keys(sweep_dir: Path) -> frozenset[str]:
    """The keys and groups a sweep sweeps, from its ``multirun.yaml`` (empty where there is none)."""
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not multirun.is_file():
        return frozenset()
    task = OmegaConf.select(OmegaConf.load(multirun), "hydra.overrides.task") or []
    return _swept_keys(tuple(str(t) for t in task))


def set_by_sweep(field: str, swept: Iterable[str]) -> bool:
    """Whether a swept key or group can set ``field``: the key itself, one above it (``adapter`` sets
    ``adapter.rank``) or below it, a group's package (``adapter@protocol.adapter``), or ``experiment``
    (which sets anything)."""
    for key in swept:
        key = key.split("@", 1)[1] if "@" in key else key.replace("/", ".")
        if key == "experiment" or field == key or field.startswith(f"{key}.") or key.startswith(f"{field}."):
            return True
    return False


# a sweep job's failure, in its folder: {"error": one line, "bad_input": true | false}
FAILED = "failed.json"


def record_failure(job: Path, error: str, bad_input: bool) -> None:
    """Write the failure of the sweep job in ``job`` (see the module's docstring)."""
    write_text(job / FAILED, json.dumps({"error": " ".join(error.split()), "bad_input": bad_input}) + "\n")


def _overrides(job: Path) -> list[str]:
    f = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(f)] if f.is_file() else []


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def job_name(job: Path, sweep_dir: Path) -> str:
    """A sweep job's name: its folder below the sweep's (``0_adapter=lora``; ``naive/order0-seed0`` where the
    experiment nests its jobs)."""
    try:
        return job.resolve().relative_to(Path(sweep_dir).resolve()).as_posix()
    except ValueError:
        return job.name


def job_row(job: Path, swept: Sequence[str], sweep_dir: Path) -> dict[str, str]:
    """One job of a sweep: its folder, the values it swept, and what its results.json reports (a training
    run: steps, losses, time; a protocol: its name and table); ``failed`` where there is no results.json."""
    overrides = [o for o in _overrides(job) if o.split("=", 1)[0].lstrip("+~") in swept] or _overrides(job)
    row = {"job": job_name(job, sweep_dir), "overrides": " ".join(overrides)}
    results, failed = job / "results.json", job / FAILED
    if not results.is_file() and failed.is_file():
        try:
            error = json.loads(failed.read_text())["error"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            error = f"{FAILED} unreadable"
        return {**row, "status": f"failed: {error}".replace("|", "\\|")}
    if not results.is_file():
        return {**row, "status": "failed (no results.json)"}
    try:  # one job's unreadable file is that job's row, not the end of the sweep's summary
        r = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {**row, "status": f"failed (results.json is not JSON: {exc})"}
    if not isinstance(r, dict):
        return {**row, "status": "failed (results.json holds no JSON object)"}
    if r.get("protocol") is None and isinstance(r.get("metrics"), dict):  # a protocol's metrics are its own
        m, t = r["metrics"], r.get("timings") or {}
        return {**row, "status": "done", "adapter": _fmt(r.get("adapter")), "steps": _fmt(m.get("steps")),
                "train loss last": _fmt(m.get("train_loss_last")), "val loss after": _fmt(m.get("val_loss_after")),
                "total s": _fmt(t.get("total_s"))}
    table = "table.md" if (job / "table.md").is_file() else "-"
    headline = r.get("headline") if isinstance(r.get("headline"), list) else []  # [label, value]: its table's gist
    return {**row, "status": "done", "protocol": _fmt(r.get("protocol")), "table": table,
            **{str(p[0]): _fmt(p[1]) for p in headline if isinstance(p, list) and len(p) == 2}}


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (folders with ``.hydra/``), in the order the sweep ran them: at its top
    (``0_adapter=lora``) or deeper, where an experiment's ``hydra.sweep.subdir`` nests them (a continual sweep's
    ``naive/order0-seed0``). A job's own folders are not searched."""
    found = []
    for folder, subdirs, _ in os.walk(sweep_dir):
        if ".hydra" in subdirs and Path(folder) != sweep_dir:
            found.append(Path(folder))
            subdirs.clear()

    def order(job: Path) -> tuple[int, str]:
        name = job_name(job, sweep_dir)
        head = name.split("_", 1)[0]
        if head.isdigit():
            return int(head), name
        try:  # a nested job's number is in Hydra's record of it
            num = OmegaConf.select(OmegaConf.load(job / ".hydra" / "hydra.yaml"), "hydra.job.num")
        except Exception:  # noqa: BLE001 - an unreadable record: the job sorts last, by name
            num = None
        return (num if isinstance(num, int) else 1 << 30), name

    return sorted(found, key=order)


def summarize(sweep_dir: str | Path, write: bool = True) -> str:
    """The table of every job of the sweep in ``sweep_dir`` (markdown); with ``write``, also written as
    ``summary.md`` and ``summary.csv`` there (atomically)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{str(sweep_dir)!r} is not a folder; give a multirun folder")
    jobs = sweep_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no sweep jobs here (folders with .hydra/); give a multirun folder")
    swept = sorted(swept_keys(sweep_dir))
    rows = [job_row(j, swept, sweep_dir) for j in jobs]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    if write:
        write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{text}\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        write_text(sweep_dir / "summary.csv", buf.getvalue())
        summary_plot(sweep_dir / "summary.png", rows, cols)
    return text


# columns that name, count or time a job rather than measure what it trained: not plotted
NOT_PLOTTED = ("job", "overrides", "status", "protocol", "table", "adapter", "steps", "total s")


def _number(cell: Optional[str]) -> float:
    try:
        return float(cell) if cell not in (None, "", "-") else float("nan")
    except ValueError:
        return float("nan")


def summary_plot(path: Path, rows: Sequence[dict[str, str]], cols: Sequence[str], per_row: int = 4) -> bool:
    """``summary.png``: one panel per measured column of the sweep's table (a run's losses, a protocol's
    ``headline``) that holds a number, a dot per job on an axis spanning the column's values (bars from zero hid
    losses 1.05 against 1.07), jobs in the table's order (a failed job's dot is missing), a group's jobs one colour
    (a nested sweep's method, else the first swept value). Written for a sweep of two jobs or more with such a
    column; returns whether it was."""
    shown = [c for c in cols if c not in NOT_PLOTTED and any(not math.isnan(_number(r.get(c))) for r in rows)]
    if len(rows) < 2 or not shown:
        return False
    from lorabench.utils.plots import figure, save_figure  # noqa: PLC0415 - matplotlib: only where a table plots

    ncols, nrows = min(per_row, len(shown)), -(-len(shown) // per_row)
    fig, axes = figure(ncols, nrows, figsize=(3.4 * ncols + 1.6, (0.28 * len(rows) + 1.0) * nrows), sharey=True)
    names = [r["job"] for r in rows]
    keys = [n.split("/", 1)[0] if "/" in n else (r.get("overrides") or n).split(" ", 1)[0] for n, r in zip(names, rows)]
    groups = list(dict.fromkeys(keys))
    colours = [f"C{groups.index(k) % 10}" for k in keys]
    for ax, col in zip(axes.flat, shown):
        values = [_number(r.get(col)) for r in rows]
        ax.scatter(values, range(len(rows)), c=colours, s=36, zorder=3)
        seen = [v for v in values if not math.isnan(v)]
        pad = (max(seen) - min(seen)) * 0.15 or abs(seen[0]) * 0.05 or 0.05
        ax.set_xlim(min(seen) - pad, max(seen) + pad)
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(rows)), names, fontsize=7)
    axes[0, 0].invert_yaxis()  # the first job on top, as in the table (once: every panel shares the axis)
    fig.suptitle(f"sweep {path.parent.name}: {len(rows)} jobs", fontsize=9)
    save_figure(fig, path)
    return True


# the exit status of the last sweep this process ran (SweepSummary sets it; the CLI exits with it)
EXIT_STATUS = {"status": 0}


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print the sweep's table (every job in its folder, an earlier
    sweep's into the same ``hydra.sweep.dir`` too) and write summary.md / summary.csv; with failed jobs of this
    sweep, count them and set :data:`EXIT_STATUS` (1, or 2 where every failure was bad input)."""

    started: float = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        EXIT_STATUS["status"] = 0
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # every job failed on bad input and removed it
            return
        try:
            text = summarize(sweep_dir)
        except FileNotFoundError:
            return
        plot = f" (plotted: {sweep_dir / 'summary.png'})" if (sweep_dir / "summary.png").is_file() else ""
        print(f"\nlorabench sweep: {sweep_dir / 'summary.md'}{plot}\n{text}")
        jobs = [p for p in sweep_jobs(sweep_dir) if (p / ".hydra" / "overrides.yaml").is_file()
                and (p / ".hydra" / "overrides.yaml").stat().st_mtime >= self.started - 1.0]  # this sweep's
        failed = [p for p in jobs if not (p / "results.json").is_file()]
        if failed:
            bad_input = [p for p in failed if _bad_input(p)]
            EXIT_STATUS["status"] = 2 if len(bad_input) == len(failed) else 1
            names = ", ".join(sorted(job_name(p, sweep_dir) for p in failed))
            print(f"lorabench sweep: {len(failed)} of {len(jobs)} jobs failed: {names}", file=sys.stderr)


def _bad_input(job: Path) -> bool:
    try:
        return json.loads((job / FAILED).read_text()).get("bad_input") is True
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorabench summarize <sweep dir>``."""
    parser = argparse.ArgumentParser(prog="lorabench summarize", description="The table of a sweep's jobs "
                                     "(also written as summary.md and summary.csv in the sweep folder).")
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/quickstart/<date>_<time>")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.sweep_dir))
    except FileNotFoundError as exc:
        print(f"lorabench: error: sweep_dir: {exc}", file=sys.stderr)
        return 2
    return 0
