"""The Center: who holds what, and which workers are alive. Never user data.

>>> import asyncio
>>> async def demo():
...     async with Center() as center:
...         center.register(address='127.0.0.1:9000', ncores=2, name='alice')
...         center.add_keys(address='127.0.0.1:9000', keys={'x': 8})
...         return center.who_has(keys=['x']), center.ncores()
>>> asyncio.run(demo())
({'x': {'127.0.0.1:9000'}}, {'127.0.0.1:9000': 2})
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
import uuid
from typing import Any, Iterable

from .comm import normalize_address
from .keytable import KeyTable
from .node import Node
from .protocol import SetMap
from .replicas import Replicas, check_copies
from .rpc import ConnectionPool
from .sessiontable import SessionTable, check_session
from .taskprogress import ClusterActivity

logger = logging.getLogger(__name__)

#: A worker silent for this long is taken for dead and dropped from every table
#: (longer in a large cluster, whose workers heartbeat less often: see
#: :meth:`Center.liveness_timeout`).
DEFAULT_HEARTBEAT_TIMEOUT = 5.0
#: The most heartbeats a second the Center asks for: it tells each worker to
#: heartbeat every ``n_workers / HEARTBEAT_RATE`` seconds (or more often, if
#: the worker was started with a shorter interval than that).
DEFAULT_HEARTBEAT_RATE = 200.0
#: A worker is dropped after missing this many of the heartbeats it was told to send
#: (or after the Center's ``heartbeat_timeout``, whichever is longer).
LIVENESS_BEATS = 5
#: Membership changes remembered for ``info(since=...)``; a client further behind gets the whole table.
CHANGES_KEPT = 10_000
#: A client session silent for this long (unless it asked for another timeout) is closed.
DEFAULT_SESSION_TIMEOUT = 10.0


class Center(Node):
    """Holds ``who_has`` (key → worker addresses) and ``has_what`` (worker → keys).

    Workers register, report the keys they gain and drop (batched), and
    heartbeat; one that misses heartbeats for ``heartbeat_timeout`` seconds
    is removed from every table.

    Data model: ``worker_info`` (address → {name, ncores, last_seen,
    interval, pid, nkeys, nbytes, status, ...}: the registered workers);
    ``keys``, a :class:`~zdist.keytable.KeyTable` (who holds which key, and
    its size; a worker's ``nkeys``/``nbytes`` mirror its counts there);
    ``sessions``, a :class:`~zdist.sessiontable.SessionTable` (client
    sessions, open and closed lately); ``replicas``, a
    :class:`~zdist.replicas.Replicas` (copies wanted of keys). This class
    keeps them consistent with each other and talks to the workers.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        heartbeat_rate: float = DEFAULT_HEARTBEAT_RATE,
        **kwargs: Any,
    ):
        super().__init__(host, port, **kwargs)
        self.heartbeat_timeout = heartbeat_timeout
        if not heartbeat_rate > 0:
            raise ValueError(f"heartbeat_rate must be a positive number of heartbeats a second, got {heartbeat_rate!r}")
        self.heartbeat_rate = heartbeat_rate
        # Where a web dashboard of this Center is served, if whoever started it
        # serves one (zdist.dashboard.serve_dashboard sets it); info() reports it.
        self.dashboard_url: str | None = None
        self.keys = KeyTable()
        self.worker_info: dict[str, dict] = {}
        self.removed_workers: list[tuple[float, str, str]] = []  # (when, address, why)
        self.generation = 0  # bumps whenever the set of workers changes
        # Membership news for info(since=...): every join, leave or change of
        # a worker's status bumps the version and logs the address, so that a
        # client is sent only what changed since its last look.
        self.membership = MembershipLog()
        self.started = time.time()
        self.id = uuid.uuid4().hex  # tells clients that a Center restarted
        self.replicas = Replicas()
        # Client sessions opened without a timeout of their own, or known only
        # from a heartbeat or a worker (after a restart), close after session_timeout.
        self.sessions = SessionTable(session_timeout)
        self._peers: ConnectionPool | None = None
        # Tasks per group (queued, executing, done, erred) and bytes moved between
        # workers, as their heartbeats tell: numbers only (zdist.taskprogress).
        self.activity_table = ClusterActivity()
        self.handlers.update(
            {
                "register": self.register,
                "unregister": self.unregister,
                "heartbeat": self.heartbeat,
                "add_keys": self.add_keys,
                "remove_keys": self.remove_keys,
                "who_has": self.keys.holders_to_send,  # the table's entries as they are: no set made per key
                "has_what": self.has_what,
                "nbytes": self.nbytes,
                "ncores": self.ncores,
                "workers": self.workers,
                "alive": self.alive,
                "info": self.info,
                "set_replicas": self.set_replicas,
                "open_session": self.sessions.open_session,
                "close_session": self.close_session,
                "sessions": self.sessions.listing,
                "activity": self.activity,
            }
        )
        self._reaper: asyncio.Task | None = None

    async def on_start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_dead_workers())
        self._peers = ConnectionPool(timeout=10, security=self.security)

    async def on_stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._peers is not None:
            self._peers.close()

    async def _reap_dead_workers(self) -> None:
        """One loop for everything that falls silent: workers, then client sessions."""
        interval = max(0.05, min(1.0, self.heartbeat_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            deadline = now - self.heartbeat_timeout
            beats = LIVENESS_BEATS
            for address, info in list(self.worker_info.items()):
                # Each worker by the interval it was last told (the cluster may
                # have shrunk since, but it heartbeats at that pace until told).
                if info["last_seen"] < deadline and info["last_seen"] < now - beats * info["interval"]:
                    logger.warning("worker %s missed heartbeats for %.1f s; removing it", address, now - info["last_seen"])
                    self._remove_worker(address, "missed heartbeats")
            for session in self.sessions.silent(now):
                info = self.sessions.open[session]
                logger.warning("client session %s (%s) silent for %.1f s; closing it", session, info["name"], info["timeout"])
                self._close_session(session)

    # -------------------------------------------------------------- membership

    def register(
        self,
        address: str,
        ncores: int,
        name: str | None = None,
        keys: dict | None = None,
        pid: int | None = None,
        sessions: list | None = None,
        replaces: str | None = None,
        resources: dict | None = None,
        **extra: Any,
    ) -> str:
        """A worker joins (or joins again after a Center restart) with the keys it holds.

        ``sessions`` lists the client sessions it holds keys of: it is told at
        once of those closed meanwhile; those this Center does not know (it
        restarted) are adopted, open for ``session_timeout`` seconds, so that
        they close unless their client is still there to heartbeat.

        ``replaces`` names the worker this one was started in place of by
        their nanny (``extra['nanny']``, its pid): that one died, and is
        dropped now rather than after missing heartbeats. Other ``extra``
        numbers and strings (``restarts``, ``nanny``, ...) are kept in
        :meth:`workers`, and so are ``resources`` (``{'GPU': 2}``: what
        tasks with resource needs may use there; ``zdist-worker --resources``).
        """
        address = normalize_address(address)
        if replaces is not None and replaces != address:
            old = self.worker_info.get(replaces)
            if old is not None and old.get("nanny") is not None and old.get("nanny") == extra.get("nanny"):
                logger.warning("worker %s (%s) died; its nanny started %s in its place", replaces, old["name"], address)
                self._remove_worker(replaces, "restarted by its nanny")
        if not isinstance(ncores, int) or ncores < 1:
            raise ValueError(f"ncores must be a positive integer, got {ncores!r}")
        if resources is not None and not (
            isinstance(resources, dict)
            and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for k, v in resources.items())
        ):
            raise ValueError(f"resources must map names to non-negative numbers, e.g. {{'GPU': 2}}; got {resources!r:.200}")
        if sessions is not None:
            if not isinstance(sessions, (list, tuple)):
                raise TypeError(f"sessions must be a list of session ids, got {type(sessions).__name__}")
            for session in sessions:
                check_session(session)
        if address in self.worker_info:
            self._remove_worker(address, "registered again", record=False)
        self.worker_info[address] = {
            "name": name if name is not None else address,
            "ncores": ncores,
            "last_seen": time.time(),
            "interval": 0.0,  # the heartbeat interval it was told (none yet)
            "pid": pid,
            "nkeys": 0,
            "nbytes": 0,
            **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))},
            **({"resources": dict(resources)} if resources else {}),
        }
        self.keys.add_holder(address)
        self.generation += 1
        self.membership.changed(address)
        if keys:
            self.add_keys(address, keys)
        for session in sessions or ():
            if not self.sessions.adopt(session) and self._peers is not None:  # closed meanwhile
                self._peers.get(address).send("release_session", session=session)
        logger.info("registered worker %s (%s, %d cores)", address, self.worker_info[address]["name"], ncores)
        return "OK"

    def unregister(self, address: str) -> str:
        address = normalize_address(address)
        if address in self.worker_info:
            self._remove_worker(address, "unregistered")
            logger.info("unregistered worker %s", address)
        return "OK"

    def heartbeat(self, address: str, **metrics: Any) -> dict:
        """A worker says it is alive: ``{'status': 'OK', 'interval': seconds}``.

        ``interval`` is how often this Center wants to hear from it: the
        cluster's size over :attr:`heartbeat_rate`, so that the Center handles
        at most about that many heartbeats a second however many workers
        there are (a worker started with a longer interval keeps its own).
        ``{'status': 'unknown'}`` asks the worker to register again. A change of
        ``status`` (paused, running) is membership news for clients.
        """
        info = self.worker_info.get(address)
        if info is None:
            return {"status": "unknown"}
        info["last_seen"] = time.time()
        status = info.get("status")
        if "task_groups" in metrics or "transfers" in metrics:
            self.activity_table.note(address, metrics.pop("task_groups", None), metrics.pop("transfers", None))
        for name, value in metrics.items():
            if isinstance(value, (int, float, str)) and name not in _COUNTED_HERE:
                info[name] = value
        if info.get("status") != status:
            self.membership.changed(address)
        interval = info["interval"] = len(self.worker_info) / self.heartbeat_rate
        return {"status": "OK", "interval": interval}

    def liveness_timeout(self) -> float:
        """How long a worker may be silent before it is dropped, at the cluster's size now.

        ``max(heartbeat_timeout, LIVENESS_BEATS * n_workers / heartbeat_rate)``:
        5 s up to 200 workers by default, 25 s at 1,000, 50 s at 2,000.
        """
        return max(self.heartbeat_timeout, LIVENESS_BEATS * len(self.worker_info) / self.heartbeat_rate)

    def _remove_worker(self, address: str, why: str, record: bool = True) -> None:
        keys = self.keys.remove_holder(address)
        if self.worker_info.pop(address, None) is not None:
            self.membership.changed(address)
        self.activity_table.remove(address)
        self.generation += 1
        if record:
            self.removed_workers.append((time.time(), address, why))
            del self.removed_workers[:-100]
        if self.replicas and keys:
            self._restore_replicas(keys)

    def set_replicas(self, keys: dict, session: str | None = None) -> str:
        """Keep ``{key: n}`` copies of each key: when a holder dies, another worker copies it.

        With ``session``, the keys belong to that client session: the copies
        belong to it too (deleted when it closes), and none is made after.
        """
        if session is not None:
            check_session(session)
        check_copies(keys)
        if session is not None and session in self.sessions.closed:
            return "OK"
        self.replicas.want(keys, session)
        self._restore_replicas(list(keys))
        return "OK"

    def _restore_replicas(self, keys: Iterable) -> None:
        """Ask workers that lack a copy to fetch one from a surviving holder (peer to peer)."""
        if self._peers is None:
            return
        for (address, session), missing in self.replicas.copies_to_make(keys, self.keys, self.worker_info).items():
            logger.info("asking %s to copy %d keys to restore their replicas", address, len(missing))
            self._peers.get(address).send("fetch_keys", keys=missing, **({"session": session} if session is not None else {}))

    # -------------------------------------------------------------- client sessions

    @property
    def session_timeout(self) -> float:
        """Seconds of silence after which a session without a timeout of its own closes."""
        return self.sessions.timeout

    def close_session(self, session: str) -> str:
        """Close a client session now: workers drop its queued tasks and delete its values.

        Closing a session this Center does not know (it restarted since)
        still tells the workers; closing one twice is harmless.
        """
        check_session(session)
        self._close_session(session)
        return "OK"

    def _close_session(self, session: str) -> None:
        self.sessions.close(session)
        self.activity_table.remove_session(session)
        self.replicas.forget_session(session)  # its keys need no more copies
        if self._peers is not None:
            for address in self.worker_info:
                self._peers.get(address).send("release_session", session=session)

    # -------------------------------------------------------------- keys

    def add_keys(self, address: str, keys: dict | list) -> str:
        """``keys`` maps each key to its size in bytes (or is a plain list of keys)."""
        if address not in self.keys:
            raise KeyError(f"worker {address} is not registered; register before reporting keys")
        info = self.worker_info[address]
        info["last_seen"] = time.time()
        self.keys.add(address, keys)
        info["nkeys"], info["nbytes"] = self.keys.held(address)
        return "OK"

    def remove_keys(self, address: str, keys: Iterable) -> str:
        if address not in self.keys:
            return "OK"  # already gone with its worker
        info = self.worker_info[address]
        for key in self.keys.remove(address, keys):  # nobody holds these any more
            self.replicas.forget(key)
        info["nkeys"], info["nbytes"] = self.keys.held(address)
        return "OK"

    # -------------------------------------------------------------- queries

    def who_has(self, keys: Iterable | None = None) -> dict:
        """``{key: set of worker addresses}``; an unknown key maps to an empty set.

        One request for any number of keys (ask for all you need at once): the
        answer travels as one :class:`~zdist.protocol.SetMap`, not a set per key.
        """
        return self.keys.holders_of(keys)

    def has_what(self, workers: Iterable[str] | None = None) -> dict:
        if workers is None:
            return self.keys.has_what_sets()
        return SetMap((w, self.keys.keys_of(normalize_address(w))) for w in workers)

    def nbytes(self, keys: Iterable | None = None) -> dict:
        return self.keys.sizes(keys)

    def ncores(self) -> dict:
        return {address: info["ncores"] for address, info in self.worker_info.items()}

    def alive(self, workers: Iterable[str]) -> list:
        """Those of ``workers`` that are registered now: O(len(workers)), not O(cluster)."""
        table = self.worker_info
        return [w for w in workers if isinstance(w, str) and w in table]

    def workers(self) -> dict:
        """address → {name, ncores, last_seen, nkeys, nbytes, ...}."""
        return {address: dict(info) for address, info in self.worker_info.items()}

    def info(self, session: str | None = None, since: int | None = None, center_id: str | None = None, submitted: dict | None = None) -> dict:
        """A summary for clients: workers, generation, recent removals, open sessions.

        With ``session``, it is also that client session's heartbeat (an
        unknown session is opened with ``session_timeout``) and the answer
        tells its state as ``'session_status'``: ``'open'`` or ``'closed'``.

        Every answer carries the membership ``version``. Given ``since`` (a
        version this Center answered before: ``center_id`` is its ``id``), the
        answer carries, instead of ``workers``, only ``changes``: ``{address:
        its entry, or None if it left}`` for the workers that joined, left or
        changed status since then; it costs O(changes), not O(workers). A
        version this Center cannot answer from (another Center's, or too old)
        gets the whole table, as without ``since``. Metrics in ``changes``
        are as of the change: :meth:`workers` has fresh ones.

        >>> import asyncio
        >>> async def demo():
        ...     async with Center() as center:
        ...         center.register(address='127.0.0.1:9000', ncores=2)
        ...         first = center.info()
        ...         center.register(address='127.0.0.1:9001', ncores=1)
        ...         news = center.info(since=first['version'], center_id=first['id'])
        ...         return sorted(first['workers']), sorted(news['changes']), 'workers' in news
        >>> asyncio.run(demo())
        (['127.0.0.1:9000'], ['127.0.0.1:9001'], False)
        """
        status = self.sessions.heartbeat(session) if session is not None else None
        if submitted is not None and session is not None:  # the session's tasks per group so far: numbers only
            self.activity_table.note_submitted(session, submitted)
        summary = {
            "address": self.address,
            "id": self.id,
            "version": self.membership.version,
            "generation": self.generation,
            "removed": [list(entry) for entry in self.removed_workers[-20:]],
            "nkeys": len(self.keys),
            "heartbeat_timeout": self.liveness_timeout(),
            "time": time.time(),
            "dashboard": self.dashboard_url,
            "sessions": len(self.sessions),
        }
        changed = self.membership.since(since) if since is not None and center_id == self.id else None
        if changed is None:
            summary["workers"] = self.workers()
        else:
            table = self.worker_info
            summary["changes"] = {address: dict(table[address]) if address in table else None for address in changed}
        if status is not None:
            summary["session_status"] = status
        return summary

    def activity(self, limit: int = 50) -> dict:
        """Task groups changed last (queued, executing, done, erred, summed over workers) and worker-to-worker bytes."""
        return self.activity_table.summary(limit if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit <= 1000 else 50)


