"""zdist.deploy's one cluster interface on LocalCluster: scale, adapt, and clients that take any cluster."""
from __future__ import annotations

import time

import psutil
import pytest

import zdist.dask
from zdist import Executor, LocalCluster, Pool
from zdist.deploy import Cluster

from .conftest import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, center_call, wait_for

#: Bounds, not measurements: the machine is small and shared.
GROW_TIMEOUT = 90.0
SHRINK_TIMEOUT = 90.0


def nworkers(cluster) -> int:
    return len(center_call(cluster.center_address, "ncores"))


def test_local_cluster_is_a_cluster_with_the_interface():
    with LocalCluster(n_workers=1, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        assert isinstance(cluster, Cluster)
        assert cluster.security is None and cluster.dashboard_link is None
        assert repr(cluster).startswith(f"<LocalCluster center={cluster.center_address} running units=1: [{cluster.worker_addresses[0]}]")
        info = cluster.center_info()
        assert list(info["workers"]) == cluster.worker_addresses
    assert cluster.status == "closed"


def test_scale_up_and_down_hands_data_over_and_leaves_no_process():
    with LocalCluster(n_workers=1, nanny=True, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=GROW_TIMEOUT)
        assert cluster.planned_workers() == 3 and len(cluster.worker_addresses) == 3
        processes = list(cluster.worker_processes.values())
        with Pool(cluster) as pool:
            handles = pool.map(abs, range(-30, 0))  # spread over the three workers
            wait_for(lambda: center_call(cluster.center_address, "info")["nkeys"] == 30, message="every result reported")
            holders = center_call(cluster.center_address, "has_what")
            assert sum(1 for keys in holders.values() if keys) >= 2
            nkeys = 30
            cluster.scale(1)
            assert cluster.planned_workers() == 1
            wait_for(lambda: nworkers(cluster) == 1, timeout=SHRINK_TIMEOUT)
            kept = center_call(cluster.center_address, "info")["nkeys"]
            assert pool.gather(handles) == list(range(30, 0, -1))  # lost ones are computed again
        gone = [p for p in processes if p.pid not in {q.pid for q in cluster.worker_processes.values()}]
        assert len(gone) == 2 and all(p.poll() is not None for p in gone)
        assert all(not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE for p in gone)
    assert kept == nkeys, f"the retired workers handed over only {kept} of {nkeys} keys"


def test_scale_in_process_cluster():
    with LocalCluster(n_workers=1, processes=False, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=GROW_TIMEOUT)
        cluster.scale(1)
        wait_for(lambda: nworkers(cluster) == 1, timeout=SHRINK_TIMEOUT)
        assert len(cluster.worker_nodes) == 1


def test_clients_take_any_cluster_and_its_security():
    with LocalCluster(n_workers=1, security=True, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        assert cluster.security is not None
        with Pool(cluster) as pool:
            assert pool.gather(pool.map(abs, [-1])) == [1]
        with Executor(cluster) as executor:
            assert executor.submit(abs, -2).result(30) == 2
        assert zdist.dask.get(cluster, {"a": 1, "b": (abs, "a")}, "b") == 1


def test_adapt_grows_under_a_long_map_and_shrinks_after_it():
    with LocalCluster(n_workers=1, nanny=True, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        adaptive = cluster.adapt(minimum=1, maximum=4, interval=0.5, wait=1.0)
        with Pool(cluster) as pool:
            handles = pool.map_async(time.sleep, [0.3] * 100)
            wait_for(lambda: nworkers(cluster) == 4, timeout=GROW_TIMEOUT, interval=0.2, message="adapt to grow to 4 workers")
            pool._results.wait(handles, GROW_TIMEOUT, raise_errors=True)
            ended = time.monotonic()
            del handles
            wait_for(lambda: nworkers(cluster) == 1, timeout=SHRINK_TIMEOUT, interval=0.2, message="adapt to shrink back to 1 worker")
            shrunk_after = time.monotonic() - ended
            wait_for(lambda: adaptive.log[-1][1:] == ("down", 1), timeout=SHRINK_TIMEOUT, message="adapt to finish its step")
            assert pool.gather(pool.map(abs, [-5])) == [5]  # the one left still works
        assert [what for _, what, _ in adaptive.log][:1] == ["up"]
        assert max(n for _, _, n in adaptive.log) == 4
        print(f"shrunk to 1 worker {shrunk_after:.1f} s after the map ended")
        cluster.scale(2)  # scale by hand ends adapt
        assert cluster._adaptive is None
        cluster.wait_for_workers(2, timeout=GROW_TIMEOUT)


def test_adapt_checks_its_bounds():
    with LocalCluster(n_workers=1, processes=False, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        with pytest.raises(ValueError, match="0 <= minimum <= maximum"):
            cluster.adapt(minimum=3, maximum=2)
        with pytest.raises(ValueError, match="scale needs a number of workers >= 0"):
            cluster.scale(-1)


def test_dashboard_link_of_a_local_cluster():
    with LocalCluster(n_workers=1, dashboard=True, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=HEARTBEAT_INTERVAL) as cluster:
        assert cluster.dashboard_link is not None and cluster.dashboard_link == cluster.dashboard_url
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")


_KILLED_SCRIPT = """
import sys
from zdist import LocalCluster
cluster = LocalCluster(n_workers=2, nanny=sys.argv[1] == 'nanny')
cluster.start()
import psutil
print(' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
import time
time.sleep(120)
"""


@pytest.mark.parametrize("nanny", ["nanny", "plain"])
def test_nodes_of_a_local_cluster_stop_when_the_script_that_started_them_is_killed(nanny):
    """A script killed before it could stop its LocalCluster (SIGKILL: no atexit) leaves no node running."""
    import signal
    import subprocess
    import sys

    script = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, nanny], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in script.stdout.readline().split()]
        assert len(pids) >= 3, pids  # a Center and two workers (and their nannies)
    finally:
        script.send_signal(signal.SIGKILL)
        script.wait(30)
    try:
        wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids), timeout=30)
    finally:
        for pid in pids:  # never leave one behind, even when the test fails
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
