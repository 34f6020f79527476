"""Real Centers and Workers on 127.0.0.1, in this process and as subprocesses."""
from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

import zdist
from zdist import Center, MissingDataError, RPCTimeoutError, Worker, rpc
from zdist.rpc import CommClosedError

from .conftest import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, make_cluster, run

ADDRESS = re.compile(r"^127\.0\.0\.1:\d{1,5}$")
#: A private local cluster's nodes (the default) listen on Unix sockets in a directory of their own.
IPC_ADDRESS = re.compile(r"^ipc:///\S+/\d+$")


# ---------------------------------------------------------------- functions the workers run


def add(x, y):
    return x + y


def add_many(*args, scale=1):
    return sum(args) * scale


def divide_by_zero(x):
    return x / 0


def raise_key_error(x):
    raise KeyError(("missing", x))


def make_array(n):
    return np.arange(n, dtype="float64")


def make_frame(n):
    return pd.DataFrame({"a": np.arange(n, dtype="float64"), "b": np.ones(n), "c": np.zeros(n, dtype="int64")})


RELEASE = threading.Event()


def wait_for_release(x):
    """Blocks an in-process worker's thread until the test sets RELEASE (bounded)."""
    RELEASE.wait(30)
    return x


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared():
    """Two subprocess workers shared by the tests that neither kill nor count on an empty cluster (TCP: its addresses are host:port)."""
    with make_cluster(2, protocol="tcp") as c:
        yield c


