"""The Worker: serves its local ``data`` dict and runs functions on it.

Inputs it lacks it fetches peer to peer, after asking the Center who has
them; every key it gains or drops it reports to the Center (batched: one
message per turn of the event loop, however many keys changed).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import sys
import time
import traceback
import uuid
from collections import deque
from typing import Any, Callable, Iterable

from .errors import MissingDataError, SessionClosedError
from .fairpool import FairThreadPool
from .memory import MemoryThresholds, parse_memory_limit
from .node import Node
from .protocol import Ref, error_fields, serialize
from .rpc import ConnectionPool, rebuild_exception, unwrap_value
from .comm import normalize_address
from .datastore import WorkerMemory, work_directory
from . import output as _output
from . import worker_setup
from .taskprogress import JobResults, TaskProgress
from .worker_center import CenterLink, rss
from .worker_fetch import PeerFetcher
from .worker_sessions import ClientSessions

logger = logging.getLogger(__name__)

try:  # dask knows the true size of NumPy, pandas and container values
    from dask.sizeof import sizeof as _sizeof
except ImportError:  # pragma: no cover - dask is a dependency
    _sizeof = sys.getsizeof


def sizeof(value: Any) -> int:
    """Bytes a value holds: buffer sizes for NumPy/pandas, ``sys.getsizeof`` otherwise."""
    try:
        return int(_sizeof(value))
    except Exception:
        return sys.getsizeof(value, 0)


def substitute(obj: Any, data: dict) -> Any:
    """``obj`` with every :class:`Ref` replaced by the value it names (any depth)."""
    cls = type(obj)
    if cls is Ref:
        try:
            return data[obj.key]
        except KeyError:
            # Deleted between the batch's check and this thread running it: missing
            # data (which a scheduler recovers from), not the user's KeyError.
            raise MissingDataError([obj.key], "deleted on this worker before the task that needs it ran") from None
    if cls is tuple or cls is list:
        return cls(substitute(item, data) for item in obj)
    if cls is dict:
        return {key: substitute(value, data) for key, value in obj.items()}
    return obj


def _run_tasks(
    tasks: list, data: dict, deadline: float | None = None, session: str | None = None, released: Any = (), output: dict | None = None, warned: dict | None = None,
    results: JobResults | None = None,
) -> list:
    """Run tasks one after the other: ``[(ok, value_or_error, nbytes_or_traceback, start, stop)]``.

    In a thread-pool thread, or, given a ``deadline`` (a ``time.time()``),
    on the event loop (a batch sent with ``inline=True``): there it stops
    once the deadline has passed, so the results may cover only the first
    tasks (at least one), and a function that tries to run an event loop of
    its own fails with an error that says why (:func:`_inline_loop_error`).

    A task of a client ``session`` found in ``released`` (the session was
    closed meanwhile) is not run: it fails with :class:`SessionClosedError`.

    With ``output`` (a dict), what each task prints or logs is captured into
    ``output[key]`` (:mod:`zdist.output`) instead of the worker's streams;
    with ``warned`` (a dict), the warnings each task raises go to
    ``warned[key]``, to be raised again on the client.

    ``results``, if given, is the list to append to: the worker's
    :class:`~zdist.taskprogress.TaskProgress` counts its entries while the
    job runs, so that the Center hears of each task as it ends.
    """
    capture = token = warning_capture = warning_token = None
    if output is not None:  # one ContextVar set per job; per task only the key in it changes
        capture = [None, output]
        token = _output.begin_batch(capture)
    if warned is not None:
        warning_capture = [None, warned]
        warning_token = _output.record_warnings(warning_capture)
    on_loop = deadline is not None
    if results is None:
        results = []
    else:
        results.started = True  # this job has a thread now: its first unfinished task is executing
    try:
        for key, function, args, kwargs, deps in tasks:
            if on_loop and results and results[-1][4] > deadline:
                break
            start = time.time()
            if session is not None and session in released:
                results.append((False, SessionClosedError(session, "the task had not started"), "", start, start))
                continue
            if capture is not None:
                capture[0] = key
            if warning_capture is not None:
                warning_capture[0] = key
            try:
                if deps:
                    args = substitute(args, data)
                    kwargs = substitute(kwargs, data) if kwargs else kwargs
                value = function(*args, **kwargs) if kwargs else function(*args)
            except Exception as exc:  # noqa: BLE001 - the user's function failed; report it
                if on_loop and _raised_by_asyncio(exc):
                    exc = _inline_loop_error(function, exc)
                results.append(_failure(exc, start))
                continue
            results.append((True, value, sizeof(value), start, time.time()))
    finally:
        if token is not None:
            _output.end(token)
        if warning_token is not None:
            _output.end_warnings(warning_token)
    return results


async def _await_task(task: list, data: dict, session: str | None = None, released: Any = (), output: dict | None = None, warned: dict | None = None) -> tuple:
    """Await one task whose function is a coroutine function, on the worker's loop (see :func:`_run_tasks`)."""
    key, function, args, kwargs, deps = task
    if output is not None:  # this coroutine runs as an asyncio task of its own: the capture stays within it
        _output.begin_batch([key, output])
    if warned is not None:
        _output.record_warnings([key, warned])
    start = time.time()
    if session is not None and session in released:
        return (False, SessionClosedError(session, "the task had not started"), "", start, start)
    try:
        if deps:
            args = substitute(args, data)
            kwargs = substitute(kwargs, data) if kwargs else kwargs
        value = await function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's function failed; report it
        return _failure(exc, start)
    return (True, value, sizeof(value), start, time.time())


