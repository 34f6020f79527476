"""The core's invariants, checked after every step in validation mode (``Scheduler(validate=True)``).

Read-only views of the tasks by id let the pure
:func:`~zdist.scheduling.policy.check_invariants` and
:func:`~zdist.scheduling.policy.to_recompute` read the core's state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .policy import check_invariants
from .state import ERRED, FORGOTTEN, LOST, MEMORY, NO_VALUE, PROCESSING, RELEASED, STATE_NAMES, TO_RUN, WAITING

if TYPE_CHECKING:
    from .core import Scheduler


def problems(s: "Scheduler") -> list[str]:
    """What is inconsistent in the state; empty when all is well (see ``policy.check_invariants``)."""
    v = views(s)
    tasks = s.tasks
    state = {i: STATE_NAMES[ts.state] for i, ts in tasks.items()}
    # A released value someone else made keeps its holders (theirs): only the copies this client caused count.
    holders = {i: ts.holders if ts.owned or ts.state != RELEASED else ts.copies for i, ts in tasks.items()}
    # After Close every value is released on purpose and the tasks still under way are abandoned
    # (what they make is deleted as it comes): only the counts must still add up.
    problems = [] if s.closing else check_invariants(state, v.dependencies, v.dependents, holders, v.outputs)
    for i, ts in tasks.items():
        if ts.state == MEMORY and any(w not in s.workers for w in ts.holders) and not s.in_grace:
            problems.append(f"{ts.key!r} is held by a worker that is gone")
        if ts.state == PROCESSING and not s.closing and (ts.worker not in s.workers or ts.batch not in s.workers[ts.worker].batches):
            problems.append(f"{ts.key!r} is processing on {ts.worker}, which does not know it")
        if ts.state == WAITING and not s.closing and ts.waiting != sum(1 for d in ts.deps if d.state != MEMORY) + (ts in s.deferred):
            problems.append(f"{ts.key!r} waits for {ts.waiting} inputs, but not that many are missing")
        pending = sum(1 for d in ts.dependents if d.state in TO_RUN)
        if ts.npending != pending:
            problems.append(f"{ts.key!r} counts {ts.npending} dependents to run, but {pending} are")
    if s.ntorun != sum(1 for ts in tasks.values() if ts.state in TO_RUN):
        problems.append("the count of tasks to run is off")
    return problems


def views(s: "Scheduler") -> "_Views":
    return _Views(s)


class _Views:
    """Read-only mappings of the scheduler's tasks by id, for the policy functions."""

    def __init__(self, scheduler: "Scheduler"):
        tasks = scheduler.tasks
        self.dependencies = _Mapped(tasks, lambda ts: [d.id for d in ts.deps if d.state != FORGOTTEN])
        self.dependents = _Mapped(tasks, lambda ts: [d.id for d in ts.dependents])
        self.done = _Filtered(tasks, lambda ts: ts.state in (MEMORY, RELEASED, LOST))
        self.available = _Filtered(tasks, lambda ts: ts.state == MEMORY)
        self.outputs = _Filtered(tasks, lambda ts: ts.deliver and ts.value is NO_VALUE and ts.state != ERRED)


class _Mapped:
    __slots__ = ("tasks", "function")

    def __init__(self, tasks: dict, function: Callable):
        self.tasks, self.function = tasks, function

    def get(self, task_id: int, default: Any = None) -> Any:
        ts = self.tasks.get(task_id)
        return default if ts is None else self.function(ts)

    def __getitem__(self, task_id: int) -> Any:
        return self.function(self.tasks[task_id])

    def __contains__(self, task_id: int) -> bool:
        return task_id in self.tasks


class _Filtered:
    __slots__ = ("tasks", "predicate")

    def __init__(self, tasks: dict, predicate: Callable):
        self.tasks, self.predicate = tasks, predicate

    def __contains__(self, task_id: int) -> bool:
        ts = self.tasks.get(task_id)
        return ts is not None and self.predicate(ts)

    def __iter__(self):
        return (i for i, ts in self.tasks.items() if self.predicate(ts))

    def __len__(self) -> int:
        return sum(1 for _ in self)
