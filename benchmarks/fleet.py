"""A fleet of simulated workers against one real Center: what the control plane costs at scale.

    python benchmarks/fleet.py [--workers 1000] [--keys 1000000] [--processes 4] [--window 10] [--json FILE]

The workers are real :class:`zdist.Worker` nodes (each its own ROUTER
socket, its own DEALER to the Center, its own heartbeat loop and batched key
reports), packed many to a process on one asyncio loop, so that a 2-core
machine can put 1,000 of them on a Center that runs as its own process
(``python -m zdist.run center``, default settings, in the environment
zdist's launchers give a node: ``zdist.deploy.local.node_environment``). The fleet:

1. registers (``--workers`` in ``--processes`` host processes, plus one
   host of a single worker that is killed at the end);
2. sits idle for ``--window`` seconds: the Center's CPU share (psutil on its
   pid) and the heartbeats it handled per second;
3. reports ``--keys`` keys (each worker stores its share with
   ``update_data``; the Center learns them from the workers' batched
   ``add_keys``): the time until the Center knows them all, its RSS growth
   per key;
4. answers queries: ``who_has`` of 1,000 random keys (median, p99), the
   Center's ``info`` (the whole table) and a client session's look at the
   membership (``info(since=...)``: only what changed), and small tasks
   (``compute_batch`` of one ``inc`` to workers picked at random);
5. loses a worker (SIGKILL): the time until the Center drops it.

Every phase is bounded in time; every process started is stopped by pid at
the end, even on failure. Prints one table; asserts nothing about time.
``run_fleet`` is what ``tests/test_scale.py`` calls, reduced.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import time

import psutil

from zdist.deploy.local import node_environment

HERE = os.path.abspath(__file__)


# ---------------------------------------------------------------- a host process: many workers, one loop


async def _host(center: str, count: int, prefix: str, heartbeat_interval: float) -> None:
    """Start ``count`` workers; then obey lines on stdin: ``keys N`` (each stores N keys), ``quit``."""
    from zdist import Worker

    workers = [Worker(center, ncores=1, name=f"{prefix}-{i}", heartbeat_interval=heartbeat_interval) for i in range(count)]
    try:
        for worker in workers:
            await worker.start()
        deadline = time.monotonic() + 120
        while not all(w.registered.is_set() for w in workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prefix}: workers not registered within 120 s")
            await asyncio.sleep(0.05)
        _say("registered")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().split()
            if not line or line[0] == "quit":
                break
            if line[0] == "keys":
                per_worker = int(line[1])
                for worker in workers:
                    base = f"{prefix}-{worker.port}-"
                    worker.update_data(data={f"{base}{n}": n for n in range(per_worker)})
                    await asyncio.sleep(0.002)  # heartbeats go on meanwhile: this host is one of several on few cores
                _say("keys-stored")
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- the driver


class _Processes:
    """Processes started here, stopped by pid at the end (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str]) -> subprocess.Popen:
        # The environment zdist's own launchers give a node (huge pages for malloc: see node_environment).
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, env=node_environment())
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Hosts first ('quit': their workers unregister), then the Center (SIGTERM); SIGKILL whatever lingers."""
        center, hosts = self.procs[:1], self.procs[1:]
        for proc in hosts:
            if proc.poll() is None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):
                    pass
        self._wait(hosts, 20)
        for proc in center:
            if proc.poll() is None:
                proc.terminate()
        self._wait(center, 10)

    @staticmethod
    def _wait(procs: list, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _read_line(proc: subprocess.Popen, expect: str, timeout: float) -> str:
    """The first line of ``proc``'s stdout containing ``expect``, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"process {proc.pid} exited (status {proc.poll()}) before saying {expect!r}")
            if expect in line:
                return line
    raise TimeoutError(f"process {proc.pid} did not say {expect!r} within {timeout} s")


def _send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _quantiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"median_ms": statistics.median(samples) * 1e3, "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3}


def inc(x: int) -> int:
    return x + 1


