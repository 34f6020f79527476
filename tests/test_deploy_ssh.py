"""SSHCluster against real OpenSSH servers, one in each of four network-namespace hosts.

The set-up (as root) installs Debian's ``openssh-server`` if it is missing,
builds five namespaces on a bridge (tests/netns.py), starts an ``sshd`` in
four of them reached by a key made here, and runs the client (SSHCluster,
the README's Pool session, a dask graph) in the fifth: the machine's own
network namespace is never touched, and it has no route to these hosts.
Everything is stopped by PID and every namespace deleted at teardown. After
``close()``, or after the client is killed, no process of ours may be left
on any host but its listening sshd (``ip netns pids``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import read_lines_until
from .netns import Hosts, SSHDaemons, namespace_skip_reason

pytest.importorskip("asyncssh", reason="SSHCluster needs asyncssh: pip install 'zdist[ssh]'")

#: Bounds, not measurements.
CLIENT_TIMEOUT = 300.0
DRAIN_TIMEOUT = 60.0

CLIENT = r'''
import asyncio, functools, json, sys, time
import zdist
from zdist import Pool, rpc
from zdist.deploy import SSHCluster

hosts, key, known, per_host = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
mode = sys.argv[5]
report = {}
connect = dict(username="root", client_keys=[key], known_hosts=known)
t0 = time.monotonic()
cluster = SSHCluster(
    [hosts[0], *hosts], connect_options=connect, remote_python=sys.executable, nworkers_per_host=per_host,
    worker_options={"ncores": per_host, "heartbeat_interval": 0.25}, center_options={"heartbeat_timeout": 5},
)
report["start_s"] = time.monotonic() - t0
report["workers"] = cluster.worker_addresses
report["pids"] = [w["pid"] for w in cluster.center_info()["workers"].values()]
if mode == "die":
    print("READY " + json.dumps(report), flush=True)
    time.sleep(600)  # killed by the test
report["secure"] = cluster.security is not None
report["repr"] = repr(cluster)
with Pool(cluster) as pool:
    A = pool.map(lambda x: x**2, range(10))
    B = pool.map(lambda x: -x, A)
    report["total"] = pool.apply(sum, [B]).get()
    report["A"] = pool.gather(A)
    report["available"] = len(pool.available_cores)

import dask.array as da
from zdist.dask import get
x = da.arange(100_000, chunks=5_000, dtype="int64")
report["dask"] = int((x * 2 + 1).sum().compute(scheduler=functools.partial(get, cluster, timeout=120)))

async def stranger(address):
    try:
        async with rpc(address, timeout=2.0) as node:  # no key
            return await node.ping()
    except zdist.RPCTimeoutError:
        return "no answer"
report["stranger"] = asyncio.run(stranger(cluster.center_address))

cluster.scale(per_host)  # one unit left: the others retire
cluster.wait_for_workers(per_host)
deadline = time.monotonic() + 60
while len(cluster.worker_addresses) > per_host and time.monotonic() < deadline:
    time.sleep(0.1)
report["after_scale_down"] = len(cluster.worker_addresses)
report["units_after_scale_down"] = len(cluster.units)
logs = cluster.logs()
report["log_names"] = list(logs)
report["center_log_has_start"] = "Start center at" in logs["center"]
t1 = time.monotonic()
cluster.close()
report["close_s"] = time.monotonic() - t1
print("REPORT " + json.dumps(report), flush=True)
'''


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    reason = namespace_skip_reason() or SSHDaemons.skip_reason()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(5)  # four sshd hosts and a client host
    daemons = None
    try:
        try:
            hosts.build()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the namespaces: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        daemons = SSHDaemons(hosts.names[:4], hosts.addresses[:4], str(tmp_path_factory.mktemp("sshd")))
        daemons.start()
        yield hosts, daemons
    finally:
        if daemons is not None:
            daemons.stop()
        hosts.destroy()


def start_client(hosts, daemons, per_host: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", hosts.names[4], sys.executable, "-c", CLIENT, json.dumps(hosts.addresses[:4]), daemons.client_key, daemons.known_hosts, str(per_host), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def read_marked(process: subprocess.Popen, marker: str, timeout: float) -> dict:
    """The JSON after ``marker`` on the line of the client's output that starts with it."""
    return json.loads(read_lines(process, marker, timeout)[-1][len(marker):])


