"""A local cluster is private by default: its nodes listen on Unix sockets in a directory only its user may open.

The test makes a second user account (removed after, even on failure) and
tries, as that user, to reach every node of a private LocalCluster: the
attempt gets no reply and the cluster runs nothing. As a control, the same
probe reaches a LocalCluster(protocol='tcp'), which any local user can.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid

import pytest

from zdist import Pool, rpc

from .conftest import make_cluster, run

SYSTEM_PYTHON = "/usr/bin/python3"  # the other user cannot run this venv's Python (it lives under /root)

#: Run as the other user with the standard library only: connect to each address and say
#: ZMTP's greeting; print what came back. A ZeroMQ node answers a greeting with its own.
PROBE = r"""
import json, socket, sys
for address in sys.argv[1:]:
    try:
        if address.startswith("ipc://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(3)
            sock.connect(address[len("ipc://"):])
        else:
            host, port = address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=3)
        sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03")
        reply = sock.recv(64)
        print(json.dumps({"address": address, "reply": reply.hex()}))
    except OSError as exc:
        print(json.dumps({"address": address, "error": type(exc).__name__}))
"""


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "making a second user account needs root"
    for program in ("useradd", "userdel", "runuser"):
        if shutil.which(program) is None:
            return f"no {program} on this machine"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON} for the other user to run"
    return None


@pytest.fixture
def other_user():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"zdist-{uuid.uuid4().hex[:8]}"
    subprocess.run([shutil.which("useradd"), "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=60)
    try:
        yield name
    finally:
        subprocess.run([shutil.which("userdel"), name], capture_output=True, timeout=60)


def probe_as(user: str, addresses: list[str]) -> list[dict]:
    out = subprocess.run(
        [shutil.which("runuser"), "-u", user, "--", SYSTEM_PYTHON, "-c", PROBE, *addresses], capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"}
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_another_local_user_cannot_reach_a_private_cluster(other_user):
    with make_cluster(2) as cluster:
        assert cluster.protocol == "ipc" and cluster.center_address.startswith("ipc://")
        directory = cluster._ipc_dir
        mode = os.stat(directory)
        assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.geteuid()
        nodes = [cluster.center_address, *cluster.worker_addresses]
        for result in probe_as(other_user, nodes):
            assert "reply" not in result, result  # not even ZeroMQ's greeting
            assert result["error"] == "PermissionError", result

        async def nothing_ran() -> list:
            metrics = []
            for address in cluster.worker_addresses:
                async with rpc(address, timeout=20) as worker:
                    metrics.append(await worker.metrics())
            return metrics

        for metrics in run(nothing_ran()):
            assert metrics["tasks_done"] == 0 and metrics["tasks_failed"] == 0 and metrics["nkeys"] == 0
        # Its own user still uses it.
        with Pool(cluster.center_address) as pool:
            assert pool.apply(sum, ([1, 2],)).get(timeout=60) == 3
    assert not os.path.exists(directory)  # removed on close


def test_the_probe_reaches_a_tcp_cluster(other_user):
    """The control: on TCP loopback every local user reaches the nodes (why ipc is the default)."""
    with make_cluster(1, protocol="tcp") as cluster:
        results = probe_as(other_user, [cluster.center_address, *cluster.worker_addresses])
    for result in results:
        assert result.get("reply", "").startswith("ff"), result  # a ZeroMQ greeting came back
