"""Graphs of a million tasks: zdist.dask.get's per-task cost and client memory at 10k and at 1M tasks, in one run.

    python benchmarks/bench_million.py [--small 10000] [--large 1000000] [--fan-in 8] [--distributed] [--no-order-timing]

The graph is a tree reduction of tiny tasks: ``n`` leaves ``inc(i)``, then
``add_all`` of ``fan-in`` inputs per level up to one root (about
``n * (1 + 1/(fan_in - 1))`` tasks). It is built as task-spec objects
(``dask._task_spec.Task``), as dask's collections hand them to a
scheduler, so dask's legacy-graph conversion is not measured; what is, in
separate columns: dask's ``order`` (which ``zdist.dask.get`` calls while
planning, timed here on its own), and the whole ``get`` (planning
included). Client memory is the growth of this process's peak RSS during
``get`` beyond the graph itself (measured after the graph is built),
divided by the task count. Target (issue 16): per-task cost at 1M at most
1.05x that at 10k, client memory under 1 KB per task.

``--distributed`` also runs dask.distributed on the same graphs (2 workers,
1 thread each), each size bounded to 10 minutes.
"""
from __future__ import annotations

import argparse
import gc
import time

from dask._task_spec import Task, TaskRef
from dask.order import order

from bench_executor import PeakRSS  # this folder's scripts import each other (run as python benchmarks/...)


def inc(x: int) -> int:
    return x + 1


def add_all(*xs: int) -> int:
    return sum(xs)


def tree_graph(n: int, fan_in: int, prefix: str) -> tuple[dict, str]:
    """A tree reduction of ``n`` leaves as task-spec objects; returns the graph and the root key."""
    graph: dict = {}
    level = []
    for i in range(n):
        key = f"{prefix}-leaf-{i}"
        graph[key] = Task(key, inc, i)
        level.append(key)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            key = f"{prefix}-sum-{depth}-{j // fan_in}"
            graph[key] = Task(key, add_all, *(TaskRef(k) for k in level[j : j + fan_in]))
            nxt.append(key)
        level = nxt
    return graph, level[0]


def run_zdist(address: str, n: int, fan_in: int, time_order: bool = True) -> dict:
    from zdist.dask import get

    graph, root = tree_graph(n, fan_in, f"z{n}")
    expected = sum(range(1, n + 1))
    gc.collect()
    ordering = float("nan")
    if time_order:  # on its own, before get (which orders the graph again): at 10^7 tasks it takes minutes
        start = time.perf_counter()
        order(graph)
        ordering = time.perf_counter() - start
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = get(address, graph, root)
        seconds = time.perf_counter() - start
    assert result == expected, (result, expected)
    return {"tasks": len(graph), "seconds": seconds, "order": ordering, "bytes_per_task": peak.growth_mb * 2**20 / len(graph)}


def run_distributed(client, n: int, fan_in: int, limit: float = 600.0) -> float | None:
    """dask.distributed's tasks/s on the same graph, or None (and why, printed) if it did not finish within ``limit`` s."""
    graph, root = tree_graph(n, fan_in, f"d{n}")
    start = time.perf_counter()
    try:
        future = client.get(graph, root, sync=False)  # submitted; the wait below is what is bounded
        result = future.result(timeout=max(1.0, limit - (time.perf_counter() - start)))
    except Exception as exc:  # noqa: BLE001 - a timeout or a crash is the figure
        print(f"dask.distributed on {len(graph):,} tasks: not done after {time.perf_counter() - start:.0f} s ({type(exc).__name__} {exc})", flush=True)
        return None
    assert result == sum(range(1, n + 1))
    rate = len(graph) / (time.perf_counter() - start)
    print(f"dask.distributed on {len(graph):,} tasks: {rate:,.0f} tasks/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--fan-in", type=int, default=8)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--no-order-timing", action="store_true", help="do not time dask.order on its own (saves minutes at 10^7 tasks)")
    args = parser.parse_args()

    from zdist import LocalCluster

    rows = {}
    with LocalCluster(n_workers=2, nanny=False) as cluster:
        run_zdist(cluster.center_address, 1000, args.fan_in)  # warm up: imports, connections
        for n in (args.small, args.large):
            rows[n] = run_zdist(cluster.center_address, n, args.fan_in, not args.no_order_timing)
            print(f"{n:,} leaves done: {rows[n]}", flush=True)
    dist = {}
    if args.distributed:
        from distributed import Client, LocalCluster as DaskCluster

        with DaskCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as dc, Client(dc) as client:
            for n in (args.small, args.large):
                dist[n] = run_distributed(client, n, args.fan_in)

    print(f"{'leaves':>10} {'tasks':>10} {'zdist tasks/s':>14} {'us/task':>8} {'order s':>8} {'client B/task':>14} {'distributed t/s':>16}")
    for n, row in rows.items():
        rate = row["tasks"] / row["seconds"]
        d = dist.get(n)
        print(f"{n:>10,} {row['tasks']:>10,} {rate:>14,.0f} {1e6 / rate:>8.1f} {row['order']:>8.2f} {row['bytes_per_task']:>14,.0f} {'' if d is None else f'{d:,.0f}':>16}")
    small, large = rows[args.small], rows[args.large]
    ratio = (large["seconds"] / large["tasks"]) / (small["seconds"] / small["tasks"])
    print(f"per-task cost, {large['tasks']:,} tasks / {small['tasks']:,} tasks = {ratio:.2f}x   (target <= 1.05)")
    print(f"client memory at {large['tasks']:,} tasks: {large['bytes_per_task']:,.0f} bytes per task   (target < 1024)")


if __name__ == "__main__":
    main()
