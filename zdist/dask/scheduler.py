"""The part of ``zdist.dask.get`` that talks to workers: one computation, run on a client loop.

A :class:`Computation` takes a :class:`~zdist.dask.plan.Plan` (tasks numbered
in ``dask.order`` priority) and drives it to the end on the workers of one
Center:

* ready tasks go out as ``compute_batch`` messages, one per worker per turn
  of the loop, each worker holding at most ``limit`` tasks in flight: a few
  per core for slow or bulky tasks, up to :data:`MAX_TASKS_PER_CORE` for tiny
  ones (measured per worker from the batches' round trips and result sizes);
* a task runs on the worker holding most bytes of its inputs, waiting for
  it if it is busy; a worker with nothing else to do takes such a task if
  its inputs are small, or if waiting would take much longer than moving
  them (:func:`~zdist.dask.graph.worth_moving`);
* a value is deleted from every worker holding it as soon as every task that
  needs it is done, and the requested values are fetched (small ones come
  back with the acknowledgement);
* the Center is asked every ``poll_interval`` which workers live; the
  results a dead worker held are computed again where still needed, and a
  task that was in flight on ``max_worker_deaths`` dying workers is given up.

Values live on the cluster under names ``zd-<run>-<n>`` rather than their
dask keys: short strings cost far less to send and look up than tuple keys.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from functools import partial
from typing import Any

import numpy as np

from ..errors import LostDataError, MissingDataError, NoWorkersError, WorkerDiedError
from ..protocol import ProtocolError, Ref
from ..rpc import ConnectionPool, rebuild_exception
from ..scheduling.policy import check_invariants, choose_worker, to_recompute, worth_moving
from .plan import Plan
from .tasks import TaskBatch, run_task_spec

logger = logging.getLogger(__name__)

WAITING, READY, PROCESSING, MEMORY, RELEASED = range(5)
STATE_NAMES = ("waiting", "ready", "processing", "memory", "released")

#: Tasks in flight per worker core, at least and at most.
MIN_TASKS_PER_CORE = 2
MAX_TASKS_PER_CORE = 128
#: Work queued per core, in seconds of measured task time: enough that a
#: worker never waits for the client's next message.
SECONDS_IN_FLIGHT = 0.1
#: Bytes of results in flight per core: bulky tasks are sent a few at a time
#: so that a long reduction never holds more than a few chunks per core.
BYTES_IN_FLIGHT = 24 * 2**20
#: Inputs this small move to a worker with nothing else to do rather than
#: wait for the busy one that holds them.
SMALL_INPUTS = 256 * 2**10
#: An idle worker takes a task held for a busy one (moving its inputs) only
#: when the wait it saves is expected to be at least this long.
STEAL_MIN_WAIT = 0.5
#: A task's time before any was measured.
DEFAULT_TASK_SECONDS = 0.001
#: How often a task failing with MissingDataError is retried while the
#: scheduler still believes a live worker holds the missing values (the
#: Center can lag behind a worker's report by a moment).
MISSING_DATA_RETRIES = 5
#: Released values are deleted from a worker in bulk: once they free this
#: many bytes, number this many keys, or have waited this long.
DELETE_BYTES = 4 * 2**20
DELETE_KEYS = 1000
DELETE_DELAY = 0.05
#: How long cleanup waits for batches still running before leaving their
#: deletion to a background task.
CLEANUP_WAIT = 5.0
#: How long the Center may stay silent before the computation gives up.
CENTER_TIMEOUT = 30.0

_NOTHING = object()


class TaskKilledWorkersError(WorkerDiedError):
    """A task was in flight on ``max_worker_deaths`` workers that died: it probably kills them."""

    def __init__(self, key: Any, workers: list[str]):
        self.key = key
        self.workers = list(workers)
        super().__init__(
            f"task {key!r} was running on {len(self.workers)} workers that died ({', '.join(self.workers)}); "
            "its workers kept dying, so it is not retried again (does it crash its process: a segfault, "
            "os._exit, running out of memory?)"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.workers))


class _Worker:
    """What the scheduler knows of one live worker."""

    __slots__ = (
        "address", "ncores", "pid", "conn", "inflight", "batches", "limit", "task_seconds", "recent",
        "recent_nbytes", "busy_since", "held", "isolated", "alive",
    )

    def __init__(self, address: str, ncores: int, pid: Any, conn: Any):
        self.address = address
        self.ncores = max(1, int(ncores))
        self.pid = pid
        self.conn = conn
        self.inflight = 0
        self.batches: dict[int, tuple[list, float, asyncio.Future]] = {}
        self.limit = MIN_TASKS_PER_CORE * self.ncores
        self.task_seconds = 0.0  # 0: not measured yet
        self.recent: list[float] = []
        self.busy_since: float | None = None  # when the worker last replied while still having work
        self.recent_nbytes: list[int] = []
        self.held: list[int] = []  # heap of tasks waiting for this worker's inputs
        self.isolated = False  # running a suspect task alone
        self.alive = True

    def free(self) -> int:
        return 0 if self.isolated else self.limit - self.inflight

    def load(self) -> float:
        return self.inflight / self.ncores

    def measured(self, ntasks: int, sent: float, now: float, max_nbytes: int) -> None:
        """Fold one batch's timing and result sizes into the in-flight limit.

        A task's time is bounded above by the batch's round trip, and, when
        the worker had more work queued since its previous reply, by the gap
        between the two replies (which leaves the network out). The median of
        recent bounds is taken: it ignores the odd slow batch (the first task
        of a kind imports its modules) and replies that came back together.
        Results are sized by the largest of recent batches: a reduction
        mixes bulky chunks with tiny partial results, and the chunks are
        what fills memory.
        """
        bound = now - sent
        if self.busy_since is not None:
            bound = min(bound, now - self.busy_since)
        self.busy_since = now if self.inflight > 0 else None
        sample = bound * self.ncores / ntasks
        recent = self.recent
        recent.append(sample)
        if len(recent) > 8:
            del recent[0]
        self.task_seconds = sorted(recent)[len(recent) // 2]
        sizes = self.recent_nbytes
        sizes.append(max_nbytes)
        if len(sizes) > 8:
            del sizes[0]
        by_time = SECONDS_IN_FLIGHT / max(self.task_seconds, 1e-6)
        by_memory = BYTES_IN_FLIGHT / max(max(sizes), 1.0)
        # Bulky results bound the count first (memory); then the time the
        # queued work takes (load balance) within [MIN, MAX].
        per_core = max(1, min(by_memory, max(MIN_TASKS_PER_CORE, min(MAX_TASKS_PER_CORE, by_time))))
        self.limit = int(per_core) * self.ncores

    def __repr__(self) -> str:
        return f"<worker {self.address} {self.inflight}/{self.limit} in flight>"


class Computation:
    """One ``get``: the state of every task, and the handlers that move it forward.

    Create and :meth:`run` it on the event loop that owns ``pool``.
    """

    def __init__(
        self,
        plan: Plan,
        center_address: str,
        pool: ConnectionPool,
        *,
        external: dict | None = None,
        max_worker_deaths: int = 3,
        poll_interval: float = 0.3,
        return_values: int = 2**20,
        validate: bool = False,
    ):
        n = len(plan)
        self.plan = plan
        self.center_address = center_address
        self.pool = pool
        self.max_worker_deaths = max_worker_deaths
        self.poll_interval = poll_interval
        self.return_values = return_values
        self.validate = validate
        self.prefix = f"zd-{uuid.uuid4().hex[:12]}-"
        self.ckeys = [f"{self.prefix}{i}" for i in range(n)]
        self.deps = plan.deps
        self.ext_deps = plan.ext_deps
        self.dependents = plan.dependents
        self.state = [WAITING] * n
        self.waiting = [len(d) for d in plan.deps]  # inputs not in memory, for waiting tasks
        self.remaining = [len(d) for d in plan.dependents]  # dependents not done
        self.holders: dict[int, set] = {}
        self.nbytes: dict[int, int] = {}
        self.where: list = [None] * n
        self.ready: list[int] = []
        self.suspects: list[int] = []  # tasks in flight on a worker that died: run alone
        self.death_workers: dict[int, list[str]] = {}
        self.missing_retries: dict[int, int] = {}
        self.deferred: list[int] = []  # tasks waiting for the next poll of the Center
        self.pending_outputs = set(plan.output_ids.values())
        self.values: dict = {}
        # Inputs from outside the graph: key -> (addresses holding it, bytes)
        self.ext_holders: dict[Any, set[str]] = {key: set(holders) for key, (holders, _) in (external or {}).items()}
        self.ext_nbytes: dict[Any, int] = {key: nbytes for key, (_, nbytes) in (external or {}).items()}
        self.ext_copies: dict[str, set] = {}
        self.workers: dict[str, _Worker] = {}
        self.deletes: dict[_Worker, list] = {}  # worker -> [keys, bytes, since]
        self._delete_timer: asyncio.TimerHandle | None = None
        self.fetching: dict[int, asyncio.Future] = {}
        self.dirty = False  # something failed: sweep every worker at the end
        self.error: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future = self.loop.create_future()
        self._flush_scheduled = False
        self._poll_now = asyncio.Event()
        self._batch_ids = 0
        self._dep_ckeys: list = [None] * n
        self._dep_keys: list = [None] * n
        self.ntasks_sent = 0
        self.ntasks_done = 0  # for progress bars: recomputed tasks count again

    # ------------------------------------------------------------------ running

    async def run(self) -> dict:
        """Compute every requested key; return ``{key: value}``. Cleans the cluster up either way."""
        poller = None
        try:
            info = await self.center.request("info", {}, timeout=10.0)
            self.center_id, self.grace_until = info.get("id"), 0.0
            if not info["workers"]:
                raise NoWorkersError(f"no workers are registered with the Center at {self.center_address}; start some with `zdist-worker {self.center_address}`")
            self._update_workers(info["workers"])
            await self._fetch_external_outputs()
            for t in range(len(self.plan)):
                if not self.deps[t]:
                    self._make_ready(t)
            poller = asyncio.ensure_future(self._poll_center())
            self._check_finished()
            self._flush()
            return await self.finished
        finally:
            if poller is not None:
                poller.cancel()
            await self._cleanup()

    @property
    def center(self):
        return self.pool.get(self.center_address)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self.dirty = True
            if not self.finished.done():
                self.finished.set_exception(exc)

    def _check_finished(self) -> None:
        if not self.pending_outputs and not self.finished.done() and self.error is None:
            self.finished.set_result(self.values)

    @property
    def closing(self) -> bool:
        return self.finished.done()

    # ------------------------------------------------------------------ workers

    def _update_workers(self, infos: dict) -> None:
        for address, worker in list(self.workers.items()):
            info = infos.get(address)
            if info is None:
                self._worker_lost(worker, "the Center dropped it")
            elif worker.pid is not None and info.get("pid") not in (None, worker.pid):
                self._worker_lost(worker, "it restarted")
        for address, info in infos.items():
            if address not in self.workers:
                self.workers[address] = _Worker(address, info.get("ncores", 1), info.get("pid"), self.pool.get(address))
        if not self.workers and not self.closing:
            self._fail(NoWorkersError(f"every worker of the Center at {self.center_address} died or left during the computation; {len(self.pending_outputs)} requested keys were not computed"))

    async def _poll_center(self) -> None:
        """Ask the Center which workers live, every ``poll_interval`` or at once when asked to."""
        silent_since = None
        while not self.closing:
            try:
                await asyncio.wait_for(self._poll_now.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._poll_now.clear()
            try:
                info = await self.center.request("info", {}, timeout=max(2.0, self.poll_interval * 4))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a silent Center is only fatal after a while
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > CENTER_TIMEOUT:
                    self._fail(ConnectionError(f"the Center at {self.center_address} has not answered for {CENTER_TIMEOUT:.0f} s: {exc}"))
                    return
                self.pool.remove(self.center_address)
                continue
            silent_since = None
            workers = info["workers"]
            if info.get("id") != self.center_id:
                logger.warning("the Center at %s restarted; waiting for workers to register again", self.center_address)
                self.center_id = info.get("id")
                self.grace_until = time.monotonic() + info.get("heartbeat_timeout", 5.0) + 2.0
            if time.monotonic() < self.grace_until:
                # A restarted Center lists workers only as they register again: keep the ones we knew.
                workers = {**{a: {"ncores": w.ncores, "pid": w.pid} for a, w in self.workers.items()}, **workers}
            self._update_workers(workers)
            if self.deferred:
                deferred, self.deferred = self.deferred, []
                for t in deferred:
                    if self.state[t] == WAITING:
                        self._uncount_wait(t)
            self._schedule_flush()

    def _worker_lost(self, worker: _Worker, why: str) -> None:
        """A worker died: retry what ran there, recompute what it held that is still needed."""
        logger.warning("worker %s is gone (%s); recovering its work", worker.address, why)
        worker.alive = False
        self.workers.pop(worker.address, None)
        self.dirty = True
        self.deletes.pop(worker, None)
        self.pool.remove(worker.address, WorkerDiedError(f"worker {worker.address} died ({why})"))
        state = self.state
        # Tasks in flight there: each is a suspect (it may have killed its worker).
        batches, worker.batches = worker.batches, {}
        worker.inflight = 0
        for ids, _, _ in batches.values():
            for t in ids:
                if state[t] == PROCESSING and self.where[t] is worker:
                    died_on = self.death_workers.setdefault(t, [])
                    died_on.append(worker.address)
                    if len(died_on) >= self.max_worker_deaths and not self.closing:
                        self._fail(TaskKilledWorkersError(self.plan.keys[t], died_on))
                    self._requeue(t)
        held, worker.held = worker.held, []
        for t in held:
            if state[t] == READY:
                self._push_ready(t)
        # Values it held.
        lost = []
        for t, holders in self.holders.items():
            if worker in holders:
                holders.discard(worker)
                if not holders and state[t] == MEMORY:
                    lost.append(t)
        for key, holders in self.ext_holders.items():
            holders.discard(worker.address)
        self.ext_copies.pop(worker.address, None)
        if self.closing:
            return
        self._check_external()
        if lost:
            self._recover(lost)
        self._schedule_flush()

    def _check_external(self) -> None:
        """Values the graph needs from outside must still be held somewhere: they cannot be recomputed."""
        for key, holders in self.ext_holders.items():
            if not holders and any(self.state[t] not in (MEMORY, RELEASED) and key in self.ext_deps[t] for t in range(len(self.plan))):
                self._fail(LostDataError(key, detail="it is an input of this graph that the graph does not make"))
                return

    def _recover(self, lost: list[int]) -> None:
        """Mark ``lost`` tasks unavailable and compute again what is still needed."""
        state = self.state
        for t in lost:
            self.nbytes.pop(t, None)
            for d in self.dependents[t]:
                if state[d] == WAITING:
                    self.waiting[d] += 1
                elif state[d] == READY:
                    state[d] = WAITING  # its heap entry goes stale
                    self.waiting[d] = 1
        n = len(self.plan)
        done = {t for t in range(n) if state[t] in (MEMORY, RELEASED)}
        available = {t for t in range(n) if state[t] == MEMORY} - set(lost)
        redo = to_recompute(lost, dict(enumerate(self.deps)), dict(enumerate(self.dependents)), done, available, self.pending_outputs)
        for t in lost:
            if t not in redo:
                state[t] = RELEASED
        for t in redo:
            if state[t] in (MEMORY, RELEASED):
                for dep in self.deps[t]:
                    self.remaining[dep] += 1
                state[t] = WAITING
        for t in sorted(redo):
            self.waiting[t] = sum(1 for dep in self.deps[t] if state[dep] != MEMORY)
            if not self.waiting[t]:
                self._make_ready(t)
        if redo:
            logger.info("recomputing %d tasks whose results were lost", len(redo))

    # ------------------------------------------------------------------ task transitions

    def _push_ready(self, t: int) -> None:
        heapq.heappush(self.suspects if t in self.death_workers else self.ready, t)

    def _make_ready(self, t: int) -> None:
        self.state[t] = READY
        self._push_ready(t)

    def _uncount_wait(self, t: int) -> None:
        self.waiting[t] -= 1
        if self.waiting[t] <= 0:
            self._make_ready(t)

    def _requeue(self, t: int, extra_wait: int = 0) -> None:
        """Send ``t`` again once its inputs are in memory (``extra_wait``: also after the next poll)."""
        state = self.state
        self.where[t] = None
        state[t] = WAITING
        self.waiting[t] = sum(1 for dep in self.deps[t] if state[dep] != MEMORY) + extra_wait
        if not self.waiting[t]:
            self._make_ready(t)

    def _release(self, t: int) -> None:
        self.state[t] = RELEASED
        nbytes = self.nbytes.pop(t, 0)
        holders = self.holders.pop(t, None)
        if holders:
            for worker in holders:
                if worker.alive:
                    self._delete_later(worker, self.ckeys[t], nbytes)

    def _delete_later(self, worker: _Worker, key: str, nbytes: int) -> None:
        pending = self.deletes.get(worker)
        if pending is None:
            pending = self.deletes[worker] = [[], 0, self.loop.time()]
        pending[0].append(key)
        pending[1] += nbytes

    def _task_done(self, t: int, worker: _Worker, nbytes: int, value: Any) -> None:
        state = self.state
        st = state[t]
        holders = self.holders.get(t)
        if holders is None:
            holders = self.holders[t] = set()
        holders.add(worker)
        # The worker fetched the inputs it lacked and keeps them: note the copies, to delete them later.
        for dep in self.deps[t]:
            dep_holders = self.holders.get(dep)
            if dep_holders is not None:
                dep_holders.add(worker)
        if self.ext_deps[t]:
            for key in self.ext_deps[t]:
                if worker.address not in self.ext_holders.get(key, ()):
                    self.ext_copies.setdefault(worker.address, set()).add(key)
        if st == MEMORY or self.closing:
            return  # a second copy, or a result nobody waits for any more
        if st == RELEASED:
            self._release(t)
            return
        state[t] = MEMORY
        self.ntasks_done += 1
        self.where[t] = None
        self.nbytes[t] = nbytes
        for d in self.dependents[t]:
            if state[d] == WAITING:
                self._uncount_wait(d)
        remaining = self.remaining
        pending = self.pending_outputs
        for dep in self.deps[t]:
            remaining[dep] -= 1
            if not remaining[dep] and dep not in pending and state[dep] == MEMORY:
                self._release(dep)
        if t in pending:
            if value is not _NOTHING:
                self._deliver(t, value)
            else:
                self._fetch_output(t, worker)
        elif not remaining[t]:
            self._release(t)

    def _task_erred(self, t: int, worker: _Worker, error: dict) -> None:
        exc = rebuild_exception(error, worker.address)
        if isinstance(exc, MissingDataError):
            missing = self._cluster_keys_to_tasks(exc.keys)
            if missing is not None:
                self._inputs_missing(t, missing)
                return
        key = self.plan.keys[t]
        note = f"while computing key {key!r} on worker {worker.address} (zdist.dask.get)"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        self._fail(exc)

    def _cluster_keys_to_tasks(self, keys: list) -> list | None:
        out = []
        prefix = self.prefix
        for key in keys:
            if isinstance(key, str) and key.startswith(prefix):
                out.append(int(key[len(prefix):]))
            elif key in self.ext_holders:
                out.append(("external", key))
            else:
                return None  # not ours: the task itself raised it
        return out

    def _inputs_missing(self, t: int, missing: list) -> None:
        """``t`` found some inputs held by nobody: recompute those we know lost, or ask the Center again."""
        believed = [m for m in missing if isinstance(m, int) and self.state[m] == MEMORY]
        if any(not isinstance(m, int) for m in missing):
            for m in missing:
                if not isinstance(m, int):
                    self.ext_holders[m[1]] = set()
            self._check_external()
            return
        if believed:
            retries = self.missing_retries[t] = self.missing_retries.get(t, 0) + 1
            if retries > MISSING_DATA_RETRIES:
                # The Center keeps saying nobody holds them: believe it, and
                # drop whatever copies the workers might still have.
                for m in believed:
                    for worker in self.holders.pop(m, ()):
                        if worker.alive:
                            self._delete_later(worker, self.ckeys[m], 0)
                self._recover(believed)
                self._requeue(t)
                return
            self._requeue(t, extra_wait=1)
            self.deferred.append(t)
            self._poll_now.set()
            return
        self._requeue(t)

    # ------------------------------------------------------------------ outputs

    def _deliver(self, t: int, value: Any) -> None:
        if t not in self.pending_outputs:
            return
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()  # received zero-copy on a read-only message frame
        self.values[self.plan.keys[t]] = value
        self.pending_outputs.discard(t)
        if not self.remaining[t] and self.state[t] == MEMORY:
            self._release(t)
        self._check_finished()

    def _fetch_output(self, t: int, worker: _Worker) -> None:
        if t in self.fetching:
            return
        future = worker.conn.request("get_data", {"keys": [self.ckeys[t]]}, timeout=None)
        self.fetching[t] = future
        future.add_done_callback(partial(self._output_fetched, t, worker))

    def _output_fetched(self, t: int, worker: _Worker, future: asyncio.Future) -> None:
        self.fetching.pop(t, None)
        if future.cancelled() or self.closing:
            return
        exc = future.exception()
        if exc is None:
            self._deliver(t, future.result()[self.ckeys[t]])
            self._schedule_flush()
            return
        if isinstance(exc, (WorkerDiedError, ConnectionError, MissingDataError)):
            # Its worker died (recovery recomputes it) or dropped it: try another holder.
            others = [w for w in self.holders.get(t, ()) if w.alive and w is not worker]
            if self.state[t] == MEMORY and others:
                self._fetch_output(t, others[0])
            elif isinstance(exc, MissingDataError) and self.state[t] == MEMORY:
                self.holders.get(t, set()).discard(worker)
                self._recover([t])
                self._schedule_flush()
            return
        self._fail(exc)

    async def _fetch_external_outputs(self) -> None:
        for key in self.plan.external_outputs:
            holders = [a for a in self.ext_holders.get(key, ()) if a in self.workers]
            if not holders:
                raise MissingDataError([key], "requested, but neither in the graph nor held on the cluster")
            self.values[key] = (await self.pool.get(holders[0]).request("get_data", {"keys": [key]}))[key]

    # ------------------------------------------------------------------ dispatch

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.closing:
            try:
                self._dispatch()
            except Exception as exc:  # noqa: BLE001 - e.g. a task that cannot be pickled
                self._fail(exc)
        self._send_deletes()
        if self.validate and not self.closing:
            self._validate()

    def _send_deletes(self, force: bool = False) -> None:
        """Tell workers to drop released values: in bulk, since every message costs a worker (and its report to the Center) more than the keys in it.

        A worker's deletions go out once they free :data:`DELETE_BYTES` or
        number :data:`DELETE_KEYS`, or have waited :data:`DELETE_DELAY`.
        """
        now = self.loop.time()
        waiting = None
        for worker, (keys, nbytes, since) in list(self.deletes.items()):
            if not (force or nbytes >= DELETE_BYTES or len(keys) >= DELETE_KEYS or now - since >= DELETE_DELAY):
                waiting = since if waiting is None else min(waiting, since)
                continue
            del self.deletes[worker]
            if worker.alive:
                try:
                    worker.conn.send("delete_data", keys=keys)
                except Exception:  # noqa: BLE001 - a closed connection: the final sweep covers it
                    self.dirty = True
        if waiting is not None and self._delete_timer is None:
            self._delete_timer = self.loop.call_at(waiting + DELETE_DELAY, self._deletes_due)

    def _deletes_due(self) -> None:
        self._delete_timer = None
        self._send_deletes()

    def _dispatch(self) -> None:
        free = [w for w in self.workers.values() if w.free() > 0]
        if not free:
            return
        state = self.state
        out: dict[_Worker, list[int]] = {}

        def assign(t: int, worker: _Worker) -> None:
            state[t] = PROCESSING
            self.where[t] = worker
            worker.inflight += 1
            out.setdefault(worker, []).append(t)

        # Suspects run alone on an idle worker, so that a task that kills
        # its worker is told apart from the tasks that were beside it; the
        # least loaded worker gets no new work until it is idle.
        suspects = self.suspects
        while suspects and state[suspects[0]] != READY:
            heapq.heappop(suspects)  # stale: lost its inputs, or was placed already
        while self.suspects:
            idle = [w for w in free if w.inflight == 0]
            if not idle:
                drain = min(self.workers.values(), key=lambda w: (w.isolated, w.inflight))
                if drain in free:
                    free.remove(drain)
                break
            t = heapq.heappop(self.suspects)
            if state[t] != READY:
                continue
            worker = idle[0]
            assign(t, worker)
            worker.isolated = True
            free.remove(worker)
        # Tasks held back for a worker that holds their inputs.
        for worker in free:
            held = worker.held
            while held and worker.free() > 0:
                t = heapq.heappop(held)
                if state[t] == READY:
                    assign(t, worker)
        free = [w for w in free if w.free() > 0]
        ready = self.ready
        deps = self.deps
        ext_deps = self.ext_deps
        fill = None
        quota = 0
        while ready and free:
            t = heapq.heappop(ready)
            if state[t] != READY:
                continue
            if not deps[t] and not ext_deps[t]:
                # No inputs: give the least loaded worker a run of consecutive
                # tasks (dask.order groups them by what they feed), at most
                # its share of what is ready.
                if fill is None or fill.free() <= 0 or quota <= 0:
                    fill = min(free, key=_Worker.load)
                    quota = -(-(len(ready) + 1) // len(free))
                worker = fill
                quota -= 1
            else:
                worker = self._place(t, free)
                if worker is None:
                    continue  # held for a busy worker
            assign(t, worker)
            if worker.free() <= 0:
                free.remove(worker)
                if worker is fill:
                    fill = None
        if free and not ready:
            self._steal(free, assign)
        for worker, ids in out.items():
            self._send(worker, ids)

    def _who_has(self, t: int) -> tuple[list, Any, Any]:
        """The inputs of ``t`` with the maps ``choose_worker`` reads, external inputs included."""
        deps = self.deps[t]
        ext = self.ext_deps[t]
        if not ext:
            return deps, self.holders, self.nbytes
        by_address = self.workers
        who = {dep: self.holders.get(dep, ()) for dep in deps}
        sizes = {dep: self.nbytes.get(dep, 0) for dep in deps}
        for key in ext:
            who[("external", key)] = {by_address[a] for a in self.ext_holders.get(key, ()) if a in by_address}
            sizes[("external", key)] = self.ext_nbytes.get(key) or 1
        return list(who), who, sizes

    def _place(self, t: int, free: list[_Worker]) -> _Worker | None:
        deps, who, sizes = self._who_has(t)
        loads = {w: w.load() for w in self.workers.values()}
        best = choose_worker(deps, who, sizes, loads)
        if best is None or best in free:
            return best
        heapq.heappush(best.held, t)  # wait for the worker that holds the inputs (or a thief)
        return None

    def _steal(self, free: list[_Worker], assign: Any) -> None:
        """Workers with nothing else to do take tasks held for busy ones.

        A task with small inputs moves at once; one with large inputs only to
        an idle worker, and when the wait saved is clearly longer than the move.
        """
        state = self.state
        for worker in free:
            for victim in sorted(self.workers.values(), key=lambda w: -len(w.held)):
                if victim is worker or not victim.held:
                    continue
                while victim.held and worker.free() > 0:
                    t = victim.held[0]
                    if state[t] != READY:
                        heapq.heappop(victim.held)
                        continue
                    deps, who, sizes = self._who_has(t)
                    moved = sum(sizes.get(dep, 0) for dep in deps if worker not in who.get(dep, ()))
                    if moved > SMALL_INPUTS and (
                        worker.inflight
                        or not worth_moving(moved, len(victim.held), victim.task_seconds or DEFAULT_TASK_SECONDS, victim.ncores, STEAL_MIN_WAIT)
                    ):
                        break
                    heapq.heappop(victim.held)
                    assign(t, worker)

    def _task_inputs(self, t: int) -> tuple[list, tuple]:
        """Cluster keys of the inputs of ``t`` (for Refs) and their dask keys (for the task)."""
        ckeys = self._dep_ckeys[t]
        if ckeys is None:
            all_ckeys = self.ckeys
            keys = self.plan.keys
            deps = self.deps[t]
            ext = self.ext_deps[t]
            ckeys = self._dep_ckeys[t] = [all_ckeys[d] for d in deps] + list(ext)
            self._dep_keys[t] = tuple(keys[d] for d in deps) + tuple(ext)
        return ckeys, self._dep_keys[t]

    def _send(self, worker: _Worker, ids: list[int]) -> None:
        """Send ``ids`` to ``worker`` as batches of at most half its limit, so two are in flight."""
        pending = self.pending_outputs
        outputs = [t for t in ids if t in pending]
        if outputs:
            ids = [t for t in ids if t not in pending]
            self._send_batch(worker, outputs, self.return_values)
        size = max(1, worker.limit // 2)
        for start in range(0, len(ids), size):
            self._send_batch(worker, ids[start : start + size], 0)

    def _send_batch(self, worker: _Worker, ids: list[int], return_values: int) -> None:
        if not ids:
            return
        nodes = self.plan.nodes
        ckeys = self.ckeys
        inputs = [self._task_inputs(t) for t in ids]
        batch = TaskBatch.pack([nodes[t] for t in ids], [keys for _, keys in inputs])
        tasks = []
        for j, t in enumerate(ids):
            dep_ckeys = inputs[j][0]
            if dep_ckeys:
                tasks.append([ckeys[t], run_task_spec, [batch, j, *map(Ref, dep_ckeys)], {}, dep_ckeys])
            else:
                tasks.append([ckeys[t], run_task_spec, [batch, j], {}, dep_ckeys])
        args = {"tasks": tasks, "return_values": return_values}
        who_has = self._who_has_elsewhere(worker, ids)
        if who_has:
            args["who_has"] = who_has  # the worker fetches them without asking the Center
        self._batch_ids += 1
        batch_id = self._batch_ids
        try:
            future = worker.conn.request("compute_batch", args, timeout=None)
        except Exception as exc:
            note = f"while sending tasks {[self.plan.keys[t] for t in ids][:5]} to worker {worker.address} (zdist.dask.get)"
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            raise
        worker.batches[batch_id] = (ids, time.monotonic(), future)
        self.ntasks_sent += len(ids)
        future.add_done_callback(partial(self._batch_done, worker, batch_id))

    def _who_has_elsewhere(self, worker: _Worker, ids: list[int]) -> dict:
        """``{cluster key: addresses}`` of the inputs of ``ids`` that ``worker`` lacks."""
        who_has = {}
        ckeys = self.ckeys
        for t in ids:
            for d in self.deps[t]:
                holders = self.holders.get(d)
                if holders and worker not in holders:
                    who_has[ckeys[d]] = [w.address for w in holders if w.alive]
            for key in self.ext_deps[t]:
                holders = self.ext_holders.get(key)
                if holders and worker.address not in holders:
                    who_has[key] = list(holders)
        return who_has

    def _batch_done(self, worker: _Worker, batch_id: int, future: asyncio.Future) -> None:
        entry = worker.batches.pop(batch_id, None)
        if entry is None:
            if not future.cancelled():
                future.exception()  # retrieved: its worker was declared dead and its tasks requeued
            return
        ids, sent, _ = entry
        worker.inflight -= len(ids)
        if worker.inflight <= 0:
            worker.isolated = False
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._batch_failed(worker, ids, exc)
            self._schedule_flush()
            return
        replies = future.result()
        largest = 0
        done = self._task_done
        for t, reply in zip(ids, replies):
            if reply[1] == "ok":
                nbytes = reply[2]
                if nbytes > largest:
                    largest = nbytes
                done(t, worker, nbytes, reply[3] if len(reply) > 3 else _NOTHING)
            elif not self.closing:
                self._task_erred(t, worker, reply[2])
        worker.measured(len(ids), sent, time.monotonic(), largest)
        self._schedule_flush()

    def _batch_failed(self, worker: _Worker, ids: list[int], exc: BaseException) -> None:
        if self.closing:
            return
        if isinstance(exc, ProtocolError):
            # The worker could not read the tasks: typically a function it cannot import.
            keys = [self.plan.keys[t] for t in ids][:5]
            if hasattr(exc, "add_note"):
                exc.add_note(f"worker {worker.address} could not load the tasks {keys} (zdist.dask.get); can it import their functions?")
            self._fail(exc)
            return
        if isinstance(exc, (ConnectionError, TimeoutError)):
            # The worker may be dying: ask the Center now, and send the tasks again.
            logger.info("a batch to %s failed (%s); retrying its %d tasks", worker.address, exc, len(ids))
            self.dirty = True
            for t in ids:
                if self.state[t] == PROCESSING and self.where[t] is worker:
                    self._requeue(t)
            self._poll_now.set()
            return
        self._fail(exc)

    # ------------------------------------------------------------------ checks and cleanup

    def _validate(self) -> None:
        n = len(self.plan)
        state = {t: STATE_NAMES[self.state[t]] for t in range(n)}
        holders = {t: {w.address for w in hs} for t, hs in self.holders.items()}
        problems = check_invariants(state, dict(enumerate(self.deps)), dict(enumerate(self.dependents)), holders, self.pending_outputs)
        for t in range(n):
            if self.state[t] != MEMORY:
                continue
            if any(w for w in self.holders.get(t, ()) if not w.alive):
                problems.append(f"{self.plan.keys[t]!r} is held by a dead worker")
        if problems:
            self._fail(AssertionError("zdist.dask scheduler state is inconsistent: " + "; ".join(problems[:10])))

    async def _cleanup(self) -> None:
        """Delete everything this computation left on the cluster."""
        if not self.finished.done():
            self.finished.cancel()
        elif not self.finished.cancelled():
            self.finished.exception()  # retrieved: run() raised it, or an earlier error
        running = [future for w in self.workers.values() for _, _, future in w.batches.values()]
        running += list(self.fetching.values())
        if running:
            await asyncio.wait(running, timeout=CLEANUP_WAIT)
        late = [f for f in running if not f.done()]
        await self._delete_everything()
        if late:
            # Batches still running would leave their results behind: delete those once they end.
            asyncio.ensure_future(self._late_cleanup(late))
        else:
            self.pool.close()

    async def _late_cleanup(self, futures: list) -> None:
        try:
            await asyncio.wait(futures, timeout=600)
            await self._delete_everything()
        finally:
            self.pool.close()

    async def _delete_everything(self) -> None:
        if self._delete_timer is not None:
            self._delete_timer.cancel()
            self._delete_timer = None
        self._send_deletes(force=True)
        by_worker: dict[_Worker, set] = {}
        for t, holders in self.holders.items():
            for worker in holders:
                if worker.alive:
                    by_worker.setdefault(worker, set()).add(self.ckeys[t])
        self.holders = {}
        for address, keys in self.ext_copies.items():
            worker = self.workers.get(address)
            if worker is not None:
                by_worker.setdefault(worker, set()).update(keys)
        self.ext_copies = {}
        if self.dirty:
            # After a failure the records may have missed a copy: sweep every live worker.
            for worker in self.workers.values():
                by_worker.setdefault(worker, set()).update(self.ckeys)
        requests = [w.conn.request("delete_data", {"keys": list(keys)}, timeout=5.0) for w, keys in by_worker.items() if w.alive and keys]
        if requests:
            await asyncio.gather(*requests, return_exceptions=True)
