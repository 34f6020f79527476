"""Replicas, Center restarts, worker deaths between computations."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zdist import LostDataError, Pool, rpc

from .conftest import make_cluster, wait_for


def slow_inc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


async def _ask(center_address, op, **args):
    async with rpc(center_address, timeout=5) as center:
        return await getattr(center, op)(**args)


def ask(center_address, op, **args):
    return asyncio.run(_ask(center_address, op, **args))


def test_replicas_survive_a_worker_and_are_restored(cluster3):
    with Pool(cluster3.center_address) as pool:
        values = list(range(12))
        handles = pool.scatter(values, replicas=2)
        keys = [h.key for h in handles]
        who_has = ask(pool.center_address, "who_has", keys=keys)
        assert all(len(holders) == 2 for holders in who_has.values())
        victim = cluster3.worker_addresses[0]
        cluster3.kill_worker(victim)
        assert pool.gather(handles) == values  # the other copy answers at once

        def restored():
            table = ask(pool.center_address, "who_has", keys=keys)
            return all(len(h) == 2 and victim not in h for h in table.values())

        wait_for(restored, timeout=20, message="every value on two live workers again")
        # And the restored copies serve: kill another original holder.
        second = cluster3.worker_addresses[0]
        cluster3.kill_worker(second)
        assert pool.gather(handles) == values
        assert pool.apply(sum, [handles]).get() == sum(values)
        pool.delete(handles)
        wait_for(lambda: not ask(pool.center_address, "who_has"), timeout=10, message="every copy deleted")


def test_scatter_without_replicas_loses_data_clearly(cluster):
    with Pool(cluster.center_address) as pool:
        a = pool.scatter([1], workers=[cluster.worker_addresses[0]])[0]
        cluster.kill_worker(cluster.worker_addresses[0])
        wait_for(lambda: len(pool.sync_center()) == 1, timeout=15)
        with pytest.raises(LostDataError, match="lost when worker"):
            a.get(timeout=30)


def test_center_restart_mid_map(cluster):
    with Pool(cluster.center_address) as pool:
        before = pool.map(slow_inc, range(10))
        restarter = threading.Thread(target=cluster.restart_center)
        handles = pool.map_async(slow_inc, range(80), )
        time.sleep(0.3)
        restarter.start()
        restarter.join(60)
        assert pool.gather(handles, timeout=120) == list(range(1, 81))
        # Workers re-registered and re-reported every key they hold.
        wait_for(lambda: len(ask(pool.center_address, "ncores")) == 2, timeout=20)
        wait_for(lambda: {h.key for h in before} <= set(ask(pool.center_address, "who_has")), timeout=20,
                 message="keys from before the restart known again")
        assert pool.gather(before) == list(range(1, 11))
        later = pool.map(slow_inc, before)  # data on workers untouched, locality intact
        assert pool.gather(later) == list(range(2, 12))


def test_scattered_values_of_a_worker_dropped_for_a_stall_are_found_again():
    """A worker that misses heartbeats (stopped, not dead) is dropped by the Center; it comes back with its data."""
    import os
    import signal

    with make_cluster(2) as cluster, Pool(cluster.center_address) as pool:
        stalled = cluster.worker_addresses[0]
        [handle] = pool.scatter([list(range(100))], workers=[stalled])
        pid = cluster.worker_processes[stalled].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: stalled not in ask(cluster.center_address, "workers"), timeout=20, message="the Center dropped the stalled worker")
            time.sleep(0.5)  # the pool notices it too
        finally:
            os.kill(pid, signal.SIGCONT)
        assert handle.get(timeout=30) == list(range(100))
        assert pool.apply(sum, [handle]).get() == 4950
