"""The seed session on a local cluster: ``python -m zdist.demo``.

Starts a Center and one worker process per core on this machine, runs the Pool
session of the original design documents, printing each step, then stops
everything.
"""
from __future__ import annotations

import time


def main() -> None:
    from zdist import Pool

    start = time.perf_counter()
    with Pool() as pool:
        print(f">>> pool = Pool()            # a Center and {len(pool.available_cores)} workers, private to you")
        print(">>> pool.available_cores")
        print(pool.available_cores)
        print(">>> A = pool.map(lambda x: x**2, range(10))")
        A = pool.map(lambda x: x**2, range(10))
        print(">>> B = pool.map(lambda x: -x, A)      # runs where A is: no data moves")
        B = pool.map(lambda x: -x, A)
        print(">>> total = pool.apply(sum, [B])")
        total = pool.apply(sum, [B])
        print(">>> total")
        print(total)
        print(">>> total.get()")
        print(total.get())
        print(">>> pool.gather(A)")
        print(pool.gather(A))
        try:
            import dask.array as da

            from zdist.dask import get
        except ImportError:
            pass
        else:
            from functools import partial

            # dask takes a scheduler as a function of (graph, keys): zdist.dask.get
            # with the cluster's address filled in runs every task of the graph there.
            print(">>> from functools import partial")
            print(">>> from zdist.dask import get")
            print(f">>> get2 = partial(get, {pool.center_address!r})   # a dask scheduler: runs the graph on this cluster")
            get2 = partial(get, pool.center_address)
            print(">>> da.arange(10, chunks=(5,)).sum().compute(scheduler=get2)")
            print(da.arange(10, chunks=(5,)).sum().compute(scheduler=get2))
    print(f"(cluster started, used and stopped in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
