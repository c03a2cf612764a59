"""The README's test suite run as one process (torch at 2 threads) against two pytest-xdist workers (one
thread each, ``OMP_WAIT_POLICY=PASSIVE`` so the few ``threads(2)`` tests sleep rather than spin beside the
other worker), side by side in one run on this machine.

    python bench/bench_suite.py                  # the README's suite: about 18 minutes on 2 CPU cores
    python bench/bench_suite.py -m "not slow and not integration"   # the fast tier

Printed: each way's wall time, its pytest summary line, and serial / parallel. Both must pass the same
number of tests; the script exits 1 otherwise. Run nothing else meanwhile (two torch jobs on 2 cores skew both).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = {"one process": [], "two workers (-n 2 --dist worksteal)": ["-n", "2", "--dist", "worksteal"]}


def run(extra: list[str], marks: list[str]) -> tuple[float, str, int]:
    """Wall seconds, pytest's last line and its exit status for one way of running the suite."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *marks, *extra],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", x)]
    return wall, (lines[-1].strip("= ") if lines else proc.stdout[-300:]), proc.returncode


def passed(line: str) -> int:
    m = re.search(r"(\d+) passed", line)
    return int(m.group(1)) if m else -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", dest="marks", default=None, help="pytest -m expression (default: the README's suite)")
    args = ap.parse_args()
    marks = ["-m", args.marks] if args.marks else []
    got = {}
    for name, extra in WAYS.items():
        got[name] = run(extra, marks)
        wall, line, rc = got[name]
        print(f"{name:38s} {wall:7.1f} s  rc {rc}  {line}", flush=True)
    (w1, l1, r1), (w2, l2, r2) = got.values()
    print(f"one process / two workers: {w1 / w2:.2f}x")
    return 0 if r1 == r2 == 0 and passed(l1) == passed(l2) else 1


if __name__ == "__main__":
    sys.exit(main())
