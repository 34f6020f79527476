"""How a worker runs the tasks of a batch: on its event loop, or in its thread pool.

:class:`BatchRunner` carries out the rule of
:meth:`Worker.compute_batch <zdist.worker.Worker.compute_batch>`: a
coroutine function is awaited on the loop; with ``inline=True`` the other
functions run on the loop, a slice of :data:`INLINE_SLICE_SECONDS` at a
time; everything else runs in the thread pool, one job per core. Missing
inputs are fetched first (:mod:`zdist.worker_fetch`); results are kept in
the worker's ``data`` and the batch answered with one reply per task.

The functions here run the tasks themselves, in whichever thread:
:func:`_run_tasks` one after the other, :func:`_await_task` one coroutine
function.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import time
import traceback
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import MissingDataError, SessionClosedError
from .fairpool import FairThreadPool
from .protocol import Ref, error_fields, serialize
from .rpc import rebuild_exception, unwrap_value
from . import output as _output
from .taskprogress import JobResults, TaskProgress

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

logger = logging.getLogger("zdist.worker")  # a part of the worker logs as the worker: what `zdist logs` shows and users filter on

#: A batch sent with ``inline=True`` runs on the worker's event loop this
#: long at most before the loop serves other requests; then it goes on.
INLINE_SLICE_SECONDS = 0.005

_MSGPACK_NATIVE = frozenset({int, float, str, bytes, bool, type(None)})

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


class BatchRunner:
    """Runs a :class:`~zdist.worker.Worker`'s batches of tasks and keeps their results.

    Owns the thread pool (``executor``, started and shut down with the
    worker), the per-group progress the heartbeat reports (``progress``),
    the log of tasks run (``task_log``), and the counts of tasks executing,
    done and failed. From the worker it reads ``data``, ``ncores``, the
    sessions released and whether it is paused or retiring; it stores
    results with :meth:`Worker.keep <zdist.worker.Worker.keep>` and fetches
    missing inputs with the worker's :class:`~zdist.worker_fetch.PeerFetcher`.
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        self.executor: FairThreadPool | None = None
        self.executing = 0
        self.tasks_done = 0
        self.tasks_failed = 0
        self.task_log: deque = deque(maxlen=10_000)  # (key, start, stop, ok)
        # Per task group: queued, executing, done, erred, as tasks start and end (for the heartbeat).
        self.progress = TaskProgress()

    def start_pool(self, name: str) -> None:
        """Start the thread pool: one thread per core of the worker, named after ``name``."""
        self.executor = FairThreadPool(self.worker.ncores, name)

    def close(self) -> None:
        """Shut the thread pool down (jobs not started fail; see :meth:`_job_done`)."""
        if self.executor is not None:
            self.executor.shutdown()

    async def compute(self, function: Callable, keys: Iterable, key: Any, args: Iterable, kwargs: dict | None, return_value: int, session: str | None) -> tuple:
        """The ``compute`` op (see :meth:`Worker.compute <zdist.worker.Worker.compute>`): a batch of one task, its error raised."""
        if not callable(function):
            raise TypeError(f"compute needs a callable function, got {type(function).__name__}")
        keys = list(keys)
        if key is None:
            key = f"{getattr(function, '__name__', 'result')}-{uuid.uuid4().hex}"
        task = [key, function, tuple(Ref(k) for k in keys) + tuple(args), kwargs or {}, keys]
        # Reported to the Center before the reply: a caller may ask it right away.
        result = (await self.start([task], return_value, False, None, report_now=True, session=session))[0]
        if result[1] == "error":
            fields = result[2]
            error = rebuild_exception({**fields, "exception": unwrap_value(fields.get("exception"))})
            error.zdist_traceback = fields.get("traceback")  # the node replies with the task's traceback
            raise error
        meta = {"key": key, "nbytes": result[2]}
        if len(result) > 3:
            meta["value"] = result[3]
        return (b"OK", meta)

    def start(self, tasks: list, return_values: int, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None, output: bool = False) -> asyncio.Future:
        """Start a batch (the arguments of :meth:`Worker.compute_batch <zdist.worker.Worker.compute_batch>`); the future of its replies.

        With ``report_now``, the Center hears of the new keys before the future resolves.
        """
        if not isinstance(tasks, list):
            raise TypeError("compute_batch needs a list of [key, function, args, kwargs, deps] tasks")
        worker = self.worker
        worker.sessions.check(session)
        if worker.retiring or (worker.memory is not None and worker.memory.paused):  # no new task until memory is back under the limit
            return worker.cancel_on_stop(asyncio.ensure_future(self._when_running(tasks, return_values, inline, who_has, report_now, session, output)))
        data = worker.data
        needed = []
        for task in tasks:
            if not (isinstance(task, (list, tuple)) and len(task) == 5 and callable(task[1])):
                raise TypeError(f"each task is [key, function, args, kwargs, deps] with a callable function; got {task!r:.200}")
            for dep in task[4]:
                if dep not in data:
                    needed.append(dep)
        if needed:
            fetching = asyncio.ensure_future(self._fetch_then_run(tasks, return_values, needed, inline, who_has, report_now, session, output))
            return worker.cancel_on_stop(fetching)
        return self._run_batch(tasks, return_values, {}, inline, report_now, session, output)

    async def _when_running(self, tasks: list, return_values: int, inline: bool, who_has: dict | None, report_now: bool, session: str | None, output: bool = False) -> list:
        worker = self.worker
        while worker.retiring or worker.memory.paused:
            if worker.retiring:
                await asyncio.Future()  # never: the worker is leaving, and stop() cancels this
            await worker.memory.wait_running()
        return await self.start(tasks, return_values, inline, who_has, report_now, session, output)

    async def _fetch_then_run(self, tasks: list, return_values: int, needed: list, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None, output: bool = False) -> list:
        worker = self.worker
        failed: dict[int, BaseException] = {}
        try:
            await worker.fetcher.gather_deps(needed, who_has, session)
        except MissingDataError:
            # Run what we can; tasks whose inputs are gone report which.
            for index, task in enumerate(tasks):
                absent = [dep for dep in task[4] if dep not in worker.data]
                if absent:
                    failed[index] = MissingDataError(absent, f"needed on worker {worker.address}")
        if session is not None and session in worker.sessions.released:
            closed = SessionClosedError(session, "while the inputs of its tasks were being fetched")
            failed = dict.fromkeys(range(len(tasks)), closed)
        return await self._run_batch(tasks, return_values, failed, inline, report_now, session, output)

    def _run_batch(self, tasks: list, return_values: int, failed: dict, inline: bool, report_now: bool, session: str | None = None, output: bool = False) -> asyncio.Future:
        """Start the tasks not in ``failed`` where the rule of :meth:`Worker.compute_batch <zdist.worker.Worker.compute_batch>` says; the future of the replies."""
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
            groups.extend((chunk, self._run_in_pool) for chunk in _split(plain, self.worker.ncores))
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
        worker = self.worker
        _run_tasks(tasks, worker.data, time.time() + INLINE_SLICE_SECONDS, session, worker.sessions.released, outputs, warned, results)
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
        worker = self.worker
        self.executor.submit(session, _run_tasks, (tasks, worker.data, None, session, worker.sessions.released, outputs, warned, results), finished)

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
        data, released = self.worker.data, self.worker.sessions.released
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
        self.worker.cancel_on_stop(gathered)

    def _batch_replies(
        self, tasks: list, outcomes: list, failed: dict, return_values: int, report_now: bool, session: str | None = None,
        outputs: dict | None = None, warned: dict | None = None,
    ) -> list:
        worker = self.worker
        keep = worker.keep
        replies = []
        closed = session is not None and session in worker.sessions.released
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
                    logger.warning("task %r failed on %s:\n%s", key, worker.address, extra)
                replies.append([key, "error", error_fields(value, extra)])
                self.tasks_failed += 1
                continue
            self.tasks_done += 1
            keep(key, value, extra, session)
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
            replies.append([None, "output", {"worker": worker.name or worker.address, "output": outputs}])
        if warned:  # likewise: raised again on the client when it takes the results
            replies.append([None, "warnings", {"worker": worker.name or worker.address, "warnings": warned}])
        if report_now:
            worker.center_link.flush_reports()  # tell the Center before the caller hears back
        return replies


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
