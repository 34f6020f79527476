"""The nanny: workers started again when they die, on real processes on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from zdist import Pool
from zdist.errors import TaskKilledWorkersError

from .conftest import center_call, make_cluster, wait_for

STOP_TIMEOUT = 30.0


def inc(x):
    return x + 1


def die(x):
    os._exit(13)


def workers(cluster) -> dict:
    return center_call(cluster.center_address, "workers")


def test_sigkilled_worker_comes_back_with_its_name_and_the_cluster_serves_again():
    # A heartbeat timeout longer than a restart on a busy machine: the dead
    # worker is dropped because its nanny replaced it, not for its silence.
    with make_cluster(2, nanny=True, heartbeat_timeout=15) as cluster, Pool(cluster.center_address) as pool:
        assert pool.gather(pool.map(inc, range(10))) == list(range(1, 11))
        before = workers(cluster)
        victim, info = min(before.items())
        assert info["restarts"] == 0 and info["nanny"] != info["pid"]
        os.kill(info["pid"], signal.SIGKILL)
        killed = time.monotonic()

        def replaced():
            now = workers(cluster)
            back = [w for a, w in now.items() if w["name"] == info["name"] and a != victim]
            return len(now) == 2 and victim not in now and back and back[0]

        new = wait_for(replaced, timeout=20, message="the nanny started the worker again and the Center dropped the dead one")
        print(f"worker back (registered again) {time.monotonic() - killed:.2f} s after SIGKILL")
        assert new["restarts"] == 1 and new["nanny"] == info["nanny"] and new["pid"] != info["pid"]
        removed = center_call(cluster.center_address, "info")["removed"]
        assert any(entry[1] == victim and entry[2] == "restarted by its nanny" for entry in removed), removed
        assert pool.gather(pool.map(inc, range(20))) == list(range(1, 21))


def test_a_task_that_kills_its_worker_fails_clearly_and_other_work_completes():
    with make_cluster(2, nanny=True) as cluster, Pool(cluster.center_address, max_worker_deaths=2) as pool:
        with pytest.raises(TaskKilledWorkersError):
            pool.apply(die, [1]).get(timeout=60)
        wait_for(lambda: len(workers(cluster)) == 2, timeout=20, message="both workers back")
        assert pool.gather(pool.map(inc, range(10))) == list(range(1, 11))
        assert sum(w["restarts"] for w in workers(cluster).values()) == 2


def hog(step_mb: int = 20, most_mb: int = 700) -> int:
    """Allocate (and touch) memory in steps, keeping it; bounded at ``most_mb``."""
    import numpy as np

    held = []
    for _ in range(most_mb // step_mb):  # bounded: the nanny should kill us long before the end
        held.append(np.ones(step_mb * 2**20, dtype=np.uint8))
        time.sleep(0.02)  # give the nanny (polling every 50 ms) time to see it
    return len(held) * step_mb


def test_a_task_past_the_terminate_threshold_gets_its_worker_restarted_and_fails_clearly():
    # 2 workers of 300 MB: terminate at 95% (285 MB); the hog stops at 700 MB if nobody kills it.
    with make_cluster(2, nanny=True, memory_limit="300MB") as cluster, Pool(cluster.center_address, max_worker_deaths=2) as pool:
        assert pool.gather(pool.map(inc, range(4))) == [1, 2, 3, 4]
        with pytest.raises(TaskKilledWorkersError, match="running out of memory"):
            pool.apply(hog).get(timeout=120)
        wait_for(lambda: len(workers(cluster)) == 2, timeout=30, message="both workers back")
        assert sum(w["restarts"] for w in workers(cluster).values()) == 2
        assert all(w["memory_limit"] == 300 * 10**6 for w in workers(cluster).values())
        assert pool.gather(pool.map(inc, range(10))) == list(range(1, 11))


def test_the_nanny_makes_glibc_give_freed_memory_back():
    # Without it a worker's RSS grows past terminate while its data fits (benchmarks/bench_memory.py --four-x).
    with make_cluster(1, nanny=True) as cluster:
        (info,) = workers(cluster).values()
        with open(f"/proc/{info['pid']}/environ", "rb") as environ:
            assert b"MALLOC_TRIM_THRESHOLD_=65536" in environ.read().split(b"\0")


# ------------------------------------------------------------------ the program


class Nodes:
    """A Center and zdist-worker programs; every one killed by PID at the end."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []
        center = self.start([sys.executable, "-m", "zdist.run", "center", "--port", "0", "--no-dashboard", "--heartbeat-timeout", "30"])
        self.center = self.read_line(center, "Start center at ").split()[-1]

    def start(self, args: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.processes.append(process)
        return process

    def worker(self, *args: str) -> subprocess.Popen:
        return self.start([sys.executable, "-m", "zdist.run", "worker", self.center, "--heartbeat-interval", "0.2", *args])

    @staticmethod
    def read_line(process: subprocess.Popen, marker: str) -> str:
        for _ in range(100):  # bounded: a node prints a few lines
            line = process.stdout.readline().decode()
            if not line:
                raise AssertionError(f"exited before printing {marker!r}: {process.stderr.read().decode()[-3000:]}")
            if marker in line:
                return line.strip()
        raise AssertionError(f"no {marker!r}")

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in reversed(self.processes):
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for child in _children(process.pid):
                    os.kill(child, signal.SIGKILL)
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def nodes():
    nodes = Nodes()
    try:
        yield nodes
    finally:
        nodes.close()


def test_nworkers_split_cores_and_memory(nodes):
    nanny = nodes.worker("--nworkers", "2", "--ncores", "3", "--memory-limit", "2GB", "--name", "w")
    nodes.read_line(nanny, "Registered")
    nodes.read_line(nanny, "Registered")
    info = center_call(nodes.center, "workers")
    assert sorted((w["name"], w["ncores"], w["memory_limit"]) for w in info.values()) == [("w-0", 2, 10**9), ("w-1", 1, 10**9)]
    assert {w["nanny"] for w in info.values()} == {nanny.pid}


def test_sigterm_to_the_nanny_stops_the_worker_gracefully(nodes):
    nanny = nodes.worker("--ncores", "1")
    address = nodes.read_line(nanny, "Start worker at:").split()[-1]
    nodes.read_line(nanny, "Registered")
    worker_pid = center_call(nodes.center, "workers")[address]["pid"]
    nanny.send_signal(signal.SIGTERM)
    assert nanny.wait(STOP_TIMEOUT) == 0
    assert not _alive(worker_pid)
    removed = center_call(nodes.center, "info")["removed"]
    assert any(entry[1] == address and entry[2] == "unregistered" for entry in removed)  # it said goodbye: no heartbeat timeout


def test_a_crash_loop_is_stopped_with_a_clear_message(nodes):
    nanny = nodes.worker("--ncores", "1", "--max-restarts", "1")
    for expected in (0, 1):
        nodes.read_line(nanny, "Registered")
        pid = wait_for(lambda n=expected: [w for w in center_call(nodes.center, "workers").values() if w["restarts"] == n], message="registered")[0]["pid"]
        os.kill(pid, signal.SIGKILL)
    assert nanny.wait(STOP_TIMEOUT) == 1
    assert "died 2 times within 60 s (last: killed by SIGKILL); not starting it again" in nanny.stderr.read().decode()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ncores", "0"], "--ncores 0: a worker needs at least one core"),
        (["--ncores", "-3"], "--ncores -3: a worker needs at least one core"),
        (["--memory-limit", "0"], "memory limit '0': a limit must be positive"),
        (["--memory-limit", "-5"], "memory limit '-5': a limit must be positive"),
        (["--memory-limit", "10XB"], "unknown unit 'XB'"),
        (["--nworkers", "2", "--no-nanny"], "--nworkers 2 needs the nanny"),
    ],
)
def test_bad_options_are_refused_clearly(nodes, args, message):
    worker = nodes.worker(*args)
    assert worker.wait(STOP_TIMEOUT) == 2
    stderr = worker.stderr.read().decode()
    assert message in stderr and "Traceback" not in stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
