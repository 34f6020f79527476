"""Pool throughput and latency, side by side with multiprocessing and dask.distributed.

    python benchmarks/bench_pool.py [--tasks 10000] [--repeat 3]

Prints tasks/s for ``pool.map(inc, range(N))`` + ``gather`` against
``multiprocessing.Pool(2).map`` (chunksize=1 and default) and dask.distributed's
``client.map`` + ``client.gather`` on a 2-worker LocalCluster, and the
single-task round trip ``pool.apply(inc, (1,)).get()`` against
``apply_async(...).get()`` and ``client.submit(inc, 1).result()``. All on
127.0.0.1, each measured in this one run; the best of ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def inc(x):
    return x + 1


def best_of(repeat, function):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def latency(n, function):
    function()  # warm up
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_zdist(n, repeat, n_latency):
    from zdist import Pool

    with Pool(processes=2) as pool:
        pool.gather(pool.map(inc, range(100)))  # warm up: functions cached on workers

        def run():
            results = pool.map(inc, range(n))
            values = pool.gather(results)
            assert values[-1] == n

        throughput = n / best_of(repeat, run)
        rtt = latency(n_latency, lambda: pool.apply(inc, (1,)).get())
    return throughput, rtt


def bench_multiprocessing(n, repeat, n_latency):
    with multiprocessing.Pool(2) as pool:
        pool.map(inc, range(100))
        chunk1 = n / best_of(repeat, lambda: pool.map(inc, range(n), chunksize=1))
        default = n / best_of(repeat, lambda: pool.map(inc, range(n)))
        rtt = latency(n_latency, lambda: pool.apply_async(inc, (1,)).get())
    return chunk1, default, rtt


def bench_dask(n, repeat, n_latency):
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = min(n, 2000)  # dask.distributed is ~100x slower per task; keep the run short
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(inc, range(100), pure=False))

        def run():
            futures = client.map(inc, range(n), pure=False)
            client.gather(futures)
            del futures

        throughput = n / best_of(repeat, run)
        rtt = latency(min(n_latency, 100), lambda: client.submit(inc, 1, pure=False).result())
    return throughput, rtt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--no-dask", action="store_true", help="skip dask.distributed")
    args = parser.parse_args()

    z_tp, z_rtt = bench_zdist(args.tasks, args.repeat, args.latency_samples)
    mp_c1, mp_default, mp_rtt = bench_multiprocessing(args.tasks, args.repeat, args.latency_samples)
    print(f"{'':44}{'tasks/s':>12}")
    print(f"{'zdist Pool.map + gather':44}{z_tp:12,.0f}")
    print(f"{'multiprocessing.Pool(2).map chunksize=1':44}{mp_c1:12,.0f}")
    print(f"{'multiprocessing.Pool(2).map default chunks':44}{mp_default:12,.0f}")
    if not args.no_dask:
        d_tp, d_rtt = bench_dask(args.tasks, args.repeat, args.latency_samples)
        print(f"{'dask.distributed client.map + gather':44}{d_tp:12,.0f}")
    print()
    print(f"{'single task round trip':44}{'ms':>12}")
    print(f"{'zdist pool.apply(inc, (1,)).get()':44}{z_rtt * 1e3:12.3f}")
    print(f"{'multiprocessing apply_async(...).get()':44}{mp_rtt * 1e3:12.3f}")
    if not args.no_dask:
        print(f"{'dask.distributed submit(...).result()':44}{d_rtt * 1e3:12.3f}")
    print()
    print(f"throughput: zdist / multiprocessing(chunksize=1) = {z_tp / mp_c1:.2f}x   (target >= 1)")
    if not args.no_dask:
        print(f"throughput: zdist / dask.distributed          = {z_tp / d_tp:.0f}x")
    print(f"round trip: zdist / multiprocessing            = {z_rtt / mp_rtt:.2f}x   (target <= 2)")
    if not args.no_dask:
        print(f"round trip: dask.distributed / zdist           = {d_rtt / z_rtt:.0f}x")


if __name__ == "__main__":
    main()
