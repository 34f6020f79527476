"""Two clients on one cluster: how much a long map of one slows a small job of the other.

    python benchmarks/bench_clients.py [--workers 2] [--long 300] [--long-task-ms 200] [--small 100] [--task-ms 20] [--repeat 3]

Measured in one run, on 127.0.0.1:

* **alone**: the small job (``Pool.map`` of ``--small`` tasks that each
  sleep ``--task-ms``) on an idle cluster of half the workers: what it
  would take with the cluster split evenly between two clients;
* **shared**: the same job from this process while another client process
  runs a long ``map_async`` of ``--long`` tasks that each sleep
  ``--long-task-ms`` on the whole cluster.

The slowdown is shared / alone (target: at most 2.5). By default the tasks
sleep rather than compute, so that the two clients' work is not also
fighting for this machine's two cores: what is measured is how the workers
share their threads between the clients' batches (:mod:`zdist.fairpool`).
With ``--cpu`` they burn CPU for their time (measured in thread CPU time,
so a task's length does not depend on how it shares a core). Best of
``--repeat``; asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap
import time

_LONG_CLIENT = textwrap.dedent(
    """
    import sys, time
    from zdist import Pool

    SECONDS = float(sys.argv[3])  # read here: on a worker, sys.argv is the worker's
    CPU = sys.argv[4] == "cpu"

    def task(i, seconds=SECONDS, cpu=CPU):
        if cpu:
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass
        else:
            time.sleep(seconds)
        return i

    with Pool(sys.argv[1]) as pool:
        handles = pool.map_async(task, range(int(sys.argv[2])))
        print("started", flush=True)
        pool.gather(handles)
        print("done", flush=True)
    """
)


def small_job(address: str, n: int, seconds: float, cpu: bool = False) -> float:
    from zdist import Pool

    def task(i):
        if cpu:  # this thread's CPU time: another thread's share of the core does not count
            end = time.thread_time() + seconds
            while time.thread_time() < end:
                pass
        else:
            time.sleep(seconds)
        return i

    with Pool(address) as pool:
        pool.gather(pool.map(task, range(4)))  # warm: the function cached, the session open
        start = time.perf_counter()
        pool.gather(pool.map(task, range(n)))
        return time.perf_counter() - start


def measure(workers: int, long: int, small: int, task_s: float, repeat: int, long_task_s: float | None = None, cpu: bool = False) -> dict:
    from zdist import LocalCluster

    alone, shared = [], []
    with LocalCluster(n_workers=max(1, workers // 2), nanny=False) as half:
        for _ in range(repeat):
            alone.append(small_job(half.center_address, small, task_s, cpu))
    with LocalCluster(n_workers=workers, nanny=False) as cluster:
        for _ in range(repeat):
            other = subprocess.Popen([sys.executable, "-c", _LONG_CLIENT, cluster.center_address, str(long), str(long_task_s or task_s), "cpu" if cpu else "sleep"], stdout=subprocess.PIPE, text=True)
            try:
                if other.stdout.readline().strip() != "started":
                    raise RuntimeError("the long-map client did not start")
                time.sleep(0.5)  # its batches fill the workers
                shared.append(small_job(cluster.center_address, small, task_s, cpu))
                still_running = other.poll() is None
                out, _ = other.communicate(timeout=600)
                if "done" not in out:
                    raise RuntimeError(f"the long-map client failed: {out!r}")
            finally:
                if other.poll() is None:
                    other.kill()
                    other.wait(10)
            if not still_running:
                print("warning: the long map finished before the small job; give it more tasks (--long)", file=sys.stderr)
    return {"alone_s": min(alone), "shared_s": min(shared), "slowdown": min(shared) / min(alone), "alone_all": alone, "shared_all": shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--long", type=int, default=300, help="tasks of the other client's long map")
    parser.add_argument("--small", type=int, default=100, help="tasks of the small job")
    parser.add_argument("--task-ms", type=float, default=20.0, help="each task of the small job sleeps this long")
    parser.add_argument("--long-task-ms", type=float, default=200.0, help="each task of the long map sleeps this long")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="tasks burn CPU for their time instead of sleeping (both clients then share the cores too)")
    args = parser.parse_args(argv)
    result = measure(args.workers, args.long, args.small, args.task_ms / 1000, args.repeat, args.long_task_ms / 1000, args.cpu)
    print(
        f"small job ({args.small} x {args.task_ms:g} ms): alone on {max(1, args.workers // 2)} worker(s) {result['alone_s']:.2f} s; "
        f"on {args.workers} while another client maps {args.long} x {args.long_task_ms:g} ms {result['shared_s']:.2f} s; "
        f"slowdown {result['slowdown']:.2f}x (target <= 2.5x)"
    )
    print(f"  all runs: alone {[round(x, 2) for x in result['alone_all']]}, shared {[round(x, 2) for x in result['shared_all']]}; median shared/alone {statistics.median(result['shared_all']) / statistics.median(result['alone_all']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
