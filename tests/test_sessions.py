"""Client sessions: nothing a client made outlives it.

A client opens a session with the Center and heartbeats it; when it closes
or falls silent, every worker drops the session's tasks not yet started and
deletes the keys stored on its behalf (results, scattered values, copies
fetched for its tasks). Real Centers and Workers on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
import uuid

import pytest

from zdist import Center, Worker, rpc
from zdist.errors import SessionClosedError
from zdist.protocol import ProtocolError, Ref

from .conftest import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add(x, y):
    return x + y


STARTED = threading.Event()
GO = threading.Event()
RAN: list = []


def first_blocks(i):
    """Task 0 says it started, then waits for the test (bounded); every task records that it ran."""
    RAN.append(i)
    if i == 0:
        STARTED.set()
        GO.wait(30)
    return i


@contextlib.asynccontextmanager
async def local_nodes(n_workers=2, session_timeout=10.0):
    """A Center and 1-core Workers in this process, on the running loop."""
    center = await Center("127.0.0.1", 0, heartbeat_timeout=HEARTBEAT_TIMEOUT, session_timeout=session_timeout).start()
    workers = []
    try:
        for i in range(n_workers):
            worker = Worker(center.address, "127.0.0.1", 0, ncores=1, name=f"w{i}", heartbeat_interval=HEARTBEAT_INTERVAL)
            workers.append(await worker.start())
        await until(lambda: len(center.worker_info) == len(workers), message="workers register")
        yield center, workers
    finally:
        for worker in workers:
            await worker.stop()
        await center.stop()


async def until(condition, timeout: float = 20.0, message: str = ""):
    """Wait for ``condition()`` (a plain function) to be true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {message or condition}")
        await asyncio.sleep(0.02)


def session_free(center, workers, session) -> bool:
    """Nothing of ``session`` is left on the workers, and the Center knows it closed."""
    return (
        session not in center.sessions.open
        and session in center.sessions.closed
        and all(session not in w.session_keys and session not in w.key_session.values() and session in w.released_sessions for w in workers)
    )


def assert_tags_consistent(worker) -> None:
    """key → session and session → keys agree, and name only keys held."""
    pairs = {(key, s) for s, keys in worker.session_keys.items() for key in keys}
    assert pairs == set(worker.key_session.items())
    assert all(keys for keys in worker.session_keys.values())
    assert set(worker.key_session) <= set(worker.data)


# ---------------------------------------------------------------- the Center's side


def test_open_heartbeat_close():
    async def main():
        async with local_nodes(1) as (center, (worker,)):
            async with rpc(center.address, timeout=20) as c:
                s = uuid.uuid4().hex
                assert await c.open_session(session=s, timeout=30, name="notebook", pid=os.getpid(), host="here") == "OK"
                listed = (await c.sessions())[s]
                assert (listed["name"], listed["pid"], listed["host"], listed["timeout"]) == ("notebook", os.getpid(), "here", 30.0)
                first_seen = listed["last_seen"]

                info = await c.info(session=s)
                assert info["session_status"] == "open" and info["sessions"] == 1
                assert {"address", "id", "workers", "generation", "removed", "nkeys", "heartbeat_timeout", "time"} <= set(info)
                assert "session_status" not in await c.info()
                await until(lambda: center.sessions.open[s]["last_seen"] >= first_seen)

                # Opening again refreshes it (new timeout, same name); still one session.
                assert await c.open_session(session=s, timeout=60) == "OK"
                listed = (await c.sessions())[s]
                assert listed["timeout"] == 60.0 and listed["name"] == "notebook"

                # A heartbeat of a session the Center does not know (it restarted) opens it.
                t = uuid.uuid4().hex
                assert (await c.info(session=t))["session_status"] == "open"
                assert (await c.sessions())[t]["timeout"] == center.session_timeout
                assert (await c.info())["sessions"] == 2

                assert await c.close_session(session=s) == "OK"
                assert s not in await c.sessions()
                await until(lambda: s in worker.released_sessions, message="the worker hears of the closed session")
                # Closed stays closed: a late heartbeat or open is told, and does not reopen it.
                assert (await c.info(session=s))["session_status"] == "closed"
                assert await c.open_session(session=s) == "closed"
                assert s not in await c.sessions()

                assert await c.close_session(session=t) == "OK"
                assert await c.close_session(session=t) == "OK"  # twice is harmless
                assert (await c.info())["sessions"] == 0

    run(main())


