"""A joblib backend: ``Parallel`` (and scikit-learn's ``n_jobs``) on a zdist cluster.

Importing this module registers the backend ``"zdist"`` with joblib:

>>> import joblib
>>> import zdist.joblib
>>> from zdist import Executor
>>> with Executor() as ex, joblib.parallel_config(backend="zdist", center=ex):
...     joblib.Parallel(n_jobs=-1)(joblib.delayed(pow)(i, 2) for i in range(6))
[0, 1, 4, 9, 16, 25]

Which cluster (``center=``, given to ``parallel_config`` as a backend keyword):

* ``None`` (the default): one local cluster for this process
  (:class:`~zdist.LocalCluster`, a worker per core), started the first time a
  ``"zdist"`` backend needs it and reused by every later one, as joblib's
  ``loky`` reuses its process pool. It stops at interpreter exit, or at
  :func:`shutdown`.
* ``"HOST:PORT"`` or a :class:`~zdist.LocalCluster`: a running cluster. The
  client session to it is opened once per process and reused, closed by
  :func:`shutdown` or at interpreter exit.
* a :class:`~zdist.Executor` or :class:`~zdist.Pool`: that client, as it is.
  It is never closed here: it is the caller's.

Other backend keywords: ``scatter_threshold`` (bytes, default 1 MB: an
argument at least this big is scattered, see below), ``scatter`` (a list of
objects to scatter at once, kept for the backend's life),
``wait_for_workers_timeout`` (seconds to wait for a first worker, default 10)
and, when a client is made here, the :class:`~zdist.Pool`'s own options
(``timeout``, ``security``, ``processes``...).

**Large arguments are sent once.** joblib hands the backend batches of calls;
a top-level positional or keyword argument at least ``scatter_threshold``
bytes big (as :func:`dask.sizeof.sizeof` measures it: NumPy arrays, pandas
DataFrames, SciPy sparse matrices, bytes...) is scattered to the cluster the
first time it is seen and replaced by its :class:`~zdist.RemoteData` handle,
which the worker resolves; the next calls that pass the *same object*
(identity, not equality) reuse the handle, for as long as the backend lives
(one ``with parallel_config(...)`` block). The handle is dropped, and the
value deleted from the cluster, when the object is garbage collected or the
backend goes. An object changed in place after it was scattered is not sent
again within the same backend: change a copy, or open a new
``parallel_config`` block.

``n_jobs=-1`` (or ``None``) means every core of the cluster, as the Center
counts them now; ``-2`` all but one, and so on; a positive ``n_jobs`` is
taken as given (it sizes joblib's batches and how far it dispatches ahead).
A ``Parallel`` nested inside a task runs on its worker with joblib's usual
nested backend (threads, then sequential).
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any, Callable

try:
    import joblib as _joblib
    from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, parallel_config, register_parallel_backend
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("zdist.joblib needs joblib: pip install 'zdist[joblib]' (or pip install joblib)") from exc

from .pool import Pool, RemoteData

__all__ = ["ZdistBackend", "register", "shutdown"]

#: Arguments at least this many bytes big are scattered once instead of sent with each batch.
SCATTER_THRESHOLD = 1_000_000

_clients: dict[Any, Pool] = {}  # the clients this module made: one per cluster per process
_clients_lock = threading.Lock()


class ZdistBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` on a zdist cluster; selected by ``parallel_config(backend="zdist", ...)``.

    Each batch of calls joblib hands over is one zdist task; its result is
    fetched on the client's callback thread, which then dispatches the next
    batch (joblib's ``retrieve_result_callback`` protocol), and batches grow
    until one takes about a fifth of a second, as with joblib's own
    process backends. See the module's documentation for ``center`` and the
    other keywords.

    >>> import joblib
    >>> from zdist import Executor
    >>> from zdist.joblib import ZdistBackend
    >>> with Executor() as ex:
    ...     backend = ZdistBackend(center=ex)
    ...     backend.effective_n_jobs(-1) == sum(ex.pool.sync_center().values())
    True
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(
        self,
        center: Any = None,
        *,
        scatter: list | tuple | None = None,
        scatter_threshold: int = SCATTER_THRESHOLD,
        wait_for_workers_timeout: float = 10.0,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **pool_options: Any,
    ):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if scatter is not None and not isinstance(scatter, (list, tuple)):
            raise TypeError(f"scatter must be a list or tuple, got {type(scatter).__name__}")
        if isinstance(center, (Pool,)) or _is_executor(center):
            if pool_options:
                raise TypeError(f"Pool options {sorted(pool_options)} cannot be applied to a client that is already open")
            self._client: Pool | None = center.pool if _is_executor(center) else center
        else:
            self._client = None
        self._center = center
        self._pool_options = pool_options
        self.scatter_threshold = scatter_threshold
        self.wait_for_workers_timeout = wait_for_workers_timeout
        self._scattered = _IdentityCache()
        self._lock = threading.RLock()  # scatter once, also when the main and the callback thread dispatch together
        self._in_flight: set[RemoteData] = set()
        if scatter:
            self._keep = list(scatter)  # their ids stay theirs while the backend lives
            for obj, handle in zip(self._keep, self.pool.scatter(self._keep)):
                self._scattered.put(obj, handle)

    # ------------------------------------------------------------------ the cluster

    @property
    def pool(self) -> Pool:
        """The :class:`~zdist.Pool` this backend submits to (made or joined on first use)."""
        if self._client is None or self._client._state != "running":
            self._client = _shared_client(self._center, self._pool_options)
        return self._client

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches can run at once: the cluster's cores for ``-1``/``None`` (waiting for a first worker)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is not None and n_jobs > 0:
            return n_jobs
        cores = self._cores()
        if n_jobs is None or n_jobs == -1:
            return cores
        return max(1, cores + 1 + n_jobs)

    def _cores(self) -> int:
        pool = self.pool
        deadline = time.monotonic() + self.wait_for_workers_timeout
        while True:
            cores = sum(pool.sync_center().values())
            if cores or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not cores:
            raise TimeoutError(
                f"the zdist cluster at {pool.center_address} has no workers after {self.wait_for_workers_timeout} s; "
                "start some, or wait longer: parallel_config(backend='zdist', wait_for_workers_timeout=60)"
            )
        return cores

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    # ------------------------------------------------------------------ tasks

    def submit(self, func: Any, callback: Callable | None = None) -> RemoteData:
        """Send one batch of calls (joblib's ``BatchedCalls``) as one task; ``callback(handle)`` once it is done."""
        items = [(f, self._scatter_args(list(args)), dict(zip(kwargs, self._scatter_args(list(kwargs.values())))))
                 for f, args, kwargs in func.items]
        nested = (getattr(func, "_backend", None), getattr(func, "_n_jobs", None))
        handle = self.pool.apply_async(joblib_batch, (items, nested))
        with self._lock:
            self._in_flight.add(handle)
        handle.add_done_callback(self._forget)
        if callback is not None:
            handle.add_done_callback(callback)
        return handle

    apply_async = submit  # what joblib before 1.5 calls

    def _forget(self, handle: RemoteData) -> None:
        with self._lock:
            self._in_flight.discard(handle)

    def retrieve_result_callback(self, out: RemoteData) -> list:
        """The batch's results, fetched from its worker (raises the task's exception, of its own type)."""
        return out.result()

    def retrieve_result(self, out: RemoteData, timeout: float | None = None) -> list:
        return out.result(timeout)

    def _scatter_args(self, args: list) -> list:
        """``args`` with each big one replaced by its handle on the cluster (scattered the first time it is seen)."""
        from dask.sizeof import sizeof

        out = []
        for arg in args:
            if isinstance(arg, (int, float, str, bool, type(None), RemoteData)):
                out.append(arg)
                continue
            handle = self._scattered.get(arg)
            if handle is None and sizeof(arg) >= self.scatter_threshold:
                with self._lock:
                    handle = self._scattered.get(arg)
                    if handle is None:
                        handle = self.pool.scatter([arg])[0]
                        self._scattered.put(arg, handle)
            out.append(arg if handle is None else handle)
        return out

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started yet (those running finish; their results are dropped)."""
        with self._lock:
            pending = [h for h in self._in_flight if not h.done()]
            self._in_flight.clear()
        for handle in pending:
            try:
                handle.cancel()
            except Exception:  # noqa: BLE001 - the client is closing: nothing to cancel
                pass

    def stop_call(self) -> None:
        with self._lock:
            self._in_flight.clear()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: forget it (the cluster, its client and the scattered data stay for the next)."""
        self.parallel = None

    def __repr__(self) -> str:
        where = self._client.center_address if self._client is not None else (self._center or "a local cluster")
        return f"<ZdistBackend {where} scattered={len(self._scattered)}>"


def joblib_batch(items: list, nested: tuple) -> list:
    """Run one batch of joblib calls on a worker (its big arguments already resolved), as ``BatchedCalls`` does."""
    backend, n_jobs = nested
    if backend is None:
        return [f(*args, **kwargs) for f, args, kwargs in items]
    with parallel_config(backend=backend, n_jobs=n_jobs):
        return [f(*args, **kwargs) for f, args, kwargs in items]


class _IdentityCache:
    """Handles of scattered objects by the objects' identity; an entry goes when its object is garbage collected.

    Objects that take no weak reference (bytes, lists...) are held strongly
    instead, for the cache's life, so that their ``id`` cannot be reused.

    >>> cache, a = _IdentityCache(), bytearray(3)
    >>> cache.put(a, 'handle'); cache.get(a), cache.get(bytearray(3))
    ('handle', None)
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], Any]] = {}

    def get(self, obj: Any) -> Any:
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: Any, value: Any) -> None:
        key, entries = id(obj), self._entries
        try:
            def forget(ref: weakref.ref, key: int = key) -> None:
                if entries.get(key, (None,))[0] is ref:
                    del entries[key]

            ref: Callable[[], Any] = weakref.ref(obj, forget)
        except TypeError:
            ref = _Strong(obj)
        entries[key] = (ref, value)

    def __len__(self) -> int:
        return len(self._entries)


class _Strong:
    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def _is_executor(obj: Any) -> bool:
    from .executor import Executor

    return isinstance(obj, Executor)


def _shared_client(center: Any, options: dict) -> Pool:
    """This process's client of ``center`` (``None``: of its own local cluster), made on first use."""
    address = getattr(center, "center_address", center)
    key = (address, repr(sorted(options.items())))
    with _clients_lock:
        pool = _clients.get(key)
        if pool is None or pool._state != "running":
            pool = Pool(address, **options)
            _clients[key] = pool
        return pool


def shutdown() -> None:
    """Close the clients this module opened, and stop the local cluster it started (if any).

    Runs at interpreter exit by itself; call it to free the cluster sooner.
    Backends used after it open a new client (and start a new local cluster)
    when next needed.

    >>> shutdown()
    """
    with _clients_lock:
        pools = list(_clients.values())
        _clients.clear()
    for pool in pools:
        pool.close()


atexit.register(shutdown)


def register() -> None:
    """Register (again) the ``"zdist"`` joblib backend; importing this module already did.

    >>> register()
    >>> import joblib
    >>> with joblib.parallel_config(backend="zdist") as config:  # connects only when first used
    ...     type(config["backend"]).__name__
    'ZdistBackend'
    """
    register_parallel_backend("zdist", ZdistBackend)


register()
# If the registration is ever dropped (joblib's tests reset BACKENDS), joblib
# registers it again by itself the next time "zdist" is asked for.
_joblib.parallel.EXTERNAL_BACKENDS.setdefault("zdist", register)
