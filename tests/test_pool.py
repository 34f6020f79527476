"""Pool on a real cluster of subprocess workers."""
from __future__ import annotations

import asyncio
import gc
import threading
import time

import numpy as np
import pytest

from zdist import LostDataError, Pool, RemoteData, rpc

from .conftest import center_call, wait_for


def inc(x):
    return x + 1


def boom(x):
    if x == 3:
        raise ValueError(f"bad element {x}")
    return x


def slow_inc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


def center_keys(pool: Pool) -> int:
    async def count() -> int:
        async with rpc(pool.center_address, timeout=5) as center:
            return len(await center.who_has())

    return asyncio.run(count())


@pytest.fixture
def pool(cluster):
    with Pool(cluster.center_address) as p:
        yield p


def test_seed_session(cluster):
    pool = Pool(cluster.center_address)
    try:
        cores = pool.sync_center()
        assert cores == pool.available_cores
        assert sorted(cores) == sorted(cluster.worker_addresses)
        assert all(n == 1 for n in cores.values())
        A = pool.map(lambda x: x**2, range(10))
        B = pool.map(lambda x: -x, A)
        total = pool.apply(sum, [B])
        assert total.get() == -285
        assert pool.gather(A) == [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
        assert repr(total).startswith(f"RemoteData<center={cluster.center_address}, key=sum-")
    finally:
        pool.close()
    pool.join()


def test_apply_async_many_concurrent(pool):
    handles = [pool.apply_async(slow_inc, (i,), {"delay": 0.005}) for i in range(200)]
    assert all(isinstance(h, RemoteData) for h in handles)
    assert [h.get(timeout=60) for h in handles] == list(range(1, 201))
    assert all(h.ready() and h.successful() for h in handles)


def test_ready_wait_successful(pool):
    handle = pool.apply_async(slow_inc, (1,), {"delay": 0.3})
    assert not handle.ready()
    with pytest.raises(ValueError):
        handle.successful()
    handle.wait(timeout=30)
    assert handle.ready() and handle.successful()
    with pytest.raises(TimeoutError):
        pool.apply_async(slow_inc, (1,), {"delay": 2}).get(timeout=0.1)


def test_nested_remote_data_arguments(pool):
    a, b, c = pool.scatter([1, 2, 3])
    result = pool.apply(lambda d, t, l: d["x"] + t[0][1] + sum(l), ({"x": a}, ((0, b),), [c, c]))
    assert result.get() == 1 + 2 + 6
    kw = pool.apply(lambda x, y=0: x * y, (a,), {"y": c})
    assert kw.get() == 3


def test_map_with_an_exception(pool):
    with pytest.raises(ValueError, match="bad element 3") as info:
        pool.map(boom, range(6))
    assert "Remote traceback" in str(info.value.__cause__) or "boom" in getattr(info.value, "remote_traceback", "")
    handles = pool.map_async(boom, range(6))
    for h in handles:
        h.wait(30)
    assert [h.successful() for h in handles] == [True, True, True, False, True, True]
    assert [h.get() for i, h in enumerate(handles) if i != 3] == [0, 1, 2, 4, 5]
    with pytest.raises(ValueError) as info:
        handles[3].get()
    assert "boom" in info.value.remote_traceback


def test_starmap_and_kwargs(pool):
    assert pool.gather(pool.starmap(lambda a, b: a * b, [(1, 2), (3, 4)])) == [2, 12]
    assert pool.apply(slow_inc, (1,), {"delay": 0}).get() == 2


def test_scatter_gather_across_workers(pool, cluster):
    values = [np.arange(i, i + 5) for i in range(6)]
    handles = pool.scatter(values)
    wait_for(lambda: {w for ws in asyncio.run(_who_has(pool.center_address, [h.key for h in handles])).values() for w in ws}
             == set(cluster.worker_addresses), message="values spread over both workers")
    gathered = pool.gather(handles)
    assert all((g == v).all() for g, v in zip(gathered, values))
    one = pool.scatter([b"abc"], workers=[cluster.worker_addresses[1]])[0]
    wait_for(lambda: asyncio.run(_who_has(pool.center_address, [one.key]))[one.key] == {cluster.worker_addresses[1]})


async def _who_has(center_address, keys):
    async with rpc(center_address, timeout=5) as center:
        return await center.who_has(keys=keys)


def test_values_released_when_handles_dropped(pool):
    assert center_keys(pool) == 0
    A = pool.map(inc, range(20))
    B = pool.map(inc, A)
    wait_for(lambda: center_keys(pool) == 40, message="40 keys on the cluster")
    del A
    gc.collect()
    # A is still needed as lineage? No: B is finished, so A may go.
    wait_for(lambda: center_keys(pool) == 20, message="A released")
    assert pool.gather(B) == list(range(2, 22))
    del B
    gc.collect()
    wait_for(lambda: center_keys(pool) == 0, message="everything released")


def test_delete_and_close_release_everything(cluster):
    pool = Pool(cluster.center_address)
    A = pool.map(inc, range(10))
    pool.delete(A[:5])
    wait_for(lambda: center_keys(pool) == 5)
    pool.scatter([1, 2, 3])
    pool.close()

    async def count():
        async with rpc(cluster.center_address, timeout=5) as center:
            return len(await center.who_has())

    wait_for(lambda: asyncio.run(count()) == 0, message="pool.close() released all keys")
    with pytest.raises(ValueError):
        pool.map(inc, [1])


def test_locality_map_over_remote_data_moves_nothing(pool, cluster):
    A = pool.map(lambda x: np.ones(1000) * x, range(20))

    async def fetched():
        out = {}
        for address in cluster.worker_addresses:
            async with rpc(address, timeout=5) as w:
                out[address] = await w.metrics()
        return out

    before = asyncio.run(fetched())
    B = pool.map(lambda a: a.sum(), A)
    assert pool.gather(B) == [1000.0 * x for x in range(20)]
    after = asyncio.run(fetched())
    for address in cluster.worker_addresses:
        assert after[address]["bytes_fetched"] == before[address]["bytes_fetched"]
        assert after[address]["ops_served"].get("get_data", 0) == before[address]["ops_served"].get("get_data", 0)


def test_apply_runs_where_most_bytes_are(pool, cluster):
    big = pool.scatter([np.ones(500_000)], workers=[cluster.worker_addresses[0]])[0]
    small = pool.scatter([np.ones(10)], workers=[cluster.worker_addresses[1]])[0]
    total = pool.apply(lambda a, b: a.sum() + b.sum(), (big, small))
    assert total.get() == 500_010
    wait_for(lambda: asyncio.run(_who_has(pool.center_address, [total.key]))[total.key] == {cluster.worker_addresses[0]})


def test_pool_without_address_starts_and_stops_its_cluster():
    with Pool(processes=2) as pool:
        assert len(pool.available_cores) == 2
        assert pool.gather(pool.map(inc, range(5))) == [1, 2, 3, 4, 5]
        cluster = pool._cluster
        assert cluster is not None
    assert cluster.status == "closed"


def test_pool_with_a_number_starts_that_many_processes_as_multiprocessing_does():
    with Pool(1) as pool:
        assert len(pool.available_cores) == 1
        assert pool.apply(inc, (1,)).get() == 2
    with pytest.raises(TypeError, match="number of processes once"):
        Pool(1, processes=2)


def test_pool_inside_a_running_event_loop(cluster):
    async def main():
        with Pool(cluster.center_address) as pool:
            return pool.apply(inc, (1,)).get()

    assert asyncio.run(main()) == 2


def test_worker_killed_during_map(cluster):
    cluster.start_worker()  # three workers, so two survive
    with Pool(cluster.center_address) as pool:
        victim = cluster.worker_addresses[0]
        killer = threading.Timer(0.4, cluster.kill_worker, (victim,))
        killer.start()
        try:
            results = pool.map(slow_inc, range(60))
            assert pool.gather(results) == list(range(1, 61))
        finally:
            killer.cancel()
            killer.join()


def test_scattered_value_lost_with_its_worker(cluster):
    with Pool(cluster.center_address) as pool:
        w0, w1 = cluster.worker_addresses
        A = pool.scatter([10, 20], workers=[w1])
        B = pool.map(inc, A)  # runs on w1, where A is
        wait_for(lambda: all(h == {w1} for h in asyncio.run(_who_has(pool.center_address, [b.key for b in B])).values()))
        cluster.kill_worker(w1)
        wait_for(lambda: list(pool.sync_center()) == [w0], timeout=15)
        with pytest.raises(LostDataError, match=r"scatter.*lost") as info:
            A[0].get(timeout=30)
        assert info.value.key == A[0].key and info.value.worker == w1
        assert B[0].get(timeout=30) == 11  # its small value came back with the answer and is kept here
        with pytest.raises(LostDataError):  # but B's copy on the cluster cannot be rebuilt: its input is gone for good
            pool.apply(inc, [B[0]])
        assert pool.apply(inc, (1,)).get() == 2  # the pool still works


def test_lost_values_recomputed_on_demand(cluster):
    with Pool(cluster.center_address) as pool:
        w0, w1 = cluster.worker_addresses
        B = pool.map(inc, range(10))
        C = pool.map(inc, B)
        wait_for(lambda: any(w1 in h for h in asyncio.run(_who_has(pool.center_address, [c.key for c in C])).values()),
                 message="work was spread over both workers")
        cluster.kill_worker(w1)
        wait_for(lambda: list(pool.sync_center()) == [w0], timeout=15)
        assert pool.gather(C) == list(range(2, 12))  # rebuilt from lineage, recursively
        assert pool.gather(B) == list(range(1, 11))
        D = pool.map(inc, C)
        assert pool.gather(D) == list(range(3, 13))


def test_remote_data_cannot_be_pickled(pool):
    import pickle

    handle = pool.apply(inc, (1,))
    with pytest.raises(TypeError, match="belongs to its Pool"):
        pickle.dumps(handle)


def test_unpicklable_result_gives_a_clear_error(pool):
    handle = pool.apply(lambda: threading.Lock())
    with pytest.raises(TypeError, match="cannot be serialized"):
        handle.get()


def test_map_progress_bar_reaches_total(pool, capsys):
    handles = pool.map(slow_inc, range(30), progress=True)
    assert len(handles) == 30
    err = capsys.readouterr().err
    assert "30/30" in err and "100%" in err


# ---------------------------------------------------------------- apply() from the calling thread


def pid_then_value(path, value, delay):
    import os

    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(delay)
    return value


def test_apply_from_many_threads_at_once(pool):
    results = {}

    def caller(i):
        results[i] = [pool.apply(inc, (i * 100 + j,)).get() for j in range(20)]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [i * 100 + j + 1 for j in range(20)] for i in range(6)}


