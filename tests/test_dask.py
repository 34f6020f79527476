"""zdist.dask.get on real clusters (subprocess workers), compared with dask's synchronous scheduler."""
from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from operator import add

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pandas as pd
import pytest
from dask._task_spec import Task, TaskRef

import zdist
import zdist.dask
from zdist import rpc
from zdist.dask import TaskKilledWorkersError, get
from zdist.dask.scheduler import Computation

from .conftest import make_cluster, wait_for

dd = pytest.importorskip("dask.dataframe")


def inc(x):
    return x + 1


def slowinc(x, delay=0.1):
    time.sleep(delay)
    return x + 1


def boom(x):
    raise ZeroDivisionError(f"boom at {x}")


def kill_my_worker(x):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(autouse=True)
def stop_get_loop():
    """get's background loop thread must not outlive a test (CPython gh-106905 with pytest)."""
    yield
    zdist.dask.close()


@pytest.fixture(scope="module")
def shared():
    """A 2-worker cluster kept for the tests that do not kill workers."""
    with make_cluster(2) as c:
        yield c


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def worker_keys(cluster) -> dict:
    async def keys():
        out = {}
        for address in cluster.live_worker_addresses():
            async with rpc(address, timeout=5) as worker:
                out[address] = await worker.keys()
        return out

    return run(keys())


def center_keys(cluster) -> dict:
    async def who_has():
        async with rpc(cluster.center_address, timeout=5) as center:
            return await center.who_has()

    return run(who_has())


def assert_cluster_clean(cluster, allowed=()):
    """Nothing of the computation is left: on the workers, and (after its reports) in the Center."""
    leftover = {a: [k for k in keys if k not in allowed] for a, keys in worker_keys(cluster).items()}
    assert not any(leftover.values()), leftover
    wait_for(lambda: not [k for k in center_keys(cluster) if k not in allowed], timeout=10, message="the Center still lists keys")


def scheduler(cluster):
    return functools.partial(get, cluster.center_address)


def same(a, b):
    if isinstance(a, (pd.DataFrame, pd.Series)):
        pd.testing.assert_frame_equal(a, b) if isinstance(a, pd.DataFrame) else pd.testing.assert_series_equal(a, b)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- raw graphs and the seed


def test_seed_examples(shared):
    assert get(shared.center_address, {"a": 1, "b": (inc, "a")}, "b") == 2
    with make_cluster(1, processes=False, protocol="tcp") as tcp_cluster:  # the seed's (host, port) form is TCP's
        _seed_examples(tcp_cluster)


def _seed_examples(shared):
    host, port = shared.center_address.rsplit(":", 1)
    dsk = {"a": 1, "b": (inc, "a")}
    assert get(host, int(port), dsk, "b") == 2
    assert get(shared.center_address, dsk, "b") == 2
    get2 = functools.partial(get, host, int(port))
    assert da.arange(10, chunks=(5,)).sum().compute(scheduler=get2) == 45
    assert_cluster_clean(shared)


def test_raw_graphs_match_dask_get(shared):
    dsk = {
        "x": 1,
        "y": (inc, "x"),
        "alias": "y",
        ("t", 0): (add, "x", "y"),
        ("t", 1): (add, ("t", 0), 10),
        "listy": (sum, ["x", "y", ("t", 1)]),
        "dicty": (dict, [["k", "alias"], ["j", ("t", 0)]]),
        "nested": (add, (inc, "x"), (inc, (inc, "y"))),
        "data": [1, 2, 3],
    }
    for keys in ["y", ("t", 1), ["listy", ["dicty", "alias"]], [["nested"], "data", "x"], []]:
        assert get(shared, dsk, keys) == dask.get(dsk, keys), keys
    assert get(shared, dsk, ["y", "y"]) == (2, 2)
    assert_cluster_clean(shared)


def test_task_spec_graph_and_validate(shared):
    dsk = {"a": Task("a", inc, 1), "b": Task("b", add, TaskRef("a"), TaskRef("a")), "c": Task("c", inc, TaskRef("b"))}
    assert get(shared, dsk, ["c", "a"], validate=True) == (5, 2)


