"""A client's scatter and gather of one large NumPy array, against dask.distributed and raw pyzmq.

    python benchmarks/bench_scatter.py [--size-mb 100] [--repeat 5] [--protocol tcp|ipc] [--no-dask]

Measured in one run, interleaved round by round (so that load from elsewhere
hits every contestant alike), best and median of ``--repeat``:

- zdist: ``pool.scatter([arr])`` (the client sends the array to a worker and
  hears back that it is stored), then ``pool.gather(handles)`` (fetched back
  into this process). The Pool is on a 2-worker ``LocalCluster``.
- dask.distributed: ``client.scatter(arr, direct=True)`` and
  ``client.gather(future, direct=True)`` on a 2-worker ``distributed.LocalCluster``
  (processes, one thread each, no dashboard): its fastest client data path.
- raw pyzmq, one way: a ROUTER subprocess sends the array's memory
  (``copy=False``) to this process's DEALER, as one frame and as 1 MiB
  frames (``bench_foundation.Raw``): what the wire carries, the floor.

Targets (issue 17): zdist's round trip at least 1.5x dask's direct mode, and
each direction at least 70% of raw pyzmq one way. Every process is stopped in
a ``finally``; every loop is bounded.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from bench_foundation import Raw, make_array  # this folder's scripts import each other (run as python benchmarks/...)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class ZdistSide:
    def __init__(self, protocol: str):
        from zdist import LocalCluster, Pool

        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, protocol=protocol, nanny=False).start()
        self.pool = Pool(self.cluster)

    def round(self, arr: np.ndarray) -> tuple[float, float]:
        start = time.perf_counter()
        (handle,) = self.pool.scatter([arr])
        scattered = time.perf_counter()
        (back,) = self.pool.gather([handle])
        gathered = time.perf_counter()
        assert back.nbytes == arr.nbytes and back[-1] == arr[-1]
        del back
        self.pool.delete([handle])
        return scattered - start, gathered - scattered

    def close(self) -> None:
        self.pool.close()
        self.cluster.close()


class DaskSide:
    def __init__(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)

    def round(self, arr: np.ndarray) -> tuple[float, float]:
        start = time.perf_counter()
        future = self.client.scatter(arr, direct=True)
        scattered = time.perf_counter()
        back = self.client.gather(future, direct=True)
        gathered = time.perf_counter()
        assert back.nbytes == arr.nbytes and back[-1] == arr[-1]
        del back
        future.release()
        return scattered - start, gathered - scattered

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--protocol", choices=["tcp", "ipc"], default="tcp", help="zdist's cluster on tcp:// (as dask and raw pyzmq here) or ipc://")
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    nbytes = args.size_mb * 10**6
    arr = make_array(nbytes)
    sides: dict = {}
    raw = Raw(nbytes)
    try:
        sides["zdist"] = ZdistSide(args.protocol)
        if not args.no_dask:
            sides["dask.distributed (direct)"] = DaskSide()
        times: dict = {name: ([], []) for name in sides}
        raw_times: dict = {"raw one frame": [], "raw 1 MiB frames": []}
        for name, side in sides.items():  # warm up: connections, first page faults
            side.round(arr)
        raw.fetch(0)
        deadline = time.monotonic() + 600
        for round_number in range(args.repeat):
            if time.monotonic() > deadline:
                break
            names = list(sides)
            names = names[round_number % len(names):] + names[: round_number % len(names)]
            for name in names:
                gc.collect()
                there, back = sides[name].round(arr)
                times[name][0].append(there)
                times[name][1].append(back)
            raw_times["raw one frame"].append(raw.fetch(0))
            raw_times["raw 1 MiB frames"].append(raw.fetch(2**20))
    finally:
        for side in sides.values():
            side.close()
        raw.close()

    print(f"\n{args.size_mb} MB float64 array, client <-> worker, best (median) of {args.repeat}, GB/s; zdist on {args.protocol}")
    print(f"{'':28} {'scatter':>16} {'gather':>16} {'round trip':>16}")
    best_raw = max(gbps(nbytes, min(t)) for t in raw_times.values())
    rows = {}
    for name, (there, back) in times.items():
        trip = [a + b for a, b in zip(there, back)]
        rows[name] = gbps(2 * nbytes, min(trip))
        cells = [f"{gbps(n * nbytes, min(t)):6.2f} ({gbps(n * nbytes, statistics.median(t)):5.2f})" for n, t in ((1, there), (1, back), (2, trip))]
        print(f"{name:28} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    for name, t in raw_times.items():
        print(f"{name + ' (one way)':28} {gbps(nbytes, min(t)):6.2f} ({gbps(nbytes, statistics.median(t)):5.2f})")
    there, back = times["zdist"]
    print(f"\nzdist scatter / best raw one way: {gbps(nbytes, min(there)) / best_raw:.2f} (target >= 0.70)")
    print(f"zdist gather  / best raw one way: {gbps(nbytes, min(back)) / best_raw:.2f} (target >= 0.70)")
    if "dask.distributed (direct)" in rows:
        print(f"zdist round trip / dask direct: {rows['zdist'] / rows['dask.distributed (direct)']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
