"""Spill throughput against numpy.save/load, and restart latency with the nanny.

    python benchmarks/bench_memory.py [--mb 400] [--kills 3]

Prints ratios; asserts nothing (timings on a shared machine vary). The
"data 4x the memory limit" run side by side with dask.distributed
(issue 12) is not here yet.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time

import numpy as np

from zdist import LocalCluster, rpc
from zdist.datastore import SpillStore


def spill_throughput(total_mb: int, chunk_mb: int = 50) -> None:
    chunks = [np.random.default_rng(i).random(chunk_mb * 10**6 // 8) for i in range(max(1, total_mb // chunk_mb))]
    nbytes = sum(c.nbytes for c in chunks)
    with tempfile.TemporaryDirectory() as d:
        store = SpillStore(os.path.join(d, "spill"), target=None)
        for i, c in enumerate(chunks):
            store[i] = c
        t = time.perf_counter()
        for _ in range(len(chunks)):  # bounded: one spill per value
            store.spill_one()
        spill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(len(chunks)):
            assert store.disk[i].nbytes == chunks[i].nbytes
        unspill = time.perf_counter() - t
        store.close()
        t = time.perf_counter()
        for i, c in enumerate(chunks):
            np.save(os.path.join(d, f"{i}.npy"), c)
        save = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(len(chunks)):
            np.load(os.path.join(d, f"{i}.npy"))
        load = time.perf_counter() - t
    mb = nbytes / 2**20
    print(f"spill   {mb / spill:8.0f} MiB/s   numpy.save {mb / save:8.0f} MiB/s   ratio {save / spill:.2f}")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    spill_throughput(args.mb)
    restart_latency(args.kills)
