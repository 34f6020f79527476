"""Spill throughput against numpy.save/load, restart latency with the nanny, and data 4x the memory limit.

    python benchmarks/bench_memory.py [--mb 400] [--kills 3]
    python benchmarks/bench_memory.py --four-x [--limit-mb 200] [--chunk-mb 20] [--workers 2]

Prints figures and ratios; asserts nothing (timings on a shared machine
vary). ``--four-x`` is issue 12's target: a map producing chunks whose total
is 4x the workers' combined memory limit (2 x 200 MB limits, 1.6 GB in 20 MB
chunks by default), then a reduction over all of them, on zdist (spilling to
disk) and on dask.distributed's LocalCluster with the same limits, in the
same run: wall time, the ratio, each system's peak worker RSS against its
limit, and what zdist spilled. dask.distributed is skipped, saying so, when
it is not installed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time

import numpy as np

from zdist import LocalCluster, rpc
from zdist.datastore import SpillStore


def spill_throughput(total_mb: int, chunk_mb: int = 50) -> None:
    """Spill and unspill against numpy.save/load of the same chunks, interleaved chunk by chunk.

    Interleaved because the disk is not one speed: the first few hundred MB
    written land in the page cache (GB/s), after which the kernel throttles
    writers to the device's speed; timing all spills first and all saves
    after (or the other way round) hands one side the cache and the other the
    device.
    """
    chunks = [np.random.default_rng(i).random(chunk_mb * 10**6 // 8) for i in range(max(1, total_mb // chunk_mb))]
    nbytes = sum(c.nbytes for c in chunks)
    spill = save = unspill = load = 0.0
    with tempfile.TemporaryDirectory() as d:
        store = SpillStore(os.path.join(d, "spill"), target=None)
        for i, c in enumerate(chunks):
            store[i] = c
        for i, c in enumerate(chunks):  # bounded: one spill and one save per chunk
            t = time.perf_counter()
            store.spill_one()
            spill += time.perf_counter() - t
            t = time.perf_counter()
            np.save(os.path.join(d, f"{i}.npy"), c)
            save += time.perf_counter() - t
        for i in range(len(chunks)):
            t = time.perf_counter()
            assert store.disk[i].nbytes == chunks[i].nbytes
            unspill += time.perf_counter() - t
            t = time.perf_counter()
            np.load(os.path.join(d, f"{i}.npy"))
            load += time.perf_counter() - t
        store.close()
    mb = nbytes / 2**20
    print(f"spill   {mb / spill:8.0f} MiB/s   numpy.save {mb / save:8.0f} MiB/s   ratio {save / spill:.2f}   (interleaved, chunk by chunk)")
    print(f"unspill {mb / unspill:8.0f} MiB/s   numpy.load {mb / load:8.0f} MiB/s   ratio {load / unspill:.2f}")


def restart_latency(kills: int) -> None:
    async def workers(center: str) -> dict:
        async with rpc(center, timeout=10) as c:
            return await c.workers()

    with LocalCluster(n_workers=1, nanny=True) as cluster:
        for n in range(1, kills + 1):
            (info,) = asyncio.run(workers(cluster.center_address)).values()
            os.kill(info["pid"], signal.SIGKILL)
            t = time.perf_counter()
            for _ in range(1000):  # bounded: 20 s
                now = asyncio.run(workers(cluster.center_address))
                if any(w["restarts"] == n for w in now.values()):
                    break
                time.sleep(0.02)
            print(f"restart {n}: registered again {time.perf_counter() - t:.2f} s after SIGKILL")


# ---------------------------------------------------------------- data 4x the memory limit


def make_chunk(i: int, chunk_mb: int) -> np.ndarray:
    """A chunk of ``chunk_mb`` MB, different for each ``i``."""
    return np.random.default_rng(i).random(chunk_mb * 10**6 // 8)


def chunk_sum(chunk: np.ndarray) -> float:
    return float(chunk.sum())


class PeakRSS:
    """The peak RSS of each process under this one, sampled every 50 ms on a thread."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self.stopped.wait(0.05):
            for child in self.me.children(recursive=True):
                try:
                    rss, cmd = child.memory_info().rss, " ".join(child.cmdline()[1:4])
                except psutil.Error:
                    continue
                if rss > self.peaks.get(child.pid, ("", 0))[1]:
                    self.peaks[child.pid] = (cmd, rss)

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)

    def top(self, n: int) -> list[int]:
        """The ``n`` highest peaks (the workers'; nannies and the Center stay small)."""
        return sorted((rss for _, rss in self.peaks.values()), reverse=True)[:n]


