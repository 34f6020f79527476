"""The Center's bytes per worker stay exact: thousands of mixed operations on real processes on 127.0.0.1.

Adds, spills (a small memory limit), unspills (gathers), deletes, keys
stored again with another size, a worker unregistered behind its back (it
registers again) and a retirement; afterwards the Center's figures for each
worker equal the worker's own, and after deleting everything they are zero.
"""
from __future__ import annotations

import random

import numpy as np

from zdist import Pool, rpc
from zdist.center import Center

from .conftest import center_call, make_cluster, run, wait_for

ROUNDS = 24


def make(n):
    # Sizes from a few bytes to ~1 MB, so that values spill under the small limit.
    return np.ones(n, dtype=np.uint8) if n > 64 else n


async def _call(node: str, op: str, **args):
    async with rpc(node, timeout=30) as worker:
        return await getattr(worker, op)(**args)


def _figures(cluster, addresses) -> tuple[dict, dict]:
    """The Center's and the workers' own: keys, bytes, bytes in memory and on disk, per worker."""
    center = center_call(cluster.center_address, "workers")
    held = center_call(cluster.center_address, "has_what", workers=list(addresses))
    theirs, ours = {}, {}
    for address in addresses:
        info = center.get(address, {})
        theirs[address] = (held[address], info.get("nkeys"), info.get("nbytes"), info.get("bytes_in_memory"), info.get("bytes_on_disk"))
        metrics = run(_call(address, "metrics"))
        keys = run(_call(address, "keys"))
        ours[address] = (set(keys), metrics["nkeys"], metrics["nbytes"], metrics["bytes_in_memory"], metrics["bytes_on_disk"])
    return theirs, ours


def test_the_centers_byte_counts_match_the_workers_after_thousands_of_mixed_operations():
    rng = random.Random(12)
    operations = 0
    thresholds = {"target": 0.2, "spill": None, "pause": None, "terminate": None}  # spill by size only: deterministic
    with make_cluster(3, memory_limit="40MB", memory_thresholds=thresholds) as cluster, Pool(cluster.center_address) as pool:
        a, b, leaving = cluster.worker_addresses
        live: list = []
        for round_ in range(ROUNDS):  # bounded: ROUNDS rounds of ~130 operations
            live += pool.scatter([make(rng.choice([8, 1000, 200_000, 900_000])) for _ in range(20)])
            live += pool.map(make, [rng.choice([16, 5000, 300_000, 800_000]) for _ in range(40)])
            operations += 60
            # Stored again under the same key with another size (what a task's rerun does).
            for i in range(10):
                run(_call(a, "update_data", data={f"again-{i}": make(rng.choice([4, 70, 100_000, 500_000]))}))
            run(_call(a, "delete_data", keys=[f"again-{i}" for i in range(0, 10, 3)]))
            operations += 14
            sample = rng.sample(live, min(len(live), 20))
            pool.gather(sample)  # reads spilled values back from disk
            doomed = rng.sample(live, len(live) // 2)
            pool.delete(doomed)
            gone = set(map(id, doomed))
            live = [h for h in live if id(h) not in gone]
            operations += len(sample) + len(doomed)
            if round_ == 8:  # the Center forgets a worker: it registers again, with what it holds
                run(_call(cluster.center_address, "unregister", address=b))
                wait_for(lambda: b in center_call(cluster.center_address, "workers"), timeout=20, message="the worker registered again")
            if round_ == 16:  # hands its keys to the others and leaves
                run(_call(leaving, "retire"), timeout=60)
                wait_for(lambda: leaving not in center_call(cluster.center_address, "workers"), timeout=30, message="the worker left")
                # The pool learns it on its next look at the Center; a scatter
                # meanwhile can pick the departed worker and wait out its timeout.
                wait_for(lambda: leaving not in pool.sync_center(), timeout=30, message="the pool saw the worker leave")
        assert operations > 2000
        stayed = [a, b]
        on_disk = center_call(cluster.center_address, "workers")
        assert any(on_disk[w].get("spilled", 0) for w in stayed), "nothing spilled: the test did not test spilling"

        def agree():
            theirs, ours = _figures(cluster, stayed)
            return theirs == ours or None

        wait_for(agree, timeout=20, message="the Center's figures equal the workers' own")
        assert len(pool.gather(live)) == len(live)

        pool.delete(live)
        # Closing the pool closes its session: every worker deletes the
        # session's values, wherever they went (handed over at retirement,
        # or held by a worker the pool took for gone while it re-registered).
        pool.close()
        run(_call(a, "delete_data", keys=[f"again-{i}" for i in range(10)]))

        def empty():
            theirs, ours = _figures(cluster, stayed)
            return theirs == ours and all(figures[1:] == (0, 0, 0, 0) for figures in theirs.values()) or None

        wait_for(empty, timeout=20, message="every count back to zero")


def test_reports_in_any_order_keep_each_workers_bytes_exact():
    """The issue's drift: a key reported again with another size, or by two workers with different sizes."""

    async def main():
        async with Center() as center:
            for address in ("127.0.0.1:1", "127.0.0.1:2"):
                center.register(address=address, ncores=1)
            one, two = "127.0.0.1:1", "127.0.0.1:2"
            center.add_keys(one, {"k": 100})
            center.add_keys(two, {"k": 104})  # another size elsewhere (a recomputation)
            center.add_keys(one, {"k": 96, "j": 5})  # stored again here, smaller
            center.remove_keys(two, ["k"])
            center.heartbeat(one, nbytes=123456, nkeys=9)  # a heartbeat does not overwrite the counts
            workers = center.workers()
            assert (workers[one]["nbytes"], workers[one]["nkeys"]) == (101, 2)
            assert (workers[two]["nbytes"], workers[two]["nkeys"]) == (0, 0)
            center.remove_keys(one, ["k", "j", "never-held"])
            center.register(address=two, ncores=1, keys={"x": 7})  # registered again: counted anew
            workers = center.workers()
            assert [(w["nbytes"], w["nkeys"]) for w in (workers[one], workers[two])] == [(0, 0), (7, 1)]

    run(main())
