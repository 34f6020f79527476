"""Recovery: what the core does when workers come and go, values vanish, or inputs cannot be found.

* a worker that died: the tasks in flight there are sent again (a task in
  flight on ``max_worker_deaths`` dying workers fails with
  :class:`~zdist.errors.TaskKilledWorkersError`), and the values it held
  are computed again from lineage where still needed
  (:func:`~zdist.scheduling.policy.to_recompute`);
* a value that cannot be computed again (scattered, or made by someone
  else) is looked for on the Center (copies it restored), and whatever
  needs it fails with :class:`~zdist.errors.LostDataError`;
* after a Center restart, or when every worker vanished at once, workers
  missing from its list get a grace period before they count as dead.

Part of the core: module functions on the :class:`~zdist.scheduling.Scheduler`,
changing task states only through its ``_set_state``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import LostDataError, MissingDataError, NoWorkersError, TaskKilledWorkersError, noted
from . import dispatch
from .events import AskWhoHas, HoldersFound, PollCenter, WorkersSeen
from .checks import views
from .policy import to_recompute
from .state import EMPTY, LOST, MEMORY, NO_VALUE, PROCESSING, READY, TO_RUN, WAITING, TaskState, WorkerState, hold

if TYPE_CHECKING:
    from .core import Scheduler

logger = logging.getLogger(__name__)

#: How often a task failing with MissingDataError is retried, after the next
#: look at the Center, while its inputs are believed held by live workers.
MISSING_DATA_RETRIES = 5


def inputs_missing(s: "Scheduler", ts: TaskState, error: MissingDataError) -> None:
    """``ts`` found inputs held by nobody: ask the Center again, or believe it and recompute them."""
    wanted = set(error.keys)
    missing = [dep for dep in ts.deps if dep.key in wanted]
    if len(missing) < len(wanted):
        s._fail(ts, noted(error, ts.key, ts.worker))  # the task itself raised it
        return
    believed = [dep for dep in missing if dep.state == MEMORY]
    ts.missing_retries += 1
    if ts.missing_retries > 2 * MISSING_DATA_RETRIES:
        s._fail(ts, noted(error, ts.key, ts.worker))
        return
    if believed and ts.missing_retries <= MISSING_DATA_RETRIES:
        s._set_state(ts, WAITING)
        ts.worker = ts.batch = None
        ts.waiting = sum(1 for dep in ts.deps if dep.state != MEMORY) + 1
        s.deferred.append(ts)
        s._out.append(PollCenter())
        return
    for dep in believed:  # the Center keeps saying nobody holds them: believe it
        for worker in dep.holders:
            if worker in s.workers:
                s._delete(worker, dep.key)
        dep.holders = EMPTY
        lost(s, [dep], None)
    if ts.state == PROCESSING:
        s._enqueue(ts)


def workers_seen(s: "Scheduler", event: WorkersSeen) -> None:
    infos = event.workers
    if event.center_id != s.center_id:
        if s.center_id is not None:
            logger.warning("%s restarted; waiting for workers to register again", s.name)
            s.grace_until = s.now + event.heartbeat_timeout + 2.0
        s.center_id = event.center_id
    if infos:
        s.stall_grace_used = False
    elif s.workers and s.ntorun and not s.in_grace and not s.stall_grace_used:
        # Every worker gone at once is more often a stall (a slow import
        # missed heartbeats) than a massacre: give them time to come back.
        logger.warning("%s lists no workers; waiting for them to register again", s.name)
        s.grace_until = s.now + event.heartbeat_timeout + 2.0
        s.stall_grace_used = True
    if s.in_grace:
        infos = {**{a: {"ncores": w.ncores, "pid": w.pid, "resources": w.resources} for a, w in s.workers.items()}, **infos}
    for address, worker in list(s.workers.items()):
        info = infos.get(address)
        if info is None:
            worker_lost(s, worker, "the Center dropped it")
        elif worker.pid is not None and info.get("pid") not in (None, worker.pid):
            worker_lost(s, worker, "it restarted")
        else:
            worker.paused = info.get("status") == "paused"
    for address, info in infos.items():
        if address not in s.workers:
            s.workers[address] = WorkerState(address, info.get("ncores", 1), info.get("pid"), info.get("resources"))
            if address in s.left_behind:
                came_back(s, address, s.left_behind.pop(address))
    s.worker_list = tuple(s.workers.values())
    if not s.workers and s.ntorun and not s.in_grace:
        error = NoWorkersError(f"every worker of {s.name} died or left; start workers and submit the work again")
        for ts in [ts for ts in s.tasks.values() if ts.state in TO_RUN]:
            if ts.state in TO_RUN:
                s._fail(ts, error)
    deferred, s.deferred = s.deferred, []
    for ts in deferred:
        if ts.state == WAITING:
            s._enqueue(ts)
    s.heartbeat_timeout = event.heartbeat_timeout
    if s.lost_deadlines:
        _look_for_lost(s)


def _look_for_lost(s: "Scheduler") -> None:
    """Ask the Center again for lost values we cannot make; fail what needs those looked for long enough."""
    ask = []
    for task_id, deadline in list(s.lost_deadlines.items()):
        ts = s.tasks.get(task_id)
        if ts is None or ts.state != LOST:
            del s.lost_deadlines[task_id]
        elif s.now >= deadline:
            unrecoverable(s, ts)
        else:
            ask.append(ts.key)
    if ask:
        s._out.append(AskWhoHas(ask))


#: Dropped workers whose keys are remembered, should they come back (the most recent ones).
LEFT_BEHIND_WORKERS = 64


def worker_lost(s: "Scheduler", worker: WorkerState, why: str) -> None:
    """A worker died: retry what ran there, recompute what it held that is still needed."""
    logger.warning("worker %s is gone (%s); recovering its work", worker.address, why)
    address = worker.address
    del s.workers[address]
    s.dirty = True
    batches, worker.batches = worker.batches, {}
    for tasks, _ in batches.values():
        for ts in tasks:
            if ts.state == PROCESSING and ts.worker == address:
                ts.deaths += (address,)
                if len(ts.deaths) >= s.max_worker_deaths:
                    s._fail(ts, TaskKilledWorkersError(ts.key, list(ts.deaths)))
                else:
                    s._enqueue(ts)
    for task_id in worker.held:
        ts = s.tasks.get(task_id)
        if ts is not None and ts.state == READY:
            dispatch.push_ready(s, ts)
    gone, refetch, held = [], [], []
    for ts in s.tasks.values():
        if address in ts.copies:  # also one it was to fetch for a task
            ts.copies = ts.copies - {address}
            held.append(ts.key)
        if address in ts.holders:
            ts.holders.discard(address)
            if ts.owned:
                held.append(ts.key)
            if not ts.holders and ts.state == MEMORY:
                gone.append(ts)
        if ts.fetching == address:  # its reply will never come: ask another holder
            ts.fetching = None
            refetch.append(ts)
    if held:  # should it come back (it stalled), they are deleted there: see came_back
        s.left_behind[address] = held
        while len(s.left_behind) > LEFT_BEHIND_WORKERS:
            del s.left_behind[next(iter(s.left_behind))]
    if gone:
        lost(s, gone, address)
    for ts in refetch:
        if ts.state == MEMORY and ts.holders:
            s._fetch(ts)


def came_back(s: "Scheduler", address: str, keys: list) -> None:
    """A worker dropped as dead is listed again (it had stalled): delete what it held then.

    The core recomputed or forgot those values meanwhile; the worker's old
    copies are strays. Kept: the copy the core knows of there now, a value
    still lost (the Center is being asked for it: this copy is the answer),
    and a task to run again (it may be sent there in this very step, and
    the delete, which goes after, would remove its new value).
    """
    for key in keys:
        ts = s.by_key.get(key)
        if ts is not None and (address in ts.holders or ts.state == LOST or ts.state in TO_RUN):
            continue
        s._delete(address, key)


def inputs_kept(s: Scheduler, ts: TaskState, worker: str) -> None:
    """``ts`` ran on ``worker`` (it returned, or raised): the worker keeps the inputs it fetched for it."""
    for dep in ts.deps:
        if worker in dep.holders:
            continue
        if dep.state != MEMORY:
            copy_fetched(s, dep, worker)
            continue
        hold(dep, worker)
        if not dep.owned:
            dep.copies = dep.copies | {worker}


def has_copies(ts: TaskState) -> bool:
    """Are there copies of ``ts`` for this client to delete? A lost replicated value may have some the Center restored."""
    return bool(ts.copies) or ts.owned and bool(ts.holders or ts.state == LOST and ts.replicas > 1)


def copy_fetched(s: Scheduler, ts: TaskState, worker: str) -> None:
    """A task done on ``worker`` fetched ``ts``, which is no longer in memory: a lost value is found again.

    Released meanwhile, the copy is deleted; while ``ts`` is computed again,
    it is left alone (a delete could cross the new value on its way there).
    """
    if ts.state == LOST:
        hold(ts, worker)
        if not ts.owned:
            ts.copies = ts.copies | {worker}
        s._now_in_memory(ts)
    elif ts.state not in TO_RUN:
        s._delete(worker, ts.key)


def lost(s: "Scheduler", tasks: list[TaskState], address: str | None) -> None:
    """Values gone with their workers: note it, and compute again what is still needed."""
    for ts in tasks:
        ts.lost_on = address
        s._set_state(ts, LOST)
        for dependent in ts.dependents:
            if dependent.state == WAITING:
                dependent.waiting += 1
            elif dependent.state == READY:
                s._set_state(dependent, WAITING)  # its heap entry goes stale
                dependent.waiting = 1
    needed = [ts for ts in tasks if ts.npending > 0 or (ts.deliver and ts.value is NO_VALUE)]
    if needed:
        recompute(s, needed)


def recompute(s: "Scheduler", lost: list[TaskState]) -> None:
    tasks = s.tasks
    v = views(s)
    redo = to_recompute([ts.id for ts in lost], v.dependencies, v.dependents, v.done, v.available, v.outputs)
    for task_id in sorted(redo):
        ts = tasks[task_id]
        if ts.state in TO_RUN:
            continue
        if not ts.recomputable:
            if ts.state != LOST:  # released once no longer needed (someone else's value): needed again now
                s._set_state(ts, LOST)
            unrecoverable(s, ts)
            continue
        if s.validate or len(redo) < 50:
            logger.info("recomputing lost key %r", ts.key)
        ts.value = NO_VALUE
        s._enqueue(ts)


def unrecoverable(s: "Scheduler", ts: TaskState) -> None:
    """A value we cannot make again is gone: look for it a while, then whatever needs it fails.

    The Center may know other copies (replicas it restored, someone else's
    value), and a worker it dropped for missed heartbeats (a stall, not a
    death) registers again with everything it holds: the Center is asked
    at every look until a heartbeat timeout has passed.
    """
    deadline = s.lost_deadlines.get(ts.id)
    if deadline is None:
        s.lost_deadlines[ts.id] = s.now + s.heartbeat_timeout + 2.0
        s._out.append(AskWhoHas([ts.key]))
        return
    if s.now < deadline:
        return  # asked again at the next look at the Center (workers_seen)
    del s.lost_deadlines[ts.id]
    error = LostDataError(ts.key, ts.lost_on)
    for dependent in list(ts.dependents):
        if dependent.state in (WAITING, READY):
            s._fail(dependent, error)
    if ts.deliver and ts.value is NO_VALUE:
        s._fail(ts, error)


def holders_found(s: "Scheduler", event: HoldersFound) -> None:
    for key, addresses in event.holders.items():
        ts = s.by_key.get(key)
        if ts is None or ts.state not in (LOST, MEMORY):
            continue
        live = {a for a in addresses if a in s.workers}
        if live:
            ts.holders = {*ts.holders, *live}
            s.lost_deadlines.pop(ts.id, None)
            if ts.state == LOST:
                s._now_in_memory(ts)
        elif ts.state == LOST:
            unrecoverable(s, ts)


def delete_strays(s: "Scheduler", worker: str, replies: list) -> None:
    """Values a worker made for a batch this client gave up on (the worker was dropped, then came back).

    Deleted unless that is the copy the core knows of there, or the task runs there again now.
    """
    for reply in replies:
        if reply[1] != "ok":
            continue
        ts = s.by_key.get(reply[0])
        if ts is not None and (worker in ts.holders or ts.worker == worker and ts.state == PROCESSING):
            continue
        s._delete(worker, reply[0], reply[2])
