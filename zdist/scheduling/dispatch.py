"""Placement: which ready task goes to which worker, in which batch. Part of the core, no I/O.

* ready tasks go out as batches, each worker holding at most its measured
  in-flight ``limit`` (:func:`~zdist.scheduling.policy.in_flight_limit`);
* a task runs on the worker holding most bytes of its inputs
  (:func:`~zdist.scheduling.policy.choose_worker`), waiting for it if it is
  busy; a worker with nothing else to do takes such a task if its inputs
  are small, or if waiting would take much longer than moving them
  (:func:`~zdist.scheduling.policy.worth_moving`);
* a task that was in flight on a worker that died runs alone on an idle
  worker, so that a task that kills its worker is told apart from its
  neighbours.

These functions change the scheduler's state only through its
``_set_state``; :meth:`Scheduler.handle` calls :func:`dispatch` after every step.
"""
from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from .controls import could_fit, fits
from .events import SendBatch
from .policy import choose_worker, worth_moving
from .state import PROCESSING, READY, TaskState, WorkerState

if TYPE_CHECKING:
    from .core import Scheduler

#: Inputs this small move to a worker with nothing else to do rather than
#: wait for the busy one that holds them.
SMALL_INPUTS = 256 * 2**10
#: An idle worker takes a task held for a busy one (moving its inputs) only
#: when the wait it saves is expected to be at least this long.
STEAL_MIN_WAIT = 0.5
#: A task's time before any was measured.
DEFAULT_TASK_SECONDS = 0.001


class _Attribute:
    """``mapping.get(task)`` for one attribute of task states, as ``choose_worker`` reads its maps."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def get(self, ts: TaskState, default: Any = None) -> Any:
        return getattr(ts, self.name)


HOLDERS = _Attribute("holders")
NBYTES = _Attribute("nbytes")


def push_ready(s: "Scheduler", ts: TaskState) -> None:
    if ts.failed_on or (ts.controls is not None and ts.controls.places):
        heapq.heappush(s.restricted, ts.id)
    else:
        heapq.heappush(s.suspects if ts.deaths else s.ready, ts.id)


def dispatch(s: "Scheduler") -> None:
    free = [w for w in s.workers.values() if w.free() > 0]
    if not free or not (s.ready or s.suspects or s.restricted or any(w.held for w in s.workers.values())):
        return
    tasks = s.tasks
    out: dict[WorkerState, list] = {}

    def assign(ts: TaskState, worker: WorkerState) -> None:
        s._set_state(ts, PROCESSING)
        ts.worker = worker.address
        worker.inflight += 1
        if ts.controls is not None and ts.controls.resources:
            worker.take(ts.controls.resources)
        out.setdefault(worker, []).append(ts)

    _run_suspects(s, free, assign)
    if s.restricted:
        _run_restricted(s, free, assign)
    for worker in free:  # tasks held back for a worker that holds their inputs
        held = worker.held
        while held and worker.free() > 0:
            ts = tasks.get(heapq.heappop(held))
            if ts is not None and ts.state == READY:
                assign(ts, worker)
    free = [w for w in free if w.free() > 0]
    ready = s.ready
    fill: WorkerState | None = None
    quota = 0
    while ready and free:
        ts = tasks.get(heapq.heappop(ready))
        if ts is None or ts.state != READY:
            continue
        if not ts.deps:
            # No inputs: give the least loaded worker a run of consecutive
            # tasks (dask.order groups them by what they feed), at most its
            # share of what is ready.
            if fill is None or fill.free() <= 0 or quota <= 0:
                fill = min(free, key=WorkerState.load)
                quota = -(-(len(ready) + 1) // len(free))
            worker = fill
            quota -= 1
        else:
            worker = _place(s, ts, free)
            if worker is None:
                continue  # held for a busy worker
        assign(ts, worker)
        if worker.free() <= 0:
            free.remove(worker)
            if worker is fill:
                fill = None
    if free and not ready:
        _steal(s, free, assign)
    for worker, batch in out.items():
        _send(s, worker, batch)


def _run_suspects(s: "Scheduler", free: list, assign: Any) -> None:
    """Suspects run alone on an idle worker; the least loaded one gets no new work until it is idle."""
    suspects = s.suspects
    while suspects:
        ts = s.tasks.get(suspects[0])
        if ts is not None and ts.state == READY:
            break
        heapq.heappop(suspects)  # stale
    while suspects:
        idle = [w for w in free if w.inflight == 0]
        if not idle:
            drain = min(s.workers.values(), key=lambda w: (w.isolated, w.inflight))
            if drain in free:
                free.remove(drain)
            return
        ts = s.tasks.get(heapq.heappop(suspects))
        if ts is None or ts.state != READY:
            continue
        worker = idle[0]
        assign(ts, worker)
        worker.isolated = True
        free.remove(worker)


def _run_restricted(s: "Scheduler", free: list, assign: Any) -> None:
    """Tasks whose controls limit where they run go to a free worker that suits them, in priority order; the rest wait."""
    heap, tasks = s.restricted, s.tasks
    waiting, unplaceable = [], set()
    while heap and free:
        task_id = heapq.heappop(heap)
        ts = tasks.get(task_id)
        if ts is None or ts.state != READY:
            continue
        worker = None if ts.controls in unplaceable else _place_controlled(s, ts, free)
        if worker is None:
            unplaceable.add(ts.controls)  # its equals need not be tried again in this step
            waiting.append(task_id)
            continue
        assign(ts, worker)
        if worker.free() <= 0:
            free.remove(worker)
    for task_id in waiting:
        heapq.heappush(heap, task_id)


def _allowed(worker: WorkerState, controls: Any) -> bool:
    if controls is None:
        return True
    if controls.workers is not None and not controls.allow_other_workers and worker.address not in controls.workers:
        return False
    return could_fit(controls.resources, worker.resources)


def _place_controlled(s: "Scheduler", ts: TaskState, free: list) -> WorkerState | None:
    """A free worker allowed by ``ts``'s controls with its resources free now: preferred workers first, then one it did not fail on."""
    controls = ts.controls
    candidates = [w for w in free if _allowed(w, controls)]
    if controls is not None:
        if controls.resources:
            candidates = [w for w in candidates if fits(controls.resources, w.resources, w.used)]
        if controls.prefers and any(a in s.workers and not s.workers[a].paused for a in controls.prefers):
            candidates = [w for w in candidates if w.address in controls.prefers]  # wait for a preferred one that lives
    if not candidates:
        return None
    fresh = [w for w in candidates if w.address not in ts.failed_on]
    loads = {w.address: w.load() for w in fresh or candidates}
    return s.workers[choose_worker(ts.deps, HOLDERS, NBYTES, loads)]


