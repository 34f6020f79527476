"""The handles of values a Pool or an Executor made: ``concurrent.futures`` futures whose values stay on the cluster.

A :class:`RemoteData` is the handle of one task's value; a chunked
``map`` gives a :class:`ChunkedResults`, a sequence with a handle per item
(made when asked for) over the handles of its chunks. They read their
task's state (written only by the client loop, through the scheduling
core) and ask their pool for values; the pool marks them done.

>>> from zdist import Pool
>>> with Pool(processes=1) as pool:
...     handle = pool.apply_async(divmod, (7, 2))
...     results = pool.map(abs, range(-3, 0), chunksize=2)
...     handle.result(), handle.done(), len(results), pool.gather(results), results[2].get()
((3, 1), True, 3, [3, 2, 1], 1)
"""
from __future__ import annotations

import asyncio
import bisect
import collections.abc
import copy
import itertools
import logging
import operator
import weakref
from concurrent.futures import CancelledError, Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import TYPE_CHECKING, Any

from .protocol import Ref
from .scheduling import NO_VALUE, TaskState, events
from .scheduling.state import ERRED, NEW, PROCESSING, READY, WAITING

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["ChunkedResults", "RemoteData"]

logger = logging.getLogger(__name__)


#: Tasks in these states have not been sent to a worker: they can be cancelled.
CANCELLABLE = frozenset({NEW, WAITING, READY})


class _PoolTask(TaskState):
    """A task of a Pool: also knows its handle (weakly: a dropped handle releases the value).

    Every one is wrapped in a :class:`RemoteData` as soon as it is made,
    which sets ``handle``: no ``__init__`` of its own, one call less per task.
    """

    __slots__ = ("handle",)


class RemoteData(Future):
    """The handle of one value on the cluster: a ``concurrent.futures.Future`` and multiprocessing's ``AsyncResult``.

    The value stays on the worker that made it until ``result()`` (or
    ``get()``) fetches it; a remote exception is raised with its remote
    traceback. ``done()``, ``exception()``, ``add_done_callback()`` and the
    standard library's ``concurrent.futures.wait`` and ``as_completed`` work
    as for any future; ``ready()``, ``wait()`` and ``successful()`` as in
    multiprocessing; ``await handle`` in async code. Done-callbacks run
    once, on a thread of the pool's own (never the one that talks to the
    cluster), or at once when added after completion.
    """

    def __init__(self, pool: "Pool", task: _PoolTask):
        # Not Future.__init__: it makes a Condition per future. A pool's
        # handles share the pool's one (an RLock: concurrent.futures.wait
        # takes every future's condition at once, so the same lock nests).
        self._condition = pool._results.changed
        self._state = FINISHED if task.done else PENDING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self.key = task.key
        self._pool = pool
        self._task = task
        self._early: tuple | None = None  # (ok, value or error) when this thread sent the task itself
        self._warnings: tuple | None = None  # (worker, what the task warned), set by the loop, raised again by result()
        task.handle = weakref.ref(self)

    @property
    def center(self) -> str:
        return self._pool.center_address

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the value, fetch it and return it; raise the remote exception if the task failed."""
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise CancelledError(f"{self.key} was cancelled")
        return self._pool._results.values([self], timeout)[0]

    def get(self, timeout: float | None = None) -> Any:
        """multiprocessing's name for :meth:`result`."""
        return self.result(timeout)

    def ready(self) -> bool:
        return self._early is not None or self._task.done or self._state != PENDING

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the task is done, or ``timeout`` seconds have passed (no error either way, as in multiprocessing)."""
        try:
            self._pool._results.wait([self], timeout, raise_errors=False)
        except TimeoutError:
            pass

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} is not ready")
        return self._error() is None

    def running(self) -> bool:
        return self._state == PENDING and self._task.state == PROCESSING

    def cancel(self) -> bool:
        """Cancel the task if it has not been sent to a worker (nor have the tasks that wait for it)."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state != PENDING or self._task.state not in CANCELLABLE or self._pool._state != "running":
                return False
        return self._pool._cancel([self])

    def _error(self) -> BaseException | None:
        if self._early is not None and not self._early[0]:
            return self._early[1]
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return CancelledError(f"{self.key} was cancelled")
        return self._task.error if self._task.state == ERRED else self._exception

    def _mark_done(self, error: BaseException | None, cancelled: bool = False) -> None:
        """The task finished (or failed, or was cancelled): wake waiters, run callbacks. Once only."""
        with self._condition:
            if self._state != PENDING:
                return
            self._exception = error
            self._state = CANCELLED_AND_NOTIFIED if cancelled else FINISHED
            for waiter in self._waiters:
                if cancelled:
                    waiter.add_cancelled(self)
                elif error is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            # No notify here: the shell wakes waiting threads once per step
            # (after_feed), not once per task.
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        if callbacks:
            self._pool._results.run_callbacks(self, callbacks)

    def __await__(self) -> Any:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.result).__await__()

    def __repr__(self) -> str:
        return f"RemoteData<center={self.center}, key={self.key}, {self._task.state_name}>"

    def __reduce__(self):
        raise TypeError("a RemoteData handle belongs to its Pool and cannot be pickled; pass it to the Pool's map/apply instead")

    def __del__(self) -> None:
        try:
            self._pool._shell.post(events.Released([self._task]))
        except Exception:  # interpreter shutdown, or the pool is gone
            pass


