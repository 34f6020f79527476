"""Pool: ``multiprocessing.Pool`` for a zdist cluster, with results that stay remote.

>>> from zdist import Pool
>>> with Pool() as pool:                      # starts a local cluster
...     A = pool.map(lambda x: x**2, range(10))
...     B = pool.map(lambda x: -x, A)         # runs where A is: no data moves
...     total = pool.apply(sum, [B])
...     total.get(), pool.gather(A)
(-285, [0, 1, 4, 9, 16, 25, 36, 49, 64, 81])

Results are :class:`RemoteData` handles; a value stays on the worker that
made it until ``.get()`` or :meth:`Pool.gather`, and is deleted from the
cluster once no handle to it is left. A function whose inputs are
``RemoteData`` runs on the worker that holds most of their bytes.

The Pool is a thin shell over the scheduling core
(:mod:`zdist.scheduling`): calling threads make :class:`TaskState`\\ s and
post them to the client loop, where :class:`_PoolShell` feeds them to the
core and carries out its commands.
"""
from __future__ import annotations

import asyncio
import collections
import collections.abc
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import CancelledError
from typing import Any, Callable, Iterable, Iterator

from .cluster_ops import WorkerOps
from .comm import normalize_address
from .errors import LostDataError, NoWorkersError
from .rpc import ThreadSockets
from .scheduling import NO_VALUE, Scheduler, TaskState, events
from .scheduling.controls import CONTROL_NAMES, Controls, controls_from
from .scheduling.gcpause import gc_paused
from .pool_direct import SMALL_RESULT, apply_here
from .pool_results import Results
from .pool_tasks import TaskMaker, checked_chunksize, run_chunk, run_star_chunk
from .pool_tasks import chunks as make_chunks
from .handles import (  # noqa: F401 - RemoteData and ChunkedResults are also this module's
    CANCELLABLE, ChunkedResults, RemoteData, _ChunkData, _ItemData, _PoolTask, _call_each, _fresh, _local_value, _to_refs, _watched,
)
from .scheduling.dispatch import waiting_for_workers
from .scheduling.policy import spread
from .scheduling.state import ERRED, hold
from .session import client_loop, open_session
from .shell import MAIL_TASKS_PER_TURN, Shell

logger = logging.getLogger(__name__)

#: ``imap`` keeps at least this many tasks in flight (more on many cores).
STREAM_WINDOW = 256