def test_unknown_kwargs_from_dask_are_ignored(shared):
    assert get(shared, {"a": 1}, "a", optimize_graph=False, num_workers=3) == 1


# ---------------------------------------------------------------- dask collections


def test_dask_array(shared):
    get2 = scheduler(shared)
    x = da.random.RandomState(0).random_sample((60, 40), chunks=(15, 10))
    cases = {
        "sum": x.sum(),
        "x+x.T": (x[:40] + x[:40].T),
        "matmul": x.dot(x.T),
        "map_blocks": x.map_blocks(lambda b: b * 2 + 1, dtype=float).mean(axis=0),
        "slicing": x[::3, 5:30].std(),
    }
    for name, expr in cases.items():
        np.testing.assert_allclose(expr.compute(scheduler=get2), expr.compute(scheduler="sync"), err_msg=name)
    assert_cluster_clean(shared)


def test_dask_dataframe(shared):
    get2 = scheduler(shared)
    left = pd.DataFrame({"k": np.arange(200) % 7, "v": np.arange(200.0)})
    right = pd.DataFrame({"k": np.arange(7), "name": list("abcdefg")})
    ddf = dd.from_pandas(left, npartitions=5)
    agg = ddf.groupby("k").v.agg(["sum", "mean", "count"])
    same(agg.compute(scheduler=get2), agg.compute(scheduler="sync"))
    merged = ddf.merge(dd.from_pandas(right, npartitions=2), on="k")
    ours = merged.compute(scheduler=get2).sort_values(["k", "v"]).reset_index(drop=True)
    theirs = merged.compute(scheduler="sync").sort_values(["k", "v"]).reset_index(drop=True)
    same(ours, theirs)
    assert_cluster_clean(shared)


def test_dask_bag(shared):
    get2 = scheduler(shared)
    b = db.from_sequence(range(100), npartitions=7)
    words = db.from_sequence(["a b", "b c", "c a a"] * 20, npartitions=4)
    assert b.map(inc).filter(lambda x: x % 3 == 0).compute(scheduler=get2) == b.map(inc).filter(lambda x: x % 3 == 0).compute(scheduler="sync")
    ours = dict(words.map(str.split).flatten().frequencies().compute(scheduler=get2))
    assert ours == dict(words.map(str.split).flatten().frequencies().compute(scheduler="sync"))
    assert_cluster_clean(shared)


def test_delayed_chains_and_config(shared):
    get2 = scheduler(shared)

    @dask.delayed
    def double(x):
        return 2 * x

    values = [dask.delayed(inc)(i) for i in range(10)]
    for _ in range(5):
        values = [double(v) for v in values]
    total = dask.delayed(sum)(values)
    assert total.compute(scheduler=get2) == total.compute(scheduler="sync")
    with dask.config.set(scheduler=get2):
        assert dask.compute(total, values[3])[0] == sum((i + 1) * 32 for i in range(10))
        assert da.ones(10, chunks=3).sum().compute() == 10
    assert_cluster_clean(shared)


def test_get_inside_a_running_event_loop(shared):
    async def notebook_cell():
        return get(shared, {"a": 1, "b": (inc, "a")}, "b")

    assert asyncio.run(notebook_cell()) == 2


# ---------------------------------------------------------------- errors and cleanup


def test_task_error_raises_original_exception_and_cleans_up(shared):
    dsk = {("x", i): (inc, i) for i in range(20)}
    dsk["bad"] = (boom, ("x", 3))
    dsk["total"] = (sum, [("x", i) for i in range(20)] + ["bad"])
    with pytest.raises(ZeroDivisionError, match="boom at 4") as info:
        get(shared, dsk, "total")
    assert "'bad'" in "\n".join(getattr(info.value, "__notes__", []))
    assert "boom" in str(info.value.__cause__)  # the remote traceback
    assert_cluster_clean(shared)


def test_missing_input_is_an_error(shared):
    with pytest.raises(zdist.MissingDataError):
        get(shared, {"y": Task("y", inc, TaskRef("not-anywhere"))}, "y")