async def until(condition, timeout: float = 30.0, interval: float = 0.02, message: str = ""):
    """Await ``condition()`` until it gives something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {message or condition}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def local_nodes(names=("alice", "bob"), heartbeat_timeout=HEARTBEAT_TIMEOUT, **worker_kwargs):
    """A Center and named Workers in this process, on the running loop."""
    center = await Center("127.0.0.1", 0, heartbeat_timeout=heartbeat_timeout).start()
    workers = []
    try:
        for name in names:
            worker = Worker(center.address, "127.0.0.1", 0, ncores=1, name=name, heartbeat_interval=HEARTBEAT_INTERVAL, **worker_kwargs)
            workers.append(await worker.start())
        deadline = time.monotonic() + 30
        while len(center.worker_info) < len(workers):
            assert time.monotonic() < deadline, "workers did not register"
            await asyncio.sleep(0.01)
        yield center, workers
    finally:
        for worker in workers:
            await worker.stop()
        await center.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the seed example


async def seed_example(center_address: str, alice_address: str, bob_address: str) -> None:
    async with rpc(alice_address, timeout=20) as alice, rpc(bob_address, timeout=20) as bob, rpc(center_address, timeout=20) as center:
        status, meta = await alice.update_data(data={"x": 1, "y": 2})
        assert status == b"OK" and set(meta["nbytes"]) == {"x", "y"}
        await bob.update_data(data={"a": 10})

        # Serve data: collect from one worker, send to the other.
        d = await alice.get_data(keys=["x", "y"])
        assert d == {"x": 1, "y": 2}
        await bob.update_data(data=d)
        assert await bob.get_data(keys=["x", "y", "a"]) == {"x": 1, "y": 2, "a": 10}

        async def center_knows():
            who = await center.who_has(keys=["x", "y", "a"])
            return who == {"x": {alice_address, bob_address}, "y": {alice_address, bob_address}, "a": {bob_address}}

        await until(center_knows, message="the Center learns who holds x, y and a")

        # Compute: 'x' is local to alice, 'a' lives on bob.
        response, meta = await alice.compute(function=add, keys=["x", "a"], key="z")
        assert response == b"OK"
        assert meta["key"] == "z"
        assert isinstance(meta["nbytes"], int) and meta["nbytes"] > 0
        assert set(meta) <= {"key", "nbytes", "value"}

        # The result stays on alice; bob does not have it.
        assert await alice.get_data(keys=["z"]) == {"z": 11}
        with pytest.raises(MissingDataError):
            await bob.get_data(keys=["z"])

        async def z_on_alice():
            who = await center.who_has(keys=["z", "a"])
            has = await center.has_what(workers=[alice_address, bob_address])
            return who == {"z": {alice_address}, "a": {alice_address, bob_address}} and "z" in has[alice_address] and "z" not in has[bob_address]

        await until(z_on_alice, message="the Center shows z on alice (and a fetched to alice)")
        has_what = await center.has_what()
        assert has_what[alice_address] == {"x", "y", "z", "a"}
        assert has_what[bob_address] == {"x", "y", "a"}
        assert (await center.nbytes(keys=["z"]))["z"] == meta["nbytes"]


def test_seed_example_in_process():
    async def main():
        async with local_nodes() as (center, (alice, bob)):
            await seed_example(center.address, alice.address, bob.address)
            # The Center's view matches what the workers really hold.
            assert set(alice.data) == {"x", "y", "z", "a"}
            assert set(bob.data) == {"x", "y", "a"}
            assert center.worker_info[alice.address]["name"] == "alice"
            assert center.worker_info[bob.address]["name"] == "bob"

    run(main())


def test_seed_example_subprocesses(cluster):
    alice, bob = cluster.worker_addresses
    run(seed_example(cluster.center_address, alice, bob))


def test_seed_example_in_process_cluster(inproc_cluster):
    alice, bob = inproc_cluster.worker_addresses
    run(seed_example(inproc_cluster.center_address, alice, bob))


# ---------------------------------------------------------------- compute


def test_compute_inputs_from_two_peers_args_and_kwargs(cluster3):
    alice, bob, charlie = cluster3.worker_addresses

    async def main():
        async with rpc(alice, timeout=20) as a, rpc(bob, timeout=20) as b, rpc(charlie, timeout=20) as c, rpc(cluster3.center_address, timeout=20) as center:
            await b.update_data(data={("b", 0): 1})
            await c.update_data(data={("c", 0): 2})
            await a.update_data(data={"own": 4})
            await until(lambda: _knows(center, [("b", 0), ("c", 0), "own"]))
            status, meta = await a.compute(function=add_many, keys=[("b", 0), ("c", 0), "own"], key=("sum", 1), args=(8,), kwargs={"scale": 10})
            assert status == b"OK" and meta["key"] == ("sum", 1)
            assert await a.get_data(keys=[("sum", 1)]) == {("sum", 1): 150}
            await until(lambda: _shows(center, ("sum", 1), {alice}))
            who = await center.who_has(keys=[("b", 0), ("c", 0)])
            assert who == {("b", 0): {alice, bob}, ("c", 0): {alice, charlie}}

    run(main())


async def _knows(center, keys):
    who = await center.who_has(keys=keys)
    return all(who[k] for k in keys)


async def _shows(center, key, holders):
    return (await center.who_has(keys=[key]))[key] == holders


def test_compute_without_key_gets_a_fresh_unique_key(shared):
    address = shared.worker_addresses[0]

    async def main():
        async with rpc(address, timeout=20) as w, rpc(shared.center_address, timeout=20) as center:
            await w.update_data(data={"x": 1, "y": 2})
            keys = []
            for _ in range(3):
                status, meta = await w.compute(function=add, keys=["x", "y"])
                assert status == b"OK"
                keys.append(meta["key"])
            assert len(set(keys)) == 3
            assert all(k not in ("x", "y") for k in keys)
            assert await w.get_data(keys=keys) == dict.fromkeys(keys, 3)
            await until(lambda: _knows(center, keys))
            who = await center.who_has(keys=keys)
            assert who == {k: {address} for k in keys}

    run(main())


@pytest.mark.parametrize("where", ["in-process", "subprocess"])
def test_function_that_raises(where, shared):
    async def check(worker_address, center_address):
        async with rpc(worker_address, timeout=20) as w, rpc(center_address, timeout=20) as center:
            await w.update_data(data={"x": 1})
            before = set(await w.keys())

            with pytest.raises(ZeroDivisionError) as info:
                await w.compute(function=divide_by_zero, keys=["x"], key="bad")
            remote_tb = getattr(info.value, "remote_traceback", "") or str(info.value.__cause__)
            assert "divide_by_zero" in remote_tb and "x / 0" in remote_tb
            assert "ZeroDivisionError" in remote_tb

            with pytest.raises(KeyError) as info:
                await w.compute(function=raise_key_error, keys=["x"])
            assert info.value.args == (("missing", 1),)
            assert "raise_key_error" in str(info.value.__cause__)

            # Nothing stored, nothing reported.
            assert set(await w.keys()) == before
            with pytest.raises(MissingDataError):
                await w.get_data(keys=["bad"])
            assert (await center.who_has(keys=["bad"])) == {"bad": set()}

            # And the worker keeps serving.
            status, meta = await w.compute(function=add, keys=["x", "x"], key="good")
            assert status == b"OK"
            assert await w.get_data(keys=["x", "good"]) == {"x": 1, "good": 2}
            assert (await w.ping()) == "pong"

    if where == "subprocess":
        run(check(shared.worker_addresses[0], shared.center_address))
    else:

        async def main():
            async with local_nodes(("solo",)) as (center, (worker,)):
                await check(worker.address, center.address)
                assert "bad" not in worker.data
                assert worker.tasks_failed == 2

        run(main())


def test_compute_with_an_input_nobody_has(shared):
    async def main():
        async with rpc(shared.worker_addresses[0], timeout=20) as w:
            with pytest.raises(MissingDataError) as info:
                await w.compute(function=add, keys=["nowhere", "nowhere-either"], key="r")
            assert "nowhere" in str(info.value)
            with pytest.raises(MissingDataError):
                await w.get_data(keys=["r"])
            assert await w.ping() == "pong"

    run(main())


def test_compute_with_a_function_that_is_not_callable(shared):
    async def main():
        async with rpc(shared.worker_addresses[0], timeout=20) as w:
            with pytest.raises(TypeError, match="callable"):
                await w.compute(function=42, keys=[])
            assert await w.ping() == "pong"

    run(main())


def test_slow_compute_does_not_block_get_data():
    async def main():
        RELEASE.clear()
        async with local_nodes(("solo",)) as (center, (worker,)):
            async with rpc(worker.address, timeout=20) as w:
                await w.update_data(data={"x": 1})
                slow = asyncio.ensure_future(w.compute(function=wait_for_release, keys=["x"], key="slow"))
                try:
                    await until(lambda: _executing(worker))
                    # The only thread is busy, yet the node answers at once.
                    assert await w.get_data(keys=["x"]) == {"x": 1}
                    assert await w.ping() == "pong"
                    assert not slow.done()
                finally:
                    RELEASE.set()
                assert (await slow)[0] == b"OK"
                assert await w.get_data(keys=["slow"]) == {"slow": 1}

    run(main())


async def _executing(worker):
    return worker.executing > 0


def test_delete_data_is_reported(shared):
    address = shared.worker_addresses[1]

    async def main():
        async with rpc(address, timeout=20) as w, rpc(shared.center_address, timeout=20) as center:
            await w.update_data(data={"gone": 1, "stays": 2})
            await until(lambda: _knows(center, ["gone", "stays"]))
            assert await w.delete_data(keys=["gone", "never-there"]) == "OK"
            await until(lambda: _shows(center, "gone", set()))
            held = (await center.has_what(workers=[address]))[address]
            assert "stays" in held and "gone" not in held
            assert (await center.who_has(keys=["stays"]))["stays"] == {address}
            keys = await w.keys()
            assert "stays" in keys and "gone" not in keys

    run(main())


# ---------------------------------------------------------------- the Center's tables


def test_center_tables_register_add_remove_unregister():
    alice, bob = "127.0.0.1:40001", "127.0.0.1:40002"

    async def main():
        async with Center("127.0.0.1", 0, heartbeat_timeout=600) as node:
            async with rpc(node.address, timeout=10) as center:
                assert ADDRESS.match(node.address)
                assert await center.register(address=alice, ncores=2, name="alice") == "OK"
                assert await center.register(address="tcp://" + bob, ncores=4, name="bob", keys={("k", 0): 100}) == "OK"
                assert await center.ncores() == {alice: 2, bob: 4}
                assert await center.has_what() == {alice: set(), bob: {("k", 0)}}
                assert await center.who_has() == {("k", 0): {bob}}

                await center.add_keys(address=alice, keys={"x": 8, ("k", 0): 100, b"raw": 3})
                await center.add_keys(address=bob, keys=["y"])
                who = await center.who_has()
                assert who == {"x": {alice}, ("k", 0): {alice, bob}, b"raw": {alice}, "y": {bob}}
                assert all(type(v) is set for v in who.values())
                assert await center.who_has(keys=["x", "unknown"]) == {"x": {alice}, "unknown": set()}
                assert await center.has_what(workers=[alice]) == {alice: {"x", ("k", 0), b"raw"}}
                assert await center.nbytes(keys=["x", ("k", 0)]) == {"x": 8, ("k", 0): 100}

                workers = await center.workers()
                assert set(workers) == {alice, bob}
                assert workers[alice]["name"] == "alice" and workers[alice]["ncores"] == 2
                assert workers[alice]["nkeys"] == 3 and workers[alice]["nbytes"] == 111
                assert isinstance(workers[bob]["last_seen"], float)

                await center.remove_keys(address=alice, keys=[("k", 0), "x", "not-there"])
                assert await center.who_has() == {("k", 0): {bob}, b"raw": {alice}, "y": {bob}}
                assert await center.has_what(workers=[alice]) == {alice: {b"raw"}}
                assert (await center.workers())[alice]["nkeys"] == 1

                # The answer says how often to beat: the cluster's size over the Center's heartbeat rate.
                assert await center.heartbeat(address=alice) == {"status": "OK", "interval": 2 / node.heartbeat_rate}
                assert await center.heartbeat(address="127.0.0.1:1") == {"status": "unknown"}

                assert await center.unregister(address=bob) == "OK"
                assert await center.ncores() == {alice: 2}
                assert await center.who_has() == {b"raw": {alice}}
                assert await center.has_what() == {alice: {b"raw"}}
                assert await center.unregister(address=bob) == "OK"  # twice is fine

                # Keys from a worker that is not registered are refused, readably.
                with pytest.raises(KeyError, match="not registered"):
                    await center.add_keys(address=bob, keys=["z"])
                assert "z" not in await center.who_has()

                # A worker that never heartbeats is dropped after the timeout.
                node.heartbeat_timeout = 0.3
                await until(lambda: _no_workers(center), timeout=30)
                assert await center.who_has() == {}
                assert await center.has_what() == {}
                info = await center.info()
                assert any(entry[1] == alice and "heartbeat" in entry[2] for entry in info["removed"])

    run(main())


async def _no_workers(center):
    return await center.ncores() == {}


def test_center_tables_with_real_workers(cluster):
    alice, bob = cluster.worker_addresses
    assert IPC_ADDRESS.match(cluster.center_address) and all(IPC_ADDRESS.match(a) for a in cluster.worker_addresses)

    async def main():
        async with rpc(cluster.center_address, timeout=20) as center:
            ncores = await center.ncores()
            assert ncores == {alice: 1, bob: 1}
            workers = await center.workers()
            assert set(workers) == {alice, bob}
            for address, info in workers.items():
                assert IPC_ADDRESS.match(address)
                assert info["ncores"] == 1
                assert isinstance(info["name"], str) and info["name"]
                assert info["nkeys"] == 0
            assert await center.has_what() == {alice: set(), bob: set()}

    run(main())


def test_addresses_are_host_port_strings(shared):
    assert ADDRESS.match(shared.center_address)
    assert all(ADDRESS.match(a) for a in shared.worker_addresses)

    async def main():
        # 'tcp://host:port' is accepted as well.
        async with rpc("tcp://" + shared.worker_addresses[0], timeout=20) as w, rpc(shared.center_address, timeout=20) as center:
            await w.update_data(data={"k": 1})
            await until(lambda: _knows(center, ["k"]))
            for holders in (await center.who_has()).values():
                assert all(isinstance(a, str) and ADDRESS.match(a) for a in holders)
            assert all(ADDRESS.match(a) for a in await center.has_what())
            assert all(ADDRESS.match(a) for a in await center.ncores())
            identity = await w.identity()
            assert identity == {"type": "Worker", "address": shared.worker_addresses[0]}

    run(main())


def test_worker_stop_unregisters_at_once():
    async def main():
        async with local_nodes(("alice", "bob")) as (center, (alice, bob)):
            async with rpc(alice.address, timeout=20) as a, rpc(center.address, timeout=20) as c:
                await a.update_data(data={"x": 1})
                await until(lambda: _knows(c, ["x"]))
                await alice.stop()
                # No heartbeat timeout needed: the worker said goodbye before it went.
                assert await c.ncores() == {bob.address: 1}
                assert await c.who_has(keys=["x"]) == {"x": set()}
                assert alice.address not in await c.has_what()

    run(main())


def test_killed_worker_leaves_every_table_after_the_heartbeat_timeout(cluster):
    alice, bob = cluster.worker_addresses

    async def main():
        async with rpc(alice, timeout=20) as a, rpc(bob, timeout=20) as b, rpc(cluster.center_address, timeout=20) as center:
            await a.update_data(data={"only-alice": 1, "both": 2})
            await b.update_data(data={"only-bob": 3, "both": 2})
            await until(lambda: _knows(center, ["only-alice", "only-bob", "both"]))
            assert (await center.who_has(keys=["both"]))["both"] == {alice, bob}

            cluster.kill_worker(alice, signal.SIGKILL)

            async def alice_gone():
                return alice not in await center.ncores()

            await until(alice_gone, timeout=HEARTBEAT_TIMEOUT * 10 + 10, message="alice dropped after missing heartbeats")
            assert await center.ncores() == {bob: 1}
            assert set(await center.workers()) == {bob}
            assert await center.has_what() == {bob: {"only-bob", "both"}}
            assert await center.who_has() == {"only-bob": {bob}, "both": {bob}}
            assert await center.who_has(keys=["only-alice"]) == {"only-alice": set()}
            info = await center.info()
            assert any(entry[1] == alice for entry in info["removed"])

            # bob is unaffected and still serves.
            assert await b.get_data(keys=["only-bob", "both"]) == {"only-bob": 3, "both": 2}
            # A compute on bob needing the lost key says which key is missing.
            with pytest.raises(MissingDataError, match="only-alice"):
                await b.compute(function=add, keys=["only-alice", "both"])

    run(main())


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("where", ["in-process", "subprocess"])
def test_nbytes_is_the_true_size(where, shared):
    x = np.arange(200_000, dtype="float64")
    df = make_frame(50_000)

    async def check(worker_address, center_address):
        async with rpc(worker_address, timeout=30) as w, rpc(center_address, timeout=20) as center:
            status, meta = await w.update_data(data={"x": x, "df": df, "small": 5})
            assert meta["nbytes"]["x"] == x.nbytes
            assert df.memory_usage(index=True).sum() <= meta["nbytes"]["df"] <= 2 * df.memory_usage(index=True, deep=True).sum() + 10_000
            assert 0 < meta["nbytes"]["small"] < 1000

            _, meta = await w.compute(function=make_array, args=(300_000,), key="arr")
            assert meta["nbytes"] == 300_000 * 8
            _, meta = await w.compute(function=make_frame, args=(10_000,), key="frame")
            assert meta["nbytes"] >= 3 * 10_000 * 8

            await until(lambda: _knows(center, ["x", "df", "arr", "frame"]))
            sizes = await center.nbytes(keys=["x", "arr"])
            assert sizes == {"x": x.nbytes, "arr": 300_000 * 8}

            got = await w.get_data(keys=["x", "df", "arr"])
            np.testing.assert_array_equal(got["x"], x)
            pd.testing.assert_frame_equal(got["df"], df)
            np.testing.assert_array_equal(got["arr"], make_array(300_000))

    if where == "subprocess":
        run(check(shared.worker_addresses[0], shared.center_address))
    else:

        async def main():
            async with local_nodes(("solo",)) as (center, (worker,)):
                await check(worker.address, center.address)

        run(main())


def test_sets_tuples_and_odd_keys_come_back_as_they_were(shared):
    alice, bob = shared.worker_addresses
    data = {
        "set": {1, 2, ("t", 3)},
        "frozenset": frozenset({"a", "b"}),
        ("tuple", 0, ("nested", 1)): [("x", 1), {"k": (1, 2)}],
        b"bytes-key": b"bytes-value",
        7: "int key",
        2**100: "big int key",
        "bytearray": bytearray(b"mutable"),
        "big-bytes": b"\x01" * 2**20,
    }

    async def main():
        async with rpc(alice, timeout=20) as a, rpc(bob, timeout=20) as b, rpc(shared.center_address, timeout=20) as center:
            await a.update_data(data=data)
            got = await a.get_data(keys=list(data))
            assert got == data
            assert type(got["set"]) is set and type(got["frozenset"]) is frozenset
            assert type(got[("tuple", 0, ("nested", 1))][0]) is tuple
            assert type(got["bytearray"]) is bytearray
            assert type(got[b"bytes-key"]) is bytes
            # Peer to peer the keys keep their types too.
            key = ("tuple", 0, ("nested", 1))
            await until(lambda: _knows(center, [key, 2**100, b"bytes-key"]))
            status, meta = await b.compute(function=add, keys=[b"bytes-key", b"bytes-key"], key=(2**100, "r"))
            assert await b.get_data(keys=[(2**100, "r")]) == {(2**100, "r"): b"bytes-value" * 2}
            assert (await center.who_has(keys=[key]))[key] == {alice}

    run(main())


# ---------------------------------------------------------------- rpc


def test_rpc_to_nobody_times_out():
    port = free_port()

    async def main():
        proxy = rpc(f"127.0.0.1:{port}", timeout=0.5)
        try:
            with pytest.raises(RPCTimeoutError) as info:
                await proxy.ping()
            assert f"127.0.0.1:{port}" in str(info.value)
            assert isinstance(info.value, TimeoutError)
            assert zdist.RPCTimeoutError is RPCTimeoutError
            # A per-call timeout overrides the proxy's.
            with pytest.raises(RPCTimeoutError):
                await proxy.ping(_timeout=0.2)
        finally:
            proxy.close()

    run(main(), timeout=30)


def test_rpc_close_fails_waiting_requests():
    port = free_port()

    async def main():
        proxy = rpc(f"127.0.0.1:{port}", timeout=60)
        waiting = asyncio.ensure_future(proxy.ping())
        await asyncio.sleep(0)
        proxy.close()
        with pytest.raises(CommClosedError):
            await waiting
        proxy.close()  # closing twice is fine

    run(main(), timeout=30)


def test_rpc_is_an_async_context_manager_and_reusable(shared):
    address = shared.worker_addresses[0]

    async def main():
        async with rpc(address, timeout=20) as w:
            assert repr(w) == f"rpc({address!r})"
            # Many concurrent calls share one connection.
            results = await asyncio.gather(*(w.update_data(data={f"k{i}": i}) for i in range(50)))
            assert all(r[0] == b"OK" for r in results)
            assert await w.get_data(keys=[f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
        w.close()
        w2 = rpc(address, timeout=20)
        try:
            assert await w2.ping() == "pong"
        finally:
            w2.close()

    run(main())


def test_rpc_bad_address():
    with pytest.raises(ValueError):
        rpc("no-port-here")
    with pytest.raises(TypeError):
        rpc(("127.0.0.1", 8787))


def test_unknown_op_through_rpc(shared):
    async def main():
        async with rpc(shared.center_address, timeout=20) as center:
            with pytest.raises(zdist.ProtocolError, match="no_such_op"):
                await center.no_such_op(x=1)
            with pytest.raises(zdist.ProtocolError, match="bad arguments"):
                await center.who_has(wrong_argument=1)
            assert await center.ping() == "pong"

    run(main())
