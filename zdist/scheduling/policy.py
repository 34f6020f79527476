"""Scheduling policy as small pure functions: where a task runs, what moves, what is recomputed.

The scheduling core (:mod:`zdist.scheduling.core`) calls these on every
decision; tests call them on plain dicts. Nothing here keeps state.

>>> choose_worker(['x'], {'x': {'A'}}, {'x': 10**6}, {'A': 3.0, 'B': 0.0})
'A'
>>> in_flight_limit(task_seconds=0.00002, largest_result=8, ncores=2)
256
"""
from __future__ import annotations

from typing import Collection, Hashable, Iterable, Mapping, Sequence

__all__ = [
    "check_invariants", "choose_worker", "in_flight_limit", "least_loaded", "releasable", "spread",
    "task_seconds_estimate", "to_recompute", "worth_moving",
]

#: What moving a byte between workers is taken to cost, for the choice between
#: waiting for a busy worker that holds a task's inputs and moving them.
BANDWIDTH = 500e6  # bytes per second
#: The fixed cost of fetching inputs from a peer (ask the Center, round trip).
FETCH_LATENCY = 1e-3  # seconds


def choose_worker(
    deps: Iterable[Hashable],
    who_has: Mapping[Hashable, Collection[str]],
    nbytes: Mapping[Hashable, int],
    loads: Mapping[str, float],
) -> str | None:
    """Where a task should run: among the workers in ``loads``, the one holding the most bytes of ``deps``.

    ``loads`` maps each eligible worker to its load (tasks in flight per
    core). Ties go to the least loaded; a task whose inputs no eligible
    worker holds goes to the least loaded. ``None`` when no worker is eligible.

    >>> who_has = {'x': {'A'}, 'y': {'B'}, 'z': {'B'}}
    >>> nbytes = {'x': 100, 'y': 60, 'z': 60}
    >>> choose_worker(['x', 'y'], who_has, nbytes, {'A': 5.0, 'B': 0.0})
    'A'
    >>> choose_worker(['x', 'y', 'z'], who_has, nbytes, {'A': 0.0, 'B': 5.0})
    'B'
    >>> choose_worker([], who_has, nbytes, {'A': 2.0, 'B': 0.5})
    'B'
    """
    if not loads:
        return None
    held: dict[str, int] = {}
    for dep in deps:
        holders = who_has.get(dep)
        if holders:
            size = nbytes.get(dep, 0) or 1  # a held value counts even if its size is unknown
            for worker in holders:
                if worker in loads:
                    held[worker] = held.get(worker, 0) + size
    if not held:
        return min(loads, key=loads.__getitem__)
    return max(held, key=lambda worker: (held[worker], -loads[worker]))


def worth_moving(moved_bytes: int, queued: int, task_seconds: float, ncores: int, min_wait: float = 0.0) -> bool:
    """Should a task run on a free worker, moving ``moved_bytes`` of inputs, rather than wait for a busy one?

    Yes when waiting behind ``queued`` tasks of ``task_seconds`` each on the
    busy worker's ``ncores`` is expected to take longer than twice the move,
    and longer than ``min_wait`` (task times measured from round trips are
    rough: a margin keeps data in place when the gain is unsure).

    >>> worth_moving(10_000_000, queued=2, task_seconds=0.001, ncores=1)
    False
    >>> worth_moving(10_000_000, queued=100, task_seconds=0.01, ncores=1)
    True
    >>> worth_moving(10_000_000, queued=100, task_seconds=0.01, ncores=1, min_wait=2.0)
    False
    """
    move = moved_bytes / BANDWIDTH + FETCH_LATENCY
    wait = queued * task_seconds / max(1, ncores)
    return wait > 2 * move and wait > min_wait


def releasable(key: Hashable, dependents: Mapping, done: Collection, outputs: Collection) -> bool:
    """May the value of ``key`` be deleted: every task that needs it is done and nobody asked for it?

    >>> dependents = {'a': {'b', 'c'}, 'b': set(), 'c': set()}
    >>> releasable('a', dependents, done={'a', 'b'}, outputs={'c'})
    False
    >>> releasable('a', dependents, done={'a', 'b', 'c'}, outputs={'c'})
    True
    >>> releasable('c', dependents, done={'a', 'b', 'c'}, outputs={'c'})
    False
    """
    if key in outputs:
        return False
    return all(dependent in done for dependent in dependents.get(key, ()))


def to_recompute(
    lost: Iterable[Hashable],
    dependencies: Mapping,
    dependents: Mapping,
    done: Collection,
    available: Collection,
    outputs: Collection,
) -> set:
    """What to compute again after the values of ``lost`` keys vanished with a worker.

    A lost key is still needed when a task that needs it is not done yet, or
    when it is an output not yet delivered (``outputs``). Each needed lost
    key is recomputed, and so, recursively, is every input of a recomputed
    key that was computed once (``done``) but is no longer ``available``
    (deleted as no longer needed, or lost too). Keys that ``dependencies``
    does not describe come back too: they cannot be recomputed, and the
    caller must say so.

    >>> deps = {'a': set(), 'b': {'a'}, 'c': {'b'}, 'd': {'c'}}
    >>> dependents = {'a': {'b'}, 'b': {'c'}, 'c': {'d'}, 'd': set()}
    >>> # 'a' was deleted once 'b' finished; then 'b' and 'c' were lost with their worker
    >>> sorted(to_recompute(['b', 'c'], deps, dependents, done={'a', 'b', 'c'}, available=set(), outputs={'d'}))
    ['a', 'b', 'c']
    >>> # 'd' is done and delivered: nothing lost is needed any more
    >>> to_recompute(['b', 'c'], deps, dependents, done={'a', 'b', 'c', 'd'}, available=set(), outputs=set())
    set()
    """
    redo: set = set()
    stack = [key for key in lost if _needed(key, dependents, done, outputs)]
    while stack:
        key = stack.pop()
        if key in redo:
            continue
        redo.add(key)
        for dep in dependencies.get(key, ()):
            if dep not in available and (dep in done or dep not in dependencies) and dep not in redo:
                stack.append(dep)
    return redo


