"""bench/gpu_report.py: the GPU run's logs read back into issue 33's figures against their goals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report(folder) -> str:
    """bench/gpu_report.py's report of ``folder``."""
    return subprocess.run([sys.executable, "bench/gpu_report.py", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_gpu_report_reads_the_committed_h200_logs():
    """bench/gpu_report.py turns gpu_rows.sh's logs into issue 33's figures against their goals: on the
    committed H200 run of 2026-12-04 it reads the figures docs/benchmarks.md gives for it, says "not in the
    logs" for the rows that run did not have, and lists every gpu test's outcome."""
    out = report("bench/results/2026-12-04-h200")
    assert "| LoRA step / frozen base, SD1.5 size, bf16, batch 4, eager | 1.674 | <= 1.10 | not met |" in out
    assert "| the same, each step one CUDA graph | 1.209 | <= 1.10 | not met |" in out
    assert "| lorabench captured / PEFT eager | 0.309 | <= 0.75 | **met** |" in out
    assert "| 2.37 ms | < 1 ms | not met |" in out and "| 3.13x | >= 2.5x | **met** |" in out
    assert "| the bf16 floor: a separate run in bf16 against itself in float32 | not in the logs |" in out
    assert "did not finish (exit 1)" in out
    assert "`pytest -m gpu`: 27 outcomes: 20 passed, 7 failed" in out
    missing = subprocess.run([sys.executable, "bench/gpu_report.py", "no/such/folder"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no such folder: no/such/folder" in missing.stderr


def test_gpu_report_reads_the_floor_and_skipped_steps(tmp_path):
    """The stacked members' difference is judged against the bf16 floor printed beside it, and a step that
    DEADLINE skipped is listed as skipped."""
    (tmp_path / "batched_sd15.log").write_text(
        "12:00:00   equality after 3 steps (lr 1e-3): each member's update against its separate run's: largest "
        "relative difference 3.01e-02 (Frobenius), largest element 1.62e-03\n"
        "12:00:00   the bfloat16 floor: each separate run against itself in float32: largest relative difference "
        "1.19e-01, largest element 3.48e-03\n12:00:01   ratio: 2.22x the concept-steps per second\n")
    (tmp_path / "summary.txt").write_text("batched_sd15 exit=0 seconds=38\nfull_scale skipped=deadline\n")
    out = report(tmp_path)
    assert "| 0.0301 | <= the bf16 floor below | **met** |" in out
    assert "| 0.119 |  |  |" in out and "| 2.22x | >= 2.5x | not met |" in out
    assert "| full_scale | skipped | - |" in out
    assert "| world Table 2 on the GPU, batched cells | not in the logs" in out


def test_gpu_report_reads_the_gpu_table_against_the_cpu_one(tmp_path):
    """The world Table 2 a GPU run made, row by row against the committed CPU table, beside what batched cells
    moved on the CPU: here the CPU's own table with one score moved by 0.01 in one row."""
    import csv

    with open(ROOT / "experiments/orthogonal_adaptation/runs/world/table2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["merged_image_alignment_mean"] = str(float(rows[0]["merged_image_alignment_mean"]) + 0.01)
    (tmp_path / "world_table2").mkdir()
    with open(tmp_path / "world_table2" / "table2.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = report(tmp_path)
    first, other = rows[0]["method"], rows[1]["method"]
    assert f"| {first} | 1.0e-02 | 1 of " in out  # the moved score, and only it
    assert f"| {other} | 0.0e+00 | 0 of 15 |" in out
    assert "| lora_fusion_lbfgs | 0.0e+00 | 0 of 15 | 2.1e-02 | 7 |" in out  # what batched cells moved on the CPU


def test_gpu_report_says_where_the_world_tables_time_went(tmp_path):
    """From the world run's results.json timings: the cells' training, the samplings and the captures with their
    passes, and the rest of the main process (what is left of score_and_merge_s)."""
    import json

    (tmp_path / "world_table2").mkdir()
    (tmp_path / "world_table2" / "results.json").write_text(json.dumps({"timings": {
        "pretrain_cells_s": 120.5, "pretrained_cells": 84, "score_and_merge_s": 100.0, "sampling_s": 30.0,
        "passes": [64, 64, 32], "alone": 0, "capture": {"sampling_s": 5.0, "passes": [28, 28, 28], "alone": 0}}}))
    out = report(tmp_path)
    assert "| training the cells (84 trained, the rest cached) | 120.5 | |" in out
    assert ("| sampling the cells alone and the merged models | 30.0 | 3 passes of 32-64 settings, 0 settings alone |"
            in out)
    assert "| capturing the cells' input statistics | 5.0 | 3 passes of 28-28 settings, 0 settings alone |" in out
    assert "| merging, scoring, crosstalk, plots | 65.0 | |" in out


def test_gpu_report_lists_the_kernels_lora_adds(tmp_path):
    """``bench_lora_overhead.py --kernels`` on a GPU: the report reads the kernel-time ratio as a figure and
    copies the list of the kernels LoRA adds (timestamps dropped); a CPU profile (operator CPU time) is not a
    GPU figure and is left out."""
    lines = ["  kernel time a step (torch.profiler over 3 eager steps, self time):", "    base        41.20 ms",
             "    lora        47.90 ms",
             "  ratio kernel time lora / base = 1.163   (the floor of lora-graph / base-graph)",
             "  ratio lora-graph-r8 / lora-graph = 0.912   (rank 8 against 4, captured: <= 1 says padding the rank "
             "to 8 pays)",
             "  operators LoRA calls more often than the base: +6.10 ms a step (9 operator-shapes; 12 largest):",
             "      +2.500 ms    +64 calls  aten::mm  [[16384, 320], [320, 4]]",
             "  the operators both call as often: +0.60 ms a step"]
    (tmp_path / "lora_step.log").write_text("".join(f"12:00:0{i} {line}\n" for i, line in enumerate(lines)))
    out = report(tmp_path)
    assert "| kernel time a step, LoRA / base (3 eager steps profiled): the captured ratio's floor | 1.163 |" in out
    assert "(rank 4 zero-padded to 8 launches rank 8's kernels) | 0.912 | (<= 1: padding the rank to 8 pays) |" in out
    assert "```\noperators LoRA calls more often than the base: +6.10 ms a step" in out
    assert "+2.500 ms    +64 calls  aten::mm  [[16384, 320], [320, 4]]\nthe operators both call as often" in out
    cpu = [line.replace("kernel time", "operator CPU time") for line in lines]
    (tmp_path / "lora_step.log").write_text("".join(f"12:00:0{i} {line}\n" for i, line in enumerate(cpu)))
    out = report(tmp_path)
    assert "captured ratio's floor | not in the logs |" in out and "operators LoRA calls" not in out


def test_the_bench_captures_every_graph_row():
    """Every ``-graph`` row of bench_lora_overhead.py is a captured step, its variants too (``lora-graph-layercast``
    was timed eagerly while its name said captured, which would have read as casting together paying 3x)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_lora_overhead import captured

    assert all(captured(n) for n in ("base-graph", "lora-graph", "lora-graph-layercast", "lora-graph-r8"))
    assert not any(captured(n) for n in ("base", "lora", "lora-layercast", "lora+ckpt", "lora-ref", "lora-compiled"))


def test_kernel_time_counts_each_kernel_once(tmp_path, capsys):
    """On CUDA the profiler lists each kernel twice, as its own event and inside the operator that launched it: the
    step's kernel time is the kernels' sum (here 40 and 46 ms, 1.150), not the operators' plus the kernels' (which
    would read 80 and 92 ms). What LoRA adds is listed by operator and shapes, then by kernel name, and the report
    copies both lists."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_lora_overhead import print_kernels

    def profile(extra_us: float, extra_calls: int) -> dict:
        ops = {("aten::convolution", "[[4, 320, 64, 64]]"): (20, 30000.0), ("aten::mm", "[[16384, 320], [320, 320]]"):
               (64, 10000.0)}
        kernels = {("sm90_xmma_fprop_bf16", ""): (20, 30000.0), ("sm90_xmma_gemm_bf16", ""): (64, 10000.0)}
        if extra_calls:
            ops["aten::mm", "[[16384, 320], [320, 4]]"] = (extra_calls, extra_us)
            kernels["gemvx_kernel_bf16", ""] = (extra_calls, extra_us)
        return {"ops": ops, "kernels": kernels}

    print_kernels({"base": profile(0, 0), "lora": profile(6000.0, 128)}, cuda=True, top=5)
    log = capsys.readouterr().out
    assert "base      40.00 ms" in log and "lora      46.00 ms" in log and "kernel time lora / base = 1.150" in log
    (tmp_path / "lora_step.log").write_text(log)
    out = report(tmp_path)
    assert "the captured ratio's floor | 1.15 |" in out
    assert "+6.000 ms    +128 calls  aten::mm  [[16384, 320], [320, 4]]" in out
    assert "kernels LoRA launches more often than the base: +6.00 ms a step (1 kernels; 5 largest):" in out
    assert "+6.000 ms    +128 launches  gemvx_kernel_bf16\nthe kernels both launch as often: +0.00 ms" in out