def test_bad_session_arguments_are_refused_and_nodes_keep_serving():
    async def main():
        async with local_nodes(1) as (center, (worker,)):
            async with rpc(center.address, timeout=20) as c, rpc(worker.address, timeout=20) as w:
                s = uuid.uuid4().hex
                for bad in (5, "", None, b"bytes", ["a"], "x" * 1000):
                    with pytest.raises(TypeError, match="session"):
                        await c.open_session(session=bad)
                for bad in ("ten", -1, 0, True, float("inf")):
                    with pytest.raises(ValueError, match="timeout"):
                        await c.open_session(session=s, timeout=bad)
                with pytest.raises(TypeError, match="name"):
                    await c.open_session(session=s, name=5)
                with pytest.raises(TypeError, match="pid"):
                    await c.open_session(session=s, pid="123")
                with pytest.raises(TypeError, match="session"):
                    await c.close_session(session=7)
                with pytest.raises(TypeError, match="session"):
                    await c.info(session=7)
                with pytest.raises(ProtocolError, match="session"):
                    await c.close_session()
                with pytest.raises(TypeError, match="sessions"):
                    await c.register(address="127.0.0.1:1", ncores=1, sessions="abc")
                with pytest.raises(TypeError, match="session"):
                    await c.register(address="127.0.0.1:1", ncores=1, sessions=[5])

                with pytest.raises(TypeError, match="session"):
                    await w.release_session(session=3)
                with pytest.raises(TypeError, match="session"):
                    await w.update_data(data={"never": 1}, session=b"x")
                with pytest.raises(TypeError, match="session"):
                    await w.compute_batch(tasks=[["never", add, (1, 2), {}, []]], session=5)
                with pytest.raises(TypeError, match="session"):
                    await w.compute(function=add, args=(1, 2), key="never", session=["s"])

                # Nothing of it left a trace, and both keep serving.
                assert await c.ping() == "pong" and await w.ping() == "pong"
                assert await c.sessions() == {} and not center.sessions.closed
                assert "127.0.0.1:1" not in await c.ncores()
                assert "never" not in await w.keys()
                assert worker.session_keys == {} and worker.released_sessions == {}

    run(main())


# ---------------------------------------------------------------- the workers' side


def test_silent_session_is_reaped_and_only_its_keys_vanish():
    async def main():
        async with local_nodes(2) as (center, (alice, bob)):
            async with rpc(center.address, timeout=20) as c, rpc(alice.address, timeout=20) as a, rpc(bob.address, timeout=20) as b:
                s, t = uuid.uuid4().hex, uuid.uuid4().hex
                assert await c.open_session(session=s, timeout=60) == "OK"
                assert await c.open_session(session=t, timeout=60) == "OK"

                await a.update_data(data={"s-scattered": 1}, session=s)
                await a.update_data(data={"t-scattered": 2}, session=t)
                await a.update_data(data={"plain": 3})
                await b.update_data(data={"bob-plain": 10})
                # s's task on alice copies bob-plain from bob; t's task on bob copies t-scattered from alice.
                replies = await a.compute_batch(tasks=[["s-result", add, (Ref("s-scattered"), Ref("bob-plain")), {}, ["s-scattered", "bob-plain"]]], session=s)
                assert replies[0][:2] == ["s-result", "ok"]
                replies = await b.compute_batch(tasks=[["t-result", add, (Ref("t-scattered"), 1), {}, ["t-scattered"]]], session=t)
                assert replies[0][:2] == ["t-result", "ok"]
                status, meta = await b.compute(function=add, keys=["plain"], args=(1,), key="plain-result")
                assert status == b"OK"
                assert alice.session_keys == {s: {"s-scattered", "s-result", "bob-plain"}, t: {"t-scattered"}}
                assert bob.session_keys == {t: {"t-result", "t-scattered"}}
                everything = {
                    "s-scattered": {alice.address}, "s-result": {alice.address}, "bob-plain": {alice.address, bob.address},
                    "t-scattered": {alice.address, bob.address}, "t-result": {bob.address},
                    "plain": {alice.address, bob.address}, "plain-result": {bob.address},
                }
                await until(lambda: center.who_has(everything) == everything, message="the Center learns every key")

                # s falls silent: a short timeout and no more heartbeats.
                assert await c.open_session(session=s, timeout=0.3) == "OK"
                await until(lambda: session_free(center, (alice, bob), s), message="s is reaped on the Center and both workers")
                left = {key: holders for key, holders in everything.items() if key not in ("s-scattered", "s-result")}
                left["bob-plain"] = {bob.address}  # alice's copy, fetched for s, is gone; bob's own stays
                await until(lambda: center.who_has() == left, message="the Center's who_has drops exactly s's keys")
                assert set(alice.data) == {"t-scattered", "plain"}
                assert set(bob.data) == {"bob-plain", "t-result", "t-scattered", "plain", "plain-result"}
                assert t in center.sessions.open and alice.session_keys == {t: {"t-scattered"}}
                for worker in (alice, bob):
                    assert_tags_consistent(worker)

                # A late request of s is refused, and stores nothing.
                with pytest.raises(SessionClosedError, match="session") as caught:
                    await a.update_data(data={"late": 1}, session=s)
                assert caught.value.session == s
                with pytest.raises(SessionClosedError):
                    await a.compute_batch(tasks=[["late-result", add, (1, 2), {}, []]], session=s)
                with pytest.raises(SessionClosedError):
                    await b.compute(function=add, args=(1, 2), key="late-result", session=s)
                assert "late" not in alice.data and "late-result" not in alice.data and "late-result" not in bob.data

                # Keys change owner with the last store; deleting untags them.
                await a.update_data(data={"plain": 4}, session=t)
                await b.delete_data(keys=["t-result"])
                assert alice.key_session["plain"] == t and "t-result" not in bob.key_session
                await a.update_data(data={"plain": 5})
                assert "plain" not in alice.key_session
                for worker in (alice, bob):
                    assert_tags_consistent(worker)

    run(main())


