"""The part of ``zdist.dask.get`` that talks to workers: one computation, a thin shell over the core.

A :class:`Computation` turns a :class:`~zdist.dask.plan.Plan` (tasks
numbered in ``dask.order`` priority) into :class:`~zdist.scheduling.TaskState`\\ s
for the scheduling core (:mod:`zdist.scheduling`) and carries out its
commands: batches go out as ``compute_batch`` messages with the dask nodes
of each batch pickled together (:class:`~zdist.dask.tasks.TaskBatch`);
requested values come back with the acknowledgement or by ``get_data``.
Placement, batch sizing, recovery after a worker died and the release of
intermediates are the core's, shared with the Pool.

Values live on the cluster under names ``zd-<run>-<n>`` rather than their
dask keys: short strings cost far less to send and look up than tuple keys.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np

from ..errors import NoWorkersError, TaskKilledWorkersError
from ..protocol import ProtocolError, Ref
from ..scheduling import Scheduler, TaskState, events
from ..scheduling.state import unlink
from ..session import Session
from ..shell import Shell
from .plan import Plan
from .tasks import TaskBatch, run_task_spec

__all__ = ["Computation", "LoadedCore", "TaskKilledWorkersError"]

#: How long cleanup waits for batches still running before leaving their
#: results to be deleted as they come back.
CLEANUP_WAIT = 5.0
#: How long the Center may stay silent before the computation gives up.
CENTER_TIMEOUT = 30.0


#: Objects freed at a time when a computation is taken apart (see LoadedCore.dismantle).
FREE_SLICE = 50_000


class LoadedCore:
    """A :class:`~zdist.scheduling.Scheduler` given every task of a :class:`~zdist.dask.plan.Plan`, before any worker is known.

    Made in the calling thread, then handed to the client loop, which
    :class:`Computation` runs on: a graph of millions of tasks takes tens of
    seconds to load, and the loop meanwhile goes on keeping the client's
    session alive (it is dropped after 10 s of silence). The core is no
    other thread's until it is handed over.
    """

    def __init__(
        self, plan: Plan, *, external: dict | None = None, max_worker_deaths: int = 3, return_values: int = 2**20, validate: bool = False, now: float = 0.0,
    ):
        self.plan = plan
        self.prefix = f"zd-{uuid.uuid4().hex[:12]}-"
        self.core = Scheduler(max_worker_deaths=max_worker_deaths, deliver_limit=return_values, validate=validate)
        # Inputs from outside the graph: key -> (addresses holding it, bytes); not ours to delete.
        self.external: dict[Any, TaskState] = {}
        for key, (holders, nbytes) in (external or {}).items():
            ts = self.external[key] = TaskState(key, wanted=0, owned=False)
            ts.holders, ts.nbytes = set(holders), nbytes
        outputs = set(plan.output_ids.values())
        index_of = {key: i for i, key in enumerate(plan.keys)} if plan.controls else {}
        # The hot path of a big graph (a TaskState per task): list lookups, no generators.
        tasks: list[TaskState] = []
        append, lookup, ext_deps, ext, prefix = tasks.append, tasks.__getitem__, plan.ext_deps, self.external, self.prefix
        for i, deps in enumerate(plan.deps):
            inputs = tuple(map(lookup, deps))
            if ext_deps[i]:
                inputs += tuple([ext[key] for key in ext_deps[i]])
            output = i in outputs
            append(TaskState(prefix + str(i), i, inputs, wanted=int(output), deliver=output))
        self.tasks = tasks
        for key, controls in plan.controls.items():
            tasks[index_of[key]].controls = controls
        self.pending_outputs = len(outputs)
        # With no worker known yet, this only numbers and queues the tasks; the
        # commands (if any) are carried out on the loop.
        self.commands = self.core.handle(events.DataPlaced(list(self.external.values())), events.Submit(tasks), now=now)

    def dismantle(self) -> None:
        """Once the computation is over: free its per-task objects by reference counting, now.

        The shell and the core hold each other in cycles (bound methods,
        futures), and everything they reach would otherwise wait for a run of
        the cyclic collector: at 3.4 million tasks, 12 s holding the GIL.
        """
        unlink(self.tasks)
        unlink(self.external.values())
        plan = self.plan
        self.core.tasks.clear()  # frees no task state: self.tasks holds them all
        self.core.by_key.clear()
        for sequence in (self.tasks, plan.deps, plan.dependents, plan.keys, plan.nodes, plan.ext_deps):
            # In slices: one clear() of 10^7 objects holds the GIL for seconds,
            # and the client loop must keep the session's heartbeat going.
            while sequence:
                del sequence[-FREE_SLICE:]


class Computation(Shell):
    """One ``get``: its tasks in the core, and the values requested so far.

    Create and :meth:`run` it on the client loop (:func:`zdist.session.client_loop`),
    from a :class:`LoadedCore`.
    """

    def __init__(self, loaded: LoadedCore, session: Session, *, forward_output: bool = False):
        loaded.core.name = f"the Center at {session.address}"
        super().__init__(loaded.core, session)
        self.forward_output = forward_output
        self.plan = loaded.plan
        self.prefix = loaded.prefix
        self.external = loaded.external
        self.tasks = loaded.tasks
        self.pending_outputs = loaded.pending_outputs
        self._loaded_commands = loaded.commands
        self.values: dict = {}
        self.warnings: list = []  # (dask key, worker, what the task warned)
        self.finished: asyncio.Future = self.loop.create_future()

    @property
    def ntasks_done(self) -> int:
        """Tasks finished so far, recomputations included (for progress bars)."""
        return self.core.ndone

    async def run(self) -> dict:
        """Compute every requested key; return ``{key: value}``. Cleans the cluster up either way."""
        try:
            info = await self.session.look(10.0)
            if not info["workers"]:
                raise NoWorkersError(
                    f"no workers are registered with the Center at {self.session.address}; start some with `zdist-worker {self.session.address}`"
                )
            await self._fetch_external_outputs()
            commands, self._loaded_commands = self._loaded_commands, []
            for command in commands:  # the look above fed the core the workers: it has dispatched already
                self._commands[type(command)](command)
            self._check_finished()
            return await self.finished
        finally:
            await self._cleanup()

    def wire(self, tasks: list) -> list:
        nodes, keys, deps, ext_deps = self.plan.nodes, self.plan.keys, self.plan.deps, self.plan.ext_deps
        inputs = [tuple(keys[d] for d in deps[ts.payload]) + tuple(ext_deps[ts.payload]) for ts in tasks]
        batch = TaskBatch.pack([nodes[ts.payload] for ts in tasks], inputs)
        wired = []
        for j, ts in enumerate(tasks):
            dep_keys = [dep.key for dep in ts.deps]
            wired.append([ts.key, run_task_spec, [batch, j, *map(Ref, dep_keys)], {}, dep_keys])
        return wired

    def _send_batch(self, command: events.SendBatch) -> None:
        try:
            super()._send_batch(command)
        except Exception as exc:  # noqa: BLE001 - e.g. a task that cannot be pickled
            self._fail(self._with_note(exc, command.tasks, command.worker, "while sending tasks"))

    def on_warnings(self, worker: str, warned: dict) -> None:
        for key, found in warned.items():  # raised again by get(), in the calling thread
            self.warnings.append((self.output_name(key), worker, found))

    def output_name(self, key: Any) -> Any:
        ts = self.core.by_key.get(key)
        return self.plan.keys[ts.payload] if ts is not None and isinstance(ts.payload, int) else key

    # ------------------------------------------------------------------ what the core says

    def _on_finished(self, command: events.Finished) -> None:
        for ts in command.tasks:
            self._task_done(ts)

    def _task_done(self, ts: TaskState) -> None:
        """One task finished (a hook for tests that act at a point of the computation)."""

    def _on_delivered(self, command: events.Delivered) -> None:
        ts = command.task
        key = self.plan.keys[ts.payload]
        if key in self.values:
            return
        value = ts.value
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()  # received zero-copy on a read-only message frame
        self.values[key] = value
        self.pending_outputs -= 1
        self.feed(events.Released([ts]))
        self._check_finished()

    def _on_erred(self, command: events.Erred) -> None:
        ts = command.task
        error = ts.error
        if isinstance(error, ProtocolError):
            error = self._with_note(error, [ts], ts.worker, "could not load the tasks; can the worker import their functions?")
        elif isinstance(ts.payload, int) and not getattr(error, "_zdist_noted", False):
            note = f"while computing key {self.plan.keys[ts.payload]!r} (zdist.dask.get)"
            if hasattr(error, "add_note"):
                error.add_note(note)
            try:
                error._zdist_noted = True
            except AttributeError:
                pass
        self._fail(error)

    def on_center_silent(self, seconds: float, error: BaseException) -> None:
        if seconds > CENTER_TIMEOUT:
            self._fail(error)

    def on_fatal(self, error: BaseException) -> None:
        self._fail(error)

    def _with_note(self, exc: BaseException, tasks: list, worker: str | None, what: str) -> BaseException:
        keys = [self.plan.keys[ts.payload] for ts in tasks][:5]
        if hasattr(exc, "add_note"):
            exc.add_note(f"{what}: tasks {keys} on worker {worker} (zdist.dask.get)")
        return exc

    def _fail(self, exc: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)

    def _check_finished(self) -> None:
        if self.pending_outputs <= 0 and not self.finished.done():
            self.finished.set_result(self.values)

    async def _fetch_external_outputs(self) -> None:
        from ..errors import MissingDataError

        for key in self.plan.external_outputs:
            ts = self.external.get(key)
            holders = [a for a in (ts.holders if ts else ()) if a in self.session.info.get("workers", {})]
            if not holders:
                raise MissingDataError([key], "requested, but neither in the graph nor held on the cluster")
            self.values[key] = (await self.session.connections.get(holders[0]).request("get_data", {"keys": [key]}))[key]

    async def _cleanup(self) -> None:
        """Delete everything this computation left on the cluster; wait a while for batches still running."""
        if not self.finished.done():
            self.finished.cancel()
        elif not self.finished.cancelled():
            self.finished.exception()  # retrieved: run() raised it, or an earlier error
        self.feed(events.Close(sweep=[ts.key for ts in self.tasks]))
        deadline = self.loop.time() + CLEANUP_WAIT
        while any(w.batches for w in self.core.workers.values()) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self.close(wait=True)
