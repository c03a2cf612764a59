"""Issue 33's figures against their goals, read from the logs of ``bench/gpu_rows.sh``: one markdown report.

    python bench/gpu_report.py OUT_DIR [OUT_DIR ...]      # e.g. the two calls' folders, g1 and g2

Each figure is read from the line its benchmark prints (``ratio lora / base = 1.674``, ...); a figure whose log
or line is missing reads "not in the logs", never a guess. Below the figures: every step's exit status and
seconds (``summary.txt``), and every ``pytest -m gpu`` outcome (``-rA``'s PASSED / FAILED / ERROR / SKIPPED
lines), and the world Table 2 the GPU made (``world_table2/table2.csv``) against the committed CPU table, row by
row: the largest difference of a mean and the columns that differ at three decimals, beside the rounding
docs/benchmarks.md documents for batched cells, and where its time went (``world_table2/results.json``: the cells'
training, the samplings, the captures, the rest). The report goes to standard output; commit it beside the logs,
under ``bench/results/<date>-<gpu>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Optional

# (figure, log, pattern whose first group is the value, unit, goal as text, test of the value against the goal)
FIGURES = [
    ("LoRA step / frozen base, SD1.5 size, bf16, batch 4, eager", "lora_step", r"ratio lora / base = ([\d.]+)",
     "", "<= 1.10", lambda v: v <= 1.10),
    ("the same, each step one CUDA graph", "lora_step", r"ratio lora-graph / base-graph = ([\d.]+)",
     "", "<= 1.10", lambda v: v <= 1.10),
    ("kernel time a step, LoRA / base (3 eager steps profiled): the captured ratio's floor", "lora_step",
     r"ratio kernel time lora / base = ([\d.]+)", "", "(<= 1.10 leaves the captured goal reachable)", None),
    ("eager step with each layer casting its own factors / all cast together", "lora_step",
     r"ratio lora-layercast / lora = ([\d.]+)", "", "(> 1: casting together pays)", None),
    ("the same, captured", "lora_step", r"ratio lora-graph-layercast / lora-graph = ([\d.]+)",
     "", "(> 1: casting together pays)", None),
    ("captured step at rank 8 / at rank 4 (rank 4 zero-padded to 8 launches rank 8's kernels)", "lora_step",
     r"ratio lora-graph-r8 / lora-graph = ([\d.]+)", "", "(<= 1: padding the rank to 8 pays)", None),
    ("LoRA operators a step over the base's, a layer (CUDA)", "lora_step",
     r"lora\s+\d+ operators a step(?: \(the CUDA path\))?\s+([\d.]+) a layer over base", "",
     "(5.80 counted on the CPU)", None),
    ("an eager step's host time a LoRA layer: fused / reference", "layer_host",
     r"fused\s+[\d.]+ us a layer\s+\(([\d.]+)x the reference\)", "", "(< 1)", None),
    ("the same with the casts together / reference", "layer_host",
     r"fused, cast once\s+[\d.]+ us a layer\s+\(([\d.]+)x the reference\)", "", "(< 1)", None),
    ("lorabench / PEFT, eager", "train_step", r"ratio lorabench / peft = ([\d.]+)", "", "<= 0.75",
     lambda v: v <= 0.75),
    ("lorabench captured / PEFT eager", "train_step", r"ratio lorabench-graph / peft = ([\d.]+)", "", "<= 0.75",
     lambda v: v <= 0.75),
    ("merge 10 rank-64 adapters into SD1.5's 128 layers, bf16, stacked path", "merge",
     r"lorabench sum \+ grouped fold:\s+([\d.]+) ms", " ms", "< 1 ms", lambda v: v < 1.0),
    ("of which the fold's batched products alone", "merge", r"batched products alone ([\d.]+) ms", " ms", "", None),
    ("the merge's host work (tiny shapes)", "merge_overhead", r"stacked sum \+ stacked fold\s+([\d.]+) ms", " ms",
     "", None),
    ("K = 4 SD1.5 LoRAs stacked at batch 1 / one after another, concept-steps per second", "batched_sd15",
     r"ratio: ([\d.]+)x", "x", ">= 2.5x", lambda v: v >= 2.5),
    ("stacked members' updates against their separate runs (relative, Frobenius)", "batched_sd15",
     r"largest relative difference ([\d.e+-]+) \(Frobenius\)", "", "<= the bf16 floor below", None),
    ("the bf16 floor: a separate run in bf16 against itself in float32", "batched_sd15",
     r"float32: largest relative difference ([\d.e+-]+)", "", "", None),
    ("world evaluation, 28 settings: one by one / in one pass, time a setting", "eval_batch",
     r"K=\s*28: .*\(([\d.]+)x\)", "x", "(> 1: batching pays; 0.87-1.00x on 2 CPU cores)", None),
    ("the same, operators a setting in one pass", "eval_batch", r"K=\s*28: .*together (\d+)$", "",
     "(10,422 alone)", None),
    ("world captures of input statistics, 28 cells: one by one / in one pass, time a cell", "capture_batch",
     r"K=\s*28: .*\(([\d.]+)x\)", "x", "(> 1: batching pays)", None),
    ("the same, operators a cell in one pass", "capture_batch", r"K=\s*28: .*together (\d+)$", "",
     "(8,131 alone)", None),
]


def read_logs(folders: list[Path]) -> dict[str, str]:
    """``{step: log text}`` from every folder (a later folder's log of the same step wins)."""
    logs = {}
    for folder in folders:
        for f in sorted(folder.glob("*.log")):
            logs[f.stem] = f.read_text(errors="replace")
    return logs


def figure(logs: dict[str, str], log: str, pattern: str) -> Optional[float]:
    """The last value ``pattern`` finds in ``log``, or None."""
    found = re.findall(pattern, logs.get(log, ""))
    return float(found[-1]) if found else None


def summary(folders: list[Path]) -> list[tuple[str, str, str]]:
    """``(step, exit status or 'skipped', seconds)`` of every step in the folders' ``summary.txt``."""
    rows = []
    for folder in folders:
        path = folder / "summary.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            name, *fields = line.split()
            kv = dict(f.split("=", 1) for f in fields if "=" in f)
            status = kv["exit"] if "exit" in kv else ("skipped" if "skipped" in kv else "?")
            rows.append((name, status, kv.get("seconds", "-")))
    return rows


def outcomes(logs: dict[str, str]) -> list[tuple[str, str]]:
    """``(test id, PASSED / FAILED / ERROR / SKIPPED)`` from the pytest shards' ``-rA`` summaries."""
    seen = {}
    for name, text in logs.items():
        if name.startswith("pytest_gpu"):
            for outcome, test in re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED)\s+(\S+::\S+|\[\d+\] \S+)", text):
                seen[test] = outcome
    return sorted(seen.items())


ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments/orthogonal_adaptation/runs"
CPU_TABLE = RUNS / "world/table2.csv"  # separate cells, the CPU
# batched cells on the CPU, against the same: the rounding docs/benchmarks.md documents ("Batched cells")
CPU_BATCHED = RUNS / "world_batched/table2.csv"


