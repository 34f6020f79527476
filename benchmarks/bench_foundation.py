"""Foundation numbers: rpc latency, worker-to-worker bandwidth, receiver memory.

    python benchmarks/bench_foundation.py [--size-mb 100] [--repeat 5] [--latency-calls 3000] [--quick] [--no-dask] [--hugetlb]
                                          [--protocol ipc|tcp|both]

``--protocol`` picks how the zdist LocalCluster listens: ``ipc`` (Unix
sockets in a private directory, the default of a LocalCluster), ``tcp``
(127.0.0.1), or ``both`` (the default here): two clusters, measured
interleaved like everything else, side by side in (a) and (b).

Measures in one run, side by side, on 127.0.0.1 (every port picked by the
OS, every process stopped in a ``finally``). All contestants are started
first and then measured *interleaved* (round after round, in rotating
order), so that a burst of load from elsewhere on a shared machine hits them
alike rather than whichever happened to run at that moment.

(a) Round-trip latency, median over ``--latency-calls`` calls (taken in ten
    alternating chunks) after a warm-up: ``await rpc(worker).ping()`` from
    this process to a zdist worker subprocess of a
    :class:`zdist.LocalCluster`, against a raw pyzmq DEALER -> ROUTER round
    trip (one small frame, blocking client) to a tiny echo server
    subprocess. Target: rpc within 3x of raw pyzmq.

(b) Bandwidth of moving a ``--size-mb`` NumPy array (random float64, so
    incompressible) between two processes; best (and median) of
    ``--repeat``:

    - zdist, worker to worker: the array is put on worker A with
      ``update_data`` (untimed); then we time
      ``await rpc(B).compute(function=nbytes_of, keys=['x'], key='n')``:
      B lacks 'x', asks the Center ``who_has``, fetches it from A with
      ``get_data`` (peer to peer), stores it, and runs the trivial
      ``x.nbytes``. The time is end to end, so it also holds the small
      messages around the transfer (client->B, B->Center and back, the
      get_data request, the reply): a few milliseconds at most. B's copy
      is dropped with ``delete_data`` between repeats.
    - raw pyzmq: this process (DEALER) asks a server subprocess (ROUTER)
      for the buffer and times until ``recv_multipart(copy=False)``
      returns; the server sends the array's memory with ``copy=False`` as
      ONE frame, as 1 MiB frames, and as frames of zdist's ``FRAME_SIZE``.
      "best raw" is the best of those. One more row has the receiver also
      join 1 MiB frames into one new array (what zdist's decoder does with
      a value split into frames); it is a diagnostic, not part of "best".
    - dask.distributed on a 2-worker ``distributed.LocalCluster``
      (processes, 1 thread each, no dashboard): each repeat makes a fresh
      array on worker A (``client.submit(np.copy, seed, workers=[A])`` of a
      random array made there once; waited for, untimed), then times ``client.submit(nbytes_of, x, workers=[B])
      .result()``, which makes B fetch x from A through dask's own
      ``Worker.gather_dep`` path. That end-to-end time carries dask's
      scheduling delays (batched sends every few ms), so we also read the
      duration of that very transfer from B's
      ``Worker.transfer_incoming_log`` (timed inside B around
      ``get_data_from_worker``, deserialization included) and compare zdist
      against the better of the two dask figures.

(c) Memory of the receiving zdist worker B (and, for comparison, dask's
    worker B): RSS (psutil on its pid) before its first fetch, after it,
    and the peak while it runs, sampled every ~2 ms from a thread here.
    Growth should stay near the array's size: no extra copy kept.

``--hugetlb`` runs every process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``,
so that large ``malloc``'d buffers (libzmq's receive buffers among them) are
backed by transparent huge pages: on a VM a first touch of a 4 KiB page is
expensive, and a received 100 MB frame is 24,000 of them.

Numbers on a shared 2-core machine move from run to run; run it a few times
(and prefer ``--repeat 10`` there).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import zmq

MiB = 2**20
TIME_LIMIT = 300.0  # seconds the measuring rounds may take, all together
RECV_TIMEOUT_MS = 60_000
LATENCY_CHUNKS = 10


def nbytes_of(x):
    return x.nbytes


def make_array(nbytes, seed=0):
    return np.random.default_rng(seed).random(nbytes // 8)


# ---------------------------------------------------------------- helpers


class PeakRSS:
    """Sample a process's RSS from a thread every ``interval`` seconds; keep the peak."""

    def __init__(self, pid, interval=0.002, limit=120.0):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.limit = limit
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self):
        return self.process.memory_info().rss

    def _run(self):
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.rss())