class _ChunkData(RemoteData):
    """The handle of one task of a chunked map: its value is the list of a chunk's results; it tells its items when done."""

    def __init__(self, pool: "Pool", task: _PoolTask):
        super().__init__(pool, task)
        self._items: list = []  # weak references to the _ItemData of this chunk

    def _mark_done(self, error: BaseException | None, cancelled: bool = False) -> None:
        super()._mark_done(error, cancelled)
        with self._condition:  # an item made from now on copies the final state instead
            items = list(self._items)
        for ref in items:
            item = ref()
            if item is not None:
                item._mark_done(error, cancelled)


class _ItemData(RemoteData):
    """One result of a chunked map: item ``index`` of its chunk's value.

    It reads its chunk's task (done, failed, value) and keeps the chunk's
    handle, hence its value, alive. Passed to another task it becomes a
    small ``getitem`` task on the worker that holds the chunk (made once,
    on first use).
    """

    def __init__(self, pool: "Pool", chunk: _ChunkData, index: int):
        self._condition = pool._results.changed
        self._result = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self.key = f"{chunk.key}[{index}]"
        self._pool = pool
        self._task = chunk._task
        self._early = None
        self._warnings = None
        self._chunk = chunk
        self._index = index
        self._derived: RemoteData | None = None
        with self._condition:
            self._state, self._exception = chunk._state, chunk._exception
            chunk._items.append(weakref.ref(self))

    def _as_input(self) -> RemoteData:
        if self._derived is None:
            self._derived = self._pool._submit(operator.getitem, [(self._chunk, self._index)])[0]
        return self._derived

    def __del__(self) -> None:
        pass  # the chunk's handle releases the value


class ChunkedResults(collections.abc.Sequence):
    """The results of a chunked ``map``: a sequence with a :class:`RemoteData` per item, made when first asked for.

    ``pool.gather(results)`` fetches whole chunks; passed to a task
    (``pool.apply(sum, [results])``) it arrives as the list of values,
    joined on a worker.
    """

    def __init__(self, pool: "Pool", chunks: list, sizes: list[int]):
        self._pool = pool
        self.chunks: list = chunks
        self._starts = list(itertools.accumulate(sizes, initial=0))
        self._items: dict[int, _ItemData] = {}
        self._joined: RemoteData | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("map result index out of range")
        item = self._items.get(index)
        if item is None:
            chunk = bisect.bisect_right(self._starts, index) - 1
            item = self._items[index] = _ItemData(self._pool, self.chunks[chunk], index - self._starts[chunk])
        return item

    def _as_input(self) -> RemoteData:
        if self._joined is None:
            self._joined = self._pool._submit(_join_chunks, [tuple(self.chunks)])[0]
        return self._joined

    def __repr__(self) -> str:
        return f"<{len(self)} results of a map, in {len(self.chunks)} chunks>"

    def __reduce__(self):
        raise TypeError("map results belong to their Pool and cannot be pickled; pass them to the Pool's map/apply instead")


def _join_chunks(*chunks: list) -> list:
    return [value for chunk in chunks for value in chunk]


def _watched(handles: Any) -> list:
    """What to wait on for ``handles``: a chunked map's chunks, not its items."""
    return handles.chunks if isinstance(handles, ChunkedResults) else handles


def _fresh(error: BaseException) -> BaseException:
    """A copy of a task's stored error, to raise: raising the stored one would hang the caller's frames on it.

    Those frames hold the caller's handles; the core holds the error as long
    as the task: the handles, hence the task and its value, would never be
    released. The copy keeps the remote traceback, cause and notes.
    """
    try:
        new = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its args
        return error
    if type(new) is not type(error):
        return error
    new.__cause__, new.__context__, new.__suppress_context__ = error.__cause__, error.__context__, error.__suppress_context__
    return new.with_traceback(error.__traceback__)


def _call_each(handle: RemoteData, callbacks: list) -> None:
    for callback in callbacks:
        try:
            callback(handle)
        except Exception:  # as concurrent.futures does: log, go on with the next
            logger.exception("exception calling callback for %r", handle)


def _local_value(handle: RemoteData) -> Any:
    early = handle._early
    if early is not None and early[0] and early[1] is not NO_VALUE:
        return early[1]
    return handle._task.value


_PLAIN_ITEMS = frozenset({int, float, str, bytes, bool, type(None), complex})


def _to_refs(obj: Any, deps: list) -> Any:
    """Replace every RemoteData (any depth of lists, tuples, dicts) with a Ref; collect their tasks."""
    cls = type(obj)
    if cls is RemoteData or cls is _ChunkData:
        deps.append(obj._task)
        return Ref(obj.key)
    if cls is _ItemData or cls is ChunkedResults:
        return _to_refs(obj._as_input(), deps)
    if cls is tuple or cls is list:
        if _PLAIN_ITEMS.issuperset(map(type, obj)):
            return obj  # the common case, plain values: nothing to replace
        return cls([_to_refs(item, deps) for item in obj])
    if cls is dict:
        return {key: _to_refs(value, deps) for key, value in obj.items()}
    return obj