class Pool(WorkerOps):
    """A ``multiprocessing.Pool`` whose workers are a zdist cluster.

    ``Pool(center_address)`` joins a running cluster; ``Pool()`` starts a
    :class:`~zdist.LocalCluster` (a worker process per core; ``Pool(4)`` or
    ``Pool(processes=4)``: four, as with multiprocessing) and stops it on
    :meth:`close`. A Center that cannot be reached within ``timeout``
    seconds raises :class:`~zdist.errors.CenterUnreachableError`.

    Functions run in each worker's thread pool. ``inline=True`` says that
    every function given to this pool is tiny (microseconds): a worker then
    runs them on its event loop, which saves two thread hand-overs per
    batch, but a slow one holds up everything else that worker does
    (heartbeats included) while it runs.

    Task controls, as defaults for every task of this pool and as keywords
    of each method (``apply_async(f, args, retries=2)``,
    ``map(f, items, resources={'GPU': 1})``):

    - ``retries=N``: a task that raises runs again, on another worker when
      there is one, up to N times before its exception is final;
    - ``priority=P``: among this pool's tasks ready to run, higher first;
    - ``resources={'GPU': 1}``: runs only on a worker started with
      ``--resources GPU=...`` while that much of it is free (waits, said in
      the pool's repr, while no worker has it);
    - ``workers=[address, ...]``: runs only there, or there first with
      ``allow_other_workers=True`` (elsewhere when none of them is left).

    ``forward_output=True`` prints here what tasks print (stdout, stderr)
    and log on their workers, each line prefixed ``[worker key]``; it is on
    by default for a ``Pool()`` that starts its own cluster.

    On every worker at once (:class:`~zdist.cluster_ops.WorkerOps`):
    :meth:`run` a function, :meth:`upload_file` your code, read
    :meth:`get_worker_logs`.
    """

    def __init__(
        self,
        center: Any = None,
        *,
        processes: int | None = None,
        security: Any = None,
        timeout: float = 30.0,
        max_worker_deaths: int = 3,
        inline: bool = False,
        initializer: Callable | None = None,
        initargs: tuple = (),
        maxtasksperchild: int | None = None,
        cluster_kwargs: dict | None = None,
        dashboard: bool = False,
        retries: int | None = None,
        priority: int | None = None,
        resources: dict | None = None,
        workers: Iterable[str] | None = None,
        allow_other_workers: bool | None = None,
        forward_output: bool | None = None,
    ):
        if isinstance(center, int) and not isinstance(center, bool):
            # multiprocessing.Pool(4): the first argument is the number of processes.
            if processes is not None:
                raise TypeError(f"Pool({center!r}, processes={processes!r}): give the number of processes once")
            center, processes = None, center
        if maxtasksperchild is not None:
            raise ValueError(
                "maxtasksperchild is not supported: zdist workers are long-lived processes shared by every client; "
                "to run set-up code per worker use initializer=, and restart a worker that leaks by stopping it "
                "(its nanny or your process manager starts a fresh one)"
            )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {type(initializer).__name__}")
        controls = controls_from(retries, priority, resources, workers, allow_other_workers, normalize=normalize_address)
        self._tasks = TaskMaker(uuid.uuid4().hex[:8], initializer, initargs, controls)
        self._kept_for_callbacks: dict[int, Any] = {}  # handles whose callbacks have not run yet
        self.security = security
        self._cluster = None
        self._state = "closed"
        if center is None:
            from .cluster import LocalCluster  # only a Pool that starts a cluster needs it

            cluster_kwargs = dict(cluster_kwargs or {})
            if dashboard:
                cluster_kwargs["dashboard"] = True
            self._cluster = LocalCluster(n_workers=processes, security=security, **cluster_kwargs)
            self._cluster.start()
            center = self._cluster.center_address
            self.security = self._cluster.security
        if self.security is None:  # a cluster object (zdist.deploy.Cluster) brings its keys
            self.security = getattr(center, "security", None)
        self.center_address = normalize_address(getattr(center, "center_address", center))
        self.timeout = timeout
        self._results = Results(self)
        self._direct = ThreadSockets(security=self.security)
        self._loop = client_loop()
        self.available_cores: dict[str, int] = {}
        try:
            self._shell: _PoolShell = self._loop.run(self._start(max_worker_deaths), timeout + 1)
            self._shell.inline = inline
            # On by default when the cluster is ours, as multiprocessing would show it.
            self._shell.forward_output = self._cluster is not None if forward_output is None else bool(forward_output)
            self._state = "running"
            self.sync_center()
        except BaseException:
            self._finish()
            raise

    async def _start(self, max_worker_deaths: int) -> "_PoolShell":
        session = await open_session(self.center_address, self.security, self.timeout)
        core = Scheduler(name=f"the Center at {self.center_address}", max_worker_deaths=max_worker_deaths, result_limit=SMALL_RESULT)
        return _PoolShell(core, session, self)

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the cluster's web dashboard, or None when its Center serves none.

        ``Pool(dashboard=True)`` starts one with the local cluster it starts;
        ``zdist-center`` serves one unless told ``--no-dashboard``.

        >>> with Pool(processes=1, dashboard=True) as pool:
        ...     pool.dashboard_link.startswith('http://127.0.0.1:')
        True
        """
        if self._cluster is not None and self._cluster.dashboard_url:
            return self._cluster.dashboard_url
        info = self._loop.run(self._shell.session.center.request("info", {}, timeout=self.timeout), self.timeout + 1)
        return info.get("dashboard")

    def sync_center(self) -> dict[str, int]:
        """Ask the Center which workers there are; updates :attr:`available_cores`."""
        self._loop.run(self._shell.session.look(self.timeout), self.timeout + 1)
        return self.available_cores

    # -------------------------------------------------------------- submitting work

    def _task_controls(self, controls: dict) -> Controls | None:
        """This pool's task controls, with those given to one call on top."""
        return merge_controls(self._tasks.controls, controls) if controls else self._tasks.controls

    def _make_tasks(
        self, function: Callable, arg_tuples: Iterable[tuple], kwargs: dict | None = None, controls: Controls | None = None, handle_type: type = RemoteData
    ) -> list[RemoteData]:
        self._check_running()
        if not callable(function):
            raise TypeError(f"the function to run must be callable, got {type(function).__name__}")
        prefix = self._tasks.key_prefix(function)
        function = self._tasks.wrap(function)
        counter = self._tasks.counter
        handles = []
        with gc_paused():  # a TaskState and a handle per item, no garbage
            for args in arg_tuples:
                deps: list = []
                args = _to_refs(args, deps)
                task_kwargs = _to_refs(kwargs, deps) if kwargs else None
                deps = tuple(dict.fromkeys(deps))
                key = f"{prefix}{next(counter)}"
                payload = (function, list(args), task_kwargs or {}, [d.key for d in deps])
                ts = _PoolTask(key, payload, deps)
                if controls is not None:
                    ts.controls = controls
                handles.append(handle_type(self, ts))
        self._shell.session.note_submitted(prefix[:-1], len(handles))  # the whole of the dashboard's progress bar
        return handles

    def _submit(
        self, function: Callable, arg_tuples: Iterable[tuple], kwargs: dict | None = None, controls: Controls | None = None, handle_type: type = RemoteData
    ) -> list[RemoteData]:
        handles = self._make_tasks(function, arg_tuples, kwargs, controls, handle_type)
        step = MAIL_TASKS_PER_TURN  # the loop feeds one part a turn (see Shell._read_mail)
        for start in range(0, len(handles), step):
            self._shell.post(events.Submit([h._task for h in handles[start : start + step]]), urgent=True)
        return handles

    def apply_async(
        self, func: Callable, args: tuple = (), kwds: dict | None = None, callback: Callable | None = None, error_callback: Callable | None = None, **controls: Any
    ) -> RemoteData:
        """Run ``func(*args, **kwds)`` on the cluster; return its :class:`RemoteData` at once.

        As in multiprocessing, ``callback(value)`` or ``error_callback(exception)``
        is called once the task is done, on the pool's callback thread.
        ``controls``: ``retries``, ``priority``, ``resources``, ``workers``,
        ``allow_other_workers`` (see :class:`Pool`).
        """
        handle = self._submit(func, [tuple(args)], kwds, self._task_controls(controls))[0]
        _when_done([handle], callback, error_callback, single=True)
        return handle

    def apply(self, func: Callable, args: tuple = (), kwds: dict | None = None, **controls: Any) -> RemoteData:
        """Run ``func(*args, **kwds)``; return its :class:`RemoteData` once it is done (raise if it failed)."""
        handle = apply_here(self, func, tuple(args), kwds, self._task_controls(controls))
        self._results.wait([handle], None, raise_errors=True)
        return handle

    def map_async(
        self, func: Callable, iterable: Iterable, chunksize: int | None = None, callback: Callable | None = None, error_callback: Callable | None = None, **controls: Any
    ) -> list[RemoteData]:
        """Like :meth:`map` but returns the list of :class:`RemoteData` at once.

        ``callback(list_of_values)`` or ``error_callback(first_exception)`` is
        called once every task is done, as in multiprocessing.
        """
        handles: Any
        if checked_chunksize(chunksize) > 1:
            handles = self._submit_chunks(func, iterable, chunksize, run_chunk, self._task_controls(controls))
        else:
            handles = self._submit(func, [(item,) for item in iterable], None, self._task_controls(controls))
        _when_done(handles, callback, error_callback)
        return handles

    def _submit_chunks(self, func: Callable, iterable: Iterable, chunksize: int, runner: Callable, controls: Controls | None) -> "ChunkedResults":
        """One task per ``chunksize`` items (``runner(func, chunk)``); a handle per item, made when asked for."""
        func = self._tasks.wrap(func)
        chunks = list(make_chunks(iterable, chunksize))
        chunk_handles = self._submit(runner, [(func, chunk) for chunk in chunks], None, controls, _ChunkData)
        return ChunkedResults(self, chunk_handles, [len(chunk) for chunk in chunks])

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None, progress: bool = False, **controls: Any) -> list[RemoteData]:
        """``[func(x) for x in iterable]`` on the cluster, results left there as RemoteData.

        Returns once every task is done; raises the first task's exception if
        any failed. ``progress=True`` shows a tqdm progress bar (terminal or
        Jupyter). ``controls``: see :class:`Pool`.
        """
        handles = self.map_async(func, iterable, chunksize, **controls)
        self._results.wait(_watched(handles), None, raise_errors=True, progress=progress)
        return handles

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1, **controls: Any) -> Iterator:
        """``func`` over ``iterable``, results in order as they come (multiprocessing's ``imap``).

        A window of tasks is in flight at a time, read from ``iterable`` as
        results are taken: an endless generator runs in bounded memory.
        ``chunksize`` items go in each task. A failed item raises its
        exception when the iteration reaches it.

        >>> with Pool(processes=1) as pool:
        ...     list(pool.imap(abs, range(-3, 3), chunksize=2))
        [3, 2, 1, 0, 1, 2]
        """
        return self._stream(func, iterable, chunksize, ordered=True, controls=controls)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1, **controls: Any) -> Iterator:
        """As :meth:`imap`, but results in the order they finish."""
        return self._stream(func, iterable, chunksize, ordered=False, controls=controls)

    def _stream(self, func: Callable, iterable: Iterable, chunksize: int, ordered: bool, controls: dict) -> Iterator:
        self._check_running()
        task_controls = self._task_controls(controls)
        checked_chunksize(chunksize)
        calls: Iterator = ((item,) for item in iterable)
        function = func
        if chunksize > 1:
            calls, function = ((self._tasks.wrap(func), chunk) for chunk in make_chunks(iterable, chunksize)), run_chunk
        window = max(STREAM_WINDOW, 8 * sum(self.available_cores.values()))
        return _stream(self, function, calls, window, ordered, flatten=chunksize > 1, controls=task_controls)

    def starmap_async(
        self, func: Callable, iterable: Iterable, chunksize: int | None = None, callback: Callable | None = None, error_callback: Callable | None = None, **controls: Any
    ) -> list[RemoteData]:
        """Like :meth:`starmap` but returns the list of :class:`RemoteData` at once (callbacks as for :meth:`map_async`)."""
        handles: Any
        if checked_chunksize(chunksize) > 1:
            handles = self._submit_chunks(func, iterable, chunksize, run_star_chunk, self._task_controls(controls))
        else:
            handles = self._submit(func, [tuple(args) for args in iterable], None, self._task_controls(controls))
        _when_done(handles, callback, error_callback)
        return handles

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None, progress: bool = False, **controls: Any) -> list[RemoteData]:
        """``[func(*args) for args in iterable]`` on the cluster."""
        handles = self.starmap_async(func, iterable, chunksize, **controls)
        self._results.wait(_watched(handles), None, raise_errors=True, progress=progress)
        return handles

    def scatter(self, values: Iterable, workers: Iterable[str] | None = None, replicas: int = 1) -> list[RemoteData]:
        """Put local values on the cluster, spread over workers by their cores.

        With ``replicas=n`` each value lives on ``n`` workers, and the Center
        restores that count when a holder dies: scattered data then survives
        the loss of a worker.
        """
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
        self._check_running()
        targets = [normalize_address(w) for w in workers] if workers is not None else None
        values = list(values)
        keys = [self._tasks.next_key(f"scatter-{self._tasks.prefix}-") for _ in values]
        tasks = self._loop.run(self._shell.scatter(dict(zip(keys, values)), targets, replicas), self.timeout)
        return [RemoteData(self, ts) for ts in tasks]

    # -------------------------------------------------------------- results

    def gather(self, remote_data: Iterable[RemoteData], timeout: float | None = None) -> list:
        """The values of many RemoteData, fetched together (one request per worker)."""
        if isinstance(remote_data, ChunkedResults):  # a chunked map's: fetch the chunks, not item by item
            return list(itertools.chain.from_iterable(self._results.values(remote_data.chunks, timeout)))
        return self._results.values(list(remote_data), timeout)

    def delete(self, remote_data: Iterable[RemoteData]) -> None:
        """Delete values from the cluster now (their handles become unusable)."""
        handles = list(remote_data)
        self._loop.run(self._shell.delete([h._task for h in handles]), self.timeout)

    def _cancel(self, handles: list[RemoteData]) -> bool:
        """Ask the core to cancel tasks not sent yet (and what waits for them); True if they were."""
        cancelled = self._loop.run(self._shell.cancel([h._task for h in handles]), self.timeout)
        return all(h._task in cancelled for h in handles)

    # -------------------------------------------------------------- lifecycle

    def _check_running(self) -> None:
        if self._state != "running":
            raise ValueError("Pool not running")

    def close(self) -> None:
        """Delete everything this pool put on the cluster and stop (and the local cluster it started)."""
        self._stop(wait=True)

    def terminate(self) -> None:
        """Stop at once, without waiting for running work (its results are deleted as they come)."""
        self._stop(wait=False)

    def _stop(self, wait: bool) -> None:
        if self._state == "closed":
            return
        self._state = "closing"
        try:
            if getattr(self, "_shell", None) is not None and not self._loop.loop.is_closed():
                self._loop.run(self._shell.close(wait=wait), 10)
        except Exception as exc:  # noqa: BLE001
            logger.warning("pool shutdown did not finish cleanly: %s", exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        self._state = "closed"
        shell = getattr(self, "_shell", None)
        if shell is not None:  # futures still pending never finish now: say so to whoever waits on them
            closed = RuntimeError("the Pool was closed before this task finished")
            for ts in list(shell.core.tasks.values()):
                handle = ts.handle()
                if handle is not None:
                    handle._mark_done(closed)
        self._results.notify()
        self._direct.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def join(self) -> None:
        """As in multiprocessing: wait for the pool to finish after :meth:`close`."""
        if self._state == "running":
            raise ValueError("Pool is still running; call close() first")

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._state != "closed":
                self.terminate()
        except Exception:
            pass

    def __repr__(self) -> str:
        shell = getattr(self, "_shell", None)
        waiting = waiting_for_workers(shell.core) if shell is not None and shell.core.restricted else {}
        stuck = "".join(f" waiting: {n} task(s) for {what} (no such worker)" for what, n in waiting.items())
        return f"<Pool center={self.center_address} workers={len(self.available_cores)} cores={sum(self.available_cores.values())}{stuck}>"


class _PoolShell(Shell):
    """The Pool's side of the core: how its tasks travel, and waking the threads that wait."""

    def __init__(self, core: Scheduler, session: Any, pool: Pool):
        super().__init__(core, session)
        self.pool = pool
        self.fatal: BaseException | None = None
        self._news = False

    def wire(self, tasks: list) -> list:
        # The top-level argument tuple goes as a msgpack list (cheaper than a
        # tuple extension); the worker calls function(*args) either way.
        return [[ts.key, *ts.payload] for ts in tasks]

    def on_workers(self, info: dict) -> bool:
        if not super().on_workers(info):
            return False  # nothing changed: the cores known stay right
        self.pool.available_cores = {w.address: w.ncores for w in self.core.worker_list}
        return True

    def on_center_silent(self, seconds: float, error: BaseException) -> None:
        if seconds > self.pool.timeout and self.core.ntorun:
            self.fatal = error
            self._news = True
            self.after_feed()

    def _on_finished(self, command: events.Finished) -> None:
        self._news = True
        for ts in command.tasks:
            handle = ts.handle()
            if handle is not None:
                handle._mark_done(None)

    def _on_erred(self, command: events.Erred) -> None:
        self._news = True
        ts = command.task
        handle = ts.handle()
        if handle is not None:
            cancelled = type(ts.error) is CancelledError
            handle._mark_done(None if cancelled else ts.error, cancelled=cancelled)

    def _on_delivered(self, command: events.Delivered) -> None:
        self._news = True

    def on_warnings(self, worker: str, warned: dict) -> None:
        self.pool._results.warned = True
        for key, found in warned.items():  # before the task is marked done: a waiter sees them
            ts = self.core.by_key.get(key)
            handle = ts.handle() if ts is not None else None
            if handle is not None:
                handle._warnings = (worker, found)

    def after_feed(self) -> None:
        if self._news:
            self._news = False
            self.pool._results.notify()

    def on_fatal(self, error: BaseException) -> None:
        self.fatal = error
        self.pool._results.notify()

    async def scatter(self, values: dict, targets: list | None, replicas: int) -> list[TaskState]:
        if not self.core.workers:
            await self.session.look()
        workers = targets or spread({w.address: w.ncores for w in self.core.worker_list})
        if not workers:
            raise NoWorkersError("the cluster has no workers to scatter to")
        distinct = list(dict.fromkeys(workers))
        if replicas > len(distinct):
            raise ValueError(f"replicas={replicas} but only {len(distinct)} workers to hold copies")
        by_worker: dict[str, dict] = {}
        for key, worker in zip(values, itertools.cycle(workers)):
            start = distinct.index(worker)
            for extra in range(replicas):
                by_worker.setdefault(distinct[(start + extra) % len(distinct)], {})[key] = values[key]
        connections = self.session.connections
        replies = await asyncio.gather(
            *(connections.get(w).request("update_data", {"data": data, "session": self.session.id}, timeout=self.pool.timeout) for w, data in by_worker.items())
        )
        tasks = {key: _PoolTask(key) for key in values}
        for (worker, data), (_, meta) in zip(by_worker.items(), replies):
            for key in data:
                hold(tasks[key], worker)
                tasks[key].nbytes = meta["nbytes"][key]
        for ts in tasks.values():
            ts.replicas = replicas
        if replicas > 1:
            await self.session.center.request("set_replicas", {"keys": {key: replicas for key in values}, "session": self.session.id})
        self.feed(events.DataPlaced(list(tasks.values())))
        return list(tasks.values())

    async def live_handles(self) -> list[RemoteData]:
        """The handles still referenced, of every task (run on the loop: after the tasks posted before this call)."""
        self._read_mail()
        return [handle for handle in (ts.handle() for ts in self.core.tasks.values()) if handle is not None]

    async def cancel(self, tasks: list[TaskState]) -> set:
        self.feed(events.Cancel(tasks))
        return {ts for ts in tasks if ts.state == ERRED and type(ts.error) is CancelledError}

    async def delete(self, tasks: list[TaskState]) -> None:
        self.feed(events.Released(tasks))  # a handle dropped later takes wanted below 0: no matter
        await self.session.outbox.flush_and_wait()


def merge_controls(defaults: Controls | None, controls: dict) -> Controls | None:
    """``defaults`` with the task-control keywords in ``controls`` on top; a clear error for any other keyword."""
    unknown = sorted(set(controls) - set(CONTROL_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; the task controls are {', '.join(CONTROL_NAMES)}")
    return controls_from(**controls, defaults=defaults, normalize=normalize_address)


def _when_done(handles: Any, callback: Callable | None, error_callback: Callable | None, single: bool = False) -> None:
    """multiprocessing's callbacks: ``callback`` with the value(s) once all are done, else ``error_callback`` with the first error."""
    if callback is None and error_callback is None:
        return
    results = handles
    if isinstance(handles, ChunkedResults):
        handles = handles.chunks
    if not handles:
        if callback is not None:
            callback([])
        return
    # As multiprocessing keeps an AsyncResult in its cache: a caller may drop
    # the handles at once (apply_async(f, callback=...)); the callback still runs.
    pool = handles[0]._pool
    kept = pool._kept_for_callbacks
    kept[id(results)] = results
    left = [len(handles)]
    lock = threading.Lock()

    def one_done(_: RemoteData) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            report()
        finally:
            kept.pop(id(results), None)

    def report() -> None:
        error = next((e for e in (h._error() for h in handles) if e is not None), None)
        if error is None:
            try:
                values = handles[0]._pool.gather(results)
            except Exception as exc:  # noqa: BLE001 - lost on the way: the error callback hears of it
                error = exc
            else:
                if callback is not None:
                    callback(values[0] if single else values)
                return
        if error_callback is not None:
            error_callback(error)

    for handle in handles:
        handle.add_done_callback(one_done)


def _stream(pool: Pool, function: Callable, calls: Iterator, window: int, ordered: bool, flatten: bool, controls: Controls | None) -> Iterator:
    """Keep up to ``window`` tasks in flight from ``calls``; yield their values in order (or as they finish)."""
    pending: collections.deque = collections.deque()
    try:
        while True:
            if len(pending) <= window // 2:
                more = list(itertools.islice(calls, window - len(pending)))
                if more:
                    pending.extend(pool._submit(function, more, None, controls))
            if not pending:
                return
            if ordered:
                pending[0].wait()
                taken = []
                while pending and len(taken) < 1000 and pending[0].ready() and pending[0]._error() is None:
                    taken.append(pending.popleft())
                if not taken:
                    pending.popleft().result()  # raises the head's error
            else:
                pool._results.until(lambda: any(h.ready() for h in pending), None, None)
                taken = [h for h in pending if h.ready()]
                pending = collections.deque(h for h in pending if not h.ready())
                failed = [h for h in taken if h._error() is not None]
                taken = [h for h in taken if h._error() is None]
            for value in pool._results.values(taken, None):
                if flatten:
                    yield from value
                else:
                    yield value
            del taken
            if not ordered and failed:
                failed[0].result()
    finally:
        for handle in pending:  # the caller stopped early: what has not started need not run
            handle.cancel()


def _results_in_order(pool: Pool, handles: list[RemoteData], end: float | None, flatten: bool) -> Iterator:
    """Yield results in order; fetch the values not here yet in runs of finished handles (one request per worker)."""
    handles.reverse()  # pop from the end: no handle kept once its result is yielded
    try:
        while handles:
            remaining = None if end is None else end - time.monotonic()
            head = handles[-1]
            head.wait(remaining)
            if not head.ready():
                raise TimeoutError(f"map results not ready within the timeout ({head.key} still running)")
            if _local_value(head) is NO_VALUE and head._error() is None:
                run = []
                for handle in reversed(handles):  # the finished ones from the head on
                    if not handle.ready() or len(run) >= 1000:
                        break
                    run.append(handle)
                pool._results.values([h for h in run if h._error() is None], remaining)
            value = handles.pop().result(None if end is None else max(0.0, end - time.monotonic()))
            if flatten:
                yield from value
            else:
                yield value
    finally:
        for handle in handles:  # the caller stopped early: what has not started need not run
            handle.cancel()


__all__ = ["LostDataError", "Pool", "RemoteData"]