def test_released_session_queued_tasks_do_not_run():
    STARTED.clear()
    GO.clear()
    RAN.clear()

    async def main():
        async with local_nodes(1) as (center, (worker,)):
            async with rpc(center.address, timeout=20) as c, rpc(worker.address, timeout=40) as w:
                s = uuid.uuid4().hex
                assert await c.open_session(session=s, timeout=60) == "OK"
                await w.update_data(data={"other": 1})  # no session: must stay
                tasks = [[f"slow-{i}", first_blocks, (i,), {}, []] for i in range(5)]
                batch = asyncio.ensure_future(w.compute_batch(tasks=tasks, session=s))
                try:
                    await until(STARTED.is_set, message="the first task starts")
                    assert await c.close_session(session=s) == "OK"
                    await until(lambda: s in worker.released_sessions, message="the worker hears of it")
                finally:
                    GO.set()
                replies = await batch
                assert [r[0] for r in replies] == [t[0] for t in tasks]
                for reply in replies:
                    assert reply[1] == "error" and reply[2]["type"] == "SessionClosedError", reply
                    assert isinstance(reply[2]["exception"], SessionClosedError)
                    assert "session" in reply[2]["message"] and "closed" in reply[2]["message"]
                assert RAN == [0]  # the running one finished; the others never started
                assert set(worker.data) == {"other"}
                assert worker.session_keys == {} and worker.key_session == {}
                assert worker.executing == 0
                await until(lambda: center.who_has() == {"other": {worker.address}}, message="the Center holds nothing of s")

    run(main())


def test_replicas_of_a_session_belong_to_it():
    async def main():
        async with local_nodes(2) as (center, (alice, bob)):
            async with rpc(center.address, timeout=20) as c, rpc(alice.address, timeout=20) as a:
                s = uuid.uuid4().hex
                assert await c.open_session(session=s, timeout=60) == "OK"
                await a.update_data(data={"s-value": 1}, session=s)
                await a.update_data(data={"plain": 2})
                await c.set_replicas(keys={"s-value": 2, "plain": 2}, session=s)
                await until(lambda: bob.key_session.get("s-value") == s and "plain" in bob.data, message="bob copies both keys")
                assert center.replicas.session == {"s-value": s, "plain": s}
                assert await c.close_session(session=s) == "OK"
                await until(lambda: session_free(center, (alice, bob), s))
                # Every copy of s's keys is gone, and the Center restores no replica of them.
                await until(lambda: center.who_has() == {"plain": {alice.address}}, message="only alice's own untagged key stays")
                assert center.replicas.wanted == {} and center.replicas.session == {}
                with pytest.raises(TypeError, match="session"):
                    await c.set_replicas(keys={"plain": 2}, session=5)

    run(main())


