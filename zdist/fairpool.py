"""A worker's thread pool that serves several clients fairly.

A worker runs every client's batches in one pool of threads. With a plain
first-in-first-out queue, a client whose long map keeps the worker's queue
full makes every other client's small job wait behind it (and a task of a
second takes as long as the first's whole backlog). :class:`FairThreadPool`
keeps one queue per owner (a client session) and takes the next job from
each owner in turn (round robin), and lets an owner that has nothing
running start one job even when the cores are taken by other owners' jobs
(up to twice the cores in threads): a client never waits for another
client's long task to finish before its own starts; the cores' time is
then shared between them. A single client never runs more jobs at once
than there are cores, as with a plain pool.

>>> import threading
>>> pool = FairThreadPool(1, "demo")
>>> done = threading.Event()
>>> results = []
>>> def finished(result, error):
...     results.append(result)
...     if len(results) == 2:
...         done.set()
>>> pool.submit('client-a', sum, ([1, 2],), finished)
>>> pool.submit('client-b', max, ([1, 2],), finished)
>>> done.wait(5)
True
>>> sorted(results)
[2, 3]
>>> pool.shutdown()
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

#: Threads a pool may run at most, as a multiple of its cores: one job beyond
#: the cores for each owner that has nothing running, up to this.
OVERSUBSCRIPTION = 2


class PoolShutDown(ConnectionAbortedError):
    """The pool was shut down before the job started."""


class FairThreadPool:
    """Threads that run jobs of several owners in turn (see the module docstring).

    ``submit(owner, function, args, done)`` queues ``function(*args)``;
    ``done(result, error)`` is called in the thread that ran it (``error``
    is the exception it raised, or None), or with :class:`PoolShutDown` for
    a job still queued when the pool shuts down.
    """

    def __init__(self, ncores: int, name: str = "zdist-worker"):
        self.ncores = max(1, ncores)
        self.limit = OVERSUBSCRIPTION * self.ncores
        self.name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[Any, deque] = {}  # owner -> jobs waiting; dict order is the round-robin order
        self._running: dict[Any, int] = {}
        self._total = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, owner: Any, function: Callable, args: tuple, done: Callable[[Any, BaseException | None], None]) -> None:
        with self._lock:
            if self._closed:
                raise PoolShutDown("the worker is shutting down")
            queue = self._queues.get(owner)
            if queue is None:
                queue = self._queues[owner] = deque()
            queue.append((function, args, done))
            if self._idle:
                self._wake.notify()
            elif len(self._threads) < self.limit and self._admissible(owner):
                thread = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _admissible(self, owner: Any) -> bool:
        return self._total < self.ncores or (not self._running.get(owner) and self._total < self.limit)

    def _next(self) -> tuple | None:
        """The next job in round-robin order that may start now (lock held)."""
        for owner, queue in self._queues.items():
            if self._admissible(owner):
                job = queue.popleft()
                del self._queues[owner]  # to the back of the round
                if queue:
                    self._queues[owner] = queue
                self._running[owner] = self._running.get(owner, 0) + 1
                self._total += 1
                return (owner, *job)
        return None

    def _serve(self) -> None:
        while True:
            with self._lock:
                job = self._next()
                while job is None:
                    if self._closed:
                        return
                    self._idle += 1
                    self._wake.wait()
                    self._idle -= 1
                    job = self._next()
            owner, function, args, done = job
            try:
                result, error = function(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to done(), which reports it
                result, error = None, exc
            with self._lock:
                left = self._running[owner] - 1
                if left:
                    self._running[owner] = left
                else:
                    del self._running[owner]
                self._total -= 1
                if self._idle and self._queues:
                    self._wake.notify()  # a slot freed may let another owner's job start too
            done(result, error)

    @property
    def running(self) -> int:
        return self._total

    def shutdown(self) -> None:
        """Stop taking jobs; jobs still queued are answered with :class:`PoolShutDown`. Does not wait for running ones."""
        with self._lock:
            self._closed = True
            queued = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._wake.notify_all()
        for _function, _args, done in queued:
            done(None, PoolShutDown("the worker shut down before the task started"))
