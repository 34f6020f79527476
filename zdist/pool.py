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
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import defaultdict, deque
from typing import Any, Callable, Iterable

from .cluster import LocalCluster
from .comm import normalize_address
from .errors import LostDataError, MissingDataError, NoWorkersError, WorkerDiedError
from .loop import Later, LoopThread
from .protocol import OK, Ref, Serialized, deserialize
from .rpc import ConnectionPool, RPCTimeoutError, ThreadSockets, rebuild_exception

logger = logging.getLogger(__name__)

#: Results up to this size come back with the acknowledgement (and also stay
#: on the worker), so ``apply(...).get()`` costs one round trip.
SMALL_RESULT = 4096
#: Most tasks one ``compute_batch`` message carries.
MAX_BATCH = 128
#: Batches in flight per worker core: enough that a worker never waits for us.
BATCHES_PER_CORE = 3
#: Queued tasks per core a worker must have before an idle worker takes
#: some of its data-local work (and moves their inputs).
STEAL_THRESHOLD = 64
#: News from other threads (handles dropped, tasks they sent) reaches the engine within this.
MAIL_DELAY = 0.02
#: Released values are deleted from the workers in batches this often.
DELETE_DELAY = 0.02
#: How often the pool asks the Center whether workers came or went.
WATCH_INTERVAL = 0.25

PENDING, RUNNING, FINISHED, ERROR, LOST, RELEASED = "pending", "running", "finished", "error", "lost", "released"

_NO_VALUE = object()


class _Task:
    """What the pool knows of one key: how it is made, where it is, how it ended."""

    __slots__ = (
        "key", "function", "args", "kwargs", "deps", "status", "holders", "nbytes", "value",
        "error", "refcount", "waiting_on", "dependents", "worker", "deaths", "scattered", "lost_on", "replicas",
    )

    def __init__(self, key: Any, function: Callable | None, args: tuple, kwargs: dict | None, deps: list):
        self.key = key
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.deps = deps
        self.status = PENDING
        self.holders: set[str] = set()
        self.nbytes = 0
        self.value: Any = _NO_VALUE
        self.error: BaseException | None = None
        self.refcount = 0
        self.waiting_on: set = set()
        self.dependents: set = set()  # keys of unfinished tasks that need this one
        self.worker: str | None = None
        self.deaths = 0
        self.scattered = function is None
        self.lost_on: str | None = None
        self.replicas = 1


