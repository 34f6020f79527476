"""Task controls end to end on real clusters: retries, priority, resources, worker restrictions.

The core's side (placement, retries, resource accounting) is also covered
by the simulated cluster in tests/test_scheduling.py; here real workers run them.
"""
from __future__ import annotations

import os
import time

import pytest

from zdist import Executor, Pool
from zdist.scheduling.controls import controls_from

from .conftest import center_call, make_cluster


def flaky(path: str, failures: int) -> str:
    """Raise the first ``failures`` times it is called (counted in a file: workers are other processes)."""
    with open(path, "a+") as f:
        f.seek(0)
        calls = len(f.read())
        f.write("x")
    if calls < failures:
        raise RuntimeError(f"flaky failure {calls + 1}")
    return f"ok after {calls} failures"


def record(path: str, what: str) -> str:
    with open(path, "a") as f:
        f.write(what + "\n")
    return what


def pid() -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def two_workers():
    with make_cluster(2) as cluster:
        yield cluster


def test_a_task_that_fails_twice_then_succeeds_with_retries_2(two_workers, tmp_path):
    with Pool(two_workers) as pool:
        assert pool.apply(flaky, (str(tmp_path / "a"), 2), retries=2).get() == "ok after 2 failures"
        with pytest.raises(RuntimeError, match="flaky failure 2"):
            pool.apply(flaky, (str(tmp_path / "b"), 2), retries=1).get()
        with pytest.raises(RuntimeError, match="flaky failure 1"):  # no retries by default
            pool.apply(flaky, (str(tmp_path / "c"), 1)).get()


def test_retries_as_pool_default_and_through_executor_options(two_workers, tmp_path):
    with Pool(two_workers, retries=3) as pool:
        assert pool.apply_async(flaky, (str(tmp_path / "p"), 3)).get() == "ok after 3 failures"
    with Executor(two_workers) as ex:
        assert ex.options(retries=1).submit(flaky, str(tmp_path / "e"), 1).result() == "ok after 1 failures"
        with pytest.raises(RuntimeError):
            ex.submit(flaky, str(tmp_path / "f"), 1).result()


def test_priorities_order_tasks_waiting_for_a_one_core_worker(tmp_path):
    log = str(tmp_path / "order")
    with make_cluster(1) as cluster, Pool(cluster) as pool:
        busy = pool.map_async(time.sleep, [0.6, 0.6])  # fill the worker's two slots
        low = [pool.apply_async(record, (log, f"low-{i}"), priority=-1) for i in range(2)]
        normal = pool.apply_async(record, (log, "normal"))
        high = pool.apply_async(record, (log, "high"), priority=10)
        pool.gather([*busy, *low, normal, high])
        with open(log) as f:
            assert f.read().split() == ["high", "normal", "low-0", "low-1"]


def test_a_task_needing_a_gpu_waits_for_a_worker_that_has_one(tmp_path):
    with make_cluster(1) as cluster, Pool(cluster) as pool:
        handle = pool.apply_async(pid, resources={"GPU": 1})
        time.sleep(1.0)
        assert not handle.ready()
        assert "waiting: 1 task(s) for resources GPU=1" in repr(pool)
        gpu_worker = cluster.start_worker(resources={"GPU": 1})
        pool.sync_center()
        gpu_pid = center_call(cluster.center_address, "workers")[gpu_worker]["pid"]
        assert handle.get(timeout=30) == gpu_pid
        # Two tasks each needing the one GPU run one after the other, both there.
        assert pool.gather([pool.apply_async(pid, resources={"GPU": 1}) for _ in range(3)]) == [gpu_pid] * 3
        assert "waiting" not in repr(pool)


def test_resources_are_never_oversubscribed(tmp_path):
    log = str(tmp_path / "gpu")

    def use_gpu(i: int) -> None:
        with open(log, "a") as f:
            f.write(f"start {i} {time.time()}\n")
        time.sleep(0.2)
        with open(log, "a") as f:
            f.write(f"stop {i} {time.time()}\n")

    with make_cluster(1, threads_per_worker=2) as cluster, Pool(cluster) as pool:
        cluster.start_worker(resources={"GPU": 1})
        pool.sync_center()
        pool.map(use_gpu, range(4), resources={"GPU": 1})
    with open(log) as f:
        events = [line.split() for line in f]
    running = peak = 0
    for kind, _, _ in sorted(events, key=lambda e: float(e[2])):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1


def test_workers_pin_a_task_and_allow_other_workers_falls_back(two_workers):
    with Pool(two_workers) as pool:
        infos = center_call(two_workers.center_address, "workers")
        target = sorted(infos)[1]
        pids = pool.gather(pool.map(lambda _: os.getpid(), range(8), workers=[target]))
        assert set(pids) == {infos[target]["pid"]}
        with pytest.raises(TypeError, match="task controls are"):
            pool.apply_async(pid, wrokers=[target])
        gone = "127.0.0.1:1"
        assert pool.apply(pid, workers=[gone], allow_other_workers=True).get() in {i["pid"] for i in infos.values()}
        stuck = pool.apply_async(pid, workers=[gone])
        time.sleep(0.5)
        assert not stuck.ready() and "one of the workers 127.0.0.1:1" in repr(pool)
        assert stuck.cancel()


def test_controls_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="priority must be a number"):
        controls_from(priority="high")
    with pytest.raises(ValueError, match="workers must be a worker address"):
        controls_from(workers=[])


def test_dask_get_honours_annotations_and_controls(two_workers, tmp_path):
    import functools

    import dask
    from dask import delayed

    from zdist.dask import get

    scheduler = functools.partial(get, two_workers.center_address)
    with dask.annotate(retries=2):
        value = delayed(flaky)(str(tmp_path / "d"), 2)
    assert value.compute(scheduler=scheduler) == "ok after 2 failures"
    with pytest.raises(RuntimeError, match="flaky failure 1"):
        delayed(flaky)(str(tmp_path / "e"), 1).compute(scheduler=scheduler)
    assert delayed(flaky)(str(tmp_path / "f"), 1).compute(scheduler=functools.partial(scheduler, retries=1)) == "ok after 1 failures"
    infos = center_call(two_workers.center_address, "workers")
    target = sorted(infos)[0]
    pids = dask.compute(*[delayed(pid)(dask_key_name=f"pid-{i}") for i in range(6)], scheduler=functools.partial(scheduler, workers=[target]))
    assert set(pids) == {infos[target]["pid"]}