def table_against(path: Path, reference: Path) -> list[tuple[str, float, int, int]]:
    """``(method, largest |difference| of a score's mean, columns differing at three decimals, columns)`` for
    every method of ``path``'s Table 2 CSV that ``reference`` has (merge times and stds left out)."""
    def rows(p: Path) -> dict[str, dict[str, str]]:
        with open(p, newline="") as f:
            return {r["method"]: r for r in csv.DictReader(f)}

    ours, ref = rows(path), rows(reference)
    out = []
    for method, row in ours.items():
        if method not in ref:
            continue
        cols = [k for k in row if k.endswith("_mean") and not k.startswith("merge_s") and row[k] and ref[method].get(k)]
        diffs = [abs(float(row[k]) - float(ref[method][k])) for k in cols]
        off = sum(round(float(row[k]), 3) != round(float(ref[method][k]), 3) for k in cols)
        out.append((method, max(diffs, default=0.0), off, len(cols)))
    return out


def world_stages(path: Path) -> list[str]:
    """Where the world Table 2's time went, from its results.json: the cells trained up front, then, in the main
    process, the samplings and the captures (seconds, passes) and the rest (merges, scoring, plots)."""
    t = json.loads(path.read_text()).get("timings", {})
    cap = t.get("capture") or {}
    sampling, capture = t.get("sampling_s", 0.0), cap.get("sampling_s", 0.0)

    def passes(log: dict) -> str:
        p = log.get("passes") or []
        return (f"{len(p)} passes of {min(p)}-{max(p)} settings" if p else "no passes") + \
            f", {log.get('alone', 0)} settings alone"

    return ["", f"Where the world Table 2's time went ({path.parent.name}/results.json):", "",
            "| stage | seconds | |", "|---|---|---|",
            f"| training the cells ({t.get('pretrained_cells', '?')} trained, the rest cached) | "
            f"{t.get('pretrain_cells_s', 0.0):.1f} | |",
            f"| sampling the cells alone and the merged models | {sampling:.1f} | {passes(t)} |",
            f"| capturing the cells' input statistics | {capture:.1f} | {passes(cap)} |",
            f"| merging, scoring, crosstalk, plots | {t.get('score_and_merge_s', 0.0) - sampling - capture:.1f} | |"]


