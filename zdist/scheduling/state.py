"""What the scheduling core knows of one task and of one worker.

A :class:`TaskState` is made by a client shell (it knows what to run) and
from then on changed only by the :class:`~zdist.scheduling.Scheduler` it is
submitted to; other threads may read it (a handle asks whether its task is
done) but never write it.

>>> ts = TaskState('x-1', payload=('inc', (1,)))
>>> ts.state_name, ts.wanted
('new', 1)
"""
from __future__ import annotations

from typing import Any, Iterable

from .policy import in_flight_limit, task_seconds_estimate

NEW, WAITING, READY, PROCESSING, MEMORY, ERRED, LOST, RELEASED, FORGOTTEN = range(9)
STATE_NAMES = ("new", "waiting", "ready", "processing", "memory", "erred", "lost", "released", "forgotten")
#: States of a task that still has to run.
TO_RUN = frozenset({WAITING, READY, PROCESSING})

#: What most tasks' ``copies`` stay: one shared empty set, not one made per task (a million tasks, a million sets).
EMPTY: frozenset = frozenset()

#: ``TaskState.value`` until a value came back.
NO_VALUE = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE", "__slots__": ()})()


class TaskState:
    """One key: how it is made (``payload``, opaque to the core), its inputs, where its value is.

    ``wanted`` counts the client's references (handles, requested outputs);
    ``deliver`` asks for the value to come here once computed. A task made
    from data the client placed (scatter, or a value found on the cluster)
    has no payload and cannot be recomputed; ``owned=False`` marks a value
    someone else made, of which only the copies this client caused are deleted.
    """

    __slots__ = (
        "id", "key", "payload", "deps", "dependents", "state", "waiting", "npending", "wanted", "deliver",
        "holders", "copies", "nbytes", "worker", "batch", "value", "error", "owned", "replicas",
        "deaths", "missing_retries", "lost_on", "fetching", "controls", "failed_on", "__weakref__",
    )

    def __init__(self, key: Any, payload: Any = None, deps: tuple = (), *, wanted: int = 1, deliver: bool = False, owned: bool = True):
        self.id = -1
        self.key = key
        self.payload = payload
        self.deps: tuple = deps  # TaskStates
        self.dependents: set = set()  # TaskStates not forgotten that take this one as input
        self.state = NEW
        self.waiting = 0  # inputs not in memory, while WAITING
        self.npending = 0  # dependents still to run (waiting, ready or processing)
        self.wanted = wanted
        self.deliver = deliver
        self.holders: set[str] | frozenset[str] = EMPTY  # a set of its own once it has one (see hold): 216 bytes a task saved
        self.copies: frozenset[str] = EMPTY  # for owned=False: holders this client caused (replaced, never changed)
        self.nbytes = 0
        self.worker: str | None = None
        self.batch: int | None = None
        self.value: Any = NO_VALUE
        self.error: BaseException | None = None
        self.owned = owned
        self.replicas = 1
        self.deaths: tuple[str, ...] = ()  # workers that died while running it
        self.missing_retries = 0
        self.lost_on: str | None = None
        self.fetching: str | None = None
        self.controls: Any = None  # a zdist.scheduling.controls.Controls, or None: no retries, priority or restriction
        self.failed_on: tuple = ()  # workers where it raised, while it had retries left

    @property
    def recomputable(self) -> bool:
        return self.payload is not None

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def done(self) -> bool:
        """Computed (or failed) at least once since last submitted: what a waiter waits for."""
        return self.state in (MEMORY, ERRED, LOST, RELEASED)

    def __repr__(self) -> str:
        return f"<TaskState {self.key!r} {self.state_name}>"


def hold(ts: TaskState, worker: str) -> None:
    """``worker`` holds ``ts``'s value: add it to ``ts.holders`` (a set of its own from the first holder on).

    >>> ts = TaskState('x'); hold(ts, 'A'); hold(ts, 'B'); sorted(ts.holders)
    ['A', 'B']
    """
    if ts.holders:
        ts.holders.add(worker)
    else:
        ts.holders = {worker}