def test_inputs_already_on_the_cluster(shared):
    a, b = shared.worker_addresses

    async def place():
        async with rpc(a, timeout=5) as alice:
            await alice.update_data(data={"ext": 10})

    run(place())
    wait_for(lambda: "ext" in center_keys(shared))
    try:
        assert get(shared, {"y": (add, "ext", 1)}, "y") == 11  # a legacy literal naming a cluster value
        assert get(shared, {"y": Task("y", add, TaskRef("ext"), 2)}, ["y", "ext"]) == (12, 10)
        assert_cluster_clean(shared, allowed={"ext"})
    finally:
        async def remove():
            async with rpc(a, timeout=5) as alice:
                await alice.delete_data(keys=["ext"])

        run(remove())


# ---------------------------------------------------------------- locality


def test_tasks_run_where_their_inputs_are(shared):
    a, b = shared.worker_addresses
    chunk = np.ones(250_000)  # 2 MB: worth keeping in place

    async def setup():
        async with rpc(a, timeout=5) as alice, rpc(b, timeout=5) as bob:
            await alice.update_data(data={("in", i): chunk + i for i in range(4)})
            await bob.update_data(data={("in", i): chunk + i for i in range(4, 8)})

    async def fetched():
        total = 0
        for address in (a, b):
            async with rpc(address, timeout=5) as worker:
                total += (await worker.metrics())["bytes_fetched"]
        return total

    run(setup())
    wait_for(lambda: len(center_keys(shared)) == 8)
    try:
        before = run(fetched())
        dsk = {}
        for i in range(8):
            dsk[("double", i)] = Task(("double", i), np.multiply, TaskRef(("in", i)), 2)
            dsk[("sum", i)] = Task(("sum", i), np.sum, TaskRef(("double", i)))
        # Each task's inputs sit on one worker: nothing needs to move.
        keys = [("sum", i) for i in range(8)]
        assert get(shared, dsk, keys) == tuple(float((chunk + i).sum() * 2) for i in range(8))
        assert run(fetched()) == before
        # A task that needs inputs from both workers moves only the smaller side.
        dsk["mix"] = Task("mix", lambda *xs: float(sum(x.sum() for x in xs)), *[TaskRef(("in", i)) for i in (0, 1, 2, 4)])
        get(shared, dsk, "mix")
        assert run(fetched()) - before == chunk.nbytes  # ("in", 4) went to the worker with three
        assert_cluster_clean(shared, allowed={("in", i) for i in range(8)})
    finally:
        async def remove():
            for address in (a, b):
                async with rpc(address, timeout=5) as worker:
                    await worker.delete_data(keys=[("in", i) for i in range(8)])

        run(remove())


# ---------------------------------------------------------------- memory


