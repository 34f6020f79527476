"""Chaos: computations that lose a worker (SIGKILL) or the Center at a random moment.

Each run starts a computation (a ``Pool.map`` chain, or a dask graph of a few
thousand tasks through ``zdist.dask.get``), kills a random worker at a random
moment while it runs (once the workers have finished a random share, 5-80 %,
of its tasks) and starts a fresh one, and checks the result. The
Center runs are the same with the Center killed and restarted at the same
address instead. The random choices come from one seed, printed (set
``ZDIST_CHAOS_SEED`` to replay one). The default suite runs a short version;
the full 20 + 5 runs are marked ``slow``::

    pytest -m slow tests/test_chaos.py -s     # prints "chaos: 20/20 correct ..."
"""
from __future__ import annotations

import asyncio
import functools
import os
import random
import sys
import threading
import time
import traceback
import uuid

import cloudpickle
import pytest

from zdist import Pool, rpc

from .conftest import make_cluster

try:
    import dask
    import dask.array as da
    from zdist.dask import get as dask_get

    HAVE_DASK_GET = True
except ImportError:  # zdist.dask not there (yet)
    HAVE_DASK_GET = False


# Ship this module's functions by value: unpickling them by reference would
# import this test module (and dask, pytest...) on each worker's event loop,
# a stall of seconds that a 2 s heartbeat timeout takes for a dead worker.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _warm_imports():
    """Import what the computations need, in a worker's thread pool (not on its event loop)."""
    import numpy  # noqa: F401

    if HAVE_DASK_GET:
        import dask.array  # noqa: F401
        import zdist.dask.tasks  # noqa: F401
    return 0


async def _warm_up_async(addresses):
    async def one(address):
        async with rpc(address, timeout=60) as worker:
            key = f"warm-up-{uuid.uuid4().hex}"
            await worker.compute(function=_warm_imports, key=key)
            await worker.delete_data(keys=[key])

    await asyncio.gather(*(one(a) for a in addresses))


def warm_up(addresses):
    """Have workers import numpy and dask before the timed part starts."""
    asyncio.run(_warm_up_async(list(addresses)))


def slow_inc(x):
    time.sleep(0.02)
    return x + 1


def inc(x):
    return x + 1


def sleepy_double(block):
    time.sleep(0.002)
    return block * 2


def add(*values):
    return sum(values)


# ---------------------------------------------------------------- computations


def pool_chain(cluster):
    """A = map(slow_inc, range(200)); B = map(inc, A); gather(B)."""
    with Pool(cluster.center_address, timeout=60) as pool:
        a = pool.map(slow_inc, range(200))
        b = pool.map(inc, a)
        got = pool.gather(b, timeout=180)
    return got, [x + 2 for x in range(200)]