class MembershipLog:
    """A version number and the workers each version changed, for :meth:`Center.info`'s deltas.

    >>> log = MembershipLog()
    >>> log.changed('a'); log.changed('b'); log.changed('a')
    >>> log.version, sorted(log.since(1)), log.since(3), log.since(99)
    (3, ['a', 'b'], set(), None)
    """

    __slots__ = ("version", "floor", "_versions", "_addresses")

    def __init__(self) -> None:
        self.version = 0
        self.floor = 0  # the oldest version a delta can still start from
        self._versions: list[int] = []
        self._addresses: list[str] = []

    def changed(self, address: str) -> None:
        self.version += 1
        self._versions.append(self.version)
        self._addresses.append(address)
        if len(self._versions) > 2 * CHANGES_KEPT:  # amortized: forget the older half at once
            cut = len(self._versions) - CHANGES_KEPT
            self.floor = self._versions[cut - 1]
            del self._versions[:cut], self._addresses[:cut]

    def since(self, version: Any) -> set | None:
        """The addresses changed after ``version``; None if that version cannot be answered from."""
        if type(version) is not int or not self.floor <= version <= self.version:
            return None
        return set(self._addresses[bisect.bisect_right(self._versions, version):])


# What a worker's heartbeat may not overwrite: the Center counts these from key reports.
_COUNTED_HERE = frozenset({"nkeys", "nbytes", "name", "ncores", "last_seen", "pid"})
