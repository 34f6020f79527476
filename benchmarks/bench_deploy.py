"""SSHCluster over four network-namespace hosts running real OpenSSH servers: start, close, adapt.

    sudo python benchmarks/bench_deploy.py [--per-host 2] [--repeat 1]

Builds the same hosts as tests/test_deploy_ssh.py (five namespaces on a
bridge, an sshd in four, the client in the fifth; needs root, ``ip`` and
``openssh-server``, which it installs with apt-get when missing) and prints:

- ``start``: seconds from ``SSHCluster(...)`` to all 4 x ``--per-host``
  workers registered (the constructor waits for them);
- ``close``: seconds ``close()`` takes, and then until no process of ours
  is left on any host (``ip netns pids``);
- ``adapt(1, 8)``: starting from one worker, seconds until adapt reached 8
  workers under a long ``pool.map`` of sleeps, and seconds from the end of
  the map until it was back to one (the target: within two heartbeat
  timeouts, here 2 x 5 s).

Everything it starts is stopped, and every namespace deleted, on the way out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENT = r'''
import json, sys, time
from zdist import Pool
from zdist.deploy import SSHCluster

hosts, key, known, per_host = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
connect = dict(username="root", client_keys=[key], known_hosts=known)
options = dict(connect_options=connect, remote_python=sys.executable, center_options={"heartbeat_timeout": 5})
out = {}
t0 = time.monotonic()
cluster = SSHCluster([hosts[0], *hosts], nworkers_per_host=per_host, worker_options={"ncores": per_host}, **options)
out["start_s"] = time.monotonic() - t0
out["workers"] = len(cluster.worker_addresses)
t0 = time.monotonic()
cluster.close()
out["close_s"] = time.monotonic() - t0
print("CLOSED " + json.dumps(out), flush=True)
sys.stdin.readline()  # the parent has counted what is left on the hosts

cluster = SSHCluster([hosts[0], *hosts], nworkers_per_host=1, worker_options={"ncores": 1}, **options)
cluster.scale(1)
deadline = time.monotonic() + 120
while len(cluster.worker_addresses) > 1 and time.monotonic() < deadline:
    time.sleep(0.1)
adaptive = cluster.adapt(minimum=1, maximum=8, interval=1.0, wait=3.0)
with Pool(cluster) as pool:
    t0 = time.monotonic()
    handles = pool.map_async(time.sleep, [0.5] * 400)
    while len(cluster.worker_addresses) < 8 and time.monotonic() < t0 + 300:
        time.sleep(0.1)
    out["grow_to_8_s"] = time.monotonic() - t0
    pool.gather(handles)
    del handles
    ended = time.monotonic()
    out["map_s"] = ended - t0
    while len(cluster.worker_addresses) > 1 and time.monotonic() < ended + 300:
        time.sleep(0.1)
    out["shrink_to_1_s"] = time.monotonic() - ended
out["adapt_log"] = [(round(t - adaptive.log[0][0], 1), what, n) for t, what, n in adaptive.log] if adaptive.log else []
cluster.close()
print("ADAPT " + json.dumps(out), flush=True)
'''


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next line of the client's output, within ``timeout`` seconds."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"the client printed nothing for {timeout:g} s")
        line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the client exited ({process.wait(30)}) before printing its figures")
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-host", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from tests.netns import Hosts, SSHDaemons, namespace_skip_reason

    reason = namespace_skip_reason() or SSHDaemons.skip_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    hosts = Hosts(5)
    daemons = None
    client = None
    try:
        hosts.build()
        daemons = SSHDaemons(hosts.names[:4], hosts.addresses[:4], tempfile.mkdtemp(prefix="zdist-bench-sshd-"))
        daemons.start()
        client = subprocess.Popen(
            ["ip", "netns", "exec", hosts.names[4], sys.executable, "-c", CLIENT, json.dumps(hosts.addresses[:4]), daemons.client_key, daemons.known_hosts, str(args.per_host)],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        closed = json.loads(read_line(client, 600).split(" ", 1)[1])
        t0 = time.monotonic()
        while any(daemons.pids(ns) for ns in hosts.names[:4]) and time.monotonic() < t0 + 60:
            time.sleep(0.05)
        drained = time.monotonic() - t0
        left = sum(len(daemons.pids(ns)) for ns in hosts.names[:4])
        client.stdin.write("go\n")
        client.stdin.flush()
        adapt = json.loads(read_line(client, 900).split(" ", 1)[1])
        client.wait(60)
        print(f"SSHCluster, 4 hosts x {args.per_host} workers (one host also runs the Center), real sshd in network namespaces:")
        print(f"  start: SSHCluster(...) to {closed['workers']} workers registered  {closed['start_s']:.1f} s")
        print(f"  close: close() {closed['close_s']:.1f} s, then nothing left on any host {drained:.1f} s later"
              + (f" ({left} processes STILL LEFT)" if left else ""))
        print(f"  adapt(1, 8) under pool.map of 400 x sleep(0.5): 1 -> 8 workers in {adapt['grow_to_8_s']:.1f} s "
              f"(map took {adapt['map_s']:.1f} s); back to 1 worker {adapt['shrink_to_1_s']:.1f} s after the map ended")
        print(f"  adapt's steps (s since the first, up/down, workers after): {adapt['adapt_log']}")
        return 0
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(30)
        if daemons is not None:
            daemons.stop()
        hosts.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
