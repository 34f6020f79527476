"""Run dask graphs on a zdist cluster: ``zdist.dask.get`` is a dask scheduler.

>>> import functools
>>> import dask.array as da
>>> from zdist import LocalCluster
>>> from zdist.dask import get
>>> with LocalCluster(n_workers=2) as cluster:
...     get2 = functools.partial(get, cluster.center_address)
...     int(da.arange(10, chunks=(5,)).sum().compute(scheduler=get2))
45
"""
from .client import close, get
from .scheduler import TaskKilledWorkersError

__all__ = ["TaskKilledWorkersError", "close", "get"]