def test_apply_errors_come_back_with_type_and_remote_traceback(pool):
    with pytest.raises(ValueError, match="bad element 3") as info:
        pool.apply(boom, (3,))
    assert "boom" in info.value.remote_traceback
    with pytest.raises(TypeError, match="callable"):
        pool.apply(42)
    with pytest.raises(TypeError):
        pool.apply(lambda: threading.Lock()).get()  # unpicklable result: a clear error
    assert pool.apply(inc, (1,)).get() == 2  # and the pool goes on


def test_apply_big_result_stays_on_the_cluster_and_is_released(pool):
    before = center_keys(pool)
    handle = pool.apply(np.ones, (100_000,))
    assert handle.get().sum() == 100_000  # not sent with the answer: fetched from its worker
    wait_for(lambda: center_keys(pool) == before + 1)
    del handle
    gc.collect()
    wait_for(lambda: center_keys(pool) == before, message="the value of a dropped apply() handle is deleted")


def test_apply_as_input_to_later_work(pool):
    x = pool.apply(np.arange, (1000,))
    y = pool.apply(lambda a: a * 2, (x,))  # has a RemoteData input: the engine places it
    assert pool.apply(np.sum, (y,)).get() == 999_000


def test_apply_rerun_when_its_worker_is_killed(cluster, tmp_path):
    path = tmp_path / "pids"
    with Pool(cluster.center_address) as pool:
        workers = {cluster.worker_processes[a].pid: a for a in cluster.worker_addresses}

        def kill_first():
            wait_for(lambda: path.exists() and path.read_text().strip(), timeout=30)
            cluster.kill_worker(workers[int(path.read_text().split()[0])])

        killer = threading.Thread(target=kill_first)
        killer.start()
        try:
            handle = pool.apply(pid_then_value, (str(path), 42, 1.5))
            assert handle.get(timeout=60) == 42
        finally:
            killer.join(60)
        assert len(path.read_text().split()) == 2  # ran twice: on the victim, then on the survivor


