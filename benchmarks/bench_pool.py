"""Pool throughput and latency, side by side with multiprocessing and dask.distributed.

    python benchmarks/bench_pool.py [--tasks 10000] [--repeat 5] [--latency-samples 2000] [--no-dask] [--compare-forwarding]
                                    [--protocol ipc|tcp|both]

Prints tasks/s for ``pool.map(inc, range(N))`` + ``gather`` against
``multiprocessing.Pool(2).map`` (chunksize=1 and default) and dask.distributed's
``client.map`` + ``client.gather`` on a 2-worker LocalCluster, and the
single-task round trip ``pool.apply(inc, (1,)).get()`` against
``apply_async(...).get()`` and ``client.submit(inc, 1).result()``, and a raw
pyzmq DEALER-ROUTER echo between two processes (the floor). All on
127.0.0.1, each measured in this one run.

The zdist Pool (a Center and two worker processes) and the multiprocessing
pool are both started first and then measured *interleaved*, round after
round, so that a burst of load from elsewhere on a shared machine (or a
VM's CPU steal) hits them alike: throughput is the best of ``--repeat``
rounds, a round trip the median of all its samples, taken in chunks that
alternate between the two. dask.distributed, about 100x slower per task,
runs on its own afterwards.

A ``Pool()`` that starts its cluster forwards what tasks print
(``forward_output``, on by default there); ``--compare-forwarding`` also
measures, interleaved with it, a second Pool on the same cluster with
forwarding off, and prints both (forwarding should cost nothing when tasks
print nothing).

``--protocol`` picks how the Pool's local cluster listens: ``ipc`` (Unix
sockets in a private directory: what ``Pool()`` does), ``tcp`` (127.0.0.1),
or ``both``: a second Pool on its own TCP cluster, measured interleaved
with the first (ipc), side by side.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

from bench_foundation import Raw  # this folder's scripts import each other (run as python benchmarks/...)


def inc(x):
    return x + 1


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def round_trips(n: int, function) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


def bench_zdist_and_multiprocessing(n: int, repeat: int, n_latency: int, compare_forwarding: bool = False, protocol: str = "ipc") -> dict:
    from zdist import Pool

    times: dict[str, list[float]] = {"zdist": [], "mp1": [], "mpdefault": [], "quiet": []}
    rtts: dict[str, list[float]] = {"zdist": [], "mp": [], "quiet": [], "pyzmq": []}
    echo = Raw(8, protocol="ipc")  # the wire's floor: a raw pyzmq echo between two processes
    first = "ipc" if protocol == "both" else protocol
    with Pool(processes=2, cluster_kwargs={"protocol": first}) as pool, multiprocessing.Pool(2) as mp_pool:
        # The interleaved second Pool: forwarding off on the same cluster, or the same on its own TCP cluster.
        if protocol == "both":
            quiet = Pool(processes=2, cluster_kwargs={"protocol": "tcp"})
        else:
            quiet = Pool(pool.center_address, forward_output=False) if compare_forwarding else None

        def zdist_run(pool=pool):
            results = pool.map(inc, range(n))
            values = pool.gather(results)
            assert values[-1] == n

        def zdist_rtt(pool=pool):
            assert pool.apply(inc, (1,)).get() == 2

        def mp_rtt():
            assert mp_pool.apply_async(inc, (1,)).get() == 2

        # Warm up: functions cached on the workers, code paths taken once.
        pool.gather(pool.map(inc, range(100)))
        mp_pool.map(inc, range(100))
        round_trips(50, zdist_rtt)
        round_trips(50, mp_rtt)
        echo.ping_samples(50)
        if quiet is not None:
            quiet.gather(quiet.map(inc, range(100)))
            round_trips(50, lambda: zdist_rtt(quiet))
        for round_ in range(repeat):
            if quiet is not None and round_ % 2 == 0:  # which goes first alternates: no order bias
                times["quiet"].append(timed(lambda: zdist_run(quiet)))
            times["zdist"].append(timed(zdist_run))
            if quiet is not None and round_ % 2 == 1:
                times["quiet"].append(timed(lambda: zdist_run(quiet)))
            times["mp1"].append(timed(lambda: mp_pool.map(inc, range(n), chunksize=1)))
            times["mpdefault"].append(timed(lambda: mp_pool.map(inc, range(n))))
        chunk = 20
        for _ in range(max(1, n_latency // chunk)):
            rtts["zdist"] += round_trips(chunk, zdist_rtt)
            rtts["mp"] += round_trips(chunk, mp_rtt)
            rtts["pyzmq"] += echo.ping_samples(chunk)
            if quiet is not None:
                rtts["quiet"] += round_trips(chunk, lambda: zdist_rtt(quiet))
        if quiet is not None:
            quiet.close()
    echo.close()
    return {
        "quiet_tp": n / min(times["quiet"]) if times["quiet"] else None,
        "quiet_rtt": statistics.median(rtts["quiet"]) if rtts["quiet"] else None,
        "zdist_tp": n / min(times["zdist"]),
        "mp1_tp": n / min(times["mp1"]),
        "mpdefault_tp": n / min(times["mpdefault"]),
        "zdist_rtt": statistics.median(rtts["zdist"]),
        "mp_rtt": statistics.median(rtts["mp"]),
        "pyzmq_rtt": statistics.median(rtts["pyzmq"]),
    }


def bench_dask(n: int, repeat: int, n_latency: int) -> tuple[float, float]:
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

        throughput = n / min(timed(run) for _ in range(repeat))
        client.submit(inc, 1, pure=False).result()
        rtt = statistics.median(round_trips(min(n_latency, 100), lambda: client.submit(inc, 1, pure=False).result()))
    return throughput, rtt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--no-dask", action="store_true", help="skip dask.distributed")
    parser.add_argument("--compare-forwarding", action="store_true", help="also measure a Pool with forward_output=False, interleaved")
    parser.add_argument("--protocol", choices=["ipc", "tcp", "both"], default="ipc", help="the Pool's cluster on ipc:// (private, Pool()'s default), tcp://, or both side by side")
    args = parser.parse_args()
    if args.protocol == "both" and args.compare_forwarding:
        parser.error("--protocol both and --compare-forwarding each need the second Pool: give one of them")

    r = bench_zdist_and_multiprocessing(args.tasks, args.repeat, args.latency_samples, args.compare_forwarding, args.protocol)
    other = "tcp" if args.protocol == "both" else "forwarding off"
    mine = "ipc" if args.protocol == "both" else args.protocol
    print(f"{'':44}{'tasks/s':>12}")
    print(f"{f'zdist Pool.map + gather ({mine})':44}{r['zdist_tp']:12,.0f}")
    if r["quiet_tp"] is not None:
        print(f"{f'zdist Pool.map + gather, {other}':44}{r['quiet_tp']:12,.0f}")
    print(f"{'multiprocessing.Pool(2).map chunksize=1':44}{r['mp1_tp']:12,.0f}")
    print(f"{'multiprocessing.Pool(2).map default chunks':44}{r['mpdefault_tp']:12,.0f}")
    if not args.no_dask:
        d_tp, d_rtt = bench_dask(args.tasks, args.repeat, args.latency_samples)
        print(f"{'dask.distributed client.map + gather':44}{d_tp:12,.0f}")
    print()
    print(f"{'single task round trip (median)':44}{'ms':>12}")
    print(f"{f'zdist pool.apply(inc, (1,)).get() ({mine})':44}{r['zdist_rtt'] * 1e3:12.3f}")
    if r["quiet_rtt"] is not None:
        print(f"{f'zdist pool.apply(...).get(), {other}':44}{r['quiet_rtt'] * 1e3:12.3f}")
    print(f"{'multiprocessing apply_async(...).get()':44}{r['mp_rtt'] * 1e3:12.3f}")
    if not args.no_dask:
        print(f"{'dask.distributed submit(...).result()':44}{d_rtt * 1e3:12.3f}")
    print(f"{'raw pyzmq DEALER-ROUTER echo (ipc)':44}{r['pyzmq_rtt'] * 1e3:12.3f}")
    print()
    print(f"throughput: zdist / multiprocessing(chunksize=1) = {r['zdist_tp'] / r['mp1_tp']:.2f}x   (target >= 1)")
    if not args.no_dask:
        print(f"throughput: zdist / dask.distributed          = {r['zdist_tp'] / d_tp:.0f}x")
    print(f"round trip: zdist / multiprocessing            = {r['zdist_rtt'] / r['mp_rtt']:.2f}x   (target <= 2; issue 17: <= 0.5)")
    print(f"round trip: raw pyzmq / multiprocessing        = {r['pyzmq_rtt'] / r['mp_rtt']:.2f}x   (the wire's floor)")
    print(f"round trip: zdist / raw pyzmq                  = {r['zdist_rtt'] / r['pyzmq_rtt']:.2f}x")
    if not args.no_dask:
        print(f"round trip: dask.distributed / zdist           = {d_rtt / r['zdist_rtt']:.0f}x")
    if args.protocol == "both":
        print(f"protocol:   throughput ipc / tcp             = {r['zdist_tp'] / r['quiet_tp']:.2f}x   (target >= 1)")
        print(f"protocol:   round trip ipc / tcp             = {r['zdist_rtt'] / r['quiet_rtt']:.2f}x   (target <= 1)")


if __name__ == "__main__":
    main()