def stop_process(process):
    process.join(2)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()


# ---------------------------------------------------------------- raw pyzmq


def _raw_server(conn, nbytes, ipc_directory=None):
    """ROUTER (on 127.0.0.1, or a Unix socket in ``ipc_directory``): echoes b'ping'; answers [b'send', frame_size] with the buffer, zero-copy."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if ipc_directory is None:
        endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        endpoint = f"ipc://{ipc_directory}/raw"
        sock.bind(endpoint)
    view = memoryview(make_array(nbytes, seed=1)).cast("B")
    conn.send(endpoint)
    conn.close()
    deadline = time.monotonic() + 30 * 60
    try:
        while time.monotonic() < deadline:
            if not sock.poll(1000):
                if os.getppid() == 1:  # the benchmark died without telling us
                    break
                continue
            frames = sock.recv_multipart()
            identity, command = frames[0], frames[1]
            if command == b"ping":
                sock.send_multipart(frames)
            elif command == b"send":
                size = int(frames[2])
                parts = [view] if size <= 0 else [view[i : i + size] for i in range(0, len(view), size)]
                sock.send_multipart([identity, *parts], copy=False)
            elif command == b"stop":
                break
    finally:
        sock.close(0)
        ctx.term()


class Raw:
    """A raw pyzmq server subprocess and a blocking DEALER talking to it, over tcp (127.0.0.1) or ipc."""

    def __init__(self, nbytes, protocol="tcp"):
        self.nbytes = nbytes
        self.ipc_directory = tempfile.mkdtemp(prefix="bench-raw-") if protocol == "ipc" else None
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        self.server = spawn.Process(target=_raw_server, args=(child, nbytes, self.ipc_directory), daemon=True)
        self.server.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        try:
            if not parent.poll(60):
                raise RuntimeError("the raw pyzmq server did not start")
            self.sock.connect(parent.recv())
        except BaseException:
            self.close()
            raise

    def ping_samples(self, n):
        sock, samples = self.sock, []
        for _ in range(n):
            start = time.perf_counter()
            sock.send(b"ping")
            sock.recv()
            samples.append(time.perf_counter() - start)
        return samples

    def fetch(self, frame_size, join=False):
        nbytes = self.nbytes
        start = time.perf_counter()
        self.sock.send_multipart([b"send", str(frame_size).encode()])
        frames = self.sock.recv_multipart(copy=False)
        if join:
            out = np.empty(nbytes, dtype=np.uint8)
            offset = 0
            for frame in frames:
                n = len(frame)
                out[offset : offset + n] = np.frombuffer(frame.buffer, dtype=np.uint8)
                offset += n
            del frames
            elapsed = time.perf_counter() - start
            assert offset == nbytes
            return elapsed
        elapsed = time.perf_counter() - start
        assert sum(len(frame) for frame in frames) == nbytes
        return elapsed

    def close(self):
        try:
            if self.server.is_alive() and not self.sock.closed:
                self.sock.send_multipart([b"stop"], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(0)
        self.ctx.term()
        stop_process(self.server)
        if self.ipc_directory is not None:
            shutil.rmtree(self.ipc_directory, ignore_errors=True)


# ---------------------------------------------------------------- zdist


class Zdist:
    """A zdist LocalCluster (Center + 2 worker subprocesses) and a loop to drive rpc on."""

    def __init__(self, nbytes, protocol="ipc"):
        from zdist import LocalCluster

        self.nbytes = nbytes
        self.protocol = protocol
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, protocol=protocol).start()
        self.loop = asyncio.new_event_loop()
        try:
            self.a_address, self.b_address = self.cluster.worker_addresses[:2]
            self.run(self._setup())
        except BaseException:
            self.close()
            raise

    def run(self, coroutine):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 300))

    async def _setup(self):
        from zdist import rpc

        self.a = rpc(self.a_address, timeout=120)
        self.b = rpc(self.b_address, timeout=120)
        x = make_array(self.nbytes)
        await self.a.update_data(data={"x": x})
        self.pid_b = (await self.b.metrics())["pid"]

    async def _ping_samples(self, n):
        ping, samples = self.b.ping, []
        for _ in range(n):
            start = time.perf_counter()
            await ping()
            samples.append(time.perf_counter() - start)
        return samples

    def ping_samples(self, n):
        return self.run(self._ping_samples(n))

    async def _fetch(self):
        start = time.perf_counter()
        status, meta = await self.b.compute(function=nbytes_of, keys=["x"], key="n")
        elapsed = time.perf_counter() - start
        assert meta["nbytes"] > 0
        await self.b.delete_data(keys=["x", "n"])
        return elapsed

    def fetch(self):
        return self.run(self._fetch())

    def first_fetch_memory(self):
        """B's RSS before, after and at the peak of its first (cold) fetch of x."""
        gc.collect()
        time.sleep(0.2)
        sampler = PeakRSS(self.pid_b)
        before = sampler.rss()
        with sampler:
            self.run(self.b.compute(function=nbytes_of, keys=["x"], key="n"))
        after = sampler.rss()
        self.run(self.b.delete_data(keys=["x", "n"]))
        return {"before": before, "after": after, "peak": sampler.peak}

    def rss_b(self):
        return psutil.Process(self.pid_b).memory_info().rss

    def get_data_to_client(self):
        """For diagnosis: A -> this process with get_data (no Center, no compute)."""

        async def get():
            start = time.perf_counter()
            d = await self.a.get_data(keys=["x"])
            elapsed = time.perf_counter() - start
            assert d["x"].nbytes == self.nbytes
            return elapsed

        return self.run(get())

    def close(self):
        try:
            for name in ("a", "b"):
                proxy = getattr(self, name, None)
                if proxy is not None:
                    proxy.close()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
        finally:
            self.cluster.close()


