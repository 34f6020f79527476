"""Executor: a ``concurrent.futures.Executor`` whose futures keep their values on the cluster.

>>> from concurrent.futures import as_completed
>>> from zdist import Executor
>>> with Executor() as ex:                    # starts a local cluster
...     future = ex.submit(pow, 2, 10)
...     squares = list(ex.map(pow, range(5), [2] * 5))
...     done = sorted(f.result() for f in as_completed([ex.submit(abs, -i) for i in range(3)]))
...     future.result(), squares, done
(1024, [0, 1, 4, 9, 16], [0, 1, 2])

``submit`` returns a :class:`~zdist.pool.RemoteData`: a
``concurrent.futures.Future`` whose value stays on the worker that made it
until ``result()`` fetches it, so the standard library's
``concurrent.futures.wait`` and ``as_completed`` work on it unchanged, and
passed to a later ``submit`` it is resolved on the worker, data-locally.

The Executor is a :class:`~zdist.Pool` seen through the standard
interface: the same scheduling core, session and worker rules.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .pool import Pool, RemoteData, _results_in_order, merge_controls
from .pool_tasks import chunks, run_chunk, run_star_chunk
from .scheduling import NO_VALUE

__all__ = ["Executor", "as_completed", "wait"]


class Executor(concurrent.futures.Executor):
    """``concurrent.futures.Executor`` on a zdist cluster.

    ``Executor()`` starts a :class:`~zdist.LocalCluster` and stops it on
    :meth:`shutdown`; ``Executor(address)`` or ``Executor(cluster)`` joins
    one. The other arguments are the :class:`~zdist.Pool`'s: ``timeout``
    (to reach the Center), ``max_worker_deaths`` (a task that was running on
    that many workers that died fails with
    :class:`~zdist.TaskKilledWorkersError`), ``security``, ``processes``,
    ``inline``, ``forward_output``, ``cluster_kwargs`` and ``dashboard``
    (``True``: the local cluster it starts serves its web dashboard, at
    :attr:`dashboard_link`).

    Futures keep their values after :meth:`shutdown`, as the standard
    library's do: ``shutdown(wait=True)`` fetches the values of the futures
    still referenced before it ends the session.

    Task controls (``retries``, ``priority``, ``resources``, ``workers``,
    ``allow_other_workers``, as for the :class:`~zdist.Pool`) are defaults
    given here, or per call through :meth:`options`, since every keyword
    of ``submit`` goes to the function.
    """

    def __init__(self, center: Any = None, **pool_options: Any):
        self._pool = Pool(center, **pool_options)
        self._shutdown_lock = threading.Lock()
        self._closed = [False]  # shared with the views made by options()
        self._controls = self._pool._tasks.controls

    @property
    def _shutdown(self) -> bool:
        return self._closed[0]

    def options(self, **controls: Any) -> "Executor":
        """A view of this executor whose tasks have other controls (as Ray's ``.options()``).

        >>> with Executor(processes=1) as ex:
        ...     ex.options(retries=2, priority=10).submit(abs, -3).result()
        3
        """
        view = object.__new__(Executor)
        view.__dict__.update(self.__dict__)
        view._controls = merge_controls(self._controls, controls)
        return view

    @property
    def center_address(self) -> str:
        return self._pool.center_address

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the cluster's web dashboard (``Executor(dashboard=True)`` starts one), or None."""
        return self._pool.dashboard_link

    @property
    def pool(self) -> Pool:
        """The :class:`~zdist.Pool` underneath (``scatter``, ``gather``, ``available_cores``...)."""
        return self._pool

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> RemoteData:
        """Run ``fn(*args, **kwargs)`` on the cluster; return its future at once."""
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            return self._pool._submit(fn, [args], kwargs or None, self._controls)[0]

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None, chunksize: int = 1) -> Iterator:
        """``map(fn, *iterables)`` on the cluster; results in order, as the standard library's.

        The calls are submitted at once (``chunksize`` items per task);
        iterating waits for each result at most until ``timeout`` seconds
        after this call, then raises ``TimeoutError``.
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            controls = self._controls
            if chunksize == 1:
                handles = self._pool._submit(fn, zip(*iterables), None, controls)
            else:
                fn = self._pool._tasks.wrap(fn)
                if len(iterables) == 1:
                    handles = self._pool._submit(run_chunk, ((fn, chunk) for chunk in chunks(iterables[0], chunksize)), None, controls)
                else:
                    handles = self._pool._submit(run_star_chunk, ((fn, chunk) for chunk in chunks(zip(*iterables), chunksize)), None, controls)
        return _results_in_order(self._pool, handles, end, flatten=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``cancel_futures`` cancel what has not started; with ``wait`` finish the rest first."""
        with self._shutdown_lock:
            if self._shutdown:
                return
            self._closed[0] = True
        pool = self._pool
        if pool._state != "running":
            return
        if cancel_futures:
            pending = [h for h in _live_handles(pool) if not h.done()]
            if pending:
                pool._cancel(pending)
        if wait:
            live = _live_handles(pool)
            pool._results.wait(live, None, raise_errors=False)
            _keep_values(pool, live)
            pool.close()
        else:
            pool.terminate()

    def run(self, function: Callable, *args: Any, **kwargs: Any) -> dict:
        """:meth:`zdist.Pool.run`: ``function(*args, **kwargs)`` once on every worker, ``{worker: result}``."""
        return self._pool.run(function, *args, **kwargs)

    def upload_file(self, path: str) -> dict:
        """:meth:`zdist.Pool.upload_file`: a ``.py``, ``.zip`` or wheel importable on every worker, joiners included."""
        return self._pool.upload_file(path)

    def get_worker_logs(self, since: int = 0, limit: int = 1000) -> dict:
        """:meth:`zdist.Pool.get_worker_logs`: each worker's recent log records."""
        return self._pool.get_worker_logs(since, limit)

    def __repr__(self) -> str:
        return f"<Executor center={self.center_address} workers={len(self._pool.available_cores)}>"


def as_completed(handles: Iterable[RemoteData], timeout: float | None = None, with_results: bool = False) -> Iterator:
    """Yield handles as they finish (``(handle, value)`` pairs with ``with_results``): ``concurrent.futures.as_completed`` plus values."""
    for handle in concurrent.futures.as_completed(handles, timeout=timeout):
        if with_results:
            yield handle, handle.result()
        else:
            yield handle


def wait(handles: Iterable[RemoteData], timeout: float | None = None, return_when: str = concurrent.futures.ALL_COMPLETED) -> Any:
    """``concurrent.futures.wait`` on zdist handles: ``(done, not_done)``."""
    return concurrent.futures.wait(handles, timeout=timeout, return_when=return_when)


def _live_handles(pool: Pool) -> list[RemoteData]:
    return pool._loop.run(pool._shell.live_handles(), pool.timeout)


def _keep_values(pool: Pool, handles: list[RemoteData]) -> None:
    """Fetch the values of finished futures still referenced, so that they outlive the session."""
    good = [h for h in handles if h.done() and not h.cancelled() and h._error() is None]
    try:
        values = pool._results.values(good, pool.timeout)
    except Exception:  # noqa: BLE001 - one lost value: keep the others one by one
        values = []
        for handle in good:
            try:
                values.append(handle.result(pool.timeout))
            except Exception as exc:  # noqa: BLE001
                handle._early = (False, exc)
                values.append(NO_VALUE)
    for handle, value in zip(good, values):
        if value is not NO_VALUE:
            handle._early = (True, value)
