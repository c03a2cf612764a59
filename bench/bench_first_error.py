"""Time from a bad command to its one-line error: caught by the early checks (before Hydra makes a run
folder and before torch is imported: ``lorabench.cli.precheck``) against caught after the imports (a rank
the model's layers cannot hold, found when the adapter is injected), measured side by side in one run.

    python bench/bench_first_error.py --repeats 5

Printed: each case's median wall time over ``--repeats`` runs of ``python -m lorabench ...`` in a fresh
process, and the ratio of the early case to the late one. Both exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "early: trainer.max_steps=ten (precheck)": ["experiment=quickstart", "trainer.max_steps=ten"],
    "early: optim.lr=-1 (precheck)": ["experiment=quickstart", "optim.lr=-1"],
    "early: data.path missing (precheck)": ["experiment=quickstart", "data=imagefolder", "data.path=/no/such/folder"],
    "late: adapter.rank=64 (after imports, needs the model)": ["experiment=quickstart", "adapter.rank=64"],
}


def time_case(args: list[str], cwd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lorabench", *args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 2:
        raise SystemExit(f"{args}: exit {proc.returncode}, expected 2\n{proc.stderr[-1000:]}")
    return elapsed, proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    lines = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):  # interleaved, so drift hits every case alike
            for name, case in CASES.items():
                t, lines[name] = time_case(case, cwd)
                times[name].append(t)
    late = statistics.median(times["late: adapter.rank=64 (after imports, needs the model)"])
    print(f"| case | median s ({args.repeats} runs) | x late | error line |\n|---|---|---|---|")
    for name in CASES:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.2f} | {m / late:.2f} | `{lines[name]}` |")


if __name__ == "__main__":
    main()
