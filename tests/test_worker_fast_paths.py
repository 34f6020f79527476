"""The worker's fast paths: where a task runs (inline batches and coroutine functions on the event loop, the rest in the thread pool), inputs fetched where the caller says, reports batched."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings


from zdist import worker_batches
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


def test_an_inline_batch_runs_on_the_loop_from_the_first_call():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            for i in range(3):
                (reply,) = await batch(worker, [one(f"t{i}", thread_name, i)], inline=True, return_values=1000)
                assert reply[1] == "ok" and reply[3] == loop_thread
            assert worker.data["t0"] == loop_thread

    run(main())


def test_without_inline_every_task_runs_in_the_thread_pool():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            for i in range(4):
                (reply,) = await batch(worker, [one(f"t{i}", thread_name, i)], return_values=1000)
                assert reply[3] != loop_thread

    run(main())


async def async_thread_name(x, pause=0.0):
    await asyncio.sleep(pause)
    return threading.current_thread().name


def test_a_coroutine_function_is_awaited_on_the_loop_with_or_without_inline():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            from zdist import rpc

            loop_thread = threading.current_thread().name
            worker.update_data(data={"x": 1})
            for inline in (False, True):
                tasks = [one(f"a{inline}", async_thread_name, 0, 0.01), one(f"p{inline}", thread_name, 0), one(f"d{inline}", async_thread_name, Ref("x"), deps=["x"])]
                replies = await batch(worker, tasks, inline=inline, return_values=1000)
                assert [reply[0] for reply in replies] == [task[0] for task in tasks]
                assert all(reply[1] == "ok" for reply in replies), replies
                assert replies[0][3] == loop_thread and replies[2][3] == loop_thread
                assert (replies[1][3] == loop_thread) is inline  # a plain function runs on the loop only inline
                assert worker.data[f"a{inline}"] == loop_thread
            async with rpc(worker.address, timeout=20) as w:
                status, meta = await w.compute(function=async_thread_name, args=[0], key="c", return_value=1000)
                assert meta["value"] == loop_thread

    run(main())


def test_compute_batch_answers_a_future_whichever_way_its_tasks_run():
    async def main():
        async with local_nodes(("alice", "bob")) as (_, (alice, bob)):
            alice.update_data(data={"x": 1})
            loop_thread = threading.current_thread().name
            cases = {
                "inline": ([one("i", thread_name, 0)], {"inline": True}),
                "pool": ([one("p", thread_name, 0)], {}),
                "coroutine": ([one("c", async_thread_name, 0)], {}),
                "fetching": ([one("f", thread_name, Ref("x"), deps=["x"])], {"inline": True}),
                "nothing": ([], {}),
            }
            for name, (tasks, options) in cases.items():
                answer = bob.compute_batch(tasks, return_values=1000, **options)
                assert isinstance(answer, asyncio.Future), name
                assert answer.done() is (name in ("inline", "nothing")), name
                replies = await answer
                assert all(reply[1] == "ok" for reply in replies), (name, replies)
            assert bob.data["i"] == loop_thread and bob.data["p"] != loop_thread

    run(main())


RELEASE = threading.Event()  # module-level: functions sent by reference share them with the worker (same process)
STARTED = threading.Event()


def wait_for_release(x):
    assert RELEASE.wait(20)
    return x


def busy_and_tell(seconds):
    STARTED.set()
    return busy(seconds)


def test_a_slow_function_in_the_pool_does_not_block_get_data():
    RELEASE.clear()

    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            worker.update_data(data={"x": 1})
            slow = asyncio.ensure_future(batch(worker, [one("slow", wait_for_release, 5)], return_values=100))
            try:
                await until(lambda: _async(worker.executing == 1), timeout=20)
                connections = ConnectionPool(timeout=20)
                try:
                    assert await connections.get(worker.address).request("get_data", {"keys": ["x"]}) == {"x": 1}
                finally:
                    connections.close()
                assert not slow.done()
            finally:
                RELEASE.set()
            (reply,) = await slow
            assert reply[1:] == ["ok", reply[2], 5]

    run(main())


async def _async(value):
    return value


def test_a_long_inline_batch_lets_other_requests_in_between_slices(monkeypatch):
    monkeypatch.setattr(worker_batches, "INLINE_SLICE_SECONDS", 0.01)
    STARTED.clear()
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            loop_thread = threading.current_thread().name
            worker.update_data(data={"x": 1})
            tasks = [one(f"t{i}", busy_and_tell, 0.002) for i in range(40)]  # 80 ms of work, all on the loop
            long_batch = asyncio.ensure_future(batch(worker, tasks, inline=True, return_values=1000))
            await until(lambda: _async(STARTED.is_set()), timeout=20, interval=0.001)  # we run between two slices
            connections = ConnectionPool(timeout=20)
            try:
                assert await connections.get(worker.address).request("get_data", {"keys": ["x"]}) == {"x": 1}
            finally:
                connections.close()
            assert not long_batch.done()  # get_data was answered in the middle of the batch
            replies = await long_batch
            assert [reply[0] for reply in replies] == [f"t{i}" for i in range(40)]
            assert all(reply[3] == loop_thread for reply in replies)

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
                return all(worker.address in holders for holders in center.who_has(keys=[f"k{i}" for i in range(10)]).values())

            await until(known, timeout=10)
            worker.delete_data(keys=[f"k{i}" for i in range(10)])

            async def forgotten():
                return not any(center.keys.who_has.get(f"k{i}") for i in range(10))

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


def test_an_inline_task_that_runs_its_own_event_loop_fails_with_an_error_that_says_why():
    async def main():
        async with local_nodes(("solo",)) as (_, (worker,)):
            with warnings.catch_warnings():  # the coroutine handed to asyncio.run is never awaited
                warnings.simplefilter("ignore", RuntimeWarning)
                replies = await batch(worker, [one("a", thread_name, 0), one("b", runs_its_own_loop, 1), one("c", thread_name, 2)], inline=True, return_values=1000)
                gc.collect()
            assert [reply[1] for reply in replies] == ["ok", "error", "ok"], replies
            error = replies[1][2]
            assert error["type"] == "RuntimeError"
            assert "runs_its_own_loop" in error["message"] and "inline=True" in error["message"]
            assert "asyncio.run" in error["traceback"]  # asyncio's own refusal, as the cause
            assert "b" not in worker.data
            # Not inline, the same function runs in the thread pool, where it may run a loop.
            (reply,) = await batch(worker, [one("b", runs_its_own_loop, 1)], return_values=1000)
            assert reply[1:] == ["ok", reply[2], 2]

    run(main())
