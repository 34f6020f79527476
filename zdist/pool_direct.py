"""``Pool.apply``'s short way: a task with no remote inputs, sent from the calling thread and waited for there.

``apply`` blocks anyway, so it takes the round trip on a socket of the
calling thread's own (:class:`~zdist.rpc.ThreadSockets`) instead of handing
the task to the client loop and the reply back: two thread wake-ups fewer,
a third of a tiny task's round trip on a VM. The core still learns of the
task (to rerun it should the worker die) and of its answer, by post; the
calling thread writes only the handle it has not returned yet.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from .errors import noted
from .handles import RemoteData
from .protocol import OK
from .rpc import rebuild_exception
from .scheduling import NO_VALUE, events
from .scheduling.controls import Controls
from .scheduling.state import NEW, PROCESSING

if TYPE_CHECKING:
    from .pool import Pool

#: Results up to this size come back with the acknowledgement (and also stay
#: on the worker), so ``apply(...).get()`` costs one round trip.
SMALL_RESULT = 4096


def apply_here(pool: "Pool", func: Callable, args: tuple, kwds: dict | None, controls: Controls | None) -> RemoteData:
    """Submit one task of ``pool``; when it has no RemoteData inputs or controls, send it from this thread and wait here."""
    if threading.current_thread() is pool._loop.thread:
        return pool._submit(func, [args], kwds, controls)[0]
    shell = pool._shell
    (handle,) = pool._make_tasks(func, [args], kwds, controls)
    ts = handle._task
    worker = None if ts.deps or controls is not None else shell.core.pick_worker()
    if worker is None:
        shell.post(events.Submit([ts]), urgent=True)
        return handle
    batch_id = next(shell.core.batch_ids)
    shell.post(events.Submit([ts], sent_to=worker, batch_id=batch_id))

    def taken_over() -> bool:  # the core sent it elsewhere (its worker died), or the pool closed
        return pool._state != "running" or (ts.state != NEW and (ts.state != PROCESSING or ts.batch != batch_id))

    function, wire_args, wire_kwargs, _ = ts.payload
    request = {"tasks": [[ts.key, function, wire_args, wire_kwargs, []]], "return_values": SMALL_RESULT, "inline": shell.inline, "session": shell.session.id}
    if shell.forward_output:
        request["output"] = True
    try:
        reply = pool._direct.request(worker, "compute_batch", request, taken_over)
    except Exception as exc:  # noqa: BLE001 - e.g. a function that cannot be pickled: the task fails with it
        shell.post(events.BatchFailed(worker, batch_id, exc), urgent=True)
        return handle
    if reply is None:
        return handle
    if reply.status != OK:
        shell.post(events.BatchFailed(worker, batch_id, rebuild_exception(reply.error, worker)), urgent=True)
        return handle
    warned = shell.take_notes(reply.result)
    if warned is not None and ts.key in warned["warnings"]:
        handle._warnings = (warned["worker"], warned["warnings"][ts.key])
        pool._results.warned = True
    entry = reply.result[0]
    if entry[1] == "ok":
        handle._early = (True, entry[3] if len(entry) > 3 else NO_VALUE)
    else:
        entry[2] = rebuild_exception(entry[2], worker)
        handle._early = (False, noted(entry[2], ts.key, worker))
    handle._mark_done(handle._error())
    shell.post(events.BatchDone(worker, batch_id, [entry]))
    return handle