def _needed(key: Hashable, dependents: Mapping, done: Collection, outputs: Collection) -> bool:
    if key in outputs:
        return True
    return any(dependent not in done for dependent in dependents.get(key, ()))


def check_invariants(
    state: Mapping[Hashable, str],
    dependencies: Mapping,
    dependents: Mapping,
    holders: Mapping[Hashable, Collection[str]],
    outputs: Collection,
) -> list[str]:
    """What is inconsistent in a scheduler's state; an empty list when all is well.

    ``state`` maps each key to ``'waiting'``, ``'ready'``, ``'processing'``,
    ``'memory'`` or ``'released'``; ``outputs`` are the requested keys not
    delivered yet. Used by tests and by ``get(..., validate=True)``.

    >>> deps = {'a': set(), 'b': {'a'}}
    >>> check_invariants({'a': 'memory', 'b': 'ready'}, deps, {'a': {'b'}}, {'a': {'W'}}, {'b'})
    []
    >>> check_invariants({'a': 'released', 'b': 'ready'}, deps, {'a': {'b'}}, {}, {'b'})[0]
    "'a' was released while still needed"
    """
    problems = []
    done = {key for key, st in state.items() if st in ("memory", "released", "lost", "erred")}
    for key, st in state.items():
        deps = [dep for dep in dependencies.get(key, ()) if dep in state]
        if st == "ready":
            for dep in deps:
                if state[dep] != "memory":
                    problems.append(f"{key!r} is ready but its input {dep!r} is not in memory")
        elif st == "memory":
            if not holders.get(key):
                problems.append(f"{key!r} is in memory but no worker holds it")
        elif st == "released":
            if holders.get(key):
                problems.append(f"{key!r} was released but workers still hold it")
            if not releasable(key, dependents, done, outputs):
                problems.append(f"{key!r} was released while still needed")
        if st in ("waiting", "ready", "processing"):
            for dep in deps:
                if state[dep] == "released":
                    problems.append(f"{key!r} is {st} but its input {dep!r} was released")
    return problems


#: Tasks in flight per worker core, at least and at most.
MIN_TASKS_PER_CORE = 2
MAX_TASKS_PER_CORE = 128
#: Work queued per core, in seconds of measured task time: enough that a
#: worker never waits for the client's next message.
SECONDS_IN_FLIGHT = 0.1
#: Bytes of results in flight per core: bulky tasks are sent a few at a time
#: so that a long reduction never holds more than a few chunks per core.
BYTES_IN_FLIGHT = 24 * 2**20


def in_flight_limit(task_seconds: float, largest_result: int, ncores: int) -> int:
    """How many tasks a worker should have in flight: batch sizing.

    Bulky results bound the count first (memory); then the time the queued
    work takes (enough to cover a round trip, not so much that one worker
    hoards what others could run), within ``[MIN, MAX]`` per core. A task
    not measured yet (``task_seconds=0``) gets the minimum.

    >>> in_flight_limit(0.0, 0, ncores=1)
    2
    >>> in_flight_limit(0.5, 100, ncores=4)
    8
    >>> in_flight_limit(0.001, 50 * 2**20, ncores=2)
    2
    """
    if task_seconds <= 0:
        return MIN_TASKS_PER_CORE * ncores
    by_time = SECONDS_IN_FLIGHT / max(task_seconds, 1e-6)
    by_memory = BYTES_IN_FLIGHT / max(largest_result, 1.0)
    per_core = max(1, min(by_memory, max(MIN_TASKS_PER_CORE, min(MAX_TASKS_PER_CORE, by_time))))
    return int(per_core) * ncores


def task_seconds_estimate(bounds: Sequence[float]) -> float:
    """A task's time from recent upper bounds (batch round trips per task): their median.

    The median ignores the odd slow batch (the first task of a kind imports
    its modules) and replies that came back together.

    >>> task_seconds_estimate([0.001, 0.5, 0.002])
    0.002
    """
    return sorted(bounds)[len(bounds) // 2] if bounds else 0.0


def least_loaded(loads: Mapping[str, float], turn: int = 0) -> str | None:
    """The worker with the lowest load; among equals, the ``turn``-th (so that equals take turns).

    >>> least_loaded({'A': 1.0, 'B': 0.0, 'C': 0.0}, turn=1)
    'C'
    >>> least_loaded({}) is None
    True
    """
    if not loads:
        return None
    low = min(loads.values())
    best = sorted(worker for worker, load in loads.items() if load == low)
    return best[turn % len(best)]


def spread(ncores: Mapping[str, int]) -> list[str]:
    """Worker addresses repeated by their cores, interleaved: a round-robin by weight (for scatter).

    >>> spread({'A': 2, 'B': 1})
    ['A', 'B', 'A']
    """
    slots = []
    remaining = dict(ncores)
    while any(remaining.values()):
        for worker in sorted(remaining):
            if remaining[worker] > 0:
                slots.append(worker)
                remaining[worker] -= 1
    return slots