def could_run_somewhere(s: "Scheduler", ts: TaskState) -> bool:
    """Is there a live worker that ``ts``'s controls allow (its resources free or not)?"""
    return any(_allowed(w, ts.controls) for w in s.workers.values())


def _place(s: "Scheduler", ts: TaskState, free: list) -> WorkerState | None:
    loads = {w.address: w.load() for w in s.workers.values() if not w.paused}
    best = choose_worker(ts.deps, HOLDERS, NBYTES, loads)
    if best is None:
        return None
    worker = s.workers[best]
    if worker in free:
        return worker
    heapq.heappush(worker.held, ts.id)  # wait for the worker that holds the inputs (or a thief)
    return None


def _steal(s: "Scheduler", free: list, assign: Any) -> None:
    """Workers with nothing else to do take tasks held for busy ones.

    A task with small inputs moves at once; one with large inputs only to
    an idle worker, and when the wait saved is clearly longer than the move.
    """
    tasks = s.tasks
    for worker in free:
        for victim in sorted(s.workers.values(), key=lambda w: -len(w.held)):
            if victim is worker or not victim.held:
                continue
            while victim.held and worker.free() > 0:
                ts = tasks.get(victim.held[0])
                if ts is None or ts.state != READY:
                    heapq.heappop(victim.held)
                    continue
                moved = sum(dep.nbytes for dep in ts.deps if worker.address not in dep.holders)
                if moved > SMALL_INPUTS and (
                    worker.inflight
                    or not worth_moving(moved, len(victim.held), victim.task_seconds or DEFAULT_TASK_SECONDS, victim.ncores, STEAL_MIN_WAIT)
                ):
                    break
                heapq.heappop(victim.held)
                assign(ts, worker)


def _send(s: "Scheduler", worker: WorkerState, batch: list) -> None:
    """Batches of at most half the worker's limit (so that two are in flight), by how much result comes back."""
    by_limit: dict[int, list] = {}
    for ts in batch:
        limit = s.deliver_limit if ts.deliver else s.result_limit if ts.wanted > 0 else 0
        by_limit.setdefault(limit, []).append(ts)
    size = max(1, worker.limit // 2)
    address = worker.address
    workers = s.workers
    for limit, group in by_limit.items():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            batch_id = next(s.batch_ids)
            who_has = {}
            for ts in chunk:
                ts.batch = batch_id
                for dep in ts.deps:
                    if address not in dep.holders and dep.holders:
                        who_has[dep.key] = [w for w in dep.holders if w in workers]
                        if not dep.owned:  # the worker fetches a copy of someone else's value: ours to delete
                            dep.copies = dep.copies | {address}
            worker.batches[batch_id] = (chunk, s.now)
            s._out.append(SendBatch(address, batch_id, chunk, who_has, limit))


def waiting_for_workers(s: "Scheduler") -> dict[str, int]:
    """Tasks that no live worker can run (resources nobody has, workers that are not there): ``{what they need: count}``.

    Safe to call from another thread (a repr): it only reads.
    """
    waiting: dict[str, int] = {}
    for task_id in list(s.restricted):
        ts = s.tasks.get(task_id)
        if ts is not None and ts.state == READY and not could_run_somewhere(s, ts):
            what = ts.controls.describe()
            waiting[what] = waiting.get(what, 0) + 1
    return waiting
