"""Memory limits end to end: spill to disk, pause and resume, a full disk; on real processes on 127.0.0.1."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging

import numpy as np
import pytest

from zdist import Worker, rpc
from zdist.center import Center
from zdist.memory import MemoryThresholds

from .conftest import center_call, make_cluster, run, wait_for

MB = 10**6


def digest(array: np.ndarray) -> str:
    return f"{array.dtype.str}{array.shape}" + hashlib.sha256(array.tobytes()).hexdigest()


def arrays(n: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    kinds = [np.float64, np.int32, np.complex64, ">f4"]
    return {f"a-{i}": rng.random(size // 8).astype(kinds[i % len(kinds)]) for i in range(n)}


def test_spilled_values_come_back_bit_identical_and_a_peer_gets_them_without_unpickling():
    values = arrays(6, 20 * MB)
    values["strided"] = np.arange(4 * MB, dtype=np.int64)[::3]  # not contiguous: pickled in band
    with make_cluster(2, memory_limit="150MB") as cluster:
        alice, bob = cluster.worker_addresses

        async def main():
            async with rpc(alice, timeout=60) as a, rpc(bob, timeout=60) as b:
                await a.update_data(data=values)
                metrics = await a.metrics()
                assert metrics["bytes_on_disk"] > 0 and metrics["spilled"] >= 1
                assert metrics["bytes_in_memory"] <= 0.6 * 150 * MB  # the target: 60% of the limit
                got = await a.get_data(keys=list(values))  # to the client, spilled ones read from disk
                for key, value in values.items():
                    assert digest(got[key]) == digest(value), key
                before = (await a.metrics())["unspilled"]
                # A peer computes on every value: bob fetches them from alice.
                for key in values:
                    _, meta = await b.compute(function=digest, keys=[key], key=f"digest-{key}", return_value=1000)
                    assert meta["value"] == digest(values[key]), key
                assert (await a.metrics())["unspilled"] == before  # alice sent spilled values as they lay on disk

        run(main(), timeout=120)
        info = center_call(cluster.center_address, "workers")[alice]
        wait_for(lambda: center_call(cluster.center_address, "workers")[alice].get("bytes_on_disk", 0) > 0, message="the Center hears of bytes on disk")
        assert info["memory_limit"] == 150 * MB


def test_a_worker_over_its_pause_threshold_pauses_and_resumes():
    thresholds = {"target": None, "spill": None, "pause": 0.8, "terminate": None}  # nothing spills: only pause
    with make_cluster(1, memory_limit="300MB", memory_thresholds=thresholds) as cluster:
        (address,) = cluster.worker_addresses

        def status():
            return center_call(cluster.center_address, "workers")[address].get("status")

        async def main():
            async with rpc(address, timeout=60) as w:
                await w.update_data(data={"small": 42})
                rss = (await w.metrics())["memory"]
                hog = np.ones(max(1, int(0.8 * 300 * MB - rss + 60 * MB)) // 8)
                await w.update_data(data={"hog": hog})
                del hog
                await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(lambda: status() == "paused", message="paused"))
                # Paused: data is still served, new tasks wait.
                assert await w.get_data(keys=["small"]) == {"small": 42}
                task = asyncio.ensure_future(w.compute(function=lambda x: x + 1, keys=["small"], key="later", return_value=100))
                await asyncio.sleep(0.5)
                assert not task.done()
                await w.delete_data(keys=["hog"])  # deletions are accepted; memory drops
                _, meta = await asyncio.wait_for(task, 30)
                assert meta["value"] == 43
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(lambda: status() == "running", message="resumed"))

        run(main(), timeout=120)


def test_a_full_disk_loses_nothing_logs_once_and_pauses(caplog, monkeypatch):
    values = arrays(8, 2 * MB, seed=1)

    async def main():
        async with Center() as center:
            thresholds = MemoryThresholds(target=0.3, spill=None, pause=None, terminate=None)
            async with Worker(center.address, memory_limit=10 * MB, memory_thresholds=thresholds, heartbeat_interval=0.1) as worker:
                store = worker.memory.store
                writes = []

                def full(name, frames):
                    writes.append(name)
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(store.disk, "_write", full)
                for key, value in values.items():
                    worker.update_data(data={key: value})
                assert len(writes) >= 2 and not store.spilled  # it tried, failed, and kept them
                assert worker.memory.paused
                for key, value in values.items():
                    assert digest(worker.data[key]) == digest(value)
                assert not any(name.startswith(tuple(writes)) for name in _files(store.disk.directory))  # no half-written file
                # Room again: deleting brings memory under the target; the worker resumes and spills anew.
                monkeypatch.undo()
                worker.delete_data(keys=list(values)[:7])
                worker.memory.check()
                assert not worker.memory.paused
                worker.update_data(data={"again": np.ones(4 * MB // 8)})
                assert store.spilled
                assert sorted(worker.get_data(keys=[*list(values)[7:], "again"])) == sorted([*list(values)[7:], "again"])

    with caplog.at_level(logging.WARNING, logger="zdist.datastore"):
        run(main(), timeout=60)
    assert sum("cannot spill" in record.getMessage() for record in caplog.records) == 1


def _files(directory: str) -> list[str]:
    import os

    return os.listdir(directory) if os.path.isdir(directory) else []


@pytest.mark.parametrize("bad", ["0", "-5", "10XB", 0, -5])
def test_bad_memory_limits_are_refused(bad):
    with pytest.raises(ValueError, match="memory limit"):
        make_cluster(1, memory_limit=bad)