# ---------------------------------------------------------------- dask.distributed


def _last_transfer(dask_worker):
    log = list(dask_worker.transfer_incoming_log)
    return log[-1] if log else None


def _nkeys(dask_worker):
    return len(dask_worker.data)


class Dask:
    """A 2-worker distributed.LocalCluster (processes, 1 thread each, no dashboard)."""

    def __init__(self, nbytes):
        import logging

        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.nbytes = nbytes
        # No dashboard; the scheduler's HTTP server (always started) on a free port, not 8787.
        self.cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
        try:
            self.client = Client(self.cluster)
            self.a_address, self.b_address = sorted(self.client.scheduler_info()["workers"])
            self.pid_b = self.client.run(os.getpid, workers=[self.b_address])[self.b_address]
            # One random (incompressible) array on A, copied on A for every repeat.
            self.seed = self.client.submit(make_array, nbytes, workers=[self.a_address], allow_other_workers=False, pure=False)
            self.seed.result()
        except BaseException:
            self.cluster.close()
            raise

    def _settle(self):
        """Wait until B has dropped everything from the previous repeat."""
        client, b = self.client, self.b_address
        deadline = time.monotonic() + 10
        while client.run(_nkeys, workers=[b])[b] and time.monotonic() < deadline:
            time.sleep(0.02)

    def fetch(self, sample_memory=False):
        """(end-to-end seconds, seconds in B's transfer log, memory dict or None)."""
        from distributed import wait

        client = self.client
        x = client.submit(np.copy, self.seed, workers=[self.a_address], allow_other_workers=False, pure=False)
        wait(x)
        self._settle()
        sampler = PeakRSS(self.pid_b) if sample_memory else None
        before = sampler.rss() if sampler else 0
        if sampler:
            sampler.__enter__()
        try:
            start = time.perf_counter()
            n = client.submit(nbytes_of, x, workers=[self.b_address], allow_other_workers=False, pure=False)
            assert n.result() == self.nbytes
            elapsed = time.perf_counter() - start
        finally:
            if sampler:
                sampler.__exit__()
        mem = {"before": before, "after": sampler.rss(), "peak": sampler.peak} if sampler else None
        log = client.run(_last_transfer, workers=[self.b_address])[self.b_address]
        transfer = log["duration"] if log and log["total"] >= self.nbytes else float("inf")
        del n, x
        return elapsed, transfer, mem

    def close(self):
        try:
            self.client.close()
        finally:
            self.cluster.close()


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0, help="array size in MB (10**6 bytes); default 100")
    parser.add_argument("--repeat", type=int, default=5, help="bandwidth repeats, best taken; default 5")
    parser.add_argument("--latency-calls", type=int, default=3000, help="timed round trips of each kind; default 3000")
    parser.add_argument("--quick", action="store_true", help="short run: 2 repeats, 500 round trips")
    parser.add_argument("--no-dask", action="store_true", help="skip dask.distributed")
    parser.add_argument("--protocol", choices=["ipc", "tcp", "both"], default="both", help="zdist over ipc:// (private), tcp:// loopback, or both side by side (default)")
    parser.add_argument(
        "--hugetlb",
        action="store_true",
        help="run every process (this one, raw server, zdist and dask nodes) with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
        "(transparent huge pages for large malloc'd buffers, such as the ones libzmq receives into)",
    )
    args = parser.parse_args()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.hugetlb and "glibc.malloc.hugetlb" not in tunables:
        # glibc reads its tunables at process start: start again with them set.
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"])))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    repeat, n_latency, warmup = max(1, args.repeat), max(LATENCY_CHUNKS, args.latency_calls), 300
    if args.quick:
        repeat, n_latency, warmup = min(repeat, 2), min(n_latency, 500), 50
    nbytes = int(args.size_mb * 1e6) // 8 * 8
    size_label = f"{nbytes / 1e6:g} MB"

    from zdist.protocol import message

    frame_size = message.FRAME_SIZE
    raw_variants = [
        ("raw pyzmq, one frame", 0, False),
        ("raw pyzmq, 1 MiB frames", MiB, False),
        (f"raw pyzmq, {frame_size / MiB:g} MiB frames (zdist FRAME_SIZE)", frame_size, False),
        ("raw pyzmq, 1 MiB frames + join into one array (diagnostic)", MiB, True),
    ]
    print(
        f"python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; array {size_label}, best of {repeat}, latency median of {n_latency}"
        f"{'; GLIBC_TUNABLES=' + os.environ['GLIBC_TUNABLES'] if os.environ.get('GLIBC_TUNABLES') else ''}",
        flush=True,
    )

    protocols = ["ipc", "tcp"] if args.protocol == "both" else [args.protocol]
    raw = z = z2 = d = None
    try:
        raw = Raw(nbytes)
        z = Zdist(nbytes, protocols[0])
        z2 = Zdist(nbytes, protocols[1]) if len(protocols) > 1 else None
        d = None if args.no_dask else Dask(nbytes)
        deadline = time.monotonic() + TIME_LIMIT

        # (a) latency, in alternating chunks after a warm-up.
        raw.ping_samples(warmup)
        z.ping_samples(warmup)
        if z2:
            z2.ping_samples(warmup)
        raw_lat, z_lat, z2_lat = [], [], []
        for _ in range(LATENCY_CHUNKS):
            raw_lat += raw.ping_samples(n_latency // LATENCY_CHUNKS)
            z_lat += z.ping_samples(n_latency // LATENCY_CHUNKS)
            if z2:
                z2_lat += z2.ping_samples(n_latency // LATENCY_CHUNKS)
            if time.monotonic() > deadline:
                break

        # (c) the first, cold fetch of each receiving worker, memory sampled (also a warm-up).
        z_mem = z.first_fetch_memory()
        if z2:
            z2.first_fetch_memory()
        d_mem = d.fetch(sample_memory=True)[2] if d else None
        for _, size, join in raw_variants:
            raw.fetch(size, join)

        # (b) bandwidth: rounds, each contestant once per round, in rotating order.
        contestants = [(label, lambda size=size, join=join: raw.fetch(size, join)) for label, size, join in raw_variants]
        contestants.append(("zdist", z.fetch))
        if z2:
            contestants.append(("zdist other protocol", z2.fetch))
        if d:
            contestants.append(("dask", d.fetch))
        times: dict = {label: [] for label, _ in contestants}
        if d:
            times["dask transfer log"] = []
        for r in range(repeat):
            for label, function in contestants[r % len(contestants) :] + contestants[: r % len(contestants)]:
                result = function()
                if label == "dask":
                    times["dask"].append(result[0])
                    times["dask transfer log"].append(result[1])
                else:
                    times[label].append(result)
            if time.monotonic() > deadline:
                print(f"(stopped after {r + 1} rounds: time limit)")
                break
        get_data_times = [z.get_data_to_client() for _ in range(max(2, min(repeat, 3)))]
        time.sleep(0.2)
        z_mem["after_delete"] = z.rss_b()
    finally:
        for side in (d, z2, z, raw):
            if side is not None:
                try:
                    side.close()
                except Exception as exc:  # keep closing the others
                    print(f"error while closing {type(side).__name__}: {exc}", file=sys.stderr)

    best = {label: nbytes / min(v) for label, v in times.items()}
    median = {label: nbytes / statistics.median(v) for label, v in times.items()}
    raw_rtt, z_rtt = statistics.median(raw_lat), statistics.median(z_lat)
    best_raw_label = max((label for label, _, join in raw_variants if not join), key=best.get)
    best_raw = best[best_raw_label]

    width = 64
    print()
    print(f"{'(a) round trip of a tiny message':{width}}{'median us':>12}")
    print(f"{'raw pyzmq DEALER->ROUTER echo':{width}}{raw_rtt * 1e6:12.1f}")
    print(f"{f'zdist await rpc(worker).ping(), {protocols[0]}':{width}}{z_rtt * 1e6:12.1f}")
    if z2_lat:
        print(f"{f'zdist await rpc(worker).ping(), {protocols[1]}':{width}}{statistics.median(z2_lat) * 1e6:12.1f}")
    print()
    print(f"{f'(b) {size_label} from one process to another':{width}}{'best GB/s':>12}{'median':>9}")
    rows = [(label, label) for label, _, _ in raw_variants]
    rows.append((f"zdist worker A -> worker B (compute on B fetches x), {protocols[0]}", "zdist"))
    if z2_lat:
        rows.append((f"zdist worker A -> worker B, {protocols[1]}", "zdist other protocol"))
    if d:
        rows.append(("dask.distributed A -> B, submit().result() end to end", "dask"))
        rows.append(("dask.distributed A -> B, the transfer in B's log", "dask transfer log"))
    for title, label in rows:
        print(f"{title:{width}}{best[label] / 1e9:12.2f}{median[label] / 1e9:9.2f}")
    print(f"{'zdist rpc(A).get_data -> client (diagnostic)':{width}}{nbytes / min(get_data_times) / 1e9:12.2f}"
          f"{nbytes / statistics.median(get_data_times) / 1e9:9.2f}")
    print()
    print(f"{'(c) receiving worker, RSS in MB':{width}}{'before':>8}{'after':>8}{'peak':>8}{'growth':>8}{'peak-bef':>9}")

    def mem_row(title, m):
        print(f"{title:{width}}{m['before'] / 1e6:8.0f}{m['after'] / 1e6:8.0f}{m['peak'] / 1e6:8.0f}"
              f"{(m['after'] - m['before']) / 1e6:8.0f}{(m['peak'] - m['before']) / 1e6:9.0f}")

    mem_row("zdist worker B, first fetch", z_mem)
    if d_mem:
        mem_row("dask.distributed worker B, first fetch", d_mem)
    print(f"zdist worker B after all repeats, x deleted: {z_mem['after_delete'] / 1e6:.0f} MB")
    print()
    ratio_rtt = z_rtt / raw_rtt
    ratio_raw = best["zdist"] / best_raw
    verdict = lambda ok: "OK" if ok else "MISSED"  # noqa: E731
    print(f"latency:   zdist rpc / raw pyzmq                 = {ratio_rtt:5.2f}x  (target <= 3x)   {verdict(ratio_rtt <= 3)}")
    print(f"bandwidth: zdist / best raw pyzmq                = {ratio_raw:5.0%}   (target >= 70%)  {verdict(ratio_raw >= 0.7)}"
          f"   best raw: {best_raw_label}")
    if d:
        best_dask = max(best["dask"], best["dask transfer log"])
        ratio_dask = best["zdist"] / best_dask
        print(f"bandwidth: zdist / dask.distributed (its best)   = {ratio_dask:5.2f}x  (target > 1x)    {verdict(ratio_dask > 1)}")
    if z2_lat:
        rtt2, bw2 = statistics.median(z2_lat), best["zdist other protocol"]
        print(f"protocol:  round trip {protocols[0]} / {protocols[1]}             = {z_rtt / rtt2:5.2f}x  (target <= 1x)    {verdict(z_rtt <= rtt2)}")
        print(f"protocol:  bandwidth {protocols[0]} / {protocols[1]}              = {best['zdist'] / bw2:5.2f}x  (target >= ~1x)")
    growth = (z_mem["after"] - z_mem["before"]) / nbytes
    peak = (z_mem["peak"] - z_mem["before"]) / nbytes
    print(f"memory:    zdist B growth / array size           = {growth:5.2f}   (target <= ~1)   {verdict(growth <= 1.1)}"
          f"   peak growth / array size = {peak:.2f}")


if __name__ == "__main__":
    main()