def _failure(exc: BaseException, start: float) -> tuple:
    """A failed task's outcome, with its traceback as text (less the worker's own frame)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None))
    return (False, exc, tb, start, time.time())


_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)


def _raised_by_asyncio(exc: BaseException) -> bool:
    """A RuntimeError raised by asyncio itself, e.g. ``asyncio.run`` refusing to start on a thread whose loop runs."""
    tb = exc.__traceback__
    if not isinstance(exc, RuntimeError) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.dirname(tb.tb_frame.f_code.co_filename) == _ASYNCIO_DIR


def _inline_loop_error(function: Callable, exc: BaseException) -> RuntimeError:
    """The error of a function sent inline that asked asyncio for a loop of its own (the cause: asyncio's refusal)."""
    name = getattr(function, "__qualname__", None) or repr(function)
    error = RuntimeError(
        f"{name} ran on the worker's event loop, because its batch was sent with inline=True, and asyncio refused what it "
        f"asked there ({exc}). A function sent inline must be tiny and must not run or wait for an event loop "
        "(asyncio.run, run_until_complete): send it without inline=True to run it in the worker's thread pool, "
        "or make it an async def function, which the worker awaits on its loop."
    )
    error.__cause__ = exc
    return error


class Worker(Node):
    """A node that holds data and runs functions on it.

    >>> import asyncio
    >>> from zdist.center import Center
    >>> async def demo():
    ...     async with Center() as center:
    ...         async with Worker(center.address) as worker:
    ...             worker.update_data(data={'x': 1, 'y': 2})
    ...             status, meta = await worker.compute(function=lambda a, b: a + b, keys=['x', 'y'], key='z')
    ...             return status, meta['key'], worker.data['z']
    >>> asyncio.run(demo())
    (b'OK', 'z', 3)
    """

    def __init__(
        self,
        center_address: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ncores: int | None = None,
        name: str | None = None,
        local_dir: str | None = None,
        heartbeat_interval: float = 0.5,
        peer_timeout: float = 60.0,
        memory_limit: int | str | None = None,
        memory_thresholds: Any = None,
        restarts: int = 0,
        replaces: str | None = None,
        nanny: int | None = None,
        lifetime: float | None = None,
        lifetime_stagger: float = 0.0,
        resources: dict | None = None,
        death_timeout: float | None = None,
        preload: Iterable[str] = (),
        **kwargs: Any,
    ):
        super().__init__(host, port, **kwargs)
        self.center_address = normalize_address(center_address)
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.local_dir = local_dir
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        # Under a nanny: how often it started this worker again, the address of
        # the one it replaces (the Center drops that one at once), the nanny's pid.
        self.restarts = restarts
        self.memory_limit = parse_memory_limit(memory_limit)
        self.memory_thresholds = MemoryThresholds.of(memory_thresholds)
        self.replaces = replaces
        self.nanny = nanny
        # After ``lifetime`` seconds (give or take ``lifetime_stagger``) the worker retires (zdist.retirement).
        self.lifetime = lifetime
        self.lifetime_stagger = lifetime_stagger
        # What tasks with resource needs may use here ({'GPU': 2}); clients place such tasks by it.
        self.resources = dict(resources or {})
        self.retiring = False
        # With no Center reachable for ``death_timeout`` seconds the worker stops
        # and ``exit_code`` says why (a batch job's worker must not outlive its Center).
        self.death_timeout = death_timeout
        self.exit_code = 0
        # Modules (names or .py files) loaded at start, their zdist_setup(worker) run (zdist.worker_setup).
        self.preload = list(preload)
        self._preloaded: list = []
        # A plain dict, or with a memory limit the spilling store of self.memory (zdist.datastore).
        self.data: Any = {}
        self.memory: WorkerMemory | None = None
        self.work_dir: str | None = None
        self.nbytes: dict[Any, int] = {}
        self.executor: FairThreadPool | None = None
        self.peers: ConnectionPool | None = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self.executing = 0
        self.bytes_served = 0
        self.task_log: deque = deque(maxlen=10_000)  # (key, start, stop, ok)
        # Per task group: queued, executing, done, erred, as tasks start and end (for the heartbeat).
        self.progress = TaskProgress()
        # The keys of client sessions, and the sessions closed.
        self.sessions = ClientSessions(self)
        # Registration, heartbeats and the key reports to the Center.
        self.center_link = CenterLink(self)
        # Copies of keys from other workers.
        self.fetcher = PeerFetcher(self)
        self._background: list[asyncio.Task] = []
        self.handlers.update(
            {
                "get_data": self.get_data,
                "update_data": self.update_data,
                "delete_data": self.delete_data,
                "compute": self.compute,
                "compute_batch": self.compute_batch,
                "keys": self.keys,
                "metrics": self.metrics,
                "get_task_log": self.get_task_log,
                "fetch_keys": self.fetcher.fetch_keys,
                "release_session": self.release_session,
                "retire": self.retire,
                **worker_setup.handlers(self),  # upload_file, run
            }
        )

    # -------------------------------------------------------------- lifecycle

    async def on_start(self) -> None:
        self.work_dir = work_directory(self.local_dir)  # raises OSError, saying so, if it cannot be made
        self.memory = WorkerMemory(self.memory_limit, self.memory_thresholds, self.work_dir, self.center_link.heartbeat_now)
        self.data = self.memory.data
        self._background.append(asyncio.ensure_future(self.memory.monitor()))
        if self.lifetime:
            self._background.append(asyncio.ensure_future(self._retire_later()))
        if self.name is None:
            self.name = self.address
        self.executor = FairThreadPool(self.ncores, f"zdist-worker-{self.port}")
        self.peers = ConnectionPool(timeout=self.peer_timeout, security=self.security)
        if self.preload:  # before registering: no task arrives before the set-up is done
            self._preloaded = await worker_setup.preload(self, self.preload)
        self._background.append(asyncio.ensure_future(self.center_link.stay_registered()))

    async def on_stop(self) -> None:
        for task in self._background:
            task.cancel()
        if self._preloaded:
            await worker_setup.teardown(self, self._preloaded)
        await self.center_link.unregister()
        if self.executor is not None:
            self.executor.shutdown()
        if self.peers is not None:
            self.peers.close()
        if self.memory is not None:
            self.memory.close()

    async def retire(self, stop: bool = True, leaving: list | None = None) -> dict:
        """Hand every key no other worker holds to other workers, then stop (see :mod:`zdist.retirement`).

        Answers ``{'moved': n, 'to': {address: n}, 'left': [keys not handed over]}``;
        the worker stops right after (unless ``stop=False``). ``zdist retire``
        and SIGTERM call this. ``leaving``: other workers retiring at the same
        time, which neither take keys nor count as their second holder.
        """
        from .retirement import retire

        if not self.retiring:
            self.retiring = True
            self.center_link.heartbeat_now()  # tell the Center now: no new tasks here
        try:
            return await retire(self, leaving=set(leaving or ()))
        finally:
            if stop:  # after the reply has left
                asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self.stop()))

    async def close_gracefully(self) -> None:
        """Retire, then stop: what SIGTERM does to a worker started by ``zdist-worker``."""
        try:
            await self.retire(stop=False)
        except Exception:  # noqa: BLE001 - leaving anyway; say why
            logger.exception("retiring %s failed; stopping anyway", self.address)
        await self.stop()

    async def _retire_later(self) -> None:
        delay = self.lifetime + random.uniform(-self.lifetime_stagger, self.lifetime_stagger)
        await asyncio.sleep(max(0.0, delay))
        logger.warning("worker %s reached its lifetime (%.0f s); retiring", self.address, delay)
        await self.close_gracefully()

    def keep(self, key: Any, value: Any, nbytes: int | None = None, session: str | None = None) -> int:
        """Hold ``value`` as ``key`` (of client ``session``, if given) and report it to the Center; its size in bytes."""
        if nbytes is None:
            nbytes = sizeof(value)
        self.data[key] = value
        self.nbytes[key] = nbytes
        sessions = self.sessions
        if session is not None or sessions.key_session:
            sessions.tag(key, session)
        self.center_link.gained(key, nbytes)
        return nbytes

    # -------------------------------------------------------------- what the collaborators own

    @property
    def registered(self) -> asyncio.Event:
        """Set while the Center knows this worker (see :class:`~zdist.worker_center.CenterLink`)."""
        return self.center_link.registered

    @property
    def current_heartbeat_interval(self) -> float:
        """Seconds between heartbeats now: the Center's wish or this worker's own, whichever is longer."""
        return self.center_link.current_heartbeat_interval

    def flush_reports(self) -> None:
        """Tell the Center now of the keys gained and dropped since the last report."""
        self.center_link.flush_reports()

    @property
    def key_session(self) -> dict:
        """Key → the client session it belongs to (tagged keys only)."""
        return self.sessions.key_session

    @property
    def session_keys(self) -> dict:
        """Client session → its keys held here."""
        return self.sessions.session_keys

    @property
    def released_sessions(self) -> dict:
        """Client sessions released lately (oldest first), whose late requests are refused."""
        return self.sessions.released

    def release_session(self, session: str) -> str:
        """A client session closed: delete its keys here and drop its tasks not yet started.

        Tasks of it that finish later are answered with
        :class:`SessionClosedError` and their results not kept; later
        requests of it are refused with that error. The Center sends this to
        every worker when it closes a session.
        """
        keys = self.sessions.release(session)
        for key in keys:
            if key in self.data:
                del self.data[key]
                self.nbytes.pop(key, None)
                self.center_link.dropped(key)
        if keys:
            logger.info("client session %s closed: deleted its %d keys", session, len(keys))
            self.center_link.flush_reports()
        return "OK"

    # -------------------------------------------------------------- data ops

    def get_data(self, keys: Iterable) -> dict:
        """``{key: value}`` for keys held here; a missing key is an error naming it."""
        data = self.data
        missing = [key for key in keys if key not in data]
        if missing:
            raise MissingDataError(missing, f"not held by worker {self.address}")
        out = {}
        stored = data.serialized if self.memory is not None and self.memory.store is not None else data.__getitem__
        for key in keys:
            try:
                out[key] = serialize(stored(key))  # a spilled value: its bytes from disk, not unpickled
            except Exception as exc:
                raise TypeError(f"the value of key {key!r} cannot be serialized to send it: {type(exc).__name__}: {exc}") from None
        self.bytes_served += sum(self.nbytes.get(key, 0) for key in keys)
        return out

    def update_data(self, data: dict, report: bool = True, session: str | None = None) -> tuple:
        """Store values; answers ``(b'OK', {'nbytes': {key: bytes}})``.

        With ``session``, the values belong to that client session: they are
        deleted when it closes.
        """
        if not isinstance(data, dict):
            raise TypeError(f"update_data needs a dict of key: value, got {type(data).__name__}")
        self.sessions.check(session)
        sizes = {}
        for key, value in data.items():
            if report:
                sizes[key] = self.keep(key, value, session=session)
            else:
                self.data[key] = value
                sizes[key] = self.nbytes[key] = sizeof(value)
                if session is not None or self.sessions.key_session:
                    self.sessions.tag(key, session)
        if report:
            self.center_link.flush_reports()  # tell the Center before the caller hears back
        return (b"OK", {"nbytes": sizes})

    def delete_data(self, keys: Iterable, report: bool = True) -> str:
        """Forget values; keys not held here are ignored."""
        for key in keys:
            if key in self.data:
                del self.data[key]
                self.nbytes.pop(key, None)
                if self.sessions.key_session:
                    self.sessions.tag(key, None)
                if report:
                    self.center_link.dropped(key)
        return "OK"

    def keys(self) -> list:
        return list(self.data)

    def metrics(self) -> dict:
        return {
            "address": self.address,
            "name": self.name,
            "ncores": self.ncores,
            "nkeys": len(self.data),
            "nbytes": sum(self.nbytes.values()),
            "executing": self.executing,
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "bytes_fetched": self.fetcher.bytes_fetched,
            "bytes_served": self.bytes_served,
            "ops_served": dict(self.ops_served),
            "memory": rss(),
            "pid": os.getpid(),
            "sessions": len(self.sessions.session_keys),
            "restarts": self.restarts,
            "memory_limit": self.memory_limit,
            **(self.memory.metrics() if self.memory is not None else {}),
        }

    def get_task_log(self, since: float = 0.0) -> list:
        return [entry for entry in self.task_log if entry[2] >= since]

    # -------------------------------------------------------------- compute

    async def compute(
        self,
        function: Callable,
        keys: Iterable = (),
        key: Any = None,
        args: Iterable = (),
        kwargs: dict | None = None,
        return_value: int = 0,
        session: str | None = None,
    ) -> tuple:
        """Run ``function(*[data[k] for k in keys], *args, **kwargs)`` and keep the result.

        Answers ``(b'OK', {'key': key, 'nbytes': n})``; with ``return_value=N``
        a result of at most N bytes also comes back as ``'value'``. With
        ``session``, the result belongs to that client session (see
        :meth:`compute_batch`). The function runs in the thread pool, or is
        awaited on the loop if it is a coroutine function (the rule of
        :meth:`compute_batch`).
        """
        if not callable(function):
            raise TypeError(f"compute needs a callable function, got {type(function).__name__}")
        keys = list(keys)
        if key is None:
            key = f"{getattr(function, '__name__', 'result')}-{uuid.uuid4().hex}"
        task = [key, function, tuple(Ref(k) for k in keys) + tuple(args), kwargs or {}, keys]
        # Reported to the Center before the reply: a caller may ask it right away.
        result = (await self._start_batch([task], return_value, False, None, report_now=True, session=session))[0]
        if result[1] == "error":
            fields = result[2]
            error = rebuild_exception({**fields, "exception": unwrap_value(fields.get("exception"))})
            error.zdist_traceback = fields.get("traceback")  # the node replies with the task's traceback
            raise error
        meta = {"key": key, "nbytes": result[2]}
        if len(result) > 3:
            meta["value"] = result[3]
        return (b"OK", meta)

    def compute_batch(self, tasks: list, return_values: int = 0, inline: bool = False, who_has: dict | None = None, session: str | None = None, output: bool = False) -> asyncio.Future:
        """Run many tasks ``[key, function, args, kwargs, deps]``; ``Ref(k)`` in args is ``data[k]``.

        Answers one entry per task: ``[key, 'ok', nbytes]`` (plus the value if
        it is at most ``return_values`` bytes and can be serialized), or
        ``[key, 'error', {type, message, traceback, exception}]``. Missing
        inputs are fetched from peers first; a task whose inputs cannot be
        found fails with :class:`MissingDataError`. ``who_has`` tells where
        inputs are, as in :meth:`~zdist.worker_fetch.PeerFetcher.gather_deps`.
        The Center hears of the new keys within
        :data:`~zdist.worker_center.REPORT_DELAY`, not before the reply: a
        scheduler that sends this knows where they are, and passes
        ``who_has`` on.

        Where a task runs is one rule, decided by what the caller sent:

        * a **coroutine function** (``async def``) is awaited on the worker's
          event loop, concurrently with the batch's other such tasks;
        * with ``inline=True``, every other function of the batch runs on the
          event loop, one after the other, in slices of at most
          :data:`INLINE_SLICE_SECONDS` (other requests are served between
          slices). The caller vouches that its functions are tiny: one that
          takes long holds up every request to this worker (``get_data``,
          heartbeats) while it runs, and one that runs or waits for an event
          loop of its own (``asyncio.run``) fails with an error that says so
          (it is not run again elsewhere);
        * everything else runs in the worker's thread pool, the batch split
          into one job per core.

        Why: handing a task to a thread and back costs two thread wake-ups
        and two hand-overs of the GIL, a large part of a tiny task's round
        trip on a busy machine; only the caller knows whether its functions
        are tiny enough to skip that, so the caller says so.

        Answers a future of the replies (already resolved when every task
        ran on the loop: the node replies at once).

        With ``session``, the tasks belong to that client session: their
        results (and inputs copied here for them) are deleted when it
        closes; its tasks not started by then fail with
        :class:`SessionClosedError`, and a batch of a session already
        closed is refused with it.

        With ``output=True``, what the tasks print (stdout, stderr) and log
        is captured per task rather than written to the worker's streams,
        and comes back as one more entry at the end of the answer, only if
        some task printed something: ``[None, 'output', {'worker': name,
        'output': {key: [[stream, text], ...]}}]`` (see :mod:`zdist.output`).
        """
        return self._start_batch(tasks, return_values, inline, who_has, report_now=False, session=session, output=output)

    def _start_batch(self, tasks: list, return_values: int, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None, output: bool = False) -> asyncio.Future:
        """The future of a batch's replies."""
        if not isinstance(tasks, list):
            raise TypeError("compute_batch needs a list of [key, function, args, kwargs, deps] tasks")
        self.sessions.check(session)
        if self.retiring or (self.memory is not None and self.memory.paused):  # no new task until memory is back under the limit
            waiting = asyncio.ensure_future(self._when_running(tasks, return_values, inline, who_has, report_now, session, output))
            self._tasks.add(waiting)
            waiting.add_done_callback(self._tasks.discard)
            return waiting
        data = self.data
        needed = []
        for task in tasks:
            if not (isinstance(task, (list, tuple)) and len(task) == 5 and callable(task[1])):
                raise TypeError(f"each task is [key, function, args, kwargs, deps] with a callable function; got {task!r:.200}")
            for dep in task[4]:
                if dep not in data:
                    needed.append(dep)
        if needed:
            fetching = asyncio.ensure_future(self._fetch_then_run(tasks, return_values, needed, inline, who_has, report_now, session, output))
            self._tasks.add(fetching)  # cancelled if the worker stops
            fetching.add_done_callback(self._tasks.discard)
            return fetching
        return self._run_batch(tasks, return_values, {}, inline, report_now, session, output)

    async def _when_running(self, tasks: list, return_values: int, inline: bool, who_has: dict | None, report_now: bool, session: str | None, output: bool = False) -> list:
        while self.retiring or self.memory.paused:
            if self.retiring:
                await asyncio.Future()  # never: the worker is leaving, and stop() cancels this
            await self.memory.wait_running()
        return await self._start_batch(tasks, return_values, inline, who_has, report_now, session, output)

    async def _fetch_then_run(self, tasks: list, return_values: int, needed: list, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None, output: bool = False) -> list:
        failed: dict[int, BaseException] = {}
        try:
            await self.fetcher.gather_deps(needed, who_has, session)
        except MissingDataError:
            # Run what we can; tasks whose inputs are gone report which.
            for index, task in enumerate(tasks):
                absent = [dep for dep in task[4] if dep not in self.data]
                if absent:
                    failed[index] = MissingDataError(absent, f"needed on worker {self.address}")
        if session is not None and session in self.sessions.released:
            closed = SessionClosedError(session, "while the inputs of its tasks were being fetched")
            failed = dict.fromkeys(range(len(tasks)), closed)
        return await self._run_batch(tasks, return_values, failed, inline, report_now, session, output)

    def _run_batch(self, tasks: list, return_values: int, failed: dict, inline: bool, report_now: bool, session: str | None = None, output: bool = False) -> asyncio.Future:
        """Start the tasks not in ``failed`` where the rule of :meth:`compute_batch` says; the future of the replies."""
        loop = asyncio.get_running_loop()
        outputs: dict | None = None
        if output:  # one dict for the batch: each task writes its own key (atomic), from whichever thread
            _output.install()
            outputs = {}
        _output.install_warning_capture()
        warned: dict = {}  # the same for warnings, always: they are raised again on the client
        result = loop.create_future()
        outcomes: list = [None] * len(tasks)
        awaited: list = []
        plain: list = []
        last_function, last_is_async = None, False
        for index, task in enumerate(tasks):
            if index in failed:
                continue
            function = task[1]
            if function is not last_function:  # a batch mostly runs one function
                last_function, last_is_async = function, inspect.iscoroutinefunction(function)
            (awaited if last_is_async else plain).append(index)
        groups: list = []  # (indices, how to start them)
        if awaited:
            groups.append((awaited, self._await_group))
        if plain and inline:
            groups.append((plain, self._run_on_loop))
        elif plain:
            groups.extend((chunk, self._run_in_pool) for chunk in _split(plain, self.ncores))
        left = [len(groups) or 1]  # no group (every task failed already): reply at once
        if failed:
            self.progress.failed([tasks[index][0] for index in failed])

        def group_done(indices: list, results: list) -> None:
            for index, outcome in zip(indices, results):
                outcomes[index] = outcome
            left[0] -= 1
            if left[0] == 0 and not result.done():
                try:
                    result.set_result(self._batch_replies(tasks, outcomes, failed, return_values, report_now, session, outputs, warned))
                except Exception as exc:  # noqa: BLE001 - reply with the error rather than hang
                    result.set_exception(exc)

        if not groups:
            group_done([], [])
        for indices, start in groups:
            start(loop, [tasks[index] for index in indices], indices, group_done, session, outputs, warned)
        return result

    def _run_on_loop(
        self, loop: asyncio.AbstractEventLoop, tasks: list, indices: list, done: Callable, session: str | None,
        outputs: dict | None = None, warned: dict | None = None, results: JobResults | None = None, token: int | None = None,
    ) -> None:
        """Run tasks here and now, a slice at a time; at the next turn of the loop go on with the rest."""
        if token is None:
            results = JobResults()
            token = self.progress.started([task[0] for task in tasks], results)
        before = len(results)
        _run_tasks(tasks, self.data, time.time() + INLINE_SLICE_SECONDS, session, self.sessions.released, outputs, warned, results)
        ran = len(results) - before
        if ran < len(tasks):
            loop.call_soon(self._run_on_loop, loop, tasks[ran:], indices, done, session, outputs, warned, results, token)
        else:
            self.progress.finished(token, results)
            done(indices, results)

    def _run_in_pool(
        self, loop: asyncio.AbstractEventLoop, tasks: list, indices: list, done: Callable, session: str | None, outputs: dict | None = None, warned: dict | None = None
    ) -> None:
        """One thread-pool job; its results come back with one ``call_soon_threadsafe``."""
        self.executing += len(tasks)
        results = JobResults()  # the job appends each task's outcome as it ends: TaskProgress counts them meanwhile
        token = self.progress.started([task[0] for task in tasks], results)

        def finished(result: Any, error: BaseException | None) -> None:  # in the pool's thread, or the one shutting it down
            try:
                loop.call_soon_threadsafe(self._job_done, result, error, indices, done, token)
            except RuntimeError:  # the loop closed: the worker has stopped
                pass

        # Each client session's jobs queue apart and take turns (zdist.fairpool).
        self.executor.submit(session, _run_tasks, (tasks, self.data, None, session, self.sessions.released, outputs, warned, results), finished)

    def _job_done(self, result: Any, error: BaseException | None, indices: list, done: Callable, token: int | None = None) -> None:
        self.executing -= len(indices)
        if error is not None:  # not the function's error (that is an outcome): the pool shut down, or a BaseException
            result = [(False, error, "", 0.0, 0.0)] * len(indices)
        if token is not None:
            self.progress.finished(token, result)
        done(indices, result)

    def _await_group(
        self, loop: asyncio.AbstractEventLoop, tasks: list, indices: list, done: Callable, session: str | None, outputs: dict | None = None, warned: dict | None = None
    ) -> None:
        """Await coroutine functions' tasks on the loop, concurrently."""
        self.executing += len(tasks)
        data, released = self.data, self.sessions.released
        gathered = asyncio.gather(*(_await_task(task, data, session, released, outputs, warned) for task in tasks))
        token = self.progress.started([task[0] for task in tasks], awaited=True)

        def finished(future: asyncio.Future) -> None:
            self.executing -= len(tasks)
            if future.cancelled():
                results = [(False, ConnectionAbortedError("worker shutting down"), "", 0.0, 0.0)] * len(tasks)
            elif future.exception() is not None:
                results = [(False, future.exception(), "", 0.0, 0.0)] * len(tasks)
            else:
                results = future.result()
            self.progress.finished(token, results)
            done(indices, results)

        gathered.add_done_callback(finished)
        self._tasks.add(gathered)  # cancelled if the worker stops
        gathered.add_done_callback(self._tasks.discard)

    def _batch_replies(
        self, tasks: list, outcomes: list, failed: dict, return_values: int, report_now: bool, session: str | None = None,
        outputs: dict | None = None, warned: dict | None = None,
    ) -> list:
        replies = []
        closed = session is not None and session in self.sessions.released
        for index, task in enumerate(tasks):
            key = task[0]
            if index in failed:
                replies.append([key, "error", error_fields(failed[index], "")])
                self.tasks_failed += 1
                continue
            ok, value, extra, start, stop = outcomes[index]
            self.task_log.append((key, start, stop, ok))
            if ok and closed:  # finished after its session closed: not kept
                ok, value, extra = False, SessionClosedError(session, "the task finished after that; its result was not kept"), ""
            if not ok:
                if type(value) is not SessionClosedError:
                    logger.warning("task %r failed on %s:\n%s", key, self.address, extra)
                replies.append([key, "error", error_fields(value, extra)])
                self.tasks_failed += 1
                continue
            self.tasks_done += 1
            self.keep(key, value, extra, session)
            entry = [key, "ok", extra]
            if return_values and extra <= return_values:
                if type(value) in _MSGPACK_NATIVE:
                    entry.append(value)  # msgpack carries it as it is: no pickle either way
                else:
                    try:
                        entry.append(serialize(value))
                    except Exception:
                        pass
            replies.append(entry)
        if outputs:  # only when some task printed: forwarding costs nothing otherwise
            replies.append([None, "output", {"worker": self.name or self.address, "output": outputs}])
        if warned:  # likewise: raised again on the client when it takes the results
            replies.append([None, "warnings", {"worker": self.name or self.address, "warnings": warned}])
        if report_now:
            self.center_link.flush_reports()  # tell the Center before the caller hears back
        return replies


#: A batch sent with ``inline=True`` runs on the worker's event loop this
#: long at most before the loop serves other requests; then it goes on.
INLINE_SLICE_SECONDS = 0.005

_MSGPACK_NATIVE = frozenset({int, float, str, bytes, bool, type(None)})


def _split(tasks: list, n: int) -> list[list]:
    """Split a batch into at most ``n`` contiguous chunks of near-equal size."""
    if n <= 1 or len(tasks) <= 1:
        return [tasks] if tasks else []
    n = min(n, len(tasks))
    size, extra = divmod(len(tasks), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(tasks[start:end])
        start = end
    return chunks
