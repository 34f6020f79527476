"""zdist.Executor against the behaviours of the standard library's own executor tests, on a real cluster."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import gc
import time

import pytest

import zdist
from zdist import Executor, Pool, RemoteData

from .conftest import wait_for


def inc(x):
    return x + 1


def slow(x, delay=0.3):
    time.sleep(delay)
    return x


def fails(x):
    raise ValueError(f"bad {x}")


@pytest.fixture
def ex(cluster):
    with Executor(cluster.center_address) as e:
        yield e


def test_submit_result_and_value_stays_remote_until_asked(ex):
    future = ex.submit(inc, 1)
    assert isinstance(future, cf.Future) and isinstance(future, RemoteData)
    assert future.result(timeout=30) == 2
    assert future.done() and not future.cancelled() and future.exception() is None
    big = ex.submit(lambda n: bytes(n), 1_000_000)
    assert big.exception(timeout=30) is None
    assert big._task.value is zdist.scheduling.NO_VALUE  # big values are not sent until result()
    assert len(big.result()) == 1_000_000


def test_submit_keyword_arguments_go_to_the_function(ex):
    assert ex.submit(slow, 5, delay=0).result(30) == 5


def test_futures_as_arguments_are_resolved_on_the_worker(ex):
    a = ex.submit(inc, 1)
    b = ex.submit(inc, a)
    c = ex.submit(sum, [a, b, {"x": a}["x"]])
    assert c.result(30) == 2 + 3 + 2


def test_exception_and_result_raise_the_remote_error(ex):
    future = ex.submit(fails, 3)
    assert isinstance(future.exception(timeout=30), ValueError)
    with pytest.raises(ValueError, match="bad 3"):
        future.result()


@pytest.mark.parametrize("return_when", [cf.FIRST_COMPLETED, cf.FIRST_EXCEPTION, cf.ALL_COMPLETED])
def test_stdlib_wait(ex, return_when):
    quick = ex.submit(inc, 1)
    bad = ex.submit(fails, 1)
    long = ex.submit(slow, 1, 2.0)
    done, not_done = cf.wait([quick, bad, long], timeout=30, return_when=return_when)
    if return_when == cf.ALL_COMPLETED:
        assert done == {quick, bad, long} and not not_done
    elif return_when == cf.FIRST_EXCEPTION:
        assert bad in done and long in not_done
    else:
        assert done and long in not_done
    long.result(30)


def test_stdlib_wait_with_a_timeout_returns_what_is_done(ex):
    long = ex.submit(slow, 1, 2.0)
    t0 = time.monotonic()
    done, not_done = cf.wait([long], timeout=0.2)
    assert not done and not_done == {long} and time.monotonic() - t0 < 1.5


def test_stdlib_as_completed_with_duplicates_and_timeout(ex):
    futures = [ex.submit(slow, i, 0.05 * (3 - i)) for i in range(3)]
    seen = list(cf.as_completed(futures + futures[:1], timeout=30))
    assert sorted(f.result() for f in seen) == [0, 1, 2]  # a duplicate comes once
    long = ex.submit(slow, 1, 3.0)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([long], timeout=0.2))
    pairs = list(zdist.as_completed([ex.submit(inc, i) for i in range(4)], with_results=True))
    assert sorted(v for _, v in pairs) == [1, 2, 3, 4]


def test_map_in_order_with_timeout_and_chunks(ex):
    assert list(ex.map(inc, range(20))) == list(range(1, 21))
    assert list(ex.map(pow, range(10), [2] * 10, chunksize=3)) == [i * i for i in range(10)]
    results = ex.map(slow, [1, 2], [2.0, 2.0], timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        list(results)
    with pytest.raises(ValueError):
        ex.map(inc, [1], chunksize=0)


def test_map_raises_the_first_error_when_reached(ex):
    results = ex.map(lambda x: 1 // x, [1, 0, 2])
    assert next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_done_callbacks_run_once_before_and_after_completion(ex):
    calls = []
    lock = threading.Lock()

    def note(tag):
        def callback(future):
            with lock:
                calls.append((tag, future.result()))
        return callback

    future = ex.submit(slow, 7, 0.2)
    future.add_done_callback(note("before"))
    future.result(30)
    future.add_done_callback(note("after"))
    wait_for(lambda: len(calls) == 2, timeout=10)
    time.sleep(0.1)
    assert sorted(calls) == [("after", 7), ("before", 7)]


def test_cancel_before_start_and_while_running(cluster):
    with Executor(cluster.center_address) as ex:
        running = [ex.submit(slow, i, 1.0) for i in range(2)]  # one per worker core: the rest waits
        wait_for(lambda: all(f.running() for f in running), timeout=10)
        # A few tasks go ahead to each worker's queue (as ProcessPoolExecutor's
        # call queue); the last of many has not left the client.
        queued = [ex.submit(slow, i, 0) for i in range(30)][-1]
        after = ex.submit(inc, queued)
        assert not running[0].cancel()  # running: too late, as in the standard library
        assert queued.cancel() and queued.cancelled()
        with pytest.raises(cf.CancelledError):
            queued.result()
        assert after.cancelled()  # what waits on a cancelled task is cancelled too
        assert [f.result(30) for f in running] == [0, 1]


def test_shutdown_cancel_futures_and_results_outlive_the_executor(cluster):
    ex = Executor(cluster.center_address)
    done = ex.submit(inc, 41)
    assert done.result(30) == 42
    big = ex.submit(lambda: list(range(10_000)))
    big.exception(30)
    blockers = [ex.submit(slow, i, 1.0) for i in range(2)]
    wait_for(lambda: all(f.running() for f in blockers), timeout=10)
    waiting = [ex.submit(slow, i, 0) for i in range(30)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert waiting[-1].cancelled()  # a few went ahead to the workers' queues: those ran
    assert all(f.cancelled() or f.result() == i for i, f in enumerate(waiting))
    assert [f.result() for f in blockers] == [0, 1]
    assert done.result() == 42 and big.result() == list(range(10_000))  # kept, as a local executor's results
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(inc, 1)


def test_await_a_future(ex):
    async def main():
        return await ex.submit(inc, 9)

    assert asyncio.run(main()) == 10


def test_pool_handles_are_futures_and_pool_callbacks(cluster):
    got, errors = [], []
    with Pool(cluster.center_address) as pool:
        handle = pool.apply_async(inc, (1,), callback=got.append)
        pool.apply_async(fails, (1,), error_callback=errors.append)  # the handles dropped at once:
        pool.map_async(inc, range(3), callback=got.append)  # the callbacks run all the same
        gc.collect()
        assert cf.wait([handle], timeout=30).done == {handle}
        wait_for(lambda: len(got) == 2 and errors, timeout=10)
        assert sorted(map(str, got)) == sorted(["2", "[1, 2, 3]"])
        assert isinstance(errors[0], ValueError)
        long = pool.apply_async(slow, (1, 2.0))
        t0 = time.monotonic()
        long.wait(0.2)  # multiprocessing's AsyncResult.wait: returns when the time is up, no error
        assert not long.ready() and time.monotonic() - t0 < 1.5


def test_executor_without_address_starts_and_stops_a_cluster():
    with Executor(processes=1) as ex:
        assert ex.submit(inc, 1).result(30) == 2


def square(x):
    return x * x


def fails_at_five(x):
    if x == 5:
        raise ValueError("five")
    return x


def test_imap_in_order_unordered_chunked_and_endless(cluster):
    import itertools

    with Pool(cluster.center_address) as pool:
        assert list(pool.imap(square, range(600))) == [x * x for x in range(600)]
        assert list(pool.imap(square, range(2500), chunksize=100)) == [x * x for x in range(2500)]
        assert sorted(pool.imap_unordered(square, range(600), chunksize=7)) == [x * x for x in range(600)]
        endless = pool.imap(square, itertools.count())  # read as results are taken: no list of the input
        assert [next(endless) for _ in range(1000)] == [x * x for x in range(1000)]
        endless.close()
        got = []
        with pytest.raises(ValueError, match="five"):
            for value in pool.imap(fails_at_five, range(10)):
                got.append(value)
        assert got == [0, 1, 2, 3, 4]  # the values before the failed one come first
        with pytest.raises(ValueError, match="chunksize"):
            pool.imap(square, range(3), chunksize=0)


def remember_setup(tag):
    import builtins

    builtins.zdist_test_setup = getattr(builtins, "zdist_test_setup", 0) + 1
    builtins.zdist_test_tag = tag


def read_setup(_):
    import builtins
    import os

    return os.getpid(), builtins.zdist_test_setup, builtins.zdist_test_tag


def test_initializer_runs_once_per_worker_including_later_ones(cluster):
    with Pool(cluster.center_address, initializer=remember_setup, initargs=("ready",)) as pool:
        seen = pool.gather(pool.map(read_setup, range(40)))
        seen += list(pool.imap(read_setup, range(40), chunksize=5))
        assert {tag for _, _, tag in seen} == {"ready"}
        assert all(count == 1 for _, count, _ in seen)  # once per process, however many tasks
        cluster.start_worker()  # a worker that joins later runs the initializer before its first task
        wait_for(lambda: len(pool.sync_center()) == 3, timeout=15)
        later = pool.gather(pool.map(read_setup, range(300)))
        assert {tag for _, _, tag in later} == {"ready"} and all(count == 1 for _, count, _ in later)
    with Executor(cluster.center_address, initializer=remember_setup, initargs=("again",)) as ex:
        assert {tag for _, _, tag in ex.map(read_setup, range(20), chunksize=4)} == {"again"}
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(cluster.center_address, maxtasksperchild=10)