async def _measure(center: str, center_pid: int, workers: int, keys: int, key_names: list, victim_address: str, samples: int) -> dict:
    """The queries of phase 4, from this process, as a client would."""
    from zdist import rpc
    from zdist.session import Session

    out: dict = {}
    async with rpc(center, timeout=30) as c:
        times = []
        for _ in range(samples):
            wanted = random.sample(key_names, min(1000, len(key_names)))
            start = time.perf_counter()
            where = await c.who_has(keys=wanted)
            times.append(time.perf_counter() - start)
            assert all(where[k] for k in wanted), "who_has lost keys"
        out["who_has_1000"] = _quantiles(times)
        times = []
        for _ in range(max(5, samples // 10)):
            start = time.perf_counter()
            info = await c.info()
            times.append(time.perf_counter() - start)
        out["info_full"] = _quantiles(times)
        out["info_full"]["workers"] = len(info["workers"])
        # A client session's look at the membership, as Pool/Executor/dask get do it every 0.25 s.
        session = Session(center)
        await session.open(30)
        try:
            times = []
            for _ in range(max(5, samples // 10)):
                start = time.perf_counter()
                await session.look()
                times.append(time.perf_counter() - start)
            out["session_look"] = _quantiles(times)
            out["session_look"]["delta"] = bool(getattr(session, "version", None) is not None)
        finally:
            session.users = 0
            await session.close()
        # Small tasks on workers picked at random: one compute_batch of one task each.
        addresses = [a for a in info["workers"] if a != victim_address]
        picked = random.sample(addresses, min(len(addresses), 200))
        start = time.perf_counter()
        conns = [rpc(a, timeout=30) for a in picked]
        try:
            replies = await asyncio.gather(*(conn.compute_batch(tasks=[[f"inc-{i}", inc, [i], {}, []]], return_values=100) for i, conn in enumerate(conns)))
        finally:
            for conn in conns:
                conn.close()
        out["small_tasks"] = {"tasks": len(picked), "seconds": time.perf_counter() - start, "ok": sum(r[0][1] == "ok" for r in replies)}
    return out


async def _wait_center(center: str, condition, timeout: float, interval: float = 0.1) -> dict:
    from zdist import rpc

    deadline = time.monotonic() + timeout
    async with rpc(center, timeout=30) as c:
        while True:
            info = await c.info()
            if condition(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Center did not reach the expected state within {timeout} s ({len(info['workers'])} workers, {info['nkeys']} keys)")
            await asyncio.sleep(interval)


async def _ops_served(center: str) -> dict:
    from zdist import rpc

    async with rpc(center, timeout=30) as c:
        try:
            return await c.ops_served()
        except Exception:  # an older Center without the op
            return {}


def run_fleet(workers: int = 1000, keys: int = 1_000_000, processes: int = 4, window: float = 10.0, samples: int = 200, center_args: tuple = (), heartbeat_interval: float = 0.5, say=print) -> dict:
    """Run the fleet benchmark; returns its figures (see the module docstring)."""
    procs = _Processes()
    result: dict = {"workers": workers, "keys": keys, "processes": processes}
    try:
        center_proc = procs.start([sys.executable, "-m", "zdist.run", "center", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", *center_args])
        center = _read_line(center_proc, "Start center at", 30).split("Start center at", 1)[1].strip()
        center_ps = psutil.Process(center_proc.pid)
        rss_empty = center_ps.memory_info().rss
        # Phase 1: register.
        start = time.perf_counter()
        sizes = [workers // processes + (1 if i < workers % processes else 0) for i in range(processes)]
        hosts = []
        for i, n in enumerate(sizes):
            if n:
                hosts.append(procs.start([sys.executable, HERE, "--serve", center, "--count", str(n), "--prefix", f"h{i}", "--heartbeat-interval", str(heartbeat_interval)]))
        victim = procs.start([sys.executable, HERE, "--serve", center, "--count", "1", "--prefix", "victim", "--heartbeat-interval", str(heartbeat_interval)])
        for host in [*hosts, victim]:
            _read_line(host, "registered", 180)
        info = asyncio.run(_wait_center(center, lambda info: len(info["workers"]) >= workers + 1, 60))
        result["register_s"] = time.perf_counter() - start
        victim_address = next(a for a, w in info["workers"].items() if w["name"].startswith("victim"))
        say(f"{workers + 1} workers registered in {result['register_s']:.1f} s (processes started included)")
        # Phase 2: idle. Let the heartbeat intervals settle first (the Center tells them on the first beats).
        time.sleep(min(window, 3.0))
        ops0, cpu0, t0 = asyncio.run(_ops_served(center)), _cpu(center_ps), time.perf_counter()
        time.sleep(window)
        ops1, cpu1, t1 = asyncio.run(_ops_served(center)), _cpu(center_ps), time.perf_counter()
        elapsed = t1 - t0
        result["idle_cpu_share"] = (cpu1 - cpu0) / elapsed
        result["heartbeats_per_s"] = (ops1.get("heartbeat", 0) - ops0.get("heartbeat", 0)) / elapsed if ops1 else None
        result["info_polls_per_s"] = (ops1.get("info", 0) - ops0.get("info", 0)) / elapsed if ops1 else None
        result["rss_workers_mb"] = center_ps.memory_info().rss / 2**20
        hb = result["heartbeats_per_s"]
        say(f"idle {elapsed:.1f} s: Center at {100 * result['idle_cpu_share']:.1f}% of a core, {hb if hb is None else round(hb)} heartbeats/s, RSS {result['rss_workers_mb']:.0f} MB")
        # Phase 3: keys.
        per_worker = keys // workers
        rss_before = center_ps.memory_info().rss
        cpu_keys = _cpu(center_ps)
        start = time.perf_counter()
        for host in hosts:
            _send(host, f"keys {per_worker}")
        for host in hosts:
            _read_line(host, "keys-stored", 300)
        total = per_worker * workers
        info = asyncio.run(_wait_center(center, lambda info: info["nkeys"] >= total, 300, interval=0.2))
        result["keys_reported"] = info["nkeys"]
        result["keys_s"] = time.perf_counter() - start
        result["keys_center_cpu_s"] = _cpu(center_ps) - cpu_keys  # the hosts storing the keys share the cores: this is the Center's part
        rss_after = center_ps.memory_info().rss
        result["rss_keys_mb"] = rss_after / 2**20
        result["bytes_per_key"] = (rss_after - rss_before) / max(1, total)
        say(f"{total} keys known to the Center in {result['keys_s']:.1f} s ({result['keys_center_cpu_s']:.1f} s of its CPU); RSS {rss_after / 2**20:.0f} MB ({result['bytes_per_key']:.0f} B a key; {rss_empty / 2**20:.0f} MB empty)")
        # Phase 4: queries. Key names as the hosts make them: prefix-port-n.
        key_names = []
        for address, w in info["workers"].items():
            if not w["name"].startswith("victim"):
                prefix = w["name"].rsplit("-", 1)[0]
                port = address.rsplit(":", 1)[1]
                key_names.extend(f"{prefix}-{port}-{n}" for n in range(0, per_worker, max(1, per_worker // 10)))
        cpu0, t0 = _cpu(center_ps), time.perf_counter()
        result.update(asyncio.run(_measure(center, center_proc.pid, workers, total, key_names, victim_address, samples)))
        w, f, s = result["who_has_1000"], result["info_full"], result["session_look"]
        say(f"who_has of 1000 keys: median {w['median_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms")
        say(f"info (whole table of {f['workers']} workers): median {f['median_ms']:.2f} ms; a session's look: median {s['median_ms']:.2f} ms ({'deltas' if s['delta'] else 'whole table'})")
        st = result["small_tasks"]
        say(f"{st['tasks']} small tasks on as many workers: {st['ok']} ok in {st['seconds'] * 1e3:.0f} ms")
        # Phase 5: a worker dies.
        start = time.perf_counter()
        victim.send_signal(signal.SIGKILL)
        info = asyncio.run(_wait_center(center, lambda info: victim_address not in info["workers"], 300, interval=0.05))
        result["dead_noticed_s"] = time.perf_counter() - start
        result["heartbeat_timeout"] = info.get("heartbeat_timeout")
        say(f"a killed worker dropped after {result['dead_noticed_s']:.1f} s (the Center's liveness timeout now {result['heartbeat_timeout']})")
        return result
    finally:
        procs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=4, help="host processes the workers are packed into")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of idle measured")
    parser.add_argument("--samples", type=int, default=200, help="who_has queries timed")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="the workers' own (shortest) heartbeat interval")
    parser.add_argument("--center-arg", action="append", default=[], help="extra argument for the Center (repeat)")
    parser.add_argument("--json", help="also write the figures to this file")
    # Internal: run as a host of simulated workers.
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_host(args.serve, args.count, args.prefix, args.heartbeat_interval))
        return 0
    result = run_fleet(args.workers, args.keys, args.processes, args.window, args.samples, tuple(args.center_arg), args.heartbeat_interval)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
