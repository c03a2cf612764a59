"""The README's test suite run as one process (torch at 2 threads) against two pytest-xdist workers (one
thread each, ``OMP_WAIT_POLICY=PASSIVE`` so the few ``threads(2)`` tests sleep rather than spin beside the
other worker), side by side in one run on this machine.

    python bench/bench_suite.py                  # the README's suite: about 18 minutes on 2 CPU cores
    python bench/bench_suite.py -m "not slow and not integration"   # the fast tier
    python bench/bench_suite.py --ways worksteal,load    # xdist's two schedulers against each other

Printed: each way's wall time, its pytest summary line, and the first way's time over each other's. All must
pass the same number of tests; the script exits 1 otherwise. Run nothing else meanwhile (two torch jobs on 2
cores skew both).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = {"serial": ("one process", []),
        "worksteal": ("two workers (-n 2 --dist worksteal)", ["-n", "2", "--dist", "worksteal"]),
        "load": ("two workers (-n 2 --dist load)", ["-n", "2", "--dist", "load"])}


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
    ap.add_argument("--ways", default="serial,worksteal",
                    help=f"comma-separated, run in this order, at least two of: {', '.join(WAYS)}")
    args = ap.parse_args()
    ways = args.ways.split(",")
    bad = [w for w in ways if w not in WAYS]
    if bad:
        ap.error(f"--ways: {bad[0]!r} is not one of {', '.join(WAYS)}")
    if len(ways) < 2:
        ap.error(f"--ways: give at least two of {', '.join(WAYS)} to compare, e.g. serial,worksteal")
    marks = ["-m", args.marks] if args.marks else []
    got = {}
    for way in ways:
        label, extra = WAYS[way]
        got[way] = run(extra, marks)
        wall, line, rc = got[way]
        print(f"{label:38s} {wall:7.1f} s  rc {rc}  {line}", flush=True)
    first = got[ways[0]][0]
    for way in ways[1:]:
        print(f"{ways[0]} / {way}: {first / got[way][0]:.2f}x")
    ok = all(rc == 0 for _, _, rc in got.values()) and len({passed(line) for _, line, _ in got.values()}) == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