def test_close_while_another_thread_waits_in_apply(cluster):
    pool = Pool(cluster.center_address)
    outcome = []

    def caller():
        try:
            pool.apply(slow_inc, (1, 5.0))
            outcome.append("returned")
        except RuntimeError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=caller)
    thread.start()
    wait_for(lambda: pool._shell.core.tasks, message="the task was submitted")
    time.sleep(0.2)
    pool.terminate()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome and "closed" in outcome[0]


def current_thread_name(_):
    return threading.current_thread().name


def test_functions_run_in_the_thread_pool_unless_the_pool_says_inline(cluster):
    # A slow function on the worker's loop would hold up its heartbeats; by
    # default the Pool's tasks run in the worker's thread pool, and only a
    # pool that vouches for tiny functions has them run on the loop.
    with Pool(cluster.center_address) as pool:
        names = set(pool.gather(pool.map(current_thread_name, range(8)))) | {pool.apply(current_thread_name, (0,)).get()}
        assert all(name != "MainThread" for name in names), names
    with Pool(cluster.center_address, inline=True) as pool:
        assert set(pool.gather(pool.map(current_thread_name, range(8)))) == {"MainThread"}
        assert pool.apply(current_thread_name, (0,)).get() == "MainThread"


def test_a_task_longer_than_the_heartbeat_timeout_keeps_its_worker(cluster):
    with Pool(cluster.center_address) as pool:
        workers = set(pool.sync_center())
        assert pool.apply(slow_inc, (1, 6.0)).get(timeout=60) == 2
        assert set(pool.sync_center()) == workers


