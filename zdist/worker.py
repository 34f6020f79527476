"""The Worker: serves its local ``data`` dict and runs functions on it.

The data model: ``data`` maps each key held here to its value (a plain dict,
or with a memory limit the spilling store of ``memory``), ``nbytes`` each key
to its size, and a key stored for a client session is tagged with that
session. Inputs it lacks it fetches peer to peer, after asking the Center
who has them; every key it gains or drops it reports to the Center
(batched: one message per :data:`~zdist.worker_center.REPORT_DELAY`,
however many keys changed).

The :class:`Worker` is the node (its ``handlers``) and holds ``data`` and
``nbytes``; the rest is in parts beside it, each owning its own state:

* ``center_link``, a :class:`~zdist.worker_center.CenterLink`: registration,
  heartbeats, and the key reports;
* ``batches``, a :class:`~zdist.worker_batches.BatchRunner`: where and how
  the tasks of ``compute`` and ``compute_batch`` run, the thread pool, and
  the counts of tasks;
* ``fetcher``, a :class:`~zdist.worker_fetch.PeerFetcher`: copies of keys
  from other workers (``fetch_keys``), and the bytes fetched;
* ``sessions``, a :class:`~zdist.worker_sessions.ClientSessions`: which key
  belongs to which client session, and the sessions closed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Callable, Iterable

from .errors import MissingDataError
from .fairpool import FairThreadPool
from .memory import MemoryThresholds, parse_memory_limit
from .node import Node
from .protocol import serialize
from .rpc import ConnectionPool
from .comm import normalize_address
from .datastore import WorkerMemory, work_directory
from . import worker_setup
from .worker_batches import BatchRunner, sizeof
from .worker_center import CenterLink, rss
from .worker_fetch import PeerFetcher
from .worker_sessions import ClientSessions

logger = logging.getLogger(__name__)


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

    # A task's function or arguments, or a value sent to be kept, may import a package as they
    # unpickle (seconds): done on the loop, that would stall heartbeats and the Center would
    # drop a busy worker.
    deferred_ops = frozenset({"compute", "compute_batch", "update_data"})

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
        self.peers: ConnectionPool | None = None
        self.bytes_served = 0
        # The collaborators, each owning its part of the state: registration,
        # heartbeats and key reports; running batches; fetching from peers;
        # the keys of client sessions and the sessions closed.
        self.center_link = CenterLink(self)
        self.batches = BatchRunner(self)
        self.fetcher = PeerFetcher(self)
        self.sessions = ClientSessions(self)
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
        self.batches.start_pool(f"zdist-worker-{self.port}")
        # A value fetched from a peer can import a package as it unpickles: not on the loop.
        self.peers = ConnectionPool(timeout=self.peer_timeout, security=self.security, loader=self.loader)
        if self.preload:  # before registering: no task arrives before the set-up is done
            self._preloaded = await worker_setup.preload(self, self.preload)
        self._background.append(asyncio.ensure_future(self.center_link.stay_registered()))

    async def on_stop(self) -> None:
        for task in self._background:
            task.cancel()
        try:
            if self._preloaded:
                await worker_setup.teardown(self, self._preloaded)
            await self.center_link.unregister()
        finally:  # the threads, sockets and files go even when a teardown or the goodbye fails
            self.batches.close()
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

    def cancel_on_stop(self, future: asyncio.Future) -> asyncio.Future:
        """``future`` (a task of this worker's, a gather), to be cancelled when the worker stops."""
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        return future

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

    @property
    def executor(self) -> FairThreadPool | None:
        """The thread pool tasks run in (None until the worker starts)."""
        return self.batches.executor

    @property
    def executing(self) -> int:
        """Tasks running now, in the thread pool or awaited on the loop."""
        return self.batches.executing

    @property
    def tasks_failed(self) -> int:
        return self.batches.tasks_failed

    # -------------------------------------------------------------- data and client sessions

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
            "tasks_done": self.batches.tasks_done,
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
        return [entry for entry in self.batches.task_log if entry[2] >= since]

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
        return await self.batches.compute(function, keys, key, args, kwargs, return_value, session)

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
          :data:`~zdist.worker_batches.INLINE_SLICE_SECONDS` (other requests
          are served between slices). The caller vouches that its functions
          are tiny: one that takes long holds up every request to this worker
          (``get_data``, heartbeats) while it runs, and one that runs or waits
          for an event loop of its own (``asyncio.run``) fails with an error
          that says so (it is not run again elsewhere);
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
        return self.batches.start(tasks, return_values, inline, who_has, report_now=False, session=session, output=output)