def read_lines(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Lines of ``process``'s output up to the first that starts with ``marker``; on failure, its stderr too."""

    def stderr() -> str:
        process.kill()
        _, err = process.communicate(timeout=30)
        return f"stderr:\n{err[-6000:]}"

    return read_lines_until(process, marker, timeout, starts=True, describe=stderr)


def assert_hosts_drain(hosts, daemons) -> float:
    """Every host is left with its sshd only, within DRAIN_TIMEOUT; how long that took."""
    start = time.monotonic()
    while True:
        left = {ns: daemons.pids(ns) for ns in hosts.names[:4]}
        if not any(left.values()):
            return time.monotonic() - start
        if time.monotonic() - start > DRAIN_TIMEOUT:
            described = {ns: [_cmdline(pid) for pid in pids] for ns, pids in left.items() if pids}
            raise AssertionError(f"processes left on the hosts: {described}")
        time.sleep(0.1)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: (gone)"


def test_sshcluster_runs_the_seed_session_and_a_dask_graph_then_leaves_nothing(ssh_hosts):
    hosts, daemons = ssh_hosts
    client = start_client(hosts, daemons, per_host=2, mode="run")
    try:
        report = read_marked(client, "REPORT ", CLIENT_TIMEOUT)
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
        client.stdout.close()
        client.stderr.close()
    assert len(report["workers"]) == 8, report  # 4 hosts x 2, the Center's host too
    assert {w.rsplit(":", 1)[0] for w in report["workers"]} == set(hosts.addresses[:4])
    assert report["secure"] and report["stranger"] == "no answer"  # CURVE on by default off loopback
    assert report["total"] == -285 and report["A"] == [x**2 for x in range(10)] and report["available"] == 8
    assert report["dask"] == 2 * (100_000 * 99_999 // 2) + 100_000
    assert report["after_scale_down"] == 2 and report["units_after_scale_down"] == 1
    assert report["log_names"][0] == "center" and report["center_log_has_start"]
    assert report["repr"].startswith("<SSHCluster center=") and "units=4 x 2" in report["repr"]
    drained = assert_hosts_drain(hosts, daemons)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in report["pids"])
    print(f"SSHCluster 4 hosts x 2 workers: up and registered in {report['start_s']:.1f} s, close() {report['close_s']:.1f} s, "
          f"hosts empty {drained:.1f} s after")


def test_remote_processes_stop_when_the_client_dies(ssh_hosts):
    hosts, daemons = ssh_hosts
    client = start_client(hosts, daemons, per_host=1, mode="die")
    try:
        report = read_marked(client, "READY ", CLIENT_TIMEOUT)
        assert len(report["workers"]) == 4
        client.send_signal(signal.SIGKILL)  # no close(), no atexit: the connections just drop
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
        client.stdout.close()
        client.stderr.close()
    drained = assert_hosts_drain(hosts, daemons)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in report["pids"])
    print(f"client SIGKILLed: every host empty {drained:.1f} s later")


def test_zdist_ssh_command(ssh_hosts, tmp_path):
    hosts, daemons = ssh_hosts
    center_file = tmp_path / "center.json"
    command = subprocess.Popen(
        ["ip", "netns", "exec", hosts.names[4], sys.executable, "-m", "zdist_cli.main", "ssh", *hosts.addresses[:3],
         "--user", "root", "-i", daemons.client_key, "--known-hosts", daemons.known_hosts, "--remote-python", sys.executable,
         "--worker-option", "ncores=1", "--center-file", str(center_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        lines = read_lines(command, "Key: ", CLIENT_TIMEOUT)
        assert lines[0].startswith(f"Start center at {hosts.addresses[0]}:") and lines[1].startswith("Workers: 2 on 2 hosts"), lines
        key = lines[-1].split()[1]
        use = subprocess.run(
            ["ip", "netns", "exec", hosts.names[4], sys.executable, "-c",
             "import sys; from zdist import Pool, Security; from zdist.deploy import read_center_file\n"
             "with Pool(read_center_file(sys.argv[1], timeout=30), security=Security(key=sys.argv[2])) as pool:\n"
             "    print(pool.gather(pool.map(abs, [-1, -2, -3])), len(pool.available_cores))",
             str(center_file), key],
            capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        )
        assert use.stdout.strip() == "[1, 2, 3] 2", use.stderr
        assert json.loads(center_file.read_text())["public_key"]
        command.send_signal(signal.SIGINT)
        assert command.wait(60) == 0, command.stderr.read()[-4000:]
        assert not center_file.exists()
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(30)
        command.stdout.close()
        command.stderr.close()
    assert_hosts_drain(hosts, daemons)


def test_the_ssh_example_of_the_docs_runs_as_written(ssh_hosts):
    """docs/deploying-ssh.md's example, with only its host names, user and Python replaced."""
    import pathlib
    import re

    hosts, daemons = ssh_hosts
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "deploying-ssh.md").read_text()
    code = re.search(r"<!-- ssh-example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    replaced = (
        code.replace('["node0", "node1", "node2"]', json.dumps(hosts.addresses[:3]))
        .replace('{"username": "me"}', repr({"username": "root", "client_keys": [daemons.client_key], "known_hosts": daemons.known_hosts}))
        .replace('"/opt/venv/bin/python"', repr(sys.executable))
    )
    assert replaced.count(hosts.addresses[0]) == 1 and daemons.client_key in replaced and sys.executable in replaced
    ran = subprocess.run(["ip", "netns", "exec", hosts.names[4], sys.executable, "-c", replaced], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert ran.returncode == 0, ran.stderr[-4000:]
    lines = ran.stdout.splitlines()
    assert lines[0] == "[1, 2, 3]" and lines[1].startswith(f"Start center at {hosts.addresses[0]}:"), ran.stdout
    assert_hosts_drain(hosts, daemons)
