"""`zdist status` / `zdist-status`: the console scripts against a live cluster."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from zdist import Pool, rpc
from zdist_cli.status import human_bytes

from .conftest import wait_for


def script(name: str) -> str:
    """The installed console script: beside this Python first (a venv), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.path.exists(beside) else shutil.which(name)
    if not found:
        pytest.fail(f"console script {name!r} is not installed; run: pip install -e .")
    return found


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def center_info(address: str) -> dict:
    async def ask():
        async with rpc(address, timeout=5) as center:
            return await center.info()

    return asyncio.run(ask())


def inc(x):
    return x + 1


@pytest.fixture
def busy_cluster(cluster):
    """The cluster fixture holding 20 keys made by a Pool."""
    with Pool(cluster.center_address) as pool:
        results = pool.map(inc, range(20))
        wait_for(lambda: center_info(cluster.center_address)["nkeys"] == 20, message="the Center knows the 20 keys")
        wait_for(lambda: all("memory" in w for w in center_info(cluster.center_address)["workers"].values()), message="heartbeats with metrics")
        yield cluster
        del results


def test_status_table(busy_cluster):
    cluster = busy_cluster
    done = run(script("zdist"), "status", cluster.center_address)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Center {cluster.center_address} · 2 workers · 2 cores")
    assert lines[1].split() == ["ADDRESS", "NAME", "CORES", "KEYS", "BYTES", "IN", "MEMORY", "ON", "DISK", "MEMORY", "LIMIT", "RUNNING", "DONE", "RESTARTS", "STATUS", "LAST", "SEEN"]
    info = center_info(cluster.center_address)
    for address in cluster.worker_addresses:
        row = next(line for line in lines if line.startswith(address))
        worker = info["workers"][address]
        cells = row.split()
        assert cells[2] == "1"  # cores
        assert cells[3] == str(worker["nkeys"])
        assert human_bytes(worker["nbytes"]) in row
        assert row.endswith("s ago")
    total = lines[-1]
    assert total.startswith("TOTAL") and "2 workers" in total
    assert total.split()[4] == "20"  # distinct keys
    nbytes = sum(w["nbytes"] for w in info["workers"].values())
    assert human_bytes(nbytes) in total


def test_status_json(busy_cluster):
    cluster = busy_cluster
    done = run(script("zdist-status"), cluster.center_address, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["center"] == cluster.center_address
    assert status["dashboard"] is None  # LocalCluster starts its Center with --no-dashboard
    assert sorted(w["address"] for w in status["workers"]) == sorted(cluster.worker_addresses)
    for w in status["workers"]:
        assert w["ncores"] == 1
        assert w["nkeys"] >= 0 and w["nbytes"] >= 0
        assert w["memory"] > 0
        assert w["last_seen_age"] >= 0
        assert set(w) >= {"address", "name", "ncores", "nkeys", "nbytes", "memory", "executing", "tasks_done", "last_seen"}
    totals = status["totals"]
    assert totals["workers"] == 2 and totals["ncores"] == 2
    assert totals["nkeys"] == 20
    assert totals["nkeys_held"] == sum(w["nkeys"] for w in status["workers"]) >= 20
    assert totals["nbytes"] == sum(w["nbytes"] for w in status["workers"]) > 0
    assert totals["tasks_done"] == sum(w["tasks_done"] for w in status["workers"])


def test_status_of_a_center_that_does_not_answer():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for program in (["zdist-status"], ["zdist", "status"]):
        done = run(script(program[0]), *program[1:], f"127.0.0.1:{port}", "--timeout", "0.5", "--json")
        assert done.returncode == 1
        assert done.stdout == ""
        assert f"127.0.0.1:{port} did not answer within 0.5 s" in done.stderr


def test_zdist_command_usage():
    done = run(script("zdist"))
    assert done.returncode == 2 and "status" in done.stdout
    done = run(script("zdist"), "status", "--help")
    assert done.returncode == 0 and "--json" in done.stdout and "--timeout" in done.stdout
    done = run(script("zdist"), "frobnicate")
    assert done.returncode == 2 and "unknown command" in done.stderr


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30)] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB"]
    assert human_bytes(None) == "-"
