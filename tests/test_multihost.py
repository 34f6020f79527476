"""Multi-host: a Center and workers on different (network-namespace) hosts.

Builds four hosts as Linux network namespaces joined by a bridge that lives
in a fifth namespace of its own (nothing is added to the machine's own
network namespace), each host with one address in a random private
``10.x.y.0/24``. The Center runs on host 1, workers on hosts 2 and 3, each
started as ``zdist-center``/``zdist-worker`` with ``--host`` set to its own
address; a client on host 4 runs the Pool seed session and a dask.array
computation across them, once without security (the nodes warn that they
listen beyond loopback unsecured) and once with CURVE keys from
``zdist-keys`` (no warning, and a client without the key gets no answer).

Needs root and ``ip`` (iproute2); skips with the reason otherwise. Every
process is killed by PID and every namespace deleted at teardown, even when
a test fails. Only addresses inside these namespaces are used.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .netns import Hosts, Processes, namespace_skip_reason

N_HOSTS = 4
WARNING = "anyone who can reach this port can run code"


@pytest.fixture(scope="module")
def hosts():
    reason = namespace_skip_reason()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(N_HOSTS)
    try:
        try:
            hosts.build()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the namespaces: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        yield hosts
    finally:
        hosts.destroy()


CLIENT = r'''
import functools, json, sys, time
import dask.array as da
import zdist
from zdist import Pool, Security, rpc
import asyncio

center, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
security = Security(key=key) if key else None
report = {}
with Pool(center, security=security, timeout=30) as pool:
    report["workers"] = sorted(pool.available_cores)
    A = pool.map(lambda x: x**2, range(10))
    B = pool.map(lambda x: -x, A)
    report["total"] = pool.apply(sum, [B]).get()
    report["A"] = pool.gather(A)

    async def where(keys):
        async with rpc(center, timeout=10, security=security) as c:
            return await c.who_has(keys=keys)

    report["A_on"] = sorted({w for holders in asyncio.run(where([a.key for a in A])).values() for w in holders})
try:
    from zdist.dask import get
except ImportError:
    report["dask"] = None
else:
    x = da.arange(100_000, chunks=5_000, dtype="int64")
    y = (x * 2 + 1).sum()
    report["dask"] = int(y.compute(scheduler=functools.partial(get, center, security=security, timeout=120)))
if key:
    async def stranger(address):
        try:
            async with rpc(address, timeout=2.0) as node:  # no key at all
                return await node.ping()
        except zdist.RPCTimeoutError:
            return "no answer"
    report["stranger"] = [asyncio.run(stranger(a)) for a in [center, *report["workers"]]]
print("REPORT " + json.dumps(report), flush=True)
'''


def _run_cluster(hosts, tmp_path, key_file: str | None) -> tuple[dict, Processes]:
    processes = Processes(str(tmp_path))
    security_args = ["--key", key_file] if key_file else []
    try:
        center_ns, *worker_ns, client_ns = hosts.names
        center_host, *worker_hosts, _ = hosts.addresses
        center = processes.start(center_ns, "center", ["-m", "zdist_cli.center", "--host", center_host, "--port", "0", "--heartbeat-timeout", "5", *security_args])
        address = processes.wait_line(center, "Start center at").split("Start center at", 1)[1].strip()
        assert address.startswith(center_host + ":")
        workers = []
        for i, (ns, host) in enumerate(zip(worker_ns, worker_hosts)):
            workers.append(processes.start(ns, f"worker-{i}", ["-m", "zdist_cli.worker", address, "--host", host, "--ncores", "1", "--heartbeat-interval", "0.25", *security_args]))
        for worker in workers:
            processes.wait_line(worker, "Registered with center at")
        client = processes.start(client_ns, "client", ["-c", CLIENT, address, *([key_file] if key_file else [])])
        line = processes.wait_line(client, "REPORT ", timeout=180)
        client.wait(30)
        return json.loads(line.split("REPORT ", 1)[1]), processes
    finally:
        processes.stop_all()


def _check_seed_session(report: dict, hosts) -> None:
    worker_hosts = hosts.addresses[1:-1]
    assert [w.rsplit(":", 1)[0] for w in report["workers"]] == worker_hosts, report
    assert report["total"] == -285
    assert report["A"] == [x**2 for x in range(10)]
    assert set(report["A_on"]) <= set(report["workers"]) and report["A_on"], report
    if report["dask"] is not None:
        assert report["dask"] == 2 * (100_000 * 99_999 // 2) + 100_000


def test_center_and_workers_on_three_hosts_client_on_a_fourth(hosts, tmp_path):
    report, processes = _run_cluster(hosts, tmp_path, key_file=None)
    _check_seed_session(report, hosts)
    # Listening beyond loopback without CURVE: every node says so.
    for label in ["center", "worker-0", "worker-1"]:
        assert WARNING in processes.log(label), f"{label} did not warn:\n{processes.log(label)}"
    print(f"multihost: center {hosts.addresses[0]}, workers {report['workers']}, client {hosts.addresses[-1]}: "
          f"seed session -285, A on {report['A_on']}, dask {report['dask']}")


def test_across_hosts_with_curve_keys(hosts, tmp_path):
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "zdist_cli.keys", str(keys)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    report, processes = _run_cluster(hosts, tmp_path, key_file=str(keys / "zdist.key_secret"))
    _check_seed_session(report, hosts)
    assert report["stranger"] == ["no answer"] * 3, report
    for label in ["center", "worker-0", "worker-1"]:
        assert WARNING not in processes.log(label), processes.log(label)
    print(f"multihost with CURVE: workers {report['workers']}, seed session -285, dask {report['dask']}, a client without the key got no answer")
