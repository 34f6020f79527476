"""The scheduling core: one state machine under every client, with no sockets, threads or clocks.

Events in, commands out (:mod:`zdist.scheduling.events`), in the style of
h11: a client shell (the Pool, ``zdist.dask.get``) calls
``commands = scheduler.handle(*events, now=clock())`` on its event loop
and carries the commands out with ``rpc``. Every change of a task's state
goes through :meth:`Scheduler._set_state`; placement lives in
:mod:`zdist.scheduling.dispatch`, policy in :mod:`zdist.scheduling.policy`.

>>> from zdist.scheduling.events import BatchDone, Submit, WorkersSeen
>>> s = Scheduler()
>>> x = TaskState('x', payload='make x', wanted=0)
>>> y = TaskState('y', payload='make y from x', deps=(x,), deliver=True)
>>> s.handle(WorkersSeen({'A': {'ncores': 1}}), Submit([x, y]), now=0.0)
[SendBatch(worker='A', batch_id=1, tasks=[<TaskState 'x' processing>], who_has={}, return_limit=0)]
>>> [type(c).__name__ for c in s.handle(BatchDone('A', 1, [['x', 'ok', 8]]), now=0.1)]
['Finished', 'SendBatch']
>>> s.handle(BatchDone('A', 2, [['y', 'ok', 8, 42]]), now=0.2)
[Finished(tasks=[<TaskState 'y' memory>]), Delivered(task=<TaskState 'y' memory>), Delete(worker='A', keys=['x'], nbytes=8)]
>>> y.value
42
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import CancelledError
from functools import partial
from typing import Any, Callable

from ..errors import LostDataError, MissingDataError, noted
from . import checks, dispatch, recovery
from .events import (
    BatchDone, BatchFailed, Close, DataPlaced, Delete, DeleteEverywhere, Delivered, Erred, Fetch, Fetched,
    FetchFailed, Finished, HoldersFound, PollCenter, Released, Submit, Wanted, WorkersSeen, Cancel,
)
from .controls import PRIORITY_SHIFT
from .policy import least_loaded
from .state import (
    EMPTY, ERRED, FORGOTTEN, LOST, MEMORY, NEW, NO_VALUE, PROCESSING, READY, RELEASED, TO_RUN, WAITING,
    TaskState, WorkerState, hold,
)

logger = logging.getLogger(__name__)


class Scheduler:
    """The state of one client's tasks and of the cluster's workers, changed only by :meth:`handle`.

    ``result_limit``: results of at most this many bytes come back with the
    answer for tasks the client holds (``wanted``); ``deliver_limit`` the
    same for tasks whose value it asked for (``deliver``).
    ``max_worker_deaths``: a task in flight on that many workers that died
    fails with :class:`~zdist.errors.TaskKilledWorkersError`.
    ``validate=True`` checks the invariants after every step (for tests).
    """

    def __init__(
        self,
        *,
        name: str = "the Center",
        max_worker_deaths: int = 3,
        result_limit: int = 0,
        deliver_limit: int = 2**20,
        validate: bool = False,
    ):
        self.name = name
        self.max_worker_deaths = max_worker_deaths
        self.result_limit = result_limit
        self.deliver_limit = deliver_limit
        self.validate = validate
        self.tasks: dict[int, TaskState] = {}
        self.by_key: dict[Any, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.worker_list: tuple[WorkerState, ...] = ()  # replaced, never changed: other threads read it
        self.ready: list[int] = []  # heap of task ids (lower id: higher priority)
        self.suspects: list[int] = []  # ready tasks that were in flight on a worker that died: run alone
        self.restricted: list[int] = []  # heap of ready tasks whose controls limit where they run
        self.deferred: list[TaskState] = []  # waiting for the next look at the Center
        self.lost_deadlines: dict[int, float] = {}  # lost values we cannot make -> until when they are looked for
        self.left_behind: dict[str, list] = {}  # a worker dropped alive, maybe -> the keys it held then
        self.heartbeat_timeout = 5.0  # the Center's, from its last list of workers
        self.center_id: str | None = None
        self.grace_until = float("-inf")
        self.stall_grace_used = False
        self.closing = False
        self.dirty = False  # something failed: Close sweeps every worker
        self.now = 0.0
        self.ntorun = 0  # tasks in TO_RUN states
        self.ndone = 0  # tasks finished, recomputations included (for progress bars)
        self.batch_ids = itertools.count(1)  # shared with threads that send batches themselves
        self._ids = itertools.count()
        self._turn = 0
        self._out: list = []
        self._deletes: dict[str, list] = {}
        self._fetches: dict[str, list] = {}
        self._finished: list[TaskState] = []
        self._release: list[TaskState] = []
        self._delivering: set[int] = set()  # ids of tasks Delivered in this step: their values must outlive it
        self._handlers: dict[type, Callable] = {
            Submit: self._submit, DataPlaced: self._placed, BatchDone: self._batch_done, BatchFailed: self._batch_failed,
            WorkersSeen: partial(recovery.workers_seen, self), Released: self._released, Cancel: self._cancel, Wanted: self._wanted, Fetched: self._fetched,
            FetchFailed: self._fetch_failed, HoldersFound: partial(recovery.holders_found, self), Close: self._close,
        }

    # ------------------------------------------------------------------ the one entry point

    def handle(self, *events: Any, now: float | None = None) -> list:
        """Apply ``events`` in order; return the commands they lead to."""
        if now is not None:
            self.now = now
        self._out = out = []
        self._delivering.clear()
        for event in events:
            self._handlers[type(event)](event)
            self._release_unneeded()
        if not self.closing:
            dispatch.dispatch(self)
        if self._finished:
            out.insert(0, Finished(self._finished))
            self._finished = []
        for worker, keys in self._fetches.items():
            out.append(Fetch(worker, keys))
        for worker, (keys, nbytes) in self._deletes.items():
            out.append(Delete(worker, keys, nbytes))
        self._fetches, self._deletes = {}, {}
        if self.validate:
            problems = self.problems()
            if problems:
                raise AssertionError("scheduler state is inconsistent: " + "; ".join(problems[:10]))
        return out

    @property
    def in_grace(self) -> bool:
        """Workers may be missing from the Center's list for a while (it restarted, or they stalled)."""
        return self.now < self.grace_until

    def pick_worker(self) -> str | None:
        """The least loaded worker, for a task a calling thread sends itself; None to leave it to :meth:`handle`.

        Safe to call from another thread: it only reads, and a snapshot a
        moment old is harmless for a choice of worker.
        """
        workers = self.worker_list
        if not workers or self.in_grace:
            return None
        self._turn += 1
        return least_loaded({w.address: w.load() for w in workers if not w.paused}, self._turn)

    # ------------------------------------------------------------------ transitions

    def _set_state(self, ts: TaskState, new: int) -> None:
        """Every change of a task's state passes here: it keeps the count of dependents still to run."""
        old = ts.state
        ts.state = new
        was, now_ = old in TO_RUN, new in TO_RUN
        if was == now_:
            return
        self.ntorun += 1 if now_ else -1
        if now_:
            for dep in ts.deps:
                dep.npending += 1
        else:
            for dep in ts.deps:
                dep.npending -= 1
                if dep.npending <= 0 and dep.state == MEMORY:
                    self._release.append(dep)

    def _register(self, ts: TaskState) -> None:
        ts.id = next(self._ids)
        if ts.controls is not None and ts.controls.priority:
            ts.id -= ts.controls.priority << PRIORITY_SHIFT  # lower ids run first: the ready heaps need no tuples
        self.tasks[ts.id] = ts
        self.by_key[ts.key] = ts
        for dep in ts.deps:
            dep.dependents.add(ts)

    def _submit(self, event: Submit) -> None:
        for ts in event.tasks:
            self._register(ts)
        worker = self.workers.get(event.sent_to) if event.sent_to else None
        if worker is not None and not self.closing:
            for ts in event.tasks:
                self._set_state(ts, PROCESSING)
                ts.worker, ts.batch = worker.address, event.batch_id
            worker.batches[event.batch_id] = (list(event.tasks), self.now)
            worker.inflight += len(event.tasks)
            return
        for ts in event.tasks:
            self._enqueue(ts)

    def _placed(self, event: DataPlaced) -> None:
        for ts in event.tasks:
            self._register(ts)
            ts.state = MEMORY

    def _enqueue(self, ts: TaskState) -> None:
        """Run ``ts`` once its inputs are in memory; compute again inputs that were lost."""
        ts.worker = ts.batch = None
        for dep in ts.deps:
            if dep.state == ERRED:
                self._fail(ts, dep.error)
                return
            if dep.state == FORGOTTEN:
                self._fail(ts, LostDataError(ts.key, dep.lost_on, f"its input {dep.key!r} was released, so it cannot be computed"))
                return
        self._set_state(ts, WAITING)
        ts.waiting = sum(1 for dep in ts.deps if dep.state != MEMORY)
        gone = [dep for dep in ts.deps if dep.state in (LOST, RELEASED)]
        if gone:
            recovery.recompute(self, gone)
        if ts.state == WAITING and not ts.waiting:
            self._make_ready(ts)

    def _make_ready(self, ts: TaskState) -> None:
        self._set_state(ts, READY)
        dispatch.push_ready(self, ts)

    def _now_in_memory(self, ts: TaskState) -> None:
        self._set_state(ts, MEMORY)
        for dependent in ts.dependents:
            if dependent.state == WAITING:
                dependent.waiting -= 1
                if dependent.waiting <= 0:
                    self._make_ready(dependent)
        if ts.deliver:
            if ts.value is not NO_VALUE:
                self._deliver(ts)
            else:
                self._fetch(ts)
        self._release.append(ts)

    def _fail(self, ts: TaskState, error: BaseException) -> None:
        """``ts`` failed, and so does every task waiting for it."""
        stack = [ts]
        while stack:
            task = stack.pop()
            if task.state == ERRED and task is not ts:
                continue
            task.error = error
            task.worker = task.batch = None
            self._set_state(task, ERRED)
            self._out.append(Erred(task))
            stack.extend(d for d in task.dependents if d.state in (WAITING, READY))

    def _releasable(self, ts: TaskState) -> bool:
        return ts.state == MEMORY and ts.wanted <= 0 and ts.npending <= 0 and not (ts.deliver and ts.value is NO_VALUE)

    def _release_unneeded(self) -> None:
        while self._release:
            ts = self._release.pop()
            if self._releasable(ts):
                self._set_state(ts, RELEASED)
                self._drop_copies(ts)
                if ts.id not in self._delivering:  # else the shell reads it after this step
                    ts.value = NO_VALUE
                ts.deliver = False
            self._maybe_forget(ts)

    def _drop_copies(self, ts: TaskState) -> None:
        """Delete the copies this client made: every one of its own values, the fetched copies of others'."""
        for worker in ts.holders if ts.owned else ts.copies:
            if worker in self.workers:
                self._delete(worker, ts.key, ts.nbytes)
        if ts.replicas > 1 and ts.owned:
            self._out.append(DeleteEverywhere([ts.key]))
        ts.holders = EMPTY if ts.owned else ts.holders - ts.copies
        ts.copies = EMPTY

    def _delete(self, worker: str, key: Any, nbytes: int = 0) -> None:
        pending = self._deletes.get(worker)
        if pending is None:
            pending = self._deletes[worker] = [[], 0]
        pending[0].append(key)
        pending[1] += nbytes

    def _maybe_forget(self, ts: TaskState) -> None:
        """Forget tasks nobody can reach: no reference, no dependent, nothing to run (lineage kept till then)."""
        stack = [ts]
        while stack:
            task = stack.pop()
            if task.wanted > 0 or task.dependents or task.state not in (RELEASED, ERRED, LOST):
                continue
            if recovery.has_copies(task):
                self._drop_copies(task)
            task.state = FORGOTTEN
            self.tasks.pop(task.id, None)
            if self.by_key.get(task.key) is task:
                del self.by_key[task.key]
            for dep in task.deps:
                dep.dependents.discard(task)
                stack.append(dep)
            if task.deps and task.error is None:
                task.deps = ()

    # ------------------------------------------------------------------ replies

    def _batch_done(self, event: BatchDone) -> None:
        worker = self.workers.get(event.worker)
        entry = worker.batches.pop(event.batch_id, None) if worker is not None else None
        if entry is None:  # its worker was declared dead, and its tasks sent elsewhere
            if worker is not None:  # ... yet it lives on: what it made for us is nobody's unless we hold it there
                recovery.delete_strays(self, worker.address, event.replies)
            return
        tasks, sent = entry
        worker.answered(tasks)
        if self.closing:
            for ts, reply in zip(tasks, event.replies):
                if reply[1] == "ok":  # nobody waits for it any more, nor for the inputs it fetched
                    self._delete(worker.address, ts.key, reply[2])
                if reply[1] == "ok" or not isinstance(reply[2], MissingDataError):
                    for dep in ts.deps:
                        if worker.address not in dep.holders:
                            self._delete(worker.address, dep.key)
            return
        largest = 0
        for ts, reply in zip(tasks, event.replies):
            if ts.batch != event.batch_id or ts.worker != worker.address or ts.state != PROCESSING:
                if reply[1] == "ok" and ts.state in (RELEASED, FORGOTTEN) and ts.owned:
                    self._delete(worker.address, ts.key, reply[2])
                continue
            if reply[1] == "ok":
                largest = max(largest, reply[2])
                self._task_done(ts, worker.address, reply[2], reply[3] if len(reply) > 3 else NO_VALUE)
            elif isinstance(reply[2], MissingDataError):
                recovery.inputs_missing(self, ts, reply[2])
            else:
                recovery.inputs_kept(self, ts, worker.address)  # it raised, with its inputs fetched
                if ts.controls is not None and len(ts.failed_on) < ts.controls.retries:
                    logger.info("task %s raised %r on %s; trying again", ts.key, reply[2], worker.address)
                    ts.failed_on += (worker.address,)  # dispatch prefers another worker next time
                    self._enqueue(ts)
                else:
                    self._fail(ts, noted(reply[2], ts.key, worker.address))
        worker.measured(len(tasks), sent, self.now, largest)

    def _task_done(self, ts: TaskState, worker: str, nbytes: int, value: Any) -> None:
        hold(ts, worker)
        recovery.inputs_kept(self, ts, worker)
        ts.nbytes = nbytes
        ts.worker = ts.batch = None
        ts.missing_retries = 0
        if value is not NO_VALUE:
            ts.value = value
        self.ndone += 1
        self._finished.append(ts)
        self._now_in_memory(ts)

    def _batch_failed(self, event: BatchFailed) -> None:
        worker = self.workers.get(event.worker)
        entry = worker.batches.pop(event.batch_id, None) if worker is not None else None
        if entry is None:
            return
        tasks, _ = entry
        worker.answered(tasks)  # a suspect's failed batch must not leave its worker isolated for good
        mine = [ts for ts in tasks if ts.state == PROCESSING and ts.batch == event.batch_id]
        if isinstance(event.error, (ConnectionError, TimeoutError)):
            # The worker may be dying: look at the Center now, and send the tasks again.
            logger.info("a batch to %s failed (%s); retrying its %d tasks", worker.address, event.error, len(mine))
            self.dirty = True
            for ts in mine:
                self._enqueue(ts)
            self._out.append(PollCenter())
            return
        for ts in mine:
            self._fail(ts, noted(event.error, ts.key, worker.address))

    # ------------------------------------------------------------------ references and values

    def _cancel(self, event: Cancel) -> None:
        for ts in event.tasks:
            if ts.state in (WAITING, READY):  # not sent yet: a running task cannot be taken back
                self._fail(ts, CancelledError(f"{ts.key} was cancelled"))

    def _released(self, event: Released) -> None:
        for ts in event.tasks:
            ts.wanted -= 1
            self._release.append(ts)

    def _wanted(self, event: Wanted) -> None:
        for ts in event.tasks:
            if ts.state == FORGOTTEN:
                continue
            ts.deliver = True
            if ts.value is not NO_VALUE and ts.state != ERRED:
                self._deliver(ts)
            elif ts.state == MEMORY:
                self._fetch(ts)
            elif ts.state in (LOST, RELEASED):
                recovery.recompute(self, [ts])

    def _deliver(self, ts: TaskState) -> None:
        self._delivering.add(ts.id)
        self._out.append(Delivered(ts))

    def _fetch(self, ts: TaskState) -> None:
        if ts.fetching is not None:
            return
        holders = [w for w in ts.holders if w in self.workers]
        if not holders:
            recovery.lost(self, [ts], ts.lost_on)
            return
        worker = min(holders, key=lambda w: self.workers[w].load())
        ts.fetching = worker
        self._fetches.setdefault(worker, []).append(ts.key)

    def _fetched(self, event: Fetched) -> None:
        for key, value in event.values.items():
            ts = self.by_key.get(key)
            if ts is None or ts.fetching != event.worker:
                continue
            ts.fetching = None
            ts.value = value
            if ts.deliver:
                self._deliver(ts)
            self._release.append(ts)

    def _fetch_failed(self, event: FetchFailed) -> None:
        for key in event.keys:
            ts = self.by_key.get(key)
            if ts is None or ts.fetching != event.worker:
                continue
            ts.fetching = None
            if isinstance(event.error, (ConnectionError, TimeoutError, MissingDataError)):
                if event.worker in ts.holders:
                    ts.holders.discard(event.worker)
                if ts.state == MEMORY:
                    self._fetch(ts)
            else:
                self._fail(ts, event.error)

    def _close(self, event: Close) -> None:
        """Delete everything this client has on the cluster (results still running are deleted as they come)."""
        self.closing = True
        for ts in list(self.tasks.values()):
            ts.wanted = 0
            ts.deliver = False
            if ts.state == MEMORY:
                self._set_state(ts, RELEASED)
            if recovery.has_copies(ts):
                self._drop_copies(ts)
        if self.dirty:
            # After a failure the records may have missed a copy: sweep every live worker.
            keys = event.sweep if event.sweep is not None else [ts.key for ts in self.tasks.values() if ts.owned]
            for worker in self.workers:  # on top of the copies of others' values dropped above
                keys_, nbytes = self._deletes.get(worker, ([], 0))
                self._deletes[worker] = [list(dict.fromkeys([*keys_, *keys])), nbytes]
        self.ready, self.suspects, self.restricted = [], [], []

    def problems(self) -> list[str]:
        """What is inconsistent in the state; empty when all is well (see :mod:`zdist.scheduling.checks`)."""
        return checks.problems(self)


__all__ = ["Scheduler", "TaskState", "WorkerState", "NEW", "NO_VALUE"]