def unlink(tasks: Iterable[TaskState]) -> None:
    """Break the links between the task states of a computation that is over (inputs and dependents).

    A task and its inputs point at each other, a cycle that only the cyclic
    collector frees: at 3.4 million tasks, a 13-second run of it. Unlinked,
    they go by reference counting as soon as the computation is dropped.
    Only for tasks no scheduler will see again.

    >>> a = TaskState('a'); b = TaskState('b', deps=(a,)); a.dependents.add(b)
    >>> unlink([a, b]); b.deps, a.dependents
    ((), set())
    """
    for ts in tasks:
        ts.deps = ()
        ts.dependents.clear()


class WorkerState:
    """A live worker: its cores, the batches in flight there, and what it is measured to take."""

    __slots__ = (
        "address", "ncores", "pid", "inflight", "batches", "limit", "recent", "recent_nbytes",
        "task_seconds", "busy_since", "held", "isolated", "paused", "resources", "used",
    )

    def __init__(self, address: str, ncores: int = 1, pid: Any = None, resources: dict | None = None):
        self.address = address
        self.ncores = max(1, int(ncores or 1))
        self.pid = pid
        self.inflight = 0
        self.batches: dict[int, tuple[list, float]] = {}  # batch id -> (tasks, sent at)
        self.limit = in_flight_limit(0.0, 0, self.ncores)
        self.recent: list[float] = []
        self.recent_nbytes: list[int] = []
        self.task_seconds = 0.0  # 0: not measured yet
        self.busy_since: float | None = None  # when it last replied while still having work
        self.held: list[int] = []  # heap of task ids waiting for the inputs this worker holds
        self.isolated = False  # running a suspect task alone
        self.paused = False
        self.resources: dict[str, float] = dict(resources or {})  # what it advertises (zdist-worker --resources)
        self.used: dict[str, float] = {}  # of those, what this client's tasks in flight there take

    def free(self) -> int:
        return 0 if self.isolated or self.paused else self.limit - self.inflight

    def load(self) -> float:
        return self.inflight / self.ncores

    def answered(self, tasks: list) -> None:
        """A batch came back, or failed: its tasks are no longer in flight (nor their resources); idle, it is no longer isolated."""
        self.inflight -= len(tasks)
        if self.inflight <= 0:
            self.isolated = False
        if self.used:
            for ts in tasks:
                if ts.controls is not None:
                    self.take(ts.controls.resources, -1)

    def take(self, resources: tuple, sign: int = 1) -> None:
        """Count ``resources`` as taken (``sign=-1``: given back) by a task of this client."""
        used = self.used
        for name, amount in resources:
            left = used.get(name, 0.0) + sign * amount
            if left > 1e-9:
                used[name] = left
            else:
                used.pop(name, None)

    def measured(self, ntasks: int, sent: float, now: float, largest_result: int) -> None:
        """Fold one batch's timing and result sizes into the in-flight limit.

        A task's time is bounded above by the batch's round trip and, when
        the worker had more work queued since its previous reply, by the gap
        between the two replies (which leaves the network out).
        """
        bound = now - sent
        if self.busy_since is not None:
            bound = min(bound, now - self.busy_since)
        self.busy_since = now if self.inflight > 0 else None
        self.recent.append(bound * self.ncores / max(1, ntasks))
        self.recent_nbytes.append(largest_result)
        del self.recent[:-8], self.recent_nbytes[:-8]
        self.task_seconds = task_seconds_estimate(self.recent)
        self.limit = in_flight_limit(max(self.task_seconds, 1e-9), max(self.recent_nbytes), self.ncores)

    def __repr__(self) -> str:
        return f"<WorkerState {self.address} {self.inflight}/{self.limit} in flight>"
