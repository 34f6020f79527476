"""A control plane that grows slowly, and several clients at once (issue 16).

* the fleet benchmark, reduced: 100 simulated workers and 10^5 keys on a real
  Center: registration, heartbeats, key reports and a dead worker handled;
* heartbeat intervals stretch with the cluster, and the liveness timeout with them;
* membership news as changes: ``info(since=version)``, and a client session
  that patches its table;
* ``who_has`` in one piece (a SetMap);
* workers serve different clients' batches in turn: two clients on one
  cluster both finish, and the small job is not starved by the long map.

No timing assertions: conditions are waited for with deadlines.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from zdist import Center, Pool, Worker
from zdist.center import LIVENESS_BEATS, MembershipLog
from zdist.fairpool import FairThreadPool, PoolShutDown
from zdist.protocol import SetMap, encode_reply, parse_reply
from zdist.session import Session

from .conftest import make_cluster, run, wait_for

_BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.abspath(os.path.join(_BENCH, f"{name}.py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def until(condition, timeout: float = 20.0, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {message}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- the fleet, reduced


def test_fleet_of_100_simulated_workers_and_100k_keys():
    """Registration, heartbeats, key reports, queries and a dead worker, on a real Center process."""
    fleet = _load("fleet")
    result = fleet.run_fleet(workers=100, keys=100_000, processes=2, window=1.0, samples=10, say=lambda line: None)
    assert result["keys_reported"] == 100_000
    assert result["heartbeats_per_s"] > 0
    assert result["who_has_1000"]["median_ms"] > 0
    assert result["session_look"]["delta"]  # the session asked for changes only
    assert result["small_tasks"]["ok"] == result["small_tasks"]["tasks"] > 0
    assert result["dead_noticed_s"] > 0  # the killed worker was dropped (else _wait_center raised)


# ---------------------------------------------------------------- heartbeats stretch with the cluster


def test_heartbeat_interval_stretches_with_the_cluster_and_liveness_with_it():
    async def main():
        async with Center(heartbeat_timeout=1.0, heartbeat_rate=10.0) as center:
            workers = [await Worker(center.address, ncores=1, heartbeat_interval=0.05).start() for _ in range(6)]
            try:
                # 6 workers at 10 heartbeats a second: each is told to beat every 0.6 s.
                await until(lambda: all(w.current_heartbeat_interval == pytest.approx(0.6) for w in workers), message="intervals told")
                assert center.liveness_timeout() == pytest.approx(LIVENESS_BEATS * 0.6)
                info = center.info()
                assert info["heartbeat_timeout"] == pytest.approx(3.0)
                # A worker that stops beating is dropped only after missing beats at its own pace.
                silent = workers.pop()
                await silent.stop()  # unregisters: gone at once
                assert silent.address not in center.worker_info
                center.register(address="127.0.0.1:1", ncores=1)  # registers, never beats
                await until(lambda: "127.0.0.1:1" not in center.worker_info, timeout=10, message="the silent worker dropped")
                assert all(w.address in center.worker_info for w in workers)  # the beating ones stay
            finally:
                for w in workers:
                    await w.stop()

    run(main())


# ---------------------------------------------------------------- membership news as changes


def test_info_since_a_version_returns_only_the_changes():
    async def main():
        async with Center() as center:
            center.register(address="127.0.0.1:9000", ncores=2)
            center.register(address="127.0.0.1:9001", ncores=1)
            first = center.info()
            assert set(first["workers"]) == {"127.0.0.1:9000", "127.0.0.1:9001"}
            # Metrics alone are no news.
            center.heartbeat(address="127.0.0.1:9000", executing=3, memory=10)
            same = center.info(since=first["version"], center_id=first["id"])
            assert same["changes"] == {} and "workers" not in same and same["version"] == first["version"]
            # A join, a pause and a leave are.
            center.register(address="127.0.0.1:9002", ncores=4)
            center.heartbeat(address="127.0.0.1:9000", status="paused")
            center.unregister(address="127.0.0.1:9001")
            news = center.info(since=first["version"], center_id=first["id"])
            assert set(news["changes"]) == {"127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"}
            assert news["changes"]["127.0.0.1:9001"] is None
            assert news["changes"]["127.0.0.1:9000"]["status"] == "paused"
            assert news["changes"]["127.0.0.1:9002"]["ncores"] == 4
            # Another Center's version, or one from the future: the whole table.
            assert "workers" in center.info(since=first["version"], center_id="another")
            assert "workers" in center.info(since=news["version"] + 5, center_id=first["id"])
            assert "workers" in center.info(since="1", center_id=first["id"])

    run(main())


def test_membership_log_forgets_old_versions_and_then_asks_for_the_table(monkeypatch):
    monkeypatch.setattr("zdist.center.CHANGES_KEPT", 10)
    log = MembershipLog()
    for i in range(25):
        log.changed(f"w{i % 3}")
    assert log.since(0) is None  # too far behind: the whole table
    assert log.since(log.version) == set()
    assert log.since(log.version - 2) == {"w2", "w0"}  # versions 24 and 25 changed w2 and w0
    assert len(log.since(log.floor)) == 3


def test_a_client_session_patches_its_table_from_the_changes():
    with make_cluster(1) as cluster:

        async def main():
            session = Session(cluster.center_address)
            await session.open(30)
            try:
                info = await session.look()
                assert set(info["workers"]) == set(cluster.worker_addresses) and session.version is not None
                quiet = await session.look(force=False)
                assert quiet["changed"] is False and set(quiet["workers"]) == set(cluster.worker_addresses)
                new = await asyncio.get_running_loop().run_in_executor(None, cluster.start_workers, 1)
                info = await session.look(force=False)
                while set(info["workers"]) != set(cluster.worker_addresses):
                    info = await session.look(force=False)
                assert new[0] in info["workers"]
                cluster.kill_worker(new[0])
                deadline = time.monotonic() + 30
                while new[0] in info["workers"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    info = await session.look(force=False)
                assert new[0] not in info["workers"]
            finally:
                await session.close()

        run(main())


# ---------------------------------------------------------------- who_has in one piece


def test_who_has_travels_as_one_set_map():
    table = SetMap({("x", 0): {"a:1", "b:2"}, "y": set(), 3: {"c:3"}})
    result = parse_reply(encode_reply(1, table)).result
    assert result == {("x", 0): {"a:1", "b:2"}, "y": set(), 3: {"c:3"}}
    assert type(result) is dict and all(type(v) is set for v in result.values())
    # The Center sends its table's entries as they are: a one-holder entry is a string.
    assert parse_reply(encode_reply(1, SetMap({"k": "a:1", "j": ()}))).result == {"k": {"a:1"}, "j": set()}


def test_a_malformed_set_map_is_a_protocol_error():
    import msgpack

    from zdist.protocol import ProtocolError
    from zdist.protocol.message import EXT_SETMAP

    for payload in ([[1, 2], [[1]]], [[1], "x"], [[[1]], [[2]]], "nope"):
        ext = msgpack.ExtType(EXT_SETMAP, msgpack.packb(payload))
        header = msgpack.packb({"id": 1, "status": "ok", "result": ext, "frames": 0})
        with pytest.raises(ProtocolError):
            parse_reply([header])


# ---------------------------------------------------------------- several clients at once


def test_fair_pool_lets_a_second_owner_start_before_the_first_ones_backlog():
    pool = FairThreadPool(1, "test")
    order: list = []
    gate = threading.Event()
    done = threading.Event()

    def job(name):
        if name == "a0":
            gate.wait(10)  # the first owner's long task holds the only core
        order.append(name)
        return name

    def finished(result, error):
        if len(order) == 6:
            done.set()

    try:
        for i in range(5):
            pool.submit("a", job, (f"a{i}",), finished)
        pool.submit("b", job, ("b0",), finished)
        assert wait_for(lambda: order == ["b0"], timeout=10)  # b ran beside a's running task, not after a's backlog
        gate.set()
        assert done.wait(10)
        assert order == ["b0", "a0", "a1", "a2", "a3", "a4"]
    finally:
        gate.set()
        pool.shutdown()


def test_fair_pool_runs_every_owners_jobs_and_answers_queued_ones_at_shutdown():
    pool = FairThreadPool(1, "test")
    gate = threading.Event()
    order: list = []
    errors: list = []

    def job(name):
        gate.wait(10)
        order.append(name)

    def finished(result, error):
        if error is not None:
            errors.append(error)

    pool.submit("a", job, ("a0",), finished)
    pool.submit("b", job, ("b0",), finished)  # b runs beside a0 (nothing of b running)
    for i in range(1, 3):
        pool.submit("a", job, (f"a{i}",), finished)
        pool.submit("b", job, (f"b{i}",), finished)
    gate.set()
    wait_for(lambda: len(order) == 6, timeout=10)
    assert sorted(order) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    gate.clear()
    pool.submit("a", job, ("a3",), finished)
    pool.submit("a", job, ("a4",), finished)  # queued behind a3
    pool.shutdown()
    gate.set()
    wait_for(lambda: errors, timeout=10)
    assert all(isinstance(e, PoolShutDown) for e in errors)
    with pytest.raises(PoolShutDown):
        pool.submit("a", job, ("late",), finished)


_LONG_CLIENT = textwrap.dedent(
    """
    import os, sys, time
    from zdist import Pool

    def slow(i):
        time.sleep(0.05)
        return os.getpid()

    with Pool(sys.argv[1]) as pool:
        handles = pool.map_async(slow, range(int(sys.argv[2])))
        print("started", flush=True)
        pids = pool.gather(handles)
        print("done", len(set(pids)), flush=True)
    """
)


def _quick(i):
    time.sleep(0.01)
    return os.getpid()


def test_two_clients_on_one_cluster_both_finish_and_the_small_one_is_not_starved():
    """A long map from one client process; a small one from another meanwhile: it finishes first, on the workers."""
    with make_cluster(2) as cluster:
        long_client = subprocess.Popen([sys.executable, "-c", _LONG_CLIENT, cluster.center_address, "600"], stdout=subprocess.PIPE, text=True)
        try:
            assert long_client.stdout.readline().strip() == "started"
            time.sleep(0.5)  # its batches fill the workers' queues
            with Pool(cluster.center_address) as pool:
                pids = pool.gather(pool.map(_quick, range(20)))
            assert len(pids) == 20
            # The small job is done while the long map still runs: it was not made to wait for it.
            assert long_client.poll() is None
            out, _ = long_client.communicate(timeout=120)
            assert out.startswith("done") and int(out.split()[1]) == 2  # the long map used both workers
        finally:
            if long_client.poll() is None:
                long_client.kill()
                long_client.wait(10)


def test_center_keeps_one_holder_as_a_string_and_several_as_a_set():
    """Most keys have one holder: the table keeps its address, not a set (216 bytes a key less)."""

    async def main():
        async with Center() as center:
            a, b = "127.0.0.1:9000", "127.0.0.1:9001"
            center.register(address=a, ncores=1)
            center.register(address=b, ncores=1)
            center.add_keys(address=a, keys={"x": 8, "y": 8})
            assert center.keys.who_has["x"] == a
            center.add_keys(address=b, keys={"x": 8})
            assert center.keys.who_has["x"] == {a, b} and center.who_has(keys=["x", "y", "z"]) == {"x": {a, b}, "y": {a}, "z": set()}
            center.remove_keys(address=a, keys=["x"])
            assert center.keys.who_has["x"] == b
            center.add_keys(address=a, keys=["x"])
            center.unregister(address=b)
            assert center.keys.who_has == {"x": a, "y": a} and center.has_what() == {a: {"x", "y"}}
            center.remove_keys(address=a, keys=["x", "y", "never"])
            assert center.keys.who_has == {} and center.keys.nbytes == {}

    run(main())
