"""The whole performance table in one command: each benchmark of this folder, one after another.

    python benchmarks/run_all.py [--quick] [--no-dask]

Runs, in this order, each as its own process (so that one's clusters and
memory cannot slow the next): ``bench_pool.py`` (map + gather, apply round
trip against multiprocessing and dask.distributed), ``bench_dask.py``
(tiny-task graph and ``(x + x.T).sum()`` against dask's threaded scheduler and
dask.distributed), ``bench_scatter.py`` (a client's 100 MB scatter and gather
against dask.distributed's direct mode and raw pyzmq) and
``bench_foundation.py`` (rpc latency and worker-to-worker bandwidth against
raw pyzmq). Each script measures its contestants interleaved, round by round,
in its own run; this one prints each script's output as it comes, then the
ratio lines of all of them together, with the date and the machine, as a
table to quote. ``--quick`` passes each script its short settings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: (script, its normal arguments, its --quick arguments)
SCRIPTS = [
    ("bench_pool.py", [], ["--tasks", "3000", "--repeat", "3", "--latency-samples", "500"]),
    ("bench_dask.py", ["--repeat", "3"], ["--repeat", "1"]),
    ("bench_scatter.py", [], ["--size-mb", "50", "--repeat", "3"]),
    ("bench_foundation.py", ["--protocol", "tcp"], ["--protocol", "tcp", "--quick"]),
]

#: A line that carries a ratio or a target: what the summary keeps.
RATIO = re.compile(r"(\d+(\.\d+)?x\b|target|ratio|/ )", re.I)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short settings for every script")
    parser.add_argument("--no-dask", action="store_true", help="skip dask.distributed where a script can")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each script may take (default 1800)")
    args = parser.parse_args()
    summary: list[str] = []
    failed = []
    started = time.monotonic()
    for script, normal, quick in SCRIPTS:
        command = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else normal)]
        if args.no_dask and script != "bench_dask.py":
            command.append("--no-dask")
        print(f"\n===== {' '.join(command[1:])}", flush=True)
        try:
            ran = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=HERE)
        except subprocess.TimeoutExpired:
            failed.append(f"{script}: over {args.timeout:.0f} s")
            continue
        print(ran.stdout, end="", flush=True)
        if ran.returncode != 0:
            print(ran.stderr[-3000:], file=sys.stderr)
            failed.append(f"{script}: exit {ran.returncode}")
            continue
        summary.append(f"--- {script}")
        summary.extend(line for line in ran.stdout.splitlines() if RATIO.search(line))
    print(f"\n===== summary: {datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.monotonic() - started:.0f} s in all")
    print("\n".join(summary))
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
