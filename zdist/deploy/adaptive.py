"""Adaptive scaling: grow a cluster while tasks wait, retire workers that stay idle.

Where the signal comes from: a client (Pool, Executor, dask ``get``) keeps
its backlog to itself and sends each worker a few batches at a time (at
least two tasks per core while it has more), so a worker that is saturated
reports, in its heartbeat, more tasks in hand (``executing`` in its threads
now, plus ``queued`` behind them) than it has cores. The
Center keeps those numbers; every ``interval`` seconds :class:`Adaptive`
reads them (``Center.info()``) and calls two pure functions:

- :func:`desired_workers`: tasks queued beyond the cores that run them
  (minus cores standing idle) ask for that many more cores' worth of
  workers, at once; workers idle long enough are given back; always within
  ``[minimum, maximum]``;
- :func:`retirable`: which workers to give back: idle for ``wait`` seconds,
  those holding the fewest bytes first. They retire gracefully (their data
  goes to other workers first; see :mod:`zdist.retirement`).

With no worker at all nothing reports a queue, so ``adapt(minimum=0)``
releases everything when idle but grows again only through ``scale(n)``:
keep ``minimum=1`` (the default) for a cluster that must pick work up by itself.

>>> workers = {'a': {'ncores': 1, 'executing': 2}, 'b': {'ncores': 1, 'executing': 2}}
>>> queued_and_idle(workers)
(2, 0)
>>> desired_workers(current=2, queued=2, idle_cores=0, minimum=1, maximum=8)
4
>>> desired_workers(current=4, queued=0, idle_cores=4, minimum=1, maximum=8, retirable=3)
1
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .base import Cluster

logger = logging.getLogger(__name__)

#: Seconds between two looks at the Center.
DEFAULT_INTERVAL = 1.0
#: Seconds a worker must have run nothing before adapt retires it.
DEFAULT_WAIT = 3.0


def in_hand_of(info: dict) -> float:
    """Tasks a worker holds: running in its threads now and queued behind them (zdist.taskprogress)."""
    return _number(info.get("executing")) + _number(info.get("queued"))


def queued_and_idle(workers: dict, newcomers: Any = ()) -> tuple[int, int]:
    """(tasks waiting on workers beyond their cores, cores running nothing), from ``Center.workers()``.

    Retiring and paused workers count for neither: they take no new tasks.
    The idle cores of ``newcomers`` (workers seen idle only lately) do not
    count either: a client has not had time to give them work yet, and
    counting them would hold growth back to one worker a step.

    >>> queued_and_idle({'a': {'ncores': 1, 'executing': 2}, 'b': {'ncores': 2, 'executing': 0}}, newcomers={'b'})
    (1, 0)
    """
    queued = idle = 0
    for address, info in workers.items():
        if info.get("retiring") or info.get("status") == "paused":
            continue
        ncores = _number(info.get("ncores")) or 1
        in_hand = in_hand_of(info)
        queued += max(0, in_hand - ncores)
        if address not in newcomers:
            idle += max(0, ncores - in_hand)
    return queued, idle


def desired_workers(
    current: int, queued: int, idle_cores: int, minimum: int, maximum: int | None, cores_per_worker: int = 1, retirable: int = 0
) -> int:
    """How many workers the cluster should have.

    ``current`` counts the workers asked for (started or still starting);
    ``queued`` the tasks waiting beyond the cores that run them;
    ``idle_cores`` the cores running nothing; ``retirable`` the workers idle
    long enough to give back.

    >>> desired_workers(current=1, queued=5, idle_cores=1, minimum=1, maximum=None, cores_per_worker=2)
    3
    >>> desired_workers(current=3, queued=100, idle_cores=0, minimum=1, maximum=4)
    4
    >>> desired_workers(current=0, queued=0, idle_cores=0, minimum=2, maximum=4)
    2
    """
    if queued > idle_cores:
        target = current + math.ceil((queued - idle_cores) / max(1, cores_per_worker))
    else:
        target = current - retirable
    if maximum is not None:
        target = min(target, maximum)
    return max(target, minimum)


def retirable(workers: dict, idle_since: dict, now: float, wait: float) -> list[str]:
    """Workers idle for at least ``wait`` seconds, fewest bytes held first (they have the least to hand over).

    >>> workers = {'a': {'nbytes': 10}, 'b': {'nbytes': 5}, 'c': {'nbytes': 0}}
    >>> retirable(workers, {'a': 0.0, 'b': 0.0, 'c': 9.5}, now=10.0, wait=3.0)
    ['b', 'a']
    """
    ready = [address for address, since in idle_since.items() if address in workers and now - since >= wait]
    return sorted(ready, key=lambda address: (workers[address].get("nbytes") or 0, address))


def track_idle(workers: dict, idle_since: dict, now: float) -> dict:
    """``idle_since`` brought up to date: when each worker last started running nothing.

    >>> track_idle({'a': {'executing': 0}, 'b': {'executing': 1}}, {'b': 1.0}, now=5.0)
    {'a': 5.0}
    """
    fresh = {}
    for address, info in workers.items():
        if not in_hand_of(info) and not info.get("retiring"):
            fresh[address] = idle_since.get(address, now)
    return fresh


class Adaptive:
    """Drives ``cluster`` between ``minimum`` and ``maximum`` workers; made by :meth:`Cluster.adapt`.

    A daemon thread looks at the Center every ``interval`` seconds; a step
    that fails (the Center is briefly busy) is logged and retried at the
    next. :meth:`stop` ends it (``Cluster.scale`` and ``close`` do).
    """

    def __init__(self, cluster: "Cluster", minimum: int = 1, maximum: int | None = None, interval: float = DEFAULT_INTERVAL, wait: float = DEFAULT_WAIT):
        if minimum < 0 or (maximum is not None and maximum < minimum):
            raise ValueError(f"adapt needs 0 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
        self.cluster = cluster
        self.minimum = minimum
        self.maximum = maximum
        self.interval = interval
        self.wait = wait
        self.idle_since: dict[str, float] = {}
        self.log: list[tuple[float, str, int]] = []  # (time, 'up'/'down', workers after): what adapt did
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zdist-adapt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - keep adapting; say why this step failed
                logger.warning("adapt: step failed (%s: %s); trying again in %g s", type(exc).__name__, exc, self.interval)

    def step(self) -> int:
        """Look at the Center once and scale; returns the number of workers asked for."""
        cluster = self.cluster
        info = cluster.center_info()
        workers = {address: w for address, w in info.get("workers", {}).items() if not w.get("retiring")}
        now = time.monotonic()
        self.idle_since = track_idle(workers, self.idle_since, now)
        # Idle for less than two looks: a newcomer the clients have not fed yet.
        newcomers = {address for address, since in self.idle_since.items() if now - since < 2 * self.interval}
        queued, idle_cores = queued_and_idle(workers, newcomers)
        current = cluster.planned_workers()
        cores = max(1, round(sum(int(w.get("ncores") or 1) for w in workers.values()) / len(workers))) if workers else 1
        candidates = retirable(workers, self.idle_since, now, self.wait)
        target = desired_workers(current, queued, idle_cores, self.minimum, self.maximum, cores, len(candidates))
        if self._stopped.is_set():
            return current
        if target > current:
            logger.info("adapt: %d tasks wait, %d cores idle: %d -> %d workers", queued, idle_cores, current, target)
            cluster.scale(target, _adaptive=True)
            self.log.append((time.time(), "up", target))
        elif target < current:
            gone = cluster.retire_workers(candidates[: current - target])
            for address in gone:
                self.idle_since.pop(address, None)
            if gone:
                logger.info("adapt: retired %d idle workers", len(gone))
                self.log.append((time.time(), "down", cluster.planned_workers()))
        return cluster.planned_workers()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"<Adaptive minimum={self.minimum} maximum={self.maximum} interval={self.interval:g}s>"


def _number(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