def four_x_zdist(workers: int, limit: int, nchunks: int, chunk_mb: int) -> tuple[float, float, list[int], dict]:
    from zdist import Pool

    with LocalCluster(n_workers=workers, memory_limit=limit) as cluster, PeakRSS() as peak:
        with Pool(cluster.center_address, timeout=600) as pool:
            t = time.perf_counter()
            chunks = pool.starmap(make_chunk, [(i, chunk_mb) for i in range(nchunks)])
            total = sum(pool.gather(pool.map(chunk_sum, chunks)))
            elapsed = time.perf_counter() - t

            async def spilled() -> dict:
                out = {"spilled": 0, "bytes_on_disk": 0, "restarts": 0}
                async with rpc(cluster.center_address, timeout=30) as center:
                    for info in (await center.workers()).values():
                        for field in out:
                            out[field] += int(info.get(field) or 0)
                return out

            stats = asyncio.run(spilled())
            pool.delete(chunks)
    return elapsed, total, peak.top(workers), stats


def four_x_dask(workers: int, limit: int, nchunks: int, chunk_mb: int) -> tuple[float, float, list[int]] | None:
    try:
        import distributed
    except ImportError:
        print("dask.distributed is not installed: skipping its side (pip install distributed)")
        return None
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)  # its memory warnings are expected here
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=limit, dashboard_address=None) as cluster, PeakRSS() as peak:
        with distributed.Client(cluster) as client:
            t = time.perf_counter()
            chunks = client.map(make_chunk, range(nchunks), chunk_mb=chunk_mb)
            sums = client.map(chunk_sum, chunks)
            total = sum(client.gather(sums))
            elapsed = time.perf_counter() - t
            del chunks, sums
    return elapsed, total, peak.top(workers)


def four_x(workers: int, limit_mb: int, chunk_mb: int) -> None:
    limit = limit_mb * 10**6
    nchunks = 4 * workers * limit_mb // chunk_mb
    print(f"data 4x the memory limit: {workers} workers x {limit_mb} MB limit, {nchunks} chunks of {chunk_mb} MB = {nchunks * chunk_mb / 1000:.1f} GB, then a sum over all")
    z_time, z_total, z_peaks, stats = four_x_zdist(workers, limit, nchunks, chunk_mb)
    peaks = ", ".join(f"{p / 10**6:.0f} MB ({p / limit:.2f}x)" for p in z_peaks)
    print(f"zdist                {z_time:7.1f} s   peak worker RSS {peaks}   spilled {stats['spilled']} values, {stats['bytes_on_disk'] / 10**6:.0f} MB on disk at the end, {stats['restarts']} restarts")
    dask = four_x_dask(workers, limit, nchunks, chunk_mb)
    if dask is not None:
        d_time, d_total, d_peaks = dask
        peaks = ", ".join(f"{p / 10**6:.0f} MB ({p / limit:.2f}x)" for p in d_peaks)
        print(f"dask.distributed     {d_time:7.1f} s   peak worker RSS {peaks}")
        print(f"ratio dask/zdist     {d_time / z_time:7.2f}   (above 1: zdist faster)   same sum: {abs(d_total - z_total) < 1e-6 * abs(z_total)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--four-x", action="store_true", help="only the run with data 4x the workers' memory limit, zdist and dask.distributed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-mb", type=int, default=200)
    parser.add_argument("--chunk-mb", type=int, default=20)
    args = parser.parse_args()
    if args.four_x:
        four_x(args.workers, args.limit_mb, args.chunk_mb)
    else:
        spill_throughput(args.mb)
        restart_latency(args.kills)
