"""zdist: a ZeroMQ-native distributed computing toolkit.

A Center keeps who holds what; Workers hold data, run functions on it and
move it peer to peer; clients drive them through :func:`rpc`, :class:`Pool`, :class:`Executor`
and :func:`zdist.dask.get`.

The names below are imported when first used: a worker or a Center
(``python -m zdist.run``) imports its own modules, not the clients'.

>>> import zdist
>>> zdist.Pool.__module__
'zdist.pool'
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported now: the module of the same name, once imported by anyone, would
# otherwise take this name's place as an attribute of the package.
from .rpc import rpc  # noqa: E402, F401

#: Each public name and the module (of this package) that defines it.
_WHERE = {
    "Center": "center",
    "LocalCluster": "cluster",
    "CenterUnreachableError": "errors",
    "LostDataError": "errors",
    "MissingDataError": "errors",
    "NoWorkersError": "errors",
    "SessionClosedError": "errors",
    "TaskKilledWorkersError": "errors",
    "WorkerDiedError": "errors",
    "Executor": "executor",
    "as_completed": "executor",
    "wait": "executor",
    "Pool": "pool",
    "RemoteData": "pool",
    "ProtocolError": "protocol",
    "performance_report": "report",
    "RemoteError": "rpc",
    "RPCTimeoutError": "rpc",
    "Security": "security",
    "Worker": "worker",
}

__all__ = sorted([*_WHERE, "rpc"])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'zdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__ (re-exports: hence the noqa)
    from .center import Center  # noqa: F401
    from .cluster import LocalCluster  # noqa: F401
    from .errors import CenterUnreachableError, LostDataError, MissingDataError, NoWorkersError  # noqa: F401
    from .errors import SessionClosedError, TaskKilledWorkersError, WorkerDiedError  # noqa: F401
    from .executor import Executor, as_completed, wait  # noqa: F401
    from .pool import Pool, RemoteData  # noqa: F401
    from .protocol import ProtocolError  # noqa: F401
    from .report import performance_report  # noqa: F401
    from .rpc import RemoteError, RPCTimeoutError  # noqa: F401
    from .security import Security  # noqa: F401
    from .worker import Worker  # noqa: F401
