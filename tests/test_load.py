"""Load: many client processes at once against one cluster; every result right, nothing left behind.

Each client is a separate Python process (a small script run with
``subprocess``) that makes its own ``Pool``, runs ``apply_async(...).get()``
calls and, where ``zdist.dask.get`` is available, a dask graph, then closes
the Pool. Afterwards the Center's tables must be empty and the workers must
hold nothing. 8 clients x 1,000 calls take about 25 s on 2 cores, so the
full load runs in the default suite.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from zdist import rpc

from .conftest import make_cluster, wait_for

CLIENT = r'''
import json, sys, time
from operator import add
from zdist import Pool

center, client_id, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = {"client": client_id, "apply_ok": 0, "dask": None}
start = time.monotonic()
with Pool(center, timeout=60) as pool:
    handles = [pool.apply_async(add, (i, client_id * 1_000_000)) for i in range(calls)]
    results = [h.get(timeout=300) for h in handles]
    report["apply_ok"] = sum(r == i + client_id * 1_000_000 for i, r in enumerate(results))
    del handles
    one = pool.apply(add, (client_id, 1)).get(timeout=60)  # and a plain apply
    report["apply_ok"] += one == client_id + 1
try:
    import functools
    import dask
    import dask.array as da
    from zdist.dask import get
except ImportError:
    pass
else:
    x = da.arange(20_000, chunks=100, dtype="int64") + client_id
    total = (x * 2).sum(split_every=4)
    leaves = [dask.delayed(add)(i, client_id) for i in range(200)]
    tree = dask.delayed(sum)(leaves)
    got = dask.compute(total, tree, scheduler=functools.partial(get, center, timeout=300))
    expected = (2 * (20_000 * 19_999 // 2 + 20_000 * client_id), sum(range(200)) + 200 * client_id)
    report["dask"] = [int(got[0]), int(got[1])] == list(expected)
report["seconds"] = round(time.monotonic() - start, 2)
print("REPORT " + json.dumps(report), flush=True)
'''


async def _ask(address, op, **args):
    async with rpc(address, timeout=10) as node:
        return await getattr(node, op)(**args)


def ask(address, op, **args):
    return asyncio.run(_ask(address, op, **args))


def run_clients(cluster, n_clients: int, calls: int, timeout: float) -> list[dict]:
    processes = []
    try:
        for client_id in range(n_clients):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", CLIENT, cluster.center_address, str(client_id), str(calls)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        reports = []
        for process in processes:
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a client did not finish within {timeout} s") from None
            lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
            assert process.returncode == 0 and lines, f"client failed (exit {process.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
            reports.append(json.loads(lines[-1][len("REPORT "):]))
        return reports
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def check_load(n_clients: int, calls: int, timeout: float) -> None:
    with make_cluster(2) as cluster:
        start = time.monotonic()
        reports = run_clients(cluster, n_clients, calls, timeout)
        seconds = time.monotonic() - start
        assert [r["apply_ok"] for r in reports] == [calls + 1] * n_clients, reports
        dask_results = [r["dask"] for r in reports]
        assert all(d is True for d in dask_results) or all(d is None for d in dask_results), reports
        # Nothing leaks: the pools and dask computations deleted everything they made.
        wait_for(lambda: ask(cluster.center_address, "who_has") == {}, timeout=30, message="the Center's who_has empty")
        assert ask(cluster.center_address, "nbytes") == {}
        workers = ask(cluster.center_address, "workers")
        assert sorted(workers) == sorted(cluster.worker_addresses)
        assert all(info["nkeys"] == 0 and info["nbytes"] == 0 for info in workers.values()), workers
        for address in cluster.worker_addresses:
            assert ask(address, "keys") == []
        print(f"load: {n_clients} clients x {calls} apply calls"
              f"{' + a dask graph each' if dask_results[0] else ''}: all correct in {seconds:.1f} s, tables empty afterwards")


@pytest.mark.timeout(600)
def test_load_eight_clients_thousand_applies_each():
    """The full load (about 25 s on 2 cores, so it stays in the default suite)."""
    check_load(8, 1000, timeout=500)
