"""zdist: a ZeroMQ-native distributed computing toolkit.

A Center keeps who holds what; Workers hold data, run functions on it and
move it peer to peer; clients drive them through :func:`rpc`, :class:`Pool`, :class:`Executor`
and :func:`zdist.dask.get`.
"""
from .center import Center
from .cluster import LocalCluster
from .errors import (
    CenterUnreachableError, LostDataError, MissingDataError, NoWorkersError, SessionClosedError, TaskKilledWorkersError, WorkerDiedError,
)
from .executor import Executor, as_completed, wait
from .pool import Pool, RemoteData
from .protocol import ProtocolError
from .report import performance_report
from .rpc import RemoteError, RPCTimeoutError, rpc
from .security import Security
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Center", "CenterUnreachableError", "Executor", "LocalCluster", "TaskKilledWorkersError", "as_completed", "wait", "LostDataError", "MissingDataError", "NoWorkersError", "Pool", "ProtocolError", "RemoteData",
    "RPCTimeoutError", "RemoteError", "Security", "SessionClosedError", "Worker", "WorkerDiedError", "performance_report", "rpc",
]