def test_worker_that_registers_later_is_told():
    """A worker the Center did not list when the session closed is told when it registers."""

    async def main():
        async with local_nodes(1) as (center, (worker,)):
            async with rpc(center.address, timeout=20) as c, rpc(worker.address, timeout=20) as w:
                s = uuid.uuid4().hex
                assert await c.open_session(session=s, timeout=60) == "OK"
                await w.update_data(data={"s-value": 1}, session=s)
                await w.update_data(data={"plain": 2})
                await until(lambda: center.who_has(["s-value", "plain"]) == {"s-value": {worker.address}, "plain": {worker.address}})
                # The Center forgets the worker (as if it missed heartbeats), then the
                # session closes: in one step of the loop, so the Center tells no worker.
                center.unregister(address=worker.address)
                center.close_session(session=s)
                assert "s-value" in worker.data and s not in worker.released_sessions
                # The worker's next heartbeat hears 'unknown'; it registers again with its sessions.
                await until(lambda: "s-value" not in worker.data and worker.address in center.worker_info, message="the worker releases s")
                await until(lambda: center.who_has() == {"plain": {worker.address}}, message="the Center drops s's key")
                assert worker.session_keys == {}

    run(main())


def test_sessions_known_only_from_workers_close_after_a_center_restart():
    """A Center that restarts learns a session from the workers; with no client to heartbeat, it closes."""

    async def main():
        async with local_nodes(1, session_timeout=0.5) as (center, (worker,)):
            s = uuid.uuid4().hex
            worker.update_data(data={"s-value": 1}, session=s)
            await until(lambda: center.who_has(["s-value"]) == {"s-value": {worker.address}})
            assert s not in center.sessions.open  # never opened: a session of a Center before this one
            # The worker registers again (as after a restart) and names the sessions it holds keys of.
            center.unregister(address=worker.address)
            await until(lambda: s in center.sessions.open and center.sessions.open[s]["adopted"], message="the Center adopts s")
            await until(lambda: session_free(center, [worker], s), message="s closes: no client heartbeats it")
            await until(lambda: center.who_has() == {}, message="its key is gone")

    run(main())


# ---------------------------------------------------------------- a client process killed mid-work

CLIENT = textwrap.dedent(
    """
    import asyncio, os, sys, time, uuid
    from zdist import rpc
    from zdist.protocol import Ref

    def slow_inc(x):
        time.sleep(0.01)
        return x + 1

    async def main(center_address, addresses):
        session = uuid.uuid4().hex
        center = rpc(center_address, timeout=20)
        assert await center.open_session(session=session, timeout=1.0, name="doomed", pid=os.getpid()) == "OK"

        async def heartbeat():
            while True:
                await center.info(session=session)
                await asyncio.sleep(0.1)

        beating = asyncio.ensure_future(heartbeat())
        workers = [rpc(a, timeout=60) for a in addresses]
        for i, w in enumerate(workers):
            await w.update_data(data={f"input-{i}": i}, session=session)
        for round in range(1_000_000):
            # Each worker's tasks read the other worker's input: copies move.
            batches = [
                asyncio.ensure_future(w.compute_batch(tasks=[[f"out-{round}-{i}-{j}", slow_inc, (Ref(f"input-{1 - i}"),), {}, [f"input-{1 - i}"]] for j in range(30)], session=session))
                for i, w in enumerate(workers)
            ]
            await asyncio.sleep(0.01)  # sent: the workers are busy with them
            if round == 1:
                print("working", session, flush=True)
            await asyncio.gather(*batches)

    asyncio.run(main(sys.argv[1], sys.argv[2:]))
    """
)


def test_killed_client_process_leaves_the_tables_empty():
    async def main():
        async with local_nodes(2) as (center, workers):
            env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, center.address, *(w.address for w in workers), stdout=asyncio.subprocess.PIPE, env=env
            )
            try:
                line = await asyncio.wait_for(client.stdout.readline(), 60)
                assert line.startswith(b"working"), line
                session = line.split()[1].decode()
                await until(lambda: session in center.sessions.open and len(center.who_has()) > 4, message="the client's keys reach the Center")
                client.send_signal(signal.SIGKILL)
                await client.wait()
            finally:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
            # No close_session: the Center notices the silence, and the workers clean up.
            await until(lambda: session_free(center, workers, session), message="the killed client's session is closed everywhere")
            await until(
                lambda: center.who_has() == {} and all(not w.data and not w.executing and not w.fetcher.in_flight for w in workers),
                message="the cluster's tables are empty again",
            )
            assert all(w.key_session == {} for w in workers)
            assert center.info()["sessions"] == 0 and center.info()["nkeys"] == 0

    run(main(), timeout=120)
