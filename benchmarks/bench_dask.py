"""zdist.dask.get against dask.distributed and dask's threaded scheduler, in one run.

    python benchmarks/bench_dask.py [--repeat 3] [--only a|b] [--profile]

(a) ``(x + x.T).sum()`` for a 4000x4000 random array in 500x500 chunks, in
    seconds;
(b) ``da.ones((2000, 2000), chunks=(20, 20)).sum()``, 10,000+ tiny tasks, in
    tasks per second.

Each scheduler gets the same materialized graph (what ``x.compute()`` hands
a scheduler, converted once), so the figures measure scheduling and
execution, not dask's graph construction; each is the median of
``--repeat`` runs. zdist and dask.distributed both run 2 worker processes
with 1 thread each on 127.0.0.1. Ratios are printed at the end.
``--profile`` runs zdist's (b) once more under cProfile (the client's loop
thread) and prints the top functions.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time
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


def median_time(repeat, function):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def workloads(only):
    out = {}
    if only in (None, "a"):
        x = da.random.random((4000, 4000), chunks=(500, 500))
        out["a"] = materialize((x + x.T).sum())
    if only in (None, "b"):
        out["b"] = materialize(da.ones((2000, 2000), chunks=(20, 20)).sum())
    return out


def check(result, expected):
    value = result[0] if isinstance(result, (tuple, list)) else result
    want = expected
    assert abs(float(value) - float(want)) <= 1e-6 * max(1.0, abs(float(want))), (value, want)


def bench(name, get, graphs, repeat):
    results = {}
    for label, (dsk, keys, expected) in graphs.items():
        check(get(dsk, keys), expected)  # warm up: imports on the workers
        seconds = median_time(repeat, lambda: check(get(dsk, keys), expected))
        results[label] = seconds
        print(f"  {name:<22} ({label}) {seconds:8.3f} s   {len(dsk) / seconds:10.0f} tasks/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b"], default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    graphs = workloads(args.only)
    for label, (dsk, _, _) in graphs.items():
        print(f"({label}) {len(dsk)} tasks")
    figures: dict[str, dict] = {}

    from zdist import LocalCluster
    from zdist.dask import client as zclient
    from zdist.dask import get

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        zget = functools.partial(get, cluster.center_address)
        figures["zdist"] = bench("zdist.dask.get", zget, graphs, args.repeat)
        if args.profile and "b" in graphs:
            dsk, keys, _ = graphs["b"]
            profile = cProfile.Profile()
            loop = zclient._shared_loop()
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

    from distributed import Client
    from distributed import LocalCluster as DaskCluster

    with DaskCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as dcluster, Client(dcluster) as dclient:
        figures["dask.distributed"] = bench("dask.distributed", dclient.get, graphs, args.repeat)

    figures["threaded"] = bench("dask threaded", dask.threaded.get, graphs, args.repeat)

    print()
    for label in graphs:
        z = figures["zdist"][label]
        d = figures["dask.distributed"][label]
        t = figures["threaded"][label]
        if label == "a":
            print(f"(a) zdist {z:.3f} s; dask.distributed {d:.3f} s ({d / z:.2f}x zdist's time); threaded {t:.3f} s ({t / z:.2f}x)")
        else:
            n = len(graphs[label][0])
            print(
                f"(b) zdist {n / z:,.0f} tasks/s; dask.distributed {n / d:,.0f} tasks/s "
                f"(zdist {d / z:.1f}x); threaded {n / t:,.0f} tasks/s (zdist {t / z:.2f}x)"
            )


if __name__ == "__main__":
    main()