def test_long_reduction_keeps_memory_flat(shared):
    nchunks, size = 200, 10 * 2**20
    dsk = {}
    for i in range(nchunks):
        dsk[("chunk", i)] = (np.full, size // 8, float(i))
        dsk[("part", i)] = (np.sum, ("chunk", i))
    dsk["total"] = (sum, [("part", i) for i in range(nchunks)])
    peak = [0]
    done = threading.Event()

    def watch():
        async def poll():
            async with rpc(shared.center_address, timeout=5) as center:
                while not done.is_set():
                    workers = await center.workers()
                    peak[0] = max(peak[0], sum(w["nbytes"] for w in workers.values()))
                    await asyncio.sleep(0.01)

        asyncio.run(poll())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = get(shared, dsk, "total")
    finally:
        done.set()
        watcher.join(10)
    assert result == sum(float(i) * (size // 8) for i in range(nchunks))
    parallelism = 2  # 2 workers, 1 core each
    assert peak[0] <= 4 * parallelism * size, f"held {peak[0] / size:.1f} chunks at once"
    assert_cluster_clean(shared)


# ---------------------------------------------------------------- resilience


def test_failing_worker_2015(cluster):
    """distributed3's test: a worker is terminated 0.1 s into four chains of slowinc."""
    n = 10
    dsk = {("x", i, j): (slowinc, ("x", i, j - 1)) for i in range(4) for j in range(1, n)}
    dsk.update({("x", i, 0): i * 10 for i in range(4)})
    dsk["z"] = (sum, [("x", i, n - 1) for i in range(4)])
    victim = cluster.worker_addresses[0]
    killer = threading.Timer(0.1, lambda: cluster.worker_processes[victim].terminate())
    killer.start()
    try:
        assert get(cluster, dsk, "z") == 96
    finally:
        killer.join()
    assert_cluster_clean(cluster)


def _big_graph(width=300, depth=4, delay=0.002):
    """A few thousand tasks that take some seconds, with data moving between workers."""
    dsk = {("x", i): i for i in range(width)}
    for level in range(1, depth + 1):
        for i in range(width):
            dsk[("f", level, i)] = (slowinc, ("x", i) if level == 1 else ("g", level - 1, i), delay)
            dsk[("g", level, i)] = (add, ("f", level, i), ("f", level, (i * 7 + 1) % width))
    dsk[("part", 0)] = (sum, [("g", depth, i) for i in range(0, width, 2)])
    dsk[("part", 1)] = (sum, [("g", depth, i) for i in range(1, width, 2)])
    dsk["total"] = (add, ("part", 0), ("part", 1))
    return dsk


KILL_AT = [0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
FAST_KILLS = {0.1, 0.4, 0.7}


@pytest.mark.parametrize(
    "fraction", [f if f in FAST_KILLS else pytest.param(f, marks=pytest.mark.slow) for f in KILL_AT]
)
def test_worker_killed_mid_computation(cluster3, fraction, monkeypatch):
    """SIGKILL a worker once a given fraction of the tasks finished; the result must not change."""
    dsk = _big_graph()
    expected = dask.get({k: (inc, v[1]) if isinstance(v, tuple) and v[0] is slowinc else v for k, v in dsk.items()}, "total")
    victim = cluster3.worker_addresses[1]
    trigger = int(fraction * len(dsk))
    finished = [0]
    killer: list[threading.Thread] = []
    task_done = Computation._task_done

    def counting_task_done(self, *args):
        # Count completions as the scheduler sees them: the kill moment is a
        # point in the computation, not a time that a loaded machine may miss.
        finished[0] += 1
        if finished[0] == trigger:
            killer.append(threading.Thread(target=cluster3.kill_worker, args=(victim,)))
            killer[0].start()
        return task_done(self, *args)

    monkeypatch.setattr(Computation, "_task_done", counting_task_done)
    try:
        assert get(cluster3, dsk, "total", validate=fraction == 0.4) == expected
    finally:
        for thread in killer:
            thread.join(15)
    assert killer and victim not in cluster3.live_worker_addresses()
    assert_cluster_clean(cluster3)


def test_task_that_kills_its_workers_is_given_up(cluster3):
    dsk = {("x", i): (inc, i) for i in range(10)}
    dsk["deadly"] = (kill_my_worker, ("x", 0))
    dsk["total"] = (sum, [("x", i) for i in range(10)] + ["deadly"])
    with pytest.raises(TaskKilledWorkersError, match="deadly") as info:
        get(cluster3, dsk, "total")
    assert "kept dying" in str(info.value) and len(info.value.workers) == 3


def test_all_workers_gone(cluster):
    dsk = {"a": 1, "deadly": (kill_my_worker, "a")}
    with pytest.raises(zdist.NoWorkersError, match="every worker"):
        get(cluster, dsk, "deadly", max_worker_deaths=10)


def test_progress_bar_reaches_total(cluster, capsys):
    import dask.array as da
    from functools import partial

    from zdist.dask import get

    x = da.ones((100, 100), chunks=(10, 10))
    assert int(x.sum().compute(scheduler=partial(get, cluster.center_address, progress=True))) == 10_000
    err = capsys.readouterr().err
    assert "100%" in err and "tasks" in err


def test_a_graph_over_the_dask_order_limit_computes_right(cluster, monkeypatch):
    """Above DASK_ORDER_LIMIT tasks the plan is ordered depth first (dask.order costs ~2 KB a task at 10^7): same answer."""
    import zdist.dask.graph as graph_module

    monkeypatch.setattr(graph_module, "DASK_ORDER_LIMIT", 10)
    x = da.arange(400, chunks=10).reshape(20, 20).rechunk(5)
    assert (x + x.T).sum().compute(scheduler=functools.partial(get, cluster.center_address)) == (x + x.T).sum().compute(scheduler="sync")