def added_kernels(log: str) -> list[str]:
    """The kernels LoRA's step adds over the base's, as ``bench_lora_overhead.py --kernels`` listed them (on a
    GPU: where the captured step's time over the base goes), or nothing when the log has no such list."""
    block = re.search(r"operators LoRA calls more often than the base:.*?the operators both call as often:[^\n]*"
                      r"(?:\n.*?kernels LoRA launches more often than the base:.*?the kernels both launch as "
                      r"often:[^\n]*)?", log, re.S)
    if not block or "kernel time" not in log:
        return []
    body = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in block[0].splitlines()]
    return ["", "Where the LoRA step's kernel time over the base's goes (`lora_step.log`):", "", "```",
            *(line.strip() for line in body), "```"]


def report(folders: list[Path]) -> str:
    """The markdown report of ``folders``."""
    logs = read_logs(folders)
    device = ""
    for folder in folders:
        if (folder / "device.txt").exists():
            device = " ".join(line.strip() for line in (folder / "device.txt").read_text().splitlines()
                              if line.startswith(("torch ", "device ")))
    dry = device.endswith("device cpu")
    lines = [f"Device: {device or 'no device.txt'}" + (" (a CPU dry run: these figures say nothing about a GPU)"
                                                       if dry else ""),
             "", "| figure | measured | goal | |", "|---|---|---|---|"]
    # the bf16 floor the stacked members' difference is read against
    floor = next(figure(logs, f[1], f[2]) for f in FIGURES if f[0].startswith("the bf16 floor"))
    for name, log, pattern, unit, goal, test in FIGURES:
        value = figure(logs, log, pattern)
        if value is None:
            lines.append(f"| {name} | not in the logs | {goal} | |")
            continue
        verdict = "" if test is None else ("**met**" if test(value) else "not met")
        if goal == "<= the bf16 floor below" and floor is not None:
            verdict = "**met**" if value <= floor else "not met"
        lines.append(f"| {name} | {value:g}{unit} | {goal} | {verdict} |")
    steps = summary(folders)
    world = next((s for s in steps if s[0] == "world_table2"), None)
    if world is None:
        lines.append("| world Table 2 on the GPU, batched cells | not in the logs | <= 300 s | |")
    else:
        ok = world[1] == "0"
        verdict = ("**met**" if float(world[2]) <= 300 else "not met") if ok else f"did not finish (exit {world[1]})"
        lines.append(f"| world Table 2 on the GPU, batched cells (wall time beside the gpu tests) | {world[2]} s | "
                     f"<= 300 s | {verdict} |")
    tables = [f / "world_table2" / "table2.csv" for f in folders if (f / "world_table2" / "table2.csv").exists()]
    if tables and CPU_TABLE.exists():
        cpu = {m: (d, n) for m, d, n, _ in table_against(CPU_BATCHED, CPU_TABLE)} if CPU_BATCHED.exists() else {}
        config = tables[0].parent / "results.json"
        trainer = json.loads(config.read_text()).get("config", {}).get("trainer", {}) if config.exists() else {}
        run = f" ({trainer.get('accelerator', '?')}, precision {trainer.get('precision', '?')})" if trainer else ""
        lines += ["", f"World Table 2 on the GPU{run} against the committed CPU table ({CPU_TABLE.relative_to(ROOT)}, "
                      f"float32), beside what batched cells moved on the CPU ({CPU_BATCHED.relative_to(ROOT)}):", "",
                  "| method | GPU: largest difference of a mean | GPU: columns off at 3 decimals | CPU batched: "
                  "largest difference | CPU batched: columns off |", "|---|---|---|---|---|"]
        for m, d, n, c in table_against(tables[0], CPU_TABLE):
            ref = cpu.get(m)
            lines.append(f"| {m} | {d:.1e} | {n} of {c} | " + (f"{ref[0]:.1e} | {ref[1]} |" if ref else "- | - |"))
    results = [f / "world_table2" / "results.json" for f in folders if (f / "world_table2" / "results.json").exists()]
    if results:
        lines += world_stages(results[0])
    lines += added_kernels(logs.get("lora_step", ""))
    lines += ["", "| step | exit | seconds |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in steps)]
    tests = outcomes(logs)
    counts = {k: sum(1 for _, o in tests if o == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    lines += ["", f"`pytest -m gpu`: {len(tests)} outcomes: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items()
                                                                      if n), "",
              "| test | outcome |", "|---|---|", *(f"| {t} | {o.lower()} |" for t, o in tests)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="gpu_rows.sh output folders")
    args = ap.parse_args()
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"gpu_report: no such folder: {missing[0]} (give gpu_rows.sh's OUT_DIR)")
    print(report(args.folders), end="")


if __name__ == "__main__":
    main()