class RemoteData:
    """The handle of one value on the cluster; plays multiprocessing's ``AsyncResult``.

    ``get()`` waits, fetches and returns the value (re-raising a remote
    exception with its remote traceback); ``ready()``, ``wait()`` and
    ``successful()`` behave as in multiprocessing.
    """

    __slots__ = ("key", "_pool", "_task", "__weakref__")

    def __init__(self, key: Any, pool: "Pool", task: _Task):
        self.key = key
        self._pool = pool
        self._task = task
        task.refcount += 1

    @property
    def center(self) -> str:
        return self._pool.center_address

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the value and return it; raise the remote exception if the task failed."""
        return self._pool._get_values([self], timeout)[0]

    def ready(self) -> bool:
        return self._task.status in (FINISHED, ERROR)

    def wait(self, timeout: float | None = None) -> None:
        self._pool._wait([self._task], timeout, raise_errors=False)

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} is not ready")
        return self._task.status == FINISHED

    def __repr__(self) -> str:
        return f"RemoteData<center={self.center}, key={self.key}>"

    def __reduce__(self):
        raise TypeError("a RemoteData handle belongs to its Pool and cannot be pickled; pass it to the Pool's map/apply instead")

    def __del__(self) -> None:
        try:
            self._pool._release_handle(self._task)
        except Exception:  # interpreter shutdown
            pass


class Pool:
    """A ``multiprocessing.Pool`` whose workers are a zdist cluster.

    ``Pool(center_address)`` joins a running cluster; ``Pool()`` starts a
    :class:`~zdist.LocalCluster` (a worker process per core) and stops it on
    :meth:`close`.
    """

    def __init__(
        self,
        center: str | None = None,
        *,
        processes: int | None = None,
        security: Any = None,
        timeout: float = 30.0,
        cluster_kwargs: dict | None = None,
    ):
        self.security = security
        self._cluster: LocalCluster | None = None
        if center is None:
            self._cluster = LocalCluster(n_workers=processes, security=security, **(cluster_kwargs or {}))
            self._cluster.start()
            center = self._cluster.center_address
            self.security = self._cluster.security
        self.center_address = normalize_address(center)
        self.timeout = timeout
        self._prefix = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self._tasks: dict[Any, _Task] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = "running"
        self._mail: list[tuple[Callable, tuple]] = []  # calls for the engine, see _post
        self._mail_scheduled = False
        self._direct = ThreadSockets(security=self.security)
        self._loop = LoopThread("zdist-pool")
        self._engine: _Engine = self._loop.run(self._make_engine(), timeout)
        self.available_cores: dict[str, int] = {}
        try:
            self.sync_center()
        except BaseException:
            self.terminate()
            raise

    async def _make_engine(self) -> "_Engine":
        engine = _Engine(self)
        await engine.start()
        return engine

    # -------------------------------------------------------------- cluster view

    def sync_center(self) -> dict[str, int]:
        """Ask the Center which workers there are; updates :attr:`available_cores`."""
        self.available_cores = self._loop.run(self._engine.refresh_workers(), self.timeout)
        return self.available_cores

    # -------------------------------------------------------------- submitting work

    def _new_key(self, function: Callable) -> str:
        name = getattr(function, "__name__", "task")
        if name == "<lambda>":
            name = "lambda"
        return f"{name}-{self._prefix}-{next(self._counter)}"

    def _make_task(self, function: Callable, args: tuple, kwargs: dict | None) -> tuple[_Task, RemoteData]:
        deps: list = []
        args = _to_refs(args, deps)
        if kwargs:
            kwargs = _to_refs(kwargs, deps)
        key = self._new_key(function)
        task = _Task(key, function, args, kwargs, list(dict.fromkeys(deps)))
        self._tasks[key] = task
        return task, RemoteData(key, self, task)

    def _new_tasks(self, function: Callable, arg_tuples: Iterable[tuple], kwargs: dict | None = None) -> tuple[list[_Task], list[RemoteData]]:
        self._check_running()
        if not callable(function):
            raise TypeError(f"the function to run must be callable, got {type(function).__name__}")
        handles = []
        tasks = []
        with self._lock:
            for args in arg_tuples:
                task, handle = self._make_task(function, args, kwargs)
                tasks.append(task)
                handles.append(handle)
        return tasks, handles

    def _submit(self, function: Callable, arg_tuples: Iterable[tuple], kwargs: dict | None = None) -> list[RemoteData]:
        tasks, handles = self._new_tasks(function, arg_tuples, kwargs)
        self._loop.loop.call_soon_threadsafe(self._engine.submit, tasks)
        return handles

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict | None = None, callback: Any = None, error_callback: Any = None) -> RemoteData:
        """Run ``func(*args, **kwds)`` on the cluster; return its :class:`RemoteData` at once."""
        if callback is not None or error_callback is not None:
            raise NotImplementedError("callbacks are not supported; call .get() or .wait() on the RemoteData")
        return self._submit(func, [tuple(args)], kwds)[0]

    def apply(self, func: Callable, args: tuple = (), kwds: dict | None = None) -> RemoteData:
        """Run ``func(*args, **kwds)``; return its :class:`RemoteData` once it is done (raise if it failed)."""
        handle = self._apply_here(func, tuple(args), kwds)
        self._wait([handle._task], None, raise_errors=True)
        return handle

    def _apply_here(self, func: Callable, args: tuple, kwds: dict | None) -> RemoteData:
        """Submit one task; when it has no RemoteData inputs, send it from this thread and wait here.

        ``apply`` blocks anyway, so it takes the round trip on a socket of
        this thread's own (:class:`~zdist.rpc.ThreadSockets`) instead of
        handing the task to the pool's loop thread and the reply back: two
        thread wake-ups fewer, a third of a tiny task's round trip on a VM.
        The engine still learns where the task runs (to rerun it should the
        worker die) and where its result is. Tasks with RemoteData inputs go
        through the engine, which knows where those are.
        """
        if threading.current_thread() is self._loop.thread:
            return self.apply_async(func, args, kwds)
        engine = self._engine
        (task,), (handle,) = self._new_tasks(func, [args], kwds)
        worker = None if task.deps else engine.pick_worker()
        if worker is None:
            self._loop.loop.call_soon_threadsafe(engine.submit, [task])
            return handle
        task.status = RUNNING
        task.worker = worker
        self._post(engine.running_elsewhere, task, worker)

        def taken_over() -> bool:  # the engine rescheduled it (its worker died), or the pool closed
            return task.status != RUNNING or task.worker != worker or self._state != "running"

        request = {"tasks": [[task.key, func, list(task.args), task.kwargs or {}, []]], "return_values": SMALL_RESULT, "inline": True}
        try:
            reply = self._direct.request(worker, "compute_batch", request, taken_over)
        except Exception as exc:  # noqa: BLE001 - e.g. a function that cannot be pickled: the task fails with it
            self._loop.loop.call_soon_threadsafe(engine.direct_done, task, worker, exc)
            return handle
        if reply is None:
            if worker not in engine.ncores:
                self._direct.forget(worker)
            return handle
        if reply.status != OK:
            self._loop.loop.call_soon_threadsafe(engine.direct_done, task, worker, rebuild_exception(reply.error, worker))
            return handle
        entry = reply.result[0]
        if not taken_over():
            if entry[1] == "ok":
                task.nbytes = entry[2]
                if len(entry) > 3:
                    task.value = entry[3]
                task.holders = {worker}  # the engine drops a worker that died from holders as it learns of it
                task.status = FINISHED  # last: a waiter that sees it finds the value
            else:
                task.error = _noted(rebuild_exception(entry[2], worker), task.key)
                task.status = ERROR
        self._post(engine.direct_done, task, worker, entry)
        return handle

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list[RemoteData]:
        """Like :meth:`map` but returns the list of :class:`RemoteData` at once."""
        return self._submit(func, [(item,) for item in iterable])

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None, progress: bool = False) -> list[RemoteData]:
        """``[func(x) for x in iterable]`` on the cluster, results left there as RemoteData.

        Returns once every task is done; raises the first task's exception if
        any failed. ``progress=True`` shows a tqdm progress bar (terminal or
        Jupyter).
        """
        handles = self.map_async(func, iterable)
        self._wait([h._task for h in handles], None, raise_errors=True, progress=progress)
        return handles

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list[RemoteData]:
        return self._submit(func, [tuple(args) for args in iterable])

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None, progress: bool = False) -> list[RemoteData]:
        """``[func(*args) for args in iterable]`` on the cluster."""
        handles = self.starmap_async(func, iterable)
        self._wait([h._task for h in handles], None, raise_errors=True, progress=progress)
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
        values = list(values)
        targets = [normalize_address(w) for w in workers] if workers is not None else None
        with self._lock:
            tasks = []
            handles = []
            for value in values:
                key = f"scatter-{self._prefix}-{next(self._counter)}"
                task = _Task(key, None, (), None, [])
                task.value = value
                task.replicas = replicas
                self._tasks[key] = task
                tasks.append(task)
                handles.append(RemoteData(key, self, task))
        self._loop.run(self._engine.scatter(tasks, targets), self.timeout)
        for task in tasks:
            task.value = _NO_VALUE  # the cluster holds it now; do not keep a local copy
        return handles

    # -------------------------------------------------------------- results

    def gather(self, remote_data: Iterable[RemoteData], timeout: float | None = None) -> list:
        """The values of many RemoteData, fetched together (one request per worker)."""
        return self._get_values(list(remote_data), timeout)

    def delete(self, remote_data: Iterable[RemoteData]) -> None:
        """Delete values from the cluster now (their handles become unusable)."""
        tasks = [handle._task for handle in remote_data]
        self._loop.run(self._engine.delete(tasks), self.timeout)

    def _get_values(self, handles: list[RemoteData], timeout: float | None) -> list:
        for handle in handles:
            if not isinstance(handle, RemoteData):
                raise TypeError(f"gather takes RemoteData handles, got {type(handle).__name__}")
        tasks = [handle._task for handle in handles]
        deadline = None if timeout is None else time.monotonic() + timeout
        for _attempt in range(10):
            self._wait(tasks, None if deadline is None else max(0.0, deadline - time.monotonic()), raise_errors=True)
            missing = [t for t in tasks if t.value is _NO_VALUE]
            if not missing:
                break
            remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
            fetched = self._loop.run(self._engine.fetch(missing), remaining)
            if fetched:
                break
        values = []
        for task in tasks:
            value = task.value
            if isinstance(value, Serialized):
                value = deserialize(value.kind, value.blob, value.buffers)
            values.append(value)
        return values

    def _wait(self, tasks: list[_Task], timeout: float | None, raise_errors: bool, progress: Any = False) -> None:
        bar = progress_bar(len(tasks), "tasks") if progress else None
        try:
            self._wait_for(tasks, timeout, raise_errors, bar)
        finally:
            if bar is not None:
                bar.close()

    def _wait_for(self, tasks: list[_Task], timeout: float | None, raise_errors: bool, bar: Any) -> None:
        """Wait until every task is done; raise the first failure (in order) once all before it are done.

        The engine wakes us once per batch: each wake looks only past the
        tasks already seen done (they finish roughly in order), and at the
        whole list only when a worker has died since the last look (to have
        lost values recomputed).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        count = len(tasks)
        done = 0  # tasks[:done] are finished
        deaths_seen = -1
        with self._changed:
            while True:
                while done < count:
                    task = tasks[done]
                    status = task.status
                    if status == FINISHED:
                        done += 1
                    elif status == ERROR:
                        if raise_errors:
                            raise task.error
                        done += 1
                    else:
                        break
                if bar is not None:
                    bar.update(sum(1 for task in tasks if task.status in (FINISHED, ERROR)) - bar.n)
                if done == count:
                    return
                if deaths_seen != self._engine.deaths:
                    deaths_seen = self._engine.deaths
                    lost = [task for task in tasks[done:] if task.status == LOST]
                    for task in lost:
                        if task.scattered:
                            raise LostDataError(task.key, task.lost_on)
                    if lost:
                        self._loop.loop.call_soon_threadsafe(self._engine.recompute_many, lost)
                if self._state != "running":
                    raise RuntimeError("the Pool was closed while waiting for results")
                if self._engine.fatal is not None:
                    raise self._engine.fatal
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"results not ready within {timeout} s")
                self._changed.wait(0.5 if remaining is None else min(remaining, 0.5))

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -------------------------------------------------------------- memory

    def _release_handle(self, task: _Task) -> None:
        task.refcount -= 1
        if task.refcount <= 0 and self._state == "running":
            self._post(self._engine.maybe_forget, task)

    def _post(self, function: Callable, *args: Any) -> None:
        """Have the engine call ``function(*args)`` within :data:`MAIL_DELAY`, in order.

        For news that is not urgent (a handle dropped, a task sent or
        answered by a calling thread): waking the loop thread for each
        costs more than a trivial task itself, and takes the GIL from the
        thread that is busy with the next one. ``list.append`` is atomic;
        the engine clears the flag before it takes the list.
        """
        self._mail.append((function, args))
        if not self._mail_scheduled and not self._loop.loop.is_closed():
            self._mail_scheduled = True
            self._loop.loop.call_soon_threadsafe(self._engine.mail_arrived)

    # -------------------------------------------------------------- lifecycle

    def _check_running(self) -> None:
        if self._state != "running":
            raise ValueError("Pool not running")

    def close(self) -> None:
        """Delete everything this pool put on the cluster and stop (and the local cluster it started)."""
        if self._state == "closed":
            return
        try:
            if self._state == "running" and not self._loop.loop.is_closed():
                self._loop.run(self._engine.shutdown(), 10)
        except Exception as exc:
            logger.warning("pool shutdown did not finish cleanly: %s", exc)
        finally:
            self._finish()

    def terminate(self) -> None:
        """Stop at once, without waiting for running work (its results are dropped)."""
        if self._state == "closed":
            return
        try:
            if not self._loop.loop.is_closed() and getattr(self, "_engine", None) is not None:
                self._loop.run(self._engine.shutdown(wait=False), 5)
        except Exception:
            pass
        finally:
            self._finish()

    def _finish(self) -> None:
        self._state = "closed"
        self._notify()
        self._direct.close()
        self._loop.stop()
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
        return f"<Pool center={self.center_address} workers={len(self.available_cores)} cores={sum(self.available_cores.values())}>"