def test_map_with_chunksize_gives_a_handle_per_item(cluster):
    import concurrent.futures

    with Pool(cluster.center_address) as pool:
        handles = pool.map(lambda x: x * 10, range(23), chunksize=5)
        assert len(handles) == 23 and len({h._task for h in handles}) == 5
        assert pool.gather(handles) == [x * 10 for x in range(23)]
        assert handles[22].get() == 220 and handles[0].ready() and handles[0].successful()
        done, _ = concurrent.futures.wait(handles[:7])
        assert len(done) == 7
        # Item handles as inputs, alone and in a list: resolved on the worker.
        assert pool.gather(pool.map(lambda x: -x, handles[:3])) == [0, -10, -20]
        assert pool.apply(sum, [handles]).get() == sum(x * 10 for x in range(23))
        pairs = pool.starmap(pow, [(2, i) for i in range(7)], chunksize=3)
        assert pool.gather(pairs) == [2**i for i in range(7)]
        async_handles = pool.map_async(abs, range(-4, 0), chunksize=2)
        assert [h.result() for h in async_handles] == [4, 3, 2, 1]
        with pytest.raises(ZeroDivisionError):
            pool.map(lambda x: 1 / x, [1, 2, 0, 4], chunksize=2)
        with pytest.raises(ValueError, match="chunksize must be a positive integer"):
            pool.map(abs, [1], chunksize=0)
        # Dropping the handles releases the chunks on the workers.
        del handles, pairs, async_handles, done
        import gc

        gc.collect()
        wait_for(lambda: not any(info["nkeys"] for info in center_call(cluster.center_address, "workers").values()), timeout=10, message="chunks released")
