"""The Executor and chunked maps, side by side with concurrent.futures, multiprocessing and dask.distributed.

    python benchmarks/bench_executor.py [--samples 2000] [--items 100000] [--chunksize 1000] [--imap-items 10000000] [--no-dask]

Measured in one run, on 127.0.0.1, zdist with a local cluster of two worker
processes against two-process peers:

* round trip: ``Executor.submit(inc, 1).result()`` against
  ``ProcessPoolExecutor(2).submit(inc, 1).result()`` (target: at most 2x)
  and dask.distributed's ``client.submit(inc, 1).result()`` (target: at
  least 10x faster); medians of samples taken in alternating chunks;
* chunked maps: ``Executor.map`` and ``Pool.imap`` of ``inc`` over
  ``range(items)`` with ``chunksize`` (and ``Pool.map`` + ``gather``) against
  ``multiprocessing.Pool(2).map`` with the same chunksize (target: at least
  0.5x its items/s); best of three;
* bounded memory: ``Pool.imap(inc, generator, chunksize)`` over
  ``imap-items`` items, the client's peak RSS growth (target: bounded, a
  few MB, whatever the item count).

Prints ratios; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import threading
import time

import psutil


def inc(x):
    return x + 1


def median_round_trip(call, samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(calls: dict, samples: int, chunk: int = 100) -> dict:
    """Medians of round trips, taken in alternating chunks so that load from elsewhere hits every peer alike."""
    got: dict = {name: [] for name in calls}
    for _ in range(max(1, samples // chunk)):
        for name, call in calls.items():
            for _ in range(chunk):
                start = time.perf_counter()
                call()
                got[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in got.items()}


def best_rate(run, items: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return items / best


class PeakRSS:
    """The process's peak RSS growth while the block runs, sampled every 10 ms."""

    def __enter__(self) -> "PeakRSS":
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join(5)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--chunksize", type=int, default=1000)
    parser.add_argument("--imap-items", type=int, default=10_000_000)
    parser.add_argument("--no-dask", action="store_true", help="skip dask.distributed")
    args = parser.parse_args()

    from zdist import Executor

    n, chunk = args.items, args.chunksize
    with Executor(processes=2) as ex, concurrent.futures.ProcessPoolExecutor(2) as ppe, multiprocessing.Pool(2) as mp_pool:
        ex.submit(inc, 1).result()
        ppe.submit(inc, 1).result()
        rtt = interleaved({
            "zdist": lambda: ex.submit(inc, 1).result(),
            "ppe": lambda: ppe.submit(inc, 1).result(),
        }, args.samples)
        expected = n  # inc over range(n): the last value
        rates = {}
        for name, run in {
            "zdist Executor.map": lambda: list(ex.map(inc, range(n), chunksize=chunk))[-1] == expected or exit(1),
            "zdist Pool.imap": lambda: list(ex.pool.imap(inc, range(n), chunksize=chunk))[-1] == expected or exit(1),
            "zdist Pool.map + gather": lambda: ex.pool.gather(ex.pool.map(inc, range(n), chunksize=chunk))[-1] == expected or exit(1),
            "multiprocessing Pool(2).map": lambda: mp_pool.map(inc, range(n), chunksize=chunk)[-1] == expected or exit(1),
            "ProcessPoolExecutor(2).map": lambda: list(ppe.map(inc, range(n), chunksize=chunk))[-1] == expected or exit(1),
        }.items():
            rates[name] = best_rate(run, n)
        with PeakRSS() as peak:
            count = 0
            start = time.perf_counter()
            for _ in ex.pool.imap(inc, (i for i in range(args.imap_items)), chunksize=chunk):
                count += 1
            imap_seconds = time.perf_counter() - start
        assert count == args.imap_items

    dask_rtt = None
    if not args.no_dask:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            print("dask.distributed not installed: skipped")
        else:
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
                client.submit(inc, 1).result()
                dask_rtt = median_round_trip(lambda: client.submit(inc, 1, pure=False).result(), min(args.samples, 300))

    print(f"{'round trip (median)':<48}{'ms':>10}")
    print(f"{'zdist Executor.submit(inc, 1).result()':<48}{rtt['zdist'] * 1e3:>10.3f}")
    print(f"{'ProcessPoolExecutor(2).submit().result()':<48}{rtt['ppe'] * 1e3:>10.3f}")
    if dask_rtt is not None:
        print(f"{'dask.distributed client.submit().result()':<48}{dask_rtt * 1e3:>10.3f}")
    print()
    print(f"{f'map of {n:,} items, chunksize={chunk}':<48}{'items/s':>12}")
    for name, rate in rates.items():
        print(f"{name:<48}{rate:>12,.0f}")
    print()
    print(f"Pool.imap over a generator of {args.imap_items:,} items: {args.imap_items / imap_seconds:,.0f} items/s, "
          f"client peak RSS growth {peak.growth_mb:.1f} MB")
    print()
    print(f"round trip: zdist / ProcessPoolExecutor = {rtt['zdist'] / rtt['ppe']:.2f}x   (target <= 2)")
    if dask_rtt is not None:
        print(f"round trip: dask.distributed / zdist    = {dask_rtt / rtt['zdist']:.1f}x   (target >= 10)")
    mp_rate = rates["multiprocessing Pool(2).map"]
    print(f"chunked map: Executor.map / multiprocessing = {rates['zdist Executor.map'] / mp_rate:.2f}x   (target >= 0.5)")
    print(f"chunked map: Pool.imap / multiprocessing    = {rates['zdist Pool.imap'] / mp_rate:.2f}x   (target >= 0.5)")
    print(f"chunked map: Pool.map+gather / multiprocessing = {rates['zdist Pool.map + gather'] / mp_rate:.2f}x   (target >= 0.5)")


if __name__ == "__main__":
    main()
