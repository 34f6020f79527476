"""Graceful retirement end to end: SIGTERM, `zdist retire`, --lifetime; on real processes on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

from zdist import rpc

from .conftest import center_call, make_cluster, run, wait_for

STOP_TIMEOUT = 30.0


def scatter(address: str, values: dict, session: str | None = None) -> None:
    async def put():
        async with rpc(address, timeout=30) as worker:
            await worker.update_data(data=values, **({"session": session} if session else {}))

    run(put())


def gather(center: str, keys: list) -> dict:
    """Values from whoever the Center says holds them."""
    async def get():
        async with rpc(center, timeout=10) as c:
            who_has = await c.who_has(keys=keys)
        out = {}
        for key, holders in who_has.items():
            assert holders, f"nobody holds {key!r}"
            async with rpc(min(holders), timeout=30) as w:
                out.update(await w.get_data(keys=[key]))
        return out

    return run(get())


def values_for(n: int) -> dict:
    rng = np.random.default_rng(7)
    return {f"x-{i}": rng.random(50_000 * (i + 1)) for i in range(n)} | {"plain": {"a": [1, 2, 3]}}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        (isinstance(v, np.ndarray) and v.dtype == b[k].dtype and v.tobytes() == b[k].tobytes()) or (not isinstance(v, np.ndarray) and v == b[k]) for k, v in a.items()
    )


def test_sigterm_hands_unreplicated_values_to_a_peer_before_exiting():
    values = values_for(5)
    # A low memory limit: some values are on disk when they are handed over.
    with make_cluster(2, memory_limit="100MB", memory_thresholds={"target": 0.02}) as cluster:
        leaving, staying = cluster.worker_addresses
        scatter(leaving, values, session="a" * 32)
        process = cluster.worker_processes[leaving]
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT) == 0
        who_has = center_call(cluster.center_address, "who_has", keys=list(values))
        assert all(holders == {staying} for holders in who_has.values()), who_has
        assert same(gather(cluster.center_address, list(values)), values)
        removed = center_call(cluster.center_address, "info")["removed"]
        assert any(entry[1] == leaving and entry[2] == "unregistered" for entry in removed)


def test_zdist_retire_moves_values_and_the_worker_and_its_nanny_exit():
    values = values_for(3)
    with make_cluster(3, nanny=True) as cluster:
        leaving = cluster.worker_addresses[0]
        name = center_call(cluster.center_address, "workers")[leaving]["name"]
        scatter(leaving, values)
        done = subprocess.run(
            [sys.executable, "-m", "zdist_cli.main", "retire", cluster.center_address, name], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"Retired {leaving}: ")
        assert cluster.worker_processes[leaving].wait(STOP_TIMEOUT) == 0  # the nanny exited with its worker
        wait_for(lambda: leaving not in center_call(cluster.center_address, "workers"), message="unregistered")
        assert same(gather(cluster.center_address, list(values)), values)


def test_a_last_worker_says_so_and_exits_without_hanging():
    with make_cluster(1) as cluster:
        (address,) = cluster.worker_addresses
        scatter(address, {"k": 1})
        process = cluster.worker_processes[address]
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT) == 0


def test_lifetime_retires_a_worker_by_itself():
    with make_cluster(1) as cluster:
        process = subprocess.Popen(
            [sys.executable, "-m", "zdist.run", "worker", cluster.center_address, "--no-nanny", "--lifetime", "3s", "--heartbeat-interval", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            address = process.stdout.readline().decode().split()[-1]
            wait_for(lambda: address in center_call(cluster.center_address, "workers"), message="registered")
            scatter(address, {"short-lived": np.arange(10)})
            assert process.wait(STOP_TIMEOUT) == 0
            assert "reached its lifetime" in process.stderr.read().decode()
            assert gather(cluster.center_address, ["short-lived"])["short-lived"].tolist() == list(range(10))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()


def test_two_workers_retiring_together_do_not_count_on_each_other():
    """A key held by two workers that retire at the same time reaches a third: neither
    may leave it in the belief that the other keeps it (scale-down retires several at once)."""
    from zdist.retirement import retire_workers

    with make_cluster(3) as cluster:
        first, second, staying = cluster.worker_addresses
        shared = {"shared": np.arange(10_000)}
        scatter(first, shared)
        scatter(second, shared)
        scatter(first, {"first-only": 1})
        wait_for(lambda: len(center_call(cluster.center_address, "who_has", keys=["shared"])["shared"]) == 2, message="both copies listed")
        results = run(retire_workers(cluster.center_address, [first, second]))
        assert all(not isinstance(r, BaseException) for r in results.values()), results
        for address in (first, second):
            assert cluster.worker_processes[address].wait(STOP_TIMEOUT) == 0
        wait_for(lambda: set(center_call(cluster.center_address, "ncores")) == {staying}, message="only the staying worker listed")
        got = gather(cluster.center_address, ["shared", "first-only"])
        assert got["first-only"] == 1 and (got["shared"] == shared["shared"]).all()
        assert {h for k in ("shared", "first-only") for h in center_call(cluster.center_address, "who_has", keys=[k])[k]} == {staying}
