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
from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, not here: workers unpickle dask tasks that refer to
# zdist.dask.tasks, which imports this package first, and a worker needs
# none of the client (its scheduler, its loop thread, its atexit hook).
_LAZY = {"get": ".client", "close": ".client", "TaskKilledWorkersError": ".scheduler"}

__all__ = ["TaskKilledWorkersError", "close", "get"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
