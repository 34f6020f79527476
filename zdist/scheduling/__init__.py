"""The scheduling core shared by every client: a sans-IO state machine, its policy and its placement.

* :mod:`~zdist.scheduling.events`: the events a shell feeds in and the commands it gets back;
* :mod:`~zdist.scheduling.core`: :class:`Scheduler`, the state machine (recovery and release);
* :mod:`~zdist.scheduling.dispatch`: placement and batching;
* :mod:`~zdist.scheduling.policy`: the decisions as small pure functions;
* :mod:`~zdist.scheduling.state`: :class:`TaskState` and :class:`WorkerState`.

>>> from zdist.scheduling import Scheduler, TaskState, events
>>> s = Scheduler()
>>> s.handle(events.WorkersSeen({'A': {'ncores': 2}}), events.Submit([TaskState('x', payload='f')]), now=0.0)[0].worker
'A'
"""
from . import events
from .core import Scheduler
from .state import NO_VALUE, STATE_NAMES, TaskState, WorkerState

__all__ = ["NO_VALUE", "STATE_NAMES", "Scheduler", "TaskState", "WorkerState", "events"]
