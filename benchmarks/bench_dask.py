"""zdist.dask.get against dask.distributed and dask's threaded scheduler, in one run.

    python benchmarks/bench_dask.py [--repeat 3] [--only a|b] [--profile] [--no-distributed]

(a) ``(x + x.T).sum()`` for a 4000x4000 random array in 500x500 chunks, in
    seconds;
(b) ``da.ones((2000, 2000), chunks=(20, 20)).sum()``, 10,000+ tiny tasks, in
    tasks per second.

Each scheduler gets materialized graphs (what ``x.compute()`` hands a
scheduler, converted before the clock starts), so the figures measure
scheduling and execution, not dask's graph construction; every run gets a
graph of its own (fresh keys: dask.distributed would otherwise reuse results
it still holds), and each figure is the median of ``--repeat`` runs. zdist
and dask.distributed both run 2 worker processes with 1 thread each on
127.0.0.1. Ratios are printed at the end.
``--profile`` runs zdist's (b) once more under cProfile (the client's loop
thread and the calling thread), prints the top functions, and skips the
other schedulers.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time
import uuid
import warnings

import dask
import dask.array as da
from dask._task_spec import convert_legacy_graph


def materialize(collection):
    """The graph and keys that ``collection.compute()`` hands a scheduler."""
    captured = {}

    def capture(dsk, keys, **kwargs):
        captured["dsk"], captured["keys"] = dsk, keys
        return dask.get(dsk, keys)

    expected = collection.compute(scheduler=capture)
    dsk = captured["dsk"]
    if not isinstance(dsk, dict):
        dsk = dsk.__dask_graph__()
    return convert_legacy_graph(dict(dsk)), captured["keys"], expected


def workload_a():
    x = da.random.random((4000, 4000), chunks=(500, 500))
    return (x + x.T).sum()


def workload_b():
    return da.ones((2000, 2000), chunks=(20, 20), name=f"ones-{uuid.uuid4().hex}").sum()


WORKLOADS = {"a": workload_a, "b": workload_b}


def check(result, expected):
    value = result[0] if isinstance(result, (tuple, list)) else result
    assert abs(float(value) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected))), (value, expected)


def bench(name, get, labels, repeat):
    """Median seconds per workload; ``repeat`` runs after a warm-up, each on a fresh graph."""
    results = {}
    for label in labels:
        times = []
        for run in range(repeat + 1):
            dsk, keys, expected = materialize(WORKLOADS[label]())
            start = time.perf_counter()
            result = get(dsk, keys)
            if run:  # the first run warms up: imports on the workers
                times.append(time.perf_counter() - start)
            check(result, expected)
        results[label] = (statistics.median(times), len(dsk))
        seconds, ntasks = results[label]
        print(f"  {name:<22} ({label}) {seconds:8.3f} s   {ntasks / seconds:10.0f} tasks/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b"], default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-distributed", action="store_true", help="skip dask.distributed (minutes on (b)): a quick zdist-against-threaded check")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    labels = [args.only] if args.only else ["a", "b"]
    figures: dict[str, dict] = {}

    from zdist import LocalCluster
    from zdist.dask import client as zclient
    from zdist.dask import get
    from zdist.session import client_loop

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        zget = functools.partial(get, cluster.center_address)
        figures["zdist"] = bench("zdist.dask.get", zget, labels, args.repeat)
        if args.profile and "b" in labels:
            dsk, keys, _ = materialize(workload_b())
            profile = cProfile.Profile()
            loop = client_loop()
            loop.call(profile.enable)
            main_profile = cProfile.Profile()
            main_profile.enable()
            zget(dsk, keys)
            main_profile.disable()
            loop.call(profile.disable)
            print("--- zdist (b): client loop thread ---")
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)
            print("--- zdist (b): calling thread (graph preparation) ---")
            pstats.Stats(main_profile).sort_stats("cumtime").print_stats(12)
    zclient.close()
    if args.profile:
        return  # profiling zdist only

    from distributed import Client
    from distributed import LocalCluster as DaskCluster

    if not args.no_distributed:
        with DaskCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as dcluster, Client(dcluster) as dclient:
            figures["dask.distributed"] = bench("dask.distributed", dclient.get, labels, args.repeat)

    figures["threaded"] = bench("dask threaded", dask.threaded.get, labels, args.repeat)

    print()
    for label in labels:
        (z, n), (t, _) = figures["zdist"][label], figures["threaded"][label]
        if args.no_distributed:
            print(f"({label}) zdist {z:.3f} s, {n / z:,.0f} tasks/s; threaded {t:.3f} s, {n / t:,.0f} tasks/s (zdist {t / z:.2f}x)")
            continue
        d = figures["dask.distributed"][label][0]
        if label == "a":
            print(f"(a) zdist {z:.3f} s; dask.distributed {d:.3f} s ({d / z:.2f}x zdist's time); threaded {t:.3f} s ({t / z:.2f}x)")
        else:
            print(
                f"(b) zdist {n / z:,.0f} tasks/s; dask.distributed {n / d:,.0f} tasks/s "
                f"(zdist {d / z:.1f}x); threaded {n / t:,.0f} tasks/s (zdist {t / z:.2f}x)"
            )


if __name__ == "__main__":
    main()
