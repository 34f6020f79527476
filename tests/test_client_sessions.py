"""Clients as a new user runs them: nothing a client made outlives it, and an unreachable Center is named.

Each test starts a real cluster (subprocess Center and workers) and, where
the client's death is the point, a client in a subprocess of its own that
is killed, interrupted, or simply ends.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import zdist
from zdist import Pool, rpc
from zdist.errors import CenterUnreachableError

from .conftest import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENT = """
import sys, time
import zdist.session
zdist.session.SESSION_TIMEOUT = 2.0  # the Center closes our session 2 s after we fall silent
from zdist import Pool

def slow(x):
    time.sleep(0.05)
    return x

pool = Pool(sys.argv[1], timeout=10)
kept = pool.map(slow, range(4))          # results that stay on the cluster
queued = pool.map_async(slow, range(400))  # ~10 s of work on 2 workers
print("submitted", flush=True)
{ending}
"""


async def _tables(center: str, workers: list[str]) -> tuple[int, int, int]:
    """Keys the Center lists, keys the workers hold, tasks the workers are running."""
    async with rpc(center, timeout=5) as c:
        nkeys = len(await c.who_has())
    held = executing = 0
    for address in workers:
        async with rpc(address, timeout=5) as w:
            held += len(await w.keys())
            executing += (await w.metrics())["executing"]
    return nkeys, held, executing


def tables(cluster) -> tuple[int, int, int]:
    return asyncio.run(_tables(cluster.center_address, cluster.worker_addresses))


def start_client(cluster, ending: str) -> subprocess.Popen:
    script = textwrap.dedent(CLIENT).format(ending=ending)
    process = subprocess.Popen(
        [sys.executable, "-c", script, cluster.center_address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    assert line.strip() == "submitted", process.stderr.read() if process.poll() is not None else line
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


@pytest.mark.parametrize("ending, signum", [("time.sleep(60)", signal.SIGKILL), ("time.sleep(60)", signal.SIGINT), ("pass", None)], ids=["SIGKILL", "Ctrl-C", "script-ends"])
def test_nothing_a_client_made_outlives_it(cluster, ending, signum):
    """Killed mid-map, interrupted, or ending without close(): its queued tasks stop and its values go."""
    process = start_client(cluster, ending)
    try:
        if signum is not None:
            # (A script that just ends may have cleaned up before a first look: `kept` was on the
            # cluster when it printed "submitted", as pool.map returns once the results are there.)
            wait_for(lambda: tables(cluster)[0] > 0, timeout=20, message="the client's results reached the cluster")
            process.send_signal(signum)
        process.wait(30)
        wait_for(lambda: tables(cluster) == (0, 0, 0), timeout=30, message="the cluster's tables are empty again")
        time.sleep(0.5)  # and stay empty: no queued task of the dead client runs later
        assert tables(cluster) == (0, 0, 0)
    finally:
        stop(process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pool_names_a_center_it_cannot_reach():
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(CenterUnreachableError, match=address) as info:
        Pool(address, timeout=1.0)
    assert time.monotonic() - start < 10
    assert "zdist-center" in str(info.value) and "authorized" in str(info.value)


def test_dask_get_names_a_center_it_cannot_reach():
    from zdist.dask import get

    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(CenterUnreachableError, match=address):
        get(address, {"a": 1}, "a")


def test_two_clients_of_one_center_share_one_session(cluster):
    from zdist.dask import get

    with Pool(cluster.center_address) as a, Pool(cluster.center_address) as b:
        assert a._shell.session is b._shell.session
        assert get(cluster.center_address, {"x": 1, "y": (sum, ["x", "x"])}, "y") == 2

        async def sessions() -> dict:
            async with rpc(cluster.center_address, timeout=5) as c:
                return await c.sessions()

        assert list(asyncio.run(sessions())) == [a._shell.session.id]
        assert zdist.Pool is Pool
