"""The worker's fast paths: tiny functions on the event loop, inputs fetched where the caller says, reports batched."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zdist import worker as worker_module
from zdist.protocol import Ref
from zdist.rpc import ConnectionPool

from .test_nodes import local_nodes, run, until


def thread_name(x):
    return threading.current_thread().name


def busy(seconds):
    """Spin (not sleep) for ``seconds``: a task that takes that long on whatever thread runs it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return threading.current_thread().name


async def batch(worker, tasks, **options):
    """compute_batch through a real socket; the replies."""
    connections = ConnectionPool(timeout=20)
    try:
        return await connections.get(worker.address).request("compute_batch", {"tasks": tasks, **options})
    finally:
        connections.close()


def one(key, function, *args, deps=()):
    return [key, function, list(args), {}, list(deps)]


def test_a_function_seen_tiny_twice_runs_on_the_loop():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            names = []
            for i in range(4):
                (reply,) = await batch(worker, [one(f"t{i}", thread_name, i)], inline=True, return_values=1000)
                assert reply[1] == "ok"
                names.append(reply[3])
            assert names[0] != loop_thread and names[1] != loop_thread  # learning, in the pool
            assert names[2] == loop_thread and names[3] == loop_thread
            assert worker.data["t3"] == loop_thread

    run(main())


def test_without_inline_every_task_runs_in_the_thread_pool():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            for i in range(4):
                (reply,) = await batch(worker, [one(f"t{i}", thread_name, i)], return_values=1000)
                assert reply[3] != loop_thread

    run(main())


def test_one_slow_run_sends_a_function_back_to_the_pool_for_good(monkeypatch):
    monkeypatch.setattr(worker_module, "INLINE_TASK_SECONDS", 0.02)

    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            runs = [0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0]
            names = []
            for i, seconds in enumerate(runs):
                (reply,) = await batch(worker, [one(f"t{i}", busy, seconds)], inline=True, return_values=1000)
                names.append(reply[3])
            assert names[2] == loop_thread  # learned tiny after two runs
            assert names[3] == loop_thread  # this run was slow: it blocked the loop, once
            assert all(name != loop_thread for name in names[4:])

    run(main())


def test_a_long_batch_leaves_the_loop_after_a_slice(monkeypatch):
    monkeypatch.setattr(worker_module, "INLINE_TASK_SECONDS", 0.05)
    monkeypatch.setattr(worker_module, "INLINE_SLICE_SECONDS", 0.01)

    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            for i in range(2):
                await batch(worker, [one(f"warm{i}", busy, 0.0)], inline=True)
            tasks = [one(f"t{i}", busy, 0.002) for i in range(40)]  # 80 ms of work
            replies = await batch(worker, tasks, inline=True, return_values=1000)
            names = [reply[3] for reply in replies]
            assert [reply[0] for reply in replies] == [f"t{i}" for i in range(40)]
            on_loop = [name == loop_thread for name in names]
            assert on_loop[0] and not on_loop[-1]
            assert sum(on_loop) < 20  # about 10 ms worth, then the pool
            assert on_loop == sorted(on_loop, reverse=True)  # a prefix ran on the loop

    run(main())


def test_who_has_from_the_caller_saves_asking_the_center():
    async def main():
        async with local_nodes(("alice", "bob")) as (center, (alice, bob)):
            alice.update_data(data={"x": 20})
            asked = center.ops_served.get("who_has", 0)
            (reply,) = await batch(bob, [one("y", lambda x: x + 1, Ref("x"), deps=["x"])], who_has={"x": [alice.address]}, return_values=100)
            assert reply[1:] == ["ok", reply[2], 21]
            assert center.ops_served.get("who_has", 0) == asked
            assert bob.data["x"] == 20

    run(main())


def test_a_wrong_who_has_falls_back_to_the_center():
    async def main():
        async with local_nodes(("alice", "bob", "carol")) as (center, (alice, bob, carol)):
            alice.update_data(data={"x": 20})
            (reply,) = await batch(bob, [one("y", lambda x: x + 1, Ref("x"), deps=["x"])], who_has={"x": [carol.address]}, return_values=100)
            assert reply[1] == "ok" and reply[3] == 21
            assert center.ops_served.get("who_has", 0) >= 1

    run(main())


def test_keys_made_by_compute_batch_reach_the_center_soon():
    async def main():
        async with local_nodes(("solo",)) as (center, (worker,)):
            await batch(worker, [one(f"k{i}", thread_name, i) for i in range(10)])

            async def known():
                return all(worker.address in center.who_has_table.get(f"k{i}", ()) for i in range(10))

            await until(known, timeout=10)
            worker.delete_data(keys=[f"k{i}" for i in range(10)])

            async def forgotten():
                return not any(center.who_has_table.get(f"k{i}") for i in range(10))

            await until(forgotten, timeout=10)

    run(main())


def test_compute_still_reports_before_it_replies():
    async def main():
        async with local_nodes(("solo",)) as (center, (worker,)):
            from zdist import rpc

            async with rpc(worker.address, timeout=20) as w, rpc(center.address, timeout=20) as c:
                for i in range(20):
                    await w.compute(function=thread_name, args=[i], key=f"c{i}")
                    assert (await c.who_has(keys=[f"c{i}"]))[f"c{i}"] == {worker.address}

    run(main())


def runs_its_own_loop(x):
    async def double():
        return 2 * x

    return asyncio.run(double())


def test_a_function_that_runs_its_own_event_loop_is_sent_back_to_the_pool(monkeypatch):
    monkeypatch.setattr(worker_module, "INLINE_TASK_SECONDS", 0.5)  # asyncio.run counts as tiny here

    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            for i in range(5):
                replies = await batch(worker, [one(f"a{i}", thread_name, i), one(f"t{i}", runs_its_own_loop, i)], inline=True, return_values=1000)
                assert [reply[1] for reply in replies] == ["ok", "ok"], replies
                assert replies[1][3] == 2 * i
            assert worker._fast_runs[runs_its_own_loop] == -1

    run(main())