def _noted(error: BaseException, key: Any) -> BaseException:
    """``error``, with a note naming the key whose computation raised it."""
    if hasattr(error, "add_note"):
        error.add_note(f"(while computing key {key!r} on the zdist cluster)")
    return error


_PLAIN_ITEMS = frozenset({int, float, str, bytes, bool, type(None), complex})


def _to_refs(obj: Any, deps: list) -> Any:
    """Replace every RemoteData (any depth of lists, tuples, dicts) with a Ref."""
    cls = type(obj)
    if cls is RemoteData:
        deps.append(obj.key)
        return Ref(obj.key)
    if cls is tuple or cls is list:
        if _PLAIN_ITEMS.issuperset(map(type, obj)):
            return obj  # the common case, plain values: nothing to replace
        return cls([_to_refs(item, deps) for item in obj])
    if cls is dict:
        return {key: _to_refs(value, deps) for key, value in obj.items()}
    return obj


class _Engine:
    """The pool's scheduler; lives on the pool's event loop thread."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.tasks = pool._tasks
        self.connections = ConnectionPool(timeout=pool.timeout, security=pool.security)
        self.ncores: dict[str, int] = {}
        self.generation = -1
        self.center_id: str | None = None
        self.grace_until = 0.0  # after a Center restart, missing workers are not yet dead
        self.grace_pending = False  # one full look at the workers is still due after the grace period
        self.shared: deque[_Task] = deque()  # tasks that may run anywhere
        self.local: dict[str, deque] = defaultdict(deque)  # tasks that prefer a worker
        self.in_flight: dict[str, int] = defaultdict(int)  # batches per worker
        self.running: dict[str, set] = defaultdict(set)  # task keys per worker
        self.fatal: BaseException | None = None
        self.deaths = 0  # workers seen to die
        self._watcher: asyncio.Task | None = None
        self._pump_scheduled = False
        self._background: set = set()
        self._mail_later = Later(MAIL_DELAY, self.read_mail)
        self._deletions: dict[str, list] = defaultdict(list)  # worker -> keys released, sent together
        self._deletions_later = Later(DELETE_DELAY, self._flush_deletions)
        self._turn = -1  # for equal loads, pick_worker takes turns

    async def start(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    @property
    def center(self):
        return self.connections.get(self.pool.center_address)

    # -------------------------------------------------------------- membership

    async def refresh_workers(self) -> dict[str, int]:
        info = await self.center.request("info", {})
        self._update_workers(info)
        return dict(self.ncores)

    def _update_workers(self, info: dict) -> None:
        if info.get("id") != self.center_id:
            if self.center_id is not None:
                logger.warning("the center restarted; waiting for workers to register again")
                self.grace_until = time.monotonic() + info.get("heartbeat_timeout", 5.0) + 2.0
            self.center_id = info.get("id")
            self.generation = -1
        if info["generation"] == self.generation and time.monotonic() > self.grace_until and not self.grace_pending:
            return
        self.generation = info["generation"]
        if self.pool.security is not None:
            self.pool.security.learn(info["workers"])
        current = {address: w["ncores"] for address, w in info["workers"].items()}
        if not current and self.ncores and self._has_work() and not self.grace_pending and time.monotonic() > self.grace_until:
            # Every worker dropped at once is more often a stall (a slow import
            # on their loops missed heartbeats) than a massacre: give them the
            # time to register again, as after a Center restart.
            logger.warning("the center lists no workers; waiting for them to register again")
            self.grace_until = time.monotonic() + info.get("heartbeat_timeout", 5.0) + 2.0
        self.grace_pending = time.monotonic() < self.grace_until
        if self.grace_pending:
            # Workers re-register one by one with a restarted Center: keep the ones we knew.
            current = {**self.ncores, **current}
        for gone in set(self.ncores) - set(current):
            self._worker_died(gone)
        self.ncores = current
        self.pool.available_cores = dict(current)
        if not current and self._has_work():
            self._fail_all(NoWorkersError("every worker of the cluster is gone; start workers and submit the work again"))
        self._schedule_pump()

    async def _watch(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                info = await self.center.request("info", {}, timeout=max(2.0, WATCH_INTERVAL * 8))
                failures = 0
            except (RPCTimeoutError, ConnectionError) as exc:
                failures += 1
                if failures == 1:
                    logger.warning("center %s is not answering (%s); still trying", self.pool.center_address, exc)
                self.connections.remove(self.pool.center_address)
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("error while watching the center")
                continue
            self._update_workers(info)

    def _worker_died(self, address: str) -> None:
        logger.warning("worker %s is gone; rescheduling its work", address)
        self.read_mail()  # tasks that calling threads sent to it
        self.deaths += 1  # waiters look for values lost with it
        self.connections.remove(address, WorkerDiedError(f"worker {address} died"))
        # Work queued for it may run elsewhere.
        queued = self.local.pop(address, deque())
        self.shared.extendleft(reversed(queued))
        self.in_flight.pop(address, None)
        for key in self.running.pop(address, set()):
            task = self.tasks.get(key)
            if task is not None and task.status == RUNNING:
                task.deaths += 1
                task.status = PENDING
                self.shared.appendleft(task)
        for task in list(self.tasks.values()):
            if address in task.holders:
                task.holders.discard(address)
                if not task.holders and task.status == FINISHED:
                    if task.replicas > 1:
                        task.lost_on = address
                        continue  # the Center restores copies; fetch asks it who holds them
                    task.status = LOST
                    task.lost_on = address
                    if task.dependents:
                        self._recompute(task)
        self.pool._notify()

    def _has_work(self) -> bool:
        return bool(self.shared) or any(self.local.values()) or any(self.running.values())

    def _fail_all(self, exc: BaseException) -> None:
        for task in self.tasks.values():
            if task.status in (PENDING, RUNNING):
                task.status = ERROR
                task.error = exc
        self.shared.clear()
        self.local.clear()
        self.pool._notify()

    # -------------------------------------------------------------- submission

    def submit(self, tasks: list[_Task]) -> None:
        for task in tasks:
            self._enqueue(task)
        self._schedule_pump()

    def _enqueue(self, task: _Task) -> None:
        """Queue a task once its inputs are there; recompute inputs that were lost."""
        task.waiting_on = set()
        for dep in task.deps:
            dep_task = self.tasks.get(dep)
            if dep_task is None:
                if task.status == LOST:
                    # Being rebuilt, but an input's handles were all dropped (and
                    # its value deleted): the chain of lineage is broken.
                    task.status = ERROR
                    task.error = LostDataError(task.key, task.lost_on, f"its input {dep!r} was released, so it cannot be recomputed")
                    self.pool._notify()
                    return
                continue  # someone else's key: the worker asks the Center
            dep_task.dependents.add(task.key)
            if dep_task.status == ERROR:
                task.status = ERROR
                task.error = dep_task.error
                self.pool._notify()
                return
            if dep_task.status == LOST:
                if dep_task.scattered:
                    task.status = ERROR
                    task.error = LostDataError(dep, dep_task.lost_on)
                    self.pool._notify()
                    return
                self._recompute(dep_task)
            if dep_task.status != FINISHED:
                task.waiting_on.add(dep)
        task.status = PENDING
        if not task.waiting_on:
            self._place(task)

    def recompute_many(self, tasks: list[_Task]) -> None:
        for task in tasks:
            if task.status == LOST:
                self._recompute(task)
        self._schedule_pump()

    def _recompute(self, task: _Task) -> None:
        if task.status in (PENDING, RUNNING):
            return
        if task.scattered:
            return
        logger.info("recomputing lost key %r", task.key)
        task.value = _NO_VALUE
        self._enqueue(task)

    def _place(self, task: _Task) -> None:
        """Queue on the worker holding most bytes of its inputs, or anywhere."""
        if task.deps and self.ncores:
            weights: dict[str, int] = defaultdict(int)
            for dep in task.deps:
                dep_task = self.tasks.get(dep)
                if dep_task is not None:
                    for holder in dep_task.holders:
                        if holder in self.ncores:
                            weights[holder] += dep_task.nbytes + 1
            if weights:
                best = max(weights, key=lambda w: (weights[w], -self._load(w)))
                self.local[best].append(task)
                return
        self.shared.append(task)

    def _load(self, worker: str) -> float:
        return (len(self.running.get(worker, ())) + len(self.local.get(worker, ()))) / self.ncores.get(worker, 1)

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Send batches to every worker with room for more."""
        self._pump_scheduled = False
        if not self.ncores:
            return
        total_cores = sum(self.ncores.values())
        queued = len(self.shared) + sum(len(q) for q in self.local.values())
        if not queued:
            return
        # Small batches when there is little work (latency), large ones when
        # there is much (throughput), always enough to keep every core busy.
        batch_size = max(1, min(MAX_BATCH, queued // (total_cores * BATCHES_PER_CORE) or 1))
        progress = True
        while progress:
            progress = False
            for worker, cores in self.ncores.items():
                if self.in_flight[worker] >= cores * BATCHES_PER_CORE:
                    continue
                batch = self._take(worker, batch_size * cores if self.in_flight[worker] == 0 else batch_size)
                if batch:
                    self._send_batch(worker, batch)
                    progress = True

    def _take(self, worker: str, n: int) -> list[_Task]:
        batch: list[_Task] = []
        own = self.local.get(worker)
        while own and len(batch) < n:
            task = own.popleft()
            if task.status == PENDING:
                batch.append(task)
        while self.shared and len(batch) < n:
            task = self.shared.popleft()
            if task.status == PENDING:
                batch.append(task)
        if not batch:
            # Steal from the longest queue of another worker, when it is long
            # enough that an idle core is worth moving data for.
            others = [(len(q), w) for w, q in self.local.items() if w != worker and len(q) > STEAL_THRESHOLD * self.ncores.get(w, 1)]
            if others:
                _, victim = max(others)
                queue = self.local[victim]
                for _ in range(min(n, len(queue) // 2)):
                    task = queue.pop()
                    if task.status == PENDING:
                        batch.append(task)
        return batch

    def _send_batch(self, worker: str, batch: list[_Task]) -> None:
        payload = []
        who_has = {}
        tasks = self.tasks
        for task in batch:
            task.status = RUNNING
            task.worker = worker
            self.running[worker].add(task.key)
            # The top-level argument tuple goes as a msgpack list (cheaper than a
            # tuple extension); the worker calls function(*args) either way.
            payload.append([task.key, task.function, list(task.args), task.kwargs or {}, task.deps])
            for dep in task.deps:
                dep_task = tasks.get(dep)
                if dep_task is not None and worker not in dep_task.holders and dep_task.holders:
                    who_has[dep] = list(dep_task.holders)  # the worker need not ask the Center
        args = {"tasks": payload, "return_values": SMALL_RESULT, "inline": True}
        if who_has:
            args["who_has"] = who_has
        self.in_flight[worker] += 1
        try:
            future = self.connections.get(worker).request("compute_batch", args, timeout=None)
        except Exception as exc:
            self._batch_failed(worker, batch, exc)
            return
        future.add_done_callback(lambda f: self._batch_done(worker, batch, f))

    # -------------------------------------------------------------- tasks sent by a calling thread

    def pick_worker(self) -> str | None:
        """The least loaded worker, for a task sent from another thread (``Pool.apply``).

        Called off the loop thread: it only reads (a snapshot that may be a
        moment old, which is harmless for a choice of worker).
        """
        ncores = self.ncores
        if not ncores or self.grace_pending:
            return None
        workers = sorted(ncores)
        self._turn = turn = (self._turn + 1) % len(workers)
        best, best_load = None, None
        for worker in workers[turn:] + workers[:turn]:  # equal loads: take turns
            load = self._load(worker)
            if best_load is None or load < best_load:
                best, best_load = worker, load
        return best

    def running_elsewhere(self, task: _Task, worker: str) -> None:
        """``task`` was sent to ``worker`` by a calling thread: rerun it should that worker die."""
        if task.status != RUNNING or task.worker != worker:
            return  # answered already
        if worker in self.ncores:
            self.running[worker].add(task.key)
        else:
            task.status = PENDING
            task.deaths += 1
            self.shared.appendleft(task)
            self._schedule_pump()

    def direct_done(self, task: _Task, worker: str, outcome: Any) -> None:
        """The answer to a task a calling thread sent: keep the books as for a batch."""
        self.running.get(worker, set()).discard(task.key)
        if isinstance(outcome, BaseException):
            if task.status == RUNNING and task.worker == worker:
                self._batch_failed_tasks(worker, [task], outcome)  # it notifies waiters
            return
        if outcome[1] == "ok" and task.status == FINISHED and worker not in self.ncores:
            # It died after answering (the calling thread set the holders).
            task.holders.discard(worker)
            if task.value is _NO_VALUE:
                task.status = LOST
                task.lost_on = worker
        if task.refcount <= 0:
            self.maybe_forget(task)

    def _batch_failed(self, worker: str, batch: list[_Task], exc: BaseException) -> None:
        if worker in self.ncores:
            self.in_flight[worker] -= 1
        self._batch_failed_tasks(worker, batch, exc)

    def _batch_failed_tasks(self, worker: str, batch: list[_Task], exc: BaseException) -> None:
        running = self.running.get(worker, set())
        for task in batch:
            running.discard(task.key)
            if task.status == RUNNING:
                if isinstance(exc, (WorkerDiedError, ConnectionError)):
                    task.status = PENDING
                    task.deaths += 1
                    self.shared.appendleft(task)
                else:
                    self._task_failed(task, exc)
        self._schedule_pump()
        self.pool._notify()

    def _batch_done(self, worker: str, batch: list[_Task], future: asyncio.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._batch_failed(worker, batch, exc)
            return
        if worker in self.ncores:
            self.in_flight[worker] -= 1
        running = self.running.get(worker, set())
        released = []
        for task, entry in zip(batch, future.result()):
            running.discard(task.key)
            if task.status != RUNNING or task.worker != worker:
                continue  # rescheduled meanwhile (its worker was presumed dead)
            if entry[1] == "ok":
                task.status = FINISHED
                task.nbytes = entry[2]
                task.holders = {worker}
                if len(entry) > 3:
                    task.value = entry[3]
                for dep in task.deps:
                    dep_task = self.tasks.get(dep)
                    if dep_task is not None:
                        dep_task.holders.add(worker)  # the worker keeps the inputs it fetched
                        dep_task.dependents.discard(task.key)
                        released.append(dep_task)
                self._wake_dependents(task)
                if task.refcount <= 0:
                    released.append(task)
            else:
                error = rebuild_exception(entry[2], worker)
                if isinstance(error, MissingDataError):
                    self._inputs_missing(task, error)
                else:
                    self._task_failed(task, error)
        for task in released:
            self.maybe_forget(task)
        self._schedule_pump()
        self.pool._notify()

    def _inputs_missing(self, task: _Task, error: MissingDataError) -> None:
        """Inputs vanished (their worker died): recompute them, then rerun ``task``."""
        task.status = PENDING
        task.deaths += 1
        if task.deaths > 10:
            self._task_failed(task, error)
            return
        for key in error.keys:
            dep_task = self.tasks.get(key)
            if dep_task is not None and dep_task.status == FINISHED:
                dep_task.holders.clear()
                dep_task.status = LOST
        self._enqueue(task)

    def _task_failed(self, task: _Task, error: BaseException) -> None:
        task.status = ERROR
        task.error = _noted(error, task.key)
        for key in list(task.dependents):
            dependent = self.tasks.get(key)
            if dependent is not None and dependent.status == PENDING:
                self._task_failed(dependent, error)

    def _wake_dependents(self, task: _Task) -> None:
        for key in list(task.dependents):
            dependent = self.tasks.get(key)
            if dependent is None or dependent.status != PENDING:
                continue
            dependent.waiting_on.discard(task.key)
            if not dependent.waiting_on:
                self._place(dependent)

    # -------------------------------------------------------------- data

    async def scatter(self, tasks: list[_Task], targets: list[str] | None) -> None:
        if not self.ncores:
            await self.refresh_workers()
        workers = targets or _spread(self.ncores)
        if not workers:
            raise NoWorkersError("the cluster has no workers to scatter to")
        distinct = list(dict.fromkeys(workers))
        by_worker: dict[str, list[_Task]] = defaultdict(list)
        for index, (task, worker) in enumerate(zip(tasks, itertools.cycle(workers))):
            by_worker[worker].append(task)
            if task.replicas > 1:
                if task.replicas > len(distinct):
                    raise ValueError(f"replicas={task.replicas} but only {len(distinct)} workers to hold copies")
                start = distinct.index(worker)
                for extra in range(1, task.replicas):
                    by_worker[distinct[(start + extra) % len(distinct)]].append(task)
        replies = await asyncio.gather(
            *(self.connections.get(w).request("update_data", {"data": {t.key: t.value for t in ts}}) for w, ts in by_worker.items())
        )
        for (worker, ts), (_, meta) in zip(by_worker.items(), replies):
            for task in ts:
                task.status = FINISHED
                task.holders.add(worker)
                task.nbytes = meta["nbytes"][task.key]
        replicated = {task.key: task.replicas for task in tasks if task.replicas > 1}
        if replicated:
            await self.center.request("set_replicas", {"keys": replicated})

    async def _ask_center_holders(self, tasks: list[_Task]) -> None:
        """Learn holders the pool does not know of (replicas the Center restored)."""
        who_has = await self.center.request("who_has", {"keys": [t.key for t in tasks]})
        for task in tasks:
            task.holders.update(w for w in who_has.get(task.key, ()) if w in self.ncores)

    async def fetch(self, tasks: list[_Task]) -> bool:
        """Bring values here; recompute lost ones. True once all are here."""
        unknown = [t for t in tasks if t.value is _NO_VALUE and t.scattered and not any(w in self.ncores for w in t.holders)]
        if unknown:
            await self._ask_center_holders(unknown)
        by_worker: dict[str, list[_Task]] = defaultdict(list)
        for task in tasks:
            if task.value is not _NO_VALUE:
                continue
            holders = [w for w in task.holders if w in self.ncores]
            if task.status == LOST or not holders:
                if task.scattered:
                    raise LostDataError(task.key, task.lost_on)
                task.status = LOST
                self._recompute(task)
                self._schedule_pump()
                continue
            by_worker[min(holders, key=self._load)].append(task)
        results = await asyncio.gather(
            *(self.connections.get(w).request("get_data", {"keys": [t.key for t in ts]}) for w, ts in by_worker.items()),
            return_exceptions=True,
        )
        complete = True
        for (worker, ts), result in zip(by_worker.items(), results):
            if isinstance(result, BaseException):
                if isinstance(result, (ConnectionError, RPCTimeoutError, MissingDataError)):
                    for task in ts:
                        task.holders.discard(worker)
                    complete = False
                    continue
                raise result
            for task in ts:
                task.value = result[task.key]
        return complete and all(t.value is not _NO_VALUE for t in tasks)

    def mail_arrived(self) -> None:
        self._mail_later.schedule()

    def read_mail(self) -> None:
        """Make the calls other threads posted (:meth:`Pool._post`)."""
        self._mail_later.cancel()
        pool = self.pool
        pool._mail_scheduled = False
        mail, pool._mail = pool._mail, []
        for function, args in mail:
            try:
                function(*args)
            except Exception:  # noqa: BLE001 - one bad letter must not lose the rest
                logger.exception("error in the pool's engine")

    def maybe_forget(self, task: _Task) -> None:
        """Delete a value nobody can reach any more: no handle, no waiting dependent."""
        if task.refcount > 0 or task.dependents or task.status in (PENDING, RUNNING, RELEASED):
            return
        if self.tasks.get(task.key) is not task:
            return
        del self.tasks[task.key]
        holders = task.holders
        task.status = RELEASED
        task.value = _NO_VALUE
        task.holders = set()
        for worker in holders:
            if worker in self.ncores:
                self._delete_later(worker, task.key)
        if task.replicas > 1:
            self._spawn(self._delete_all_copies(task.key))
        for dep in task.deps:
            dep_task = self.tasks.get(dep)
            if dep_task is not None:
                dep_task.dependents.discard(task.key)
                self.maybe_forget(dep_task)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete_all_copies(self, key: Any) -> None:
        try:
            await self.center.request("set_replicas", {"keys": {key: 1}})
            who_has = await self.center.request("who_has", {"keys": [key]})
            for worker in who_has.get(key, ()):
                self.connections.get(worker).send("delete_data", keys=[key])
        except Exception as exc:
            logger.info("could not delete every copy of %r: %s", key, exc)

    def _delete_later(self, worker: str, key: Any) -> None:
        """Batch deletions: one delete_data message per worker every :data:`DELETE_DELAY`.

        Released values are not urgent, and a message per released handle
        would wake a worker (and, through its report, the Center) in the
        middle of the next task's round trip.
        """
        self._deletions[worker].append(key)
        self._deletions_later.schedule()

    def _take_deletions(self) -> dict:
        self._deletions_later.cancel()
        pending, self._deletions = self._deletions, defaultdict(list)
        return pending

    def _flush_deletions(self) -> None:
        for worker, keys in self._take_deletions().items():
            try:
                self.connections.get(worker).send("delete_data", keys=keys)
            except Exception as exc:
                logger.info("could not delete %d keys on %s: %s", len(keys), worker, exc)

    async def delete(self, tasks: list[_Task]) -> None:
        replicated = [task for task in tasks if task.replicas > 1]
        if replicated:
            await self._ask_center_holders(replicated)
        by_worker: dict[str, list] = defaultdict(list)
        for task in tasks:
            for worker in task.holders:
                by_worker[worker].append(task.key)
            task.holders = set()
            task.status = RELEASED
            task.value = _NO_VALUE
            self.tasks.pop(task.key, None)
        await asyncio.gather(
            *(self.connections.get(w).request("delete_data", {"keys": keys}) for w, keys in by_worker.items() if w in self.ncores),
            return_exceptions=True,
        )

    async def shutdown(self, wait: bool = True) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.read_mail()
        if wait:
            by_worker: dict[str, list] = defaultdict(list)
            replicated = [task for task in self.tasks.values() if task.replicas > 1]
            if replicated:
                try:
                    await self._ask_center_holders(replicated)
                except Exception as exc:
                    logger.info("could not ask the center where replicas are: %s", exc)
            for task in self.tasks.values():
                for worker in task.holders:
                    by_worker[worker].append(task.key)
            for worker, keys in self._take_deletions().items():
                by_worker[worker].extend(keys)
            await asyncio.gather(
                *(self.connections.get(w).request("delete_data", {"keys": keys}, timeout=5) for w, keys in by_worker.items() if w in self.ncores),
                return_exceptions=True,
            )
            await asyncio.sleep(0)  # let the delete replies' callbacks run
        self.tasks.clear()
        self.connections.close()


def _spread(ncores: dict[str, int]) -> list[str]:
    """Worker addresses repeated by their cores, interleaved: a round-robin by weight."""
    slots = []
    remaining = dict(ncores)
    while any(remaining.values()):
        for worker in sorted(remaining):
            if remaining[worker] > 0:
                slots.append(worker)
                remaining[worker] -= 1
    return slots


def progress_bar(total: int, unit: str) -> Any:
    """A tqdm bar that suits where we run: a widget in Jupyter, text in a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.2)
