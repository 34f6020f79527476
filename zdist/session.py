"""A client process's link to one Center: its session, the Center watcher, and the outbox to workers.

Every client of one Center in a process (Pools, ``zdist.dask.get`` calls)
shares one :class:`Session`, on one background event loop
(:func:`client_loop`):

* it opens a **session** with the Center, keeps it alive (each look at the
  Center is its heartbeat) and closes it when the last client is done or
  the interpreter exits. When a client process dies without closing it,
  the Center closes it once it falls silent, and the workers drop its
  queued tasks and delete its values: nothing a client made outlives it;
* it **watches** the Center: every :data:`WATCH_INTERVAL` (or at once when
  a client asks) it asks what changed in the list of live workers since
  its last look (joins, leaves, pauses: O(changes), not O(workers)) and
  hands the news to every client's scheduling core;
* its **outbox** batches the deletions clients send each worker: one
  message per worker per :data:`DELETE_DELAY`, not one per released value.

A Center that cannot be reached within the client's timeout gives one
error, :class:`~zdist.errors.CenterUnreachableError`, naming the address
and the likely causes.

>>> from zdist import LocalCluster
>>> with LocalCluster(n_workers=1) as cluster:
...     session = client_loop().run(open_session(cluster.center_address))
...     sorted(session.info['workers']) == cluster.worker_addresses
True
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import sys
import threading
import uuid
from functools import partial
from typing import Any, Protocol

from .comm import normalize_address
from .errors import CenterUnreachableError, SessionClosedError
from .loop import Later, LoopThread
from .rpc import ConnectionPool, RPCTimeoutError

logger = logging.getLogger(__name__)

#: How often the Center is asked which workers live (and the session kept alive).
WATCH_INTERVAL = 0.25
#: The Center closes a session silent for this long. Generous, because a
#: client's heartbeat needs the GIL: a process that holds it for seconds
#: (freeing a graph of 10^7 tasks, a collector's full run over it, a long C
#: call) is busy, not gone, and must not lose its values. A process that
#: died has its values deleted this long after.
SESSION_TIMEOUT = 30.0
#: A session no client uses any more is closed after this long (a next client reuses it).
LINGER = 5.0
#: Deletions wait at most this long, this many keys, or this many bytes before they go out.
DELETE_DELAY = 0.02
DELETE_KEYS = 1000
DELETE_BYTES = 4 * 2**20

_lock = threading.Lock()
_loop: LoopThread | None = None
_sessions: dict[tuple, "Session"] = {}
#: Active performance reports (zdist.report.Recorder): each look at a Center is shown to them.
recorders: set = set()


def client_loop() -> LoopThread:
    """The background event loop every client of this process runs on (started on first use)."""
    global _loop
    with _lock:
        if _loop is None or _loop.loop.is_closed() or not _loop.thread.is_alive():
            _loop = LoopThread("zdist-client")
        return _loop


class Subscriber(Protocol):
    def on_workers(self, info: dict) -> Any: ...
    def on_center_silent(self, seconds: float, error: BaseException) -> None: ...
    def on_fatal(self, error: BaseException) -> None: ...


class Outbox:
    """Deletions for each worker, gathered and sent as one message (see :data:`DELETE_DELAY`)."""

    def __init__(self, connections: ConnectionPool, session_id: str):
        self.connections = connections
        self.session_id = session_id
        self.pending: dict[str, list] = {}  # worker -> [keys, nbytes]
        self._later = Later(DELETE_DELAY, self.flush)

    def delete(self, worker: str, keys: list, nbytes: int = 0) -> None:
        entry = self.pending.get(worker)
        if entry is None:
            entry = self.pending[worker] = [[], 0]
        entry[0].extend(keys)
        entry[1] += nbytes
        if len(entry[0]) >= DELETE_KEYS or entry[1] >= DELETE_BYTES:
            self._send(worker)
        else:
            self._later.schedule()

    def _send(self, worker: str) -> None:
        keys, _ = self.pending.pop(worker)
        try:
            self.connections.get(worker).send("delete_data", keys=keys)
        except Exception as exc:  # noqa: BLE001 - a worker gone: its keys went with it
            logger.info("could not delete %d keys on %s: %s", len(keys), worker, exc)

    def flush(self) -> None:
        self._later.cancel()
        for worker in list(self.pending):
            self._send(worker)

    async def flush_and_wait(self, timeout: float = 5.0) -> None:
        """Send every pending deletion and wait for the workers to confirm (for ``close``)."""
        self._later.cancel()
        pending, self.pending = self.pending, {}
        requests = [self.connections.get(w).request("delete_data", {"keys": keys}, timeout=timeout) for w, (keys, _) in pending.items()]
        if requests:
            await asyncio.gather(*requests, return_exceptions=True)


class Session:
    """This process's session with the Center at ``address``; lives on :func:`client_loop`."""

    def __init__(self, address: str, security: Any = None):
        self.address = address
        self.security = security
        self.id = uuid.uuid4().hex
        self.connections = ConnectionPool(timeout=None, security=security)
        self.outbox = Outbox(self.connections, self.id)
        self.subscribers: set = set()
        self.info: dict = {}
        self.workers: dict = {}  # the Center's table as of membership version self.version
        self.version: int | None = None
        # Tasks submitted per task group (zdist.taskprogress.group_of of their keys), told
        # to the Center with the next look: the dashboard's progress bars need the whole.
        self.submitted: dict[str, int] = {}
        self._submitted_told: dict[str, int] = {}
        self.users = 0
        self.closed = False
        self.silent_since: float | None = None
        self._poll_now = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self._linger: asyncio.TimerHandle | None = None
        # Files uploaded by this process's clients (Pool.upload_file): name -> (number, bytes),
        # and the highest number each worker has. Kept here, never on the Center
        # (it holds no user data): each worker that joins later gets them from us.
        self.uploads: dict[str, tuple[int, bytes]] = {}
        self._uploaded: dict[str, int] = {}

    @property
    def center(self):
        return self.connections.get(self.address)

    async def open(self, timeout: float) -> None:
        """Open the session with the Center; raise :class:`CenterUnreachableError` if it does not answer in time."""
        args = {"session": self.id, "timeout": SESSION_TIMEOUT, "name": " ".join(sys.argv[:1]) or "python", "pid": os.getpid(), "host": socket.gethostname()}
        try:
            await self.center.request("open_session", args, timeout=timeout)
            await self.look(timeout)
        except (RPCTimeoutError, ConnectionError) as exc:
            self.connections.close()
            raise CenterUnreachableError(self.address, timeout, exc) from None
        self._watcher = asyncio.ensure_future(self._watch())

    def note_submitted(self, group: str, n: int) -> None:
        """``n`` more tasks of ``group`` were submitted (the Center hears of it with the next look)."""
        self.submitted[group] = self.submitted.get(group, 0) + n

    async def look(self, timeout: float | None = None, force: bool = True) -> dict:
        """Ask the Center which workers live (this is also the session's heartbeat); tell every subscriber.

        After the first look the Center is asked only what changed since the
        last (``info(since=version)``): the answer costs O(changes), and the
        table here (``self.info['workers']``) is patched in place.
        ``self.info['changed']`` says whether anything did, or, with
        ``force``, that the caller asked to look (subscribers then act even
        if nothing changed); a subscriber may skip its work otherwise.
        """
        args: dict = {"session": self.id}
        if self.version is not None and not recorders:  # a performance report samples every worker's fresh metrics
            args["since"] = self.version
            args["center_id"] = self.info.get("id")
        told = self._submitted_told
        news_submitted = {group: n for group, n in list(self.submitted.items()) if told.get(group) != n}  # list(): clients add from their threads
        if news_submitted:
            args["submitted"] = news_submitted
        info = await self.center.request("info", args, timeout=timeout or max(2.0, WATCH_INTERVAL * 8))
        told.update(news_submitted)
        changes = info.pop("changes", None)
        if changes is None:  # the whole table: the first look, a new Center, or too far behind
            self.workers = news = info["workers"]
            changed = True
        else:
            workers = self.workers
            for address, entry in changes.items():
                if entry is None:
                    workers.pop(address, None)
                else:
                    workers[address] = entry
            info["workers"] = workers
            news = {address: entry for address, entry in changes.items() if entry is not None}
            changed = bool(changes)
        info["changed"] = changed or force
        self.version = info.get("version")
        self.info = info
        self.silent_since = None
        if info.get("session_status") == "closed" and not self.closed:
            # We fell silent longer than the session's timeout (a stopped
            # process, a cut network): the cluster dropped our tasks and values.
            error = SessionClosedError(self.id, f"this process was silent for more than {SESSION_TIMEOUT:.0f} s; start a new client")
            logger.error("%s", error)
            self.closed = True
            _sessions.pop((self.address, id(self.security)), None)
            if self._watcher is not None:
                self._watcher.cancel()
            for subscriber in list(self.subscribers):
                subscriber.on_fatal(error)
            return info
        if self.security is not None and news:
            self.security.learn(news)
        if self.uploads and changed:  # before the clients hear of a new worker, so that its uploads reach it before any task
            self.push_uploads(info["workers"])
        for recorder in list(recorders):
            recorder.on_info(self, info)
        for subscriber in list(self.subscribers):
            try:
                subscriber.on_workers(info)
            except Exception:  # noqa: BLE001 - one broken client must not blind the others
                logger.exception("error in a client's reaction to the Center's news")
        return info

    def push_uploads(self, workers: Any) -> dict[str, asyncio.Future]:
        """Send each worker the uploads it lacks, in the order they were made; the requests, by worker."""
        requests = {}
        for address in [a for a in self._uploaded if a not in workers]:
            del self._uploaded[address]  # gone (a worker that comes back under that address gets them all again)
        for address in workers:
            have = self._uploaded.get(address, 0)
            missing = sorted((number, name, data) for name, (number, data) in self.uploads.items() if number > have)
            if not missing:
                continue
            self._uploaded[address] = missing[-1][0]
            connection = self.connections.get(address)
            for _, name, data in missing:
                request = connection.request("upload_file", {"filename": name, "data": data}, timeout=None)
                request.add_done_callback(partial(_upload_done, address, name))
                requests[address] = request  # the last one: requests to one worker are answered in order
        return requests

    def poll_now(self) -> None:
        self._poll_now.set()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._poll_now.wait(), WATCH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            asked = self._poll_now.is_set()
            self._poll_now.clear()
            if self.users <= 0:
                continue  # lingering with no client: nobody to tell (its cluster may be gone already)
            try:
                await self.look(force=asked)
            except asyncio.CancelledError:
                raise
            except (RPCTimeoutError, ConnectionError) as exc:
                # The connection stays: ZeroMQ reconnects by itself, and a request
                # of another client may be waiting on it.
                if self.silent_since is None:
                    self.silent_since = loop.time()
                    logger.warning("the Center at %s is not answering (%s); still trying", self.address, exc)
                silent = loop.time() - self.silent_since
                for subscriber in list(self.subscribers):
                    subscriber.on_center_silent(silent, CenterUnreachableError(self.address, silent, exc))
            except Exception:  # noqa: BLE001
                logger.exception("error while watching the Center at %s", self.address)

    async def before_release(self) -> None:
        """A client is about to let go: active performance reports take a last look (its cluster may end next)."""
        if recorders:
            await asyncio.gather(*(recorder.before_release(self) for recorder in list(recorders)), return_exceptions=True)

    def release(self) -> None:
        """One client is done with the session; the last one closes it after :data:`LINGER` seconds."""
        self.users -= 1
        if self.users <= 0 and not self.closed:
            self._linger = asyncio.get_running_loop().call_later(LINGER, lambda: asyncio.ensure_future(self.close()))

    async def close(self) -> None:
        if self.closed or self.users > 0:
            return
        self.closed = True
        _sessions.pop((self.address, id(self.security)), None)
        if self._watcher is not None:
            self._watcher.cancel()
        self.outbox.flush()
        try:
            await self.center.request("close_session", {"session": self.id}, timeout=1.0)
        except Exception as exc:  # noqa: BLE001 - the Center closes it anyway once it falls silent
            logger.info("could not close session %s with %s: %s", self.id, self.address, exc)
        self.connections.close()


def _upload_done(address: str, name: str, request: asyncio.Future) -> None:
    if not request.cancelled() and request.exception() is not None:
        logger.warning("upload of %s to worker %s failed: %s", name, address, request.exception())


async def open_session(address: str, security: Any = None, timeout: float = 30.0) -> Session:
    """The session with the Center at ``address`` (opened on first use); the caller must :meth:`~Session.release` it."""
    address = normalize_address(address)
    key = (address, id(security))
    session = _sessions.get(key)
    if session is None or session.closed:
        session = Session(address, security)
        await session.open(timeout)
        _sessions[key] = session
    session.users += 1
    if session._linger is not None:
        session._linger.cancel()
        session._linger = None
    return session


async def _close_all() -> None:
    sessions = list(_sessions.values())
    for session in sessions:
        session.users = 0
    await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)


def close_all_sessions() -> None:
    """Close every session of this process and stop the client loop (at exit; also for tests)."""
    global _loop
    with _lock:
        loop, _loop = _loop, None
    if loop is None or loop.loop.is_closed():
        return
    try:
        loop.run(_close_all(), 2.0)
    except Exception:  # noqa: BLE001 - at exit, nothing more can be done
        pass
    loop.stop()


atexit.register(close_all_sessions)