def dask_array(cluster):
    """A dask.array sum over 1,000 small chunks with a sleep in map_blocks: about 3,000 tasks."""
    x = da.arange(20_000, chunks=20, dtype="int64")
    y = (x.map_blocks(sleepy_double, dtype="int64") + 1).sum(split_every=4)
    scheduler = functools.partial(dask_get, cluster.center_address, timeout=180)
    return int(y.compute(scheduler=scheduler, optimize_graph=False)), int(2 * (20_000 * 19_999 // 2) + 20_000)


def dask_delayed_tree(cluster):
    """A delayed tree: 1,024 leaves summed pairwise, about 2,000 tasks."""
    leaves = [dask.delayed(slow_inc)(i) for i in range(1024)]
    while len(leaves) > 1:
        leaves = [dask.delayed(add)(leaves[i], leaves[i + 1]) for i in range(0, len(leaves), 2)]
    scheduler = functools.partial(dask_get, cluster.center_address, timeout=180)
    return leaves[0].compute(scheduler=scheduler), sum(range(1, 1025))


COMPUTATIONS = [pool_chain] + ([dask_array, dask_delayed_tree] if HAVE_DASK_GET else [])
#: About how many tasks each runs: the disaster strikes after a random share of them.
#: (The Pool chain counts only its slow first map: the second one is over in a moment.)
TASKS = {pool_chain: 200, dask_array: 3000, dask_delayed_tree: 2047} if HAVE_DASK_GET else {pool_chain: 200}


# ---------------------------------------------------------------- the chaos loop


def _seed() -> int:
    seed = int(os.environ.get("ZDIST_CHAOS_SEED", random.randrange(2**32)))
    print(f"chaos seed: {seed} (set ZDIST_CHAOS_SEED={seed} to replay)")
    return seed


async def _tasks_done_async(addresses):
    async def one(address):
        try:
            async with rpc(address, timeout=2) as worker:
                return (await worker.metrics())["tasks_done"]
        except Exception:  # noqa: BLE001 - a worker just killed or starting
            return 0

    return sum(await asyncio.gather(*(one(a) for a in addresses)))


def tasks_done(cluster) -> int:
    """Tasks finished so far by the live workers, all together."""
    return asyncio.run(_tasks_done_async(cluster.live_worker_addresses()))


def _strike_when(cluster, target, finished, disaster, rng, record, limit=120.0):
    """Wait until the workers have done ``target`` tasks (or the computation ended); then strike."""

    def run():
        deadline = time.monotonic() + limit
        while not finished.is_set() and tasks_done(cluster) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            disaster(cluster, rng, record)
        except Exception as exc:  # noqa: BLE001 - reported with the run
            record["disaster_error"] = f"{type(exc).__name__}: {exc}"

    return threading.Thread(target=run, name="chaos-disaster", daemon=True)


def _kill_a_worker(cluster, rng, record):
    victim = rng.choice(cluster.live_worker_addresses())
    cluster.kill_worker(victim)
    record["killed_at"] = time.monotonic()
    record["victim"] = victim
    record["fresh"] = cluster.start_worker()
    warm_up([record["fresh"]])


def _restart_center(cluster, rng, record):
    cluster.kill_center()
    record["killed_at"] = time.monotonic()
    cluster.restart_center()
    record["restarted_at"] = time.monotonic()


def chaos_loop(cluster, runs, disaster, *, seed, wall_time, label):
    """Run ``runs`` computations, each hit by ``disaster`` at a random moment; return the records."""
    rng = random.Random(seed)
    kinds = COMPUTATIONS[:runs]
    warm_up(cluster.live_worker_addresses())
    for computation in kinds:  # one calm run of each kind, to warm up the workers
        got, expected = computation(cluster)
        assert got == expected, f"{computation.__name__} without any failure gave {got!r:.200}"
    records = []
    deadline = time.monotonic() + wall_time
    for i in range(runs):
        if time.monotonic() > deadline:
            break
        computation = kinds[i % len(kinds)]
        share = rng.uniform(0.05, 0.8)
        record = {"run": i, "computation": computation.__name__, "share": round(share, 2), "ok": False}
        finished = threading.Event()
        striker = _strike_when(cluster, tasks_done(cluster) + share * TASKS[computation], finished, disaster, rng, record)
        start = time.monotonic()
        striker.start()
        try:
            got, expected = computation(cluster)
            record["ok"] = got == expected
            if not record["ok"]:
                record["error"] = f"wrong result {got!r:.200}, expected {expected!r:.200}"
        except Exception as exc:  # noqa: BLE001 - counted and reported below
            record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
        finally:
            record["finished_at"] = time.monotonic()
            finished.set()
            striker.join(120)
        record["seconds"] = round(record["finished_at"] - start, 2)
        record["mid_computation"] = record.get("killed_at", float("inf")) < record["finished_at"]
        records.append(record)
        print(f"{label} run {i}: {record['computation']} {'ok' if record['ok'] else 'WRONG'} in {record['seconds']} s, "
              f"disaster after ~{record['share']:.0%} of its tasks{' (mid-computation)' if record['mid_computation'] else ' (after it finished)'}"
              + (f": {record['error']}" if "error" in record else "") + (f": {record['disaster_error']}" if "disaster_error" in record else ""))
        # Let the cluster settle: the Center lists exactly the live workers again.
        cluster.wait_for_workers(len(cluster.live_worker_addresses()), timeout=60)
    ok = sum(r["ok"] for r in records)
    mid = sum(r["mid_computation"] for r in records)
    print(f"{label}: {ok}/{runs} correct ({mid}/{len(records)} hit mid-computation, seed {seed})")
    return records


def _check(records, runs):
    failed = [r for r in records if not r["ok"] or "disaster_error" in r]
    assert len(records) == runs, f"only {len(records)} of {runs} runs within the time limit"
    assert not failed, failed


# ---------------------------------------------------------------- tests


def test_chaos_short_worker_kills():
    """Default suite: one computation of each kind (a Pool chain, a dask graph), each losing a worker."""
    with make_cluster(3) as cluster:
        runs = min(2, len(COMPUTATIONS))
        records = chaos_loop(cluster, runs, _kill_a_worker, seed=_seed(), wall_time=150, label="chaos (short)")
    _check(records, runs)


def test_chaos_short_center_restart():
    """A Pool chain and (where zdist.dask works) a dask graph, each with the Center restarted mid-way.

    The dask run is the regression test of a bug the chaos loop found: ``get``
    took the restarted Center's still-empty worker list for every worker dead
    and failed with NoWorkersError."""
    runs = min(2, len(COMPUTATIONS))
    with make_cluster(2) as cluster:
        records = chaos_loop(cluster, runs, _restart_center, seed=_seed(), wall_time=150, label="chaos center restarts (short)")
    _check(records, runs)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_20_worker_kills():
    with make_cluster(3) as cluster:
        records = chaos_loop(cluster, 20, _kill_a_worker, seed=_seed(), wall_time=1200, label="chaos")
    _check(records, 20)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos_5_center_restarts():
    with make_cluster(2) as cluster:
        records = chaos_loop(cluster, 5, _restart_center, seed=_seed(), wall_time=900, label="chaos center restarts")
    _check(records, 5)


class _StallsWhenUnpickled:
    """Unpickling this sleeps: like a task whose module takes seconds to import."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return (_stall, (self.seconds,))


def _stall(seconds):
    time.sleep(seconds)
    _UNPICKLED.append(time.monotonic())
    return seconds


_UNPICKLED: list = []  # when each _stall ended (in this process)


def test_pool_rides_out_workers_stalled_past_the_heartbeat_timeout():
    """Found by the chaos loop: a worker unpickles task functions and arguments on its
    event loop, so a slow import (this test module, importing dask, took ~2 s) stalls
    its heartbeats; the Center dropped every worker at once and the Pool failed all
    work with NoWorkersError, though the workers registered again a moment later.
    The Pool now waits a heartbeat timeout (+2 s) for workers before giving up, and a worker
    unpickles such payloads in a thread of its own (Node.deferred_ops): its loop keeps beating."""
    with make_cluster(2) as cluster:
        with Pool(cluster.center_address, timeout=60) as pool:
            assert pool.gather(pool.map(inc, range(4))) == [1, 2, 3, 4]
            stalls = pool.map(_stall, [_StallsWhenUnpickled(3.0) for _ in range(2)])  # both workers' loops stall 3 s
            assert pool.gather(stalls, timeout=60) == [3.0, 3.0]


def test_worker_serves_while_a_task_payload_unpickles():
    """What the test above rode out is gone at the root: a batch whose payload takes 2 s to
    unpickle is loaded in the worker's loader thread; another client's pings, data requests
    and batches of quick payloads (a function loaded before, plain data) are answered
    meanwhile, and the slow batch still runs to its result."""
    from zdist import Center, Worker

    from .conftest import run

    async def main():
        async with Center() as center:
            async with Worker(center.address, ncores=2) as worker:
                worker.update_data(data={"x": 1})
                async with rpc(worker.address, timeout=30) as w, rpc(worker.address, timeout=30) as other:
                    await w.compute_batch(tasks=[["warm", inc, (0,), {}, []]])  # inc loaded: quick to load from now on
                    slow = asyncio.ensure_future(w.compute_batch(tasks=[["slow", _stall, (_StallsWhenUnpickled(2.0),), {}, []]]))
                    await asyncio.sleep(0.2)  # the slow batch is loading
                    assert await other.ping() == "pong"
                    assert await other.get_data(keys=["x"]) == {"x": 1}
                    quick = await other.compute_batch(tasks=[["quick", inc, (1,), {}, []]])
                    answered = time.monotonic()
                    return quick, await slow, answered

    _UNPICKLED.clear()
    quick, slow, answered = run(main(), timeout=30)
    assert quick == [["quick", "ok", quick[0][2]]]
    assert slow[0][:2] == ["slow", "ok"]
    # Causal, not timed: the quick requests were answered before the slow payload had loaded
    # (worker and client share this process's loop: a load on the loop would hold up both).
    assert answered < _UNPICKLED[0], (answered, _UNPICKLED)


def test_a_peers_requests_keep_their_order_while_one_loads():
    """A client scatters a value that is slow to unpickle (update_data, loaded off the loop),
    then at once sends a quick batch that needs it: the batch waits for the value, in the
    order the client sent them, instead of overtaking it and finding nothing. Meanwhile
    another client is served."""
    from zdist import Center, Worker
    from zdist.protocol import Ref

    from .conftest import run

    async def main():
        async with Center() as center:
            async with Worker(center.address, ncores=1) as worker:
                async with rpc(worker.address, timeout=30) as w, rpc(worker.address, timeout=30) as other:
                    await w.compute_batch(tasks=[["warm", inc, (0,), {}, []]])
                    stored = asyncio.ensure_future(w.update_data(data={"x": _StallsWhenUnpickled(1.0)}))
                    await asyncio.sleep(0)  # sent: the batch below follows it on the same connection
                    batch = asyncio.ensure_future(w.compute_batch(tasks=[["y", inc, (Ref("x"),), {}, ["x"]]], return_values=64))
                    await asyncio.sleep(0.2)
                    assert await other.ping() == "pong"
                    answered = time.monotonic()
                    return await stored, await batch, answered

    _UNPICKLED.clear()
    stored, batch, answered = run(main(), timeout=30)
    assert batch[0][:2] == ["y", "ok"] and batch[0][3] == 2.0, batch
    assert answered < _UNPICKLED[0], (answered, _UNPICKLED)


def test_worker_serves_while_a_fetched_value_unpickles():
    """The same for a value fetched from a peer (a reply, decoded by the fetching worker):
    it is loaded in the worker's loader thread, and the worker answers meanwhile."""
    from zdist import Center, Worker
    from zdist.protocol import Ref

    from .conftest import run

    async def main():
        async with Center() as center:
            async with Worker(center.address, ncores=1) as holder, Worker(center.address, ncores=1) as fetcher:
                holder.update_data(data={"x": _StallsWhenUnpickled(2.0)})  # in this process: nothing unpickled yet
                async with rpc(fetcher.address, timeout=30) as w:
                    await w.compute_batch(tasks=[["warm", inc, (0,), {}, []]])  # inc loaded: quick to load from now on
                    fetched = asyncio.ensure_future(
                        w.compute_batch(tasks=[["y", inc, (Ref("x"),), {}, ["x"]]], who_has={"x": [holder.address]}, return_values=64)
                    )
                    await asyncio.sleep(0.2)  # the fetcher is loading x
                    assert await w.ping() == "pong"
                    quick = await w.compute_batch(tasks=[["quick", inc, (1,), {}, []]])
                    answered = time.monotonic()
                    return quick, await fetched, answered

    _UNPICKLED.clear()
    quick, fetched, answered = run(main(), timeout=30)
    assert quick[0][:2] == ["quick", "ok"]
    assert fetched[0][:2] == ["y", "ok"] and fetched[0][3] == 3.0, fetched
    assert answered < _UNPICKLED[0], (answered, _UNPICKLED)  # causal, not timed (see above)


def test_pool_still_gives_up_when_every_worker_is_really_dead():
    """The wait above is bounded: with every worker killed, NoWorkersError still comes (no hang)."""
    from zdist import NoWorkersError

    with make_cluster(2) as cluster:
        with Pool(cluster.center_address, timeout=60) as pool:
            handles = pool.map_async(slow_inc, range(300))
            time.sleep(0.5)
            for address in list(cluster.worker_addresses):
                cluster.kill_worker(address)
            with pytest.raises(NoWorkersError):
                pool.gather(handles, timeout=60)


def test_input_deleted_before_its_task_runs_is_missing_data_not_a_key_error():
    """Found by the chaos loop (a dask graph with the Center restarted): a worker checks a
    batch's inputs, then runs it in its thread pool; a delete_data in between made the task
    fail with a bare KeyError, which zdist.dask.get passed to the user as the task's own
    error. It is now MissingDataError, which schedulers recover from."""
    from zdist import Center, MissingDataError, Worker
    from zdist.protocol import Ref

    from .conftest import run

    async def main():
        async with Center() as center:
            async with Worker(center.address, ncores=1) as worker:
                worker.update_data(data={"x": 1})
                async with rpc(worker.address, timeout=30) as w:
                    tasks = [["first", _stall, (0.5,), {}, []], ["second", inc, (Ref("x"),), {}, ["x"]]]
                    batch = asyncio.ensure_future(w.compute_batch(tasks=tasks))
                    await asyncio.sleep(0.1)  # both checked and handed to the thread pool, the first sleeping
                    await w.delete_data(keys=["x"])
                    return await batch

    first, second = run(main(), timeout=30)
    assert first[:2] == ["first", "ok"]
    assert second[:2] == ["second", "error"], second
    assert second[2]["type"] == "MissingDataError", second[2]
    assert isinstance(second[2]["exception"], MissingDataError) or "x" in second[2]["message"]
