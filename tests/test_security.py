"""CURVE authentication and encryption, and safe defaults."""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import stat
import subprocess
import sys

import pytest
import zmq

import zdist
from zdist import Pool, rpc
from zdist.security import Security, create_keys

from .conftest import make_cluster, wait_for


def test_zdist_keys_writes_a_key_pair(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zdist_cli.keys", str(tmp_path / "keys")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "keys" / "zdist.key", tmp_path / "keys" / "zdist.key_secret"
    assert public.exists() and secret.exists()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert "Secret key:" in out.stdout
    again = subprocess.run([sys.executable, "-m", "zdist_cli.keys", str(tmp_path / "keys")], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "exists already" in again.stderr
    named = subprocess.run([sys.executable, "-m", "zdist_cli.keys", str(tmp_path / "keys"), "--name", "alice"], capture_output=True, text=True, timeout=30)
    assert named.returncode == 0 and (tmp_path / "keys" / "alice.key_secret").exists()


def test_security_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="zdist-keys"):
        Security(key=str(tmp_path / "missing.key_secret"))
    public, _ = create_keys(str(tmp_path))
    with pytest.raises(ValueError, match="secret key file"):
        Security(key=public)


def _node_logs(cluster) -> str:
    return "".join(open(path, errors="replace").read() for path in glob.glob(os.path.join(cluster.log_directory, "*.log")))


def test_secure_cluster_works_and_refuses_strangers(tmp_path):
    with make_cluster(2, security=True) as cluster:
        with Pool(cluster.center_address, security=cluster.security) as pool:
            assert pool.gather(pool.map(lambda x: x * 2, range(6))) == [0, 2, 4, 6, 8, 10]
            a = pool.scatter([5], workers=[cluster.worker_addresses[0]])[0]
            assert pool.apply(lambda x: x + 1, (a,)).get() == 6

            async def ask(security, address):
                async with rpc(address, timeout=1.0, security=security) as node:
                    connection = node.connection
                    result = await node.ping()
                    return result, connection.stream.sock.getsockopt(zmq.MECHANISM)

            # An authorized client works, over CURVE (encrypted).
            assert asyncio.run(ask(cluster.security, cluster.worker_addresses[0])) == ("pong", zmq.CURVE)
            stranger = Security.temporary()
            try:
                for address in [cluster.center_address, *cluster.worker_addresses]:
                    with pytest.raises(zdist.RPCTimeoutError):
                        asyncio.run(ask(None, address))  # no key at all
                    with pytest.raises(zdist.RPCTimeoutError):
                        asyncio.run(ask(stranger, address))  # a key nobody authorized
            finally:
                stranger.cleanup()
            # The stranger could not read data either: its request never reached a handler.
            assert pool.gather([a]) == [5]
        wait_for(lambda: "refused a connection" in _node_logs(cluster), message="nodes log refusals")


def test_per_node_key_pairs(tmp_path):
    """Each node its own key pair; the authorized directory holds every public key."""
    keys = tmp_path / "keys"
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    pairs = {}
    for name in ["center", "w0", "w1", "client"]:
        public, secret = create_keys(str(keys), name)
        os.link(public, authorized / os.path.basename(public))
        pairs[name] = secret

    async def main():
        center = await zdist.Center(security=Security(pairs["center"], str(authorized))).start()
        client_security = Security(pairs["client"], str(authorized))
        client_security.server_keys[center.address] = Security(pairs["center"]).public_key
        workers = []
        try:
            for name in ["w0", "w1"]:
                security = Security(pairs[name], str(authorized))
                security.server_keys[center.address] = Security(pairs["center"]).public_key
                workers.append(await zdist.Worker(center.address, security=security, heartbeat_interval=0.1).start())
            for worker in workers:
                await asyncio.wait_for(worker.registered.wait(), 10)
            async with rpc(center.address, timeout=5, security=client_security) as c:
                client_security.learn(await c.workers())
            w0, w1 = (rpc(w.address, timeout=5, security=client_security) for w in workers)
            await w0.update_data(data={"a": 1})
            await w1.update_data(data={"b": 2})
            status, meta = await w0.compute(function=lambda x, y: x + y, keys=["a", "b"], key="c")  # w0 fetches b from w1
            value = await w0.get_data(keys=["c"])
            w0.close()
            w1.close()
            return value
        finally:
            for worker in workers:
                await worker.stop()
            await center.stop()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == {"c": 3}


def test_binding_beyond_loopback_without_security_warns(caplog):
    async def main():
        # Bound only for a moment; no traffic is sent anywhere.
        center = zdist.Center(host="0.0.0.0", port=0)
        await center.start()
        await center.stop()

    with caplog.at_level(logging.WARNING, logger="zdist.node"):
        asyncio.run(main())
    assert "anyone who can reach this port can run code" in caplog.text
    assert "zdist-keys" in caplog.text
