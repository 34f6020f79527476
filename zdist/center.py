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
from collections import OrderedDict, defaultdict
from typing import Any, Iterable

from .comm import normalize_address
from .node import Node
from .protocol import SetMap
from .rpc import ConnectionPool
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
#: Closed sessions are remembered (to tell late heartbeats and re-registering
#: workers) for this long, and at most this many of them.
CLOSED_SESSION_MEMORY = 3600.0
CLOSED_SESSIONS_KEPT = 10_000
#: The longest session id accepted (clients use a uuid hex: 32 characters).
MAX_SESSION_ID = 256


class Center(Node):
    """Holds ``who_has`` (key → worker addresses) and ``has_what`` (worker → keys).

    Workers register, report the keys they gain and drop (batched), and
    heartbeat; one that misses heartbeats for ``heartbeat_timeout`` seconds
    is removed from every table.
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
        # Client sessions opened without a timeout of their own, or known only
        # from a heartbeat or a worker (after a restart), close after this.
        self.session_timeout = session_timeout
        # Where a web dashboard of this Center is served, if whoever started it
        # serves one (zdist.dashboard.serve_dashboard sets it); info() reports it.
        self.dashboard_url: str | None = None
        # key → its holder's address, or a set of addresses when several hold
        # it: most keys have one holder, and a set costs 216 bytes a key.
        self.who_has_table: dict[Any, str | set[str]] = {}
        self.has_what_table: dict[str, set] = {}
        self.nbytes_table: dict[Any, int] = {}
        # Each worker's size of each key it holds, as that worker last reported it:
        # its "nbytes" is their sum, exact under any order of reports (the
        # global nbytes_table keeps only the last size anyone reported).
        self.key_bytes: dict[str, dict[Any, int]] = {}
        self.worker_info: dict[str, dict] = {}
        self.removed_workers: list[tuple[float, str, str]] = []  # (when, address, why)
        self.generation = 0  # bumps whenever the set of workers changes
        # Membership news for info(since=...): every join, leave or change of
        # a worker's status bumps the version and logs the address, so that a
        # client is sent only what changed since its last look.
        self.membership = MembershipLog()
        self.started = time.time()
        self.id = uuid.uuid4().hex  # tells clients that a Center restarted
        self.replicas: dict[Any, int] = {}  # key → copies wanted (only keys asking for more than one)
        # Client sessions: id → {timeout, last_seen, opened, name, pid, host}; and
        # recently closed ones, id → when (oldest first), so that a late
        # heartbeat or a worker that registers later can be told.
        self.sessions: dict[str, dict] = {}
        self.closed_sessions: OrderedDict[str, float] = OrderedDict()
        self.replica_session: dict[Any, str] = {}  # replicated key → the session it belongs to
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
                "who_has": self._who_has_for_peer,
                "has_what": self.has_what,
                "nbytes": self.nbytes,
                "ncores": self.ncores,
                "workers": self.workers,
                "alive": self.alive,
                "info": self.info,
                "set_replicas": self.set_replicas,
                "open_session": self.open_session,
                "close_session": self.close_session,
                "sessions": self.list_sessions,
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
            for session, info in list(self.sessions.items()):
                if info["last_seen"] < now - info["timeout"]:
                    logger.warning("client session %s (%s) silent for %.1f s; closing it", session, info["name"], info["timeout"])
                    self._close_session(session)
            closed = self.closed_sessions
            while closed and next(iter(closed.values())) < now - CLOSED_SESSION_MEMORY:
                closed.popitem(last=False)

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
                _check_session(session)
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
        self.has_what_table[address] = set()
        self.key_bytes[address] = {}
        self.generation += 1
        self.membership.changed(address)
        if keys:
            self.add_keys(address, keys)
        for session in sessions or ():
            if session in self.closed_sessions:
                if self._peers is not None:
                    self._peers.get(address).send("release_session", session=session)
            elif session not in self.sessions:
                self._open(session, self.session_timeout, None, None, None, adopted=True)
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
        keys = self.has_what_table.pop(address, set())
        self.key_bytes.pop(address, None)
        for key in keys:
            if self._drop_holder(key, address):
                self.nbytes_table.pop(key, None)
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
            _check_session(session)
        for key, n in keys.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"replicas must be a positive integer, got {n!r} for {key!r}")
        if session is not None and session in self.closed_sessions:
            return "OK"
        for key, n in keys.items():
            if n > 1:
                self.replicas[key] = n
                if session is not None:
                    self.replica_session[key] = session
                else:
                    self.replica_session.pop(key, None)
            else:
                self.replicas.pop(key, None)
                self.replica_session.pop(key, None)
        self._restore_replicas(list(keys))
        return "OK"

    def _restore_replicas(self, keys: Iterable) -> None:
        """Ask workers that lack a copy to fetch one from a surviving holder (peer to peer)."""
        if self._peers is None:
            return
        wanted: dict[tuple[str, str | None], list] = defaultdict(list)
        load = {address: info["nbytes"] for address, info in self.worker_info.items()}
        for key in keys:
            n = self.replicas.get(key)
            holders = _holders(self.who_has_table.get(key))
            if not n or not holders:
                continue
            candidates = sorted((a for a, info in self.worker_info.items() if a not in holders and not info.get("retiring")), key=lambda a: load[a])  # a retiring worker would leave with it
            for address in candidates[: max(0, n - len(holders))]:
                wanted[address, self.replica_session.get(key)].append(key)
                load[address] += self.nbytes_table.get(key, 0)
        for (address, session), missing in wanted.items():
            logger.info("asking %s to copy %d keys to restore their replicas", address, len(missing))
            self._peers.get(address).send("fetch_keys", keys=missing, **({"session": session} if session is not None else {}))

    # -------------------------------------------------------------- client sessions

    def open_session(self, session: str, timeout: float | None = None, name: str | None = None, pid: int | None = None, host: str | None = None) -> str:
        """A client opens its session: ``session`` is an id it chose (a uuid hex).

        The session stays open while the client calls this again or
        ``info(session=...)`` at least every ``timeout`` seconds (None: the
        Center's ``session_timeout``, 10 s unless configured); it closes
        when the client calls :meth:`close_session` or falls silent. Closing
        drops the session's queued tasks and deletes its values on every
        worker. Opening an open session again refreshes it (and its timeout,
        name, pid and host). Answers ``'OK'``, or ``'closed'`` when this id
        was closed recently: a closed session stays closed (its values are
        gone); open a new one with a fresh id.
        """
        _check_session(session)
        if timeout is None:
            timeout = self.session_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"session timeout must be a positive number of seconds, got {timeout!r}")
        for field, value, kind in (("name", name, str), ("pid", pid, int), ("host", host, str)):
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise TypeError(f"session {field} must be a {kind.__name__} or None, got {type(value).__name__}")
        if session in self.closed_sessions:
            return "closed"
        self._open(session, float(timeout), name, pid, host)
        return "OK"

    def _open(self, session: str, timeout: float, name: str | None, pid: int | None, host: str | None, adopted: bool = False) -> None:
        now = time.time()
        info = self.sessions.get(session)
        if info is None:
            info = self.sessions[session] = {"opened": now, "name": name, "pid": pid, "host": host, "adopted": adopted}
            logger.info("client session %s opened (%s, pid %s on %s, timeout %.1f s)", session, name, pid, host, timeout)
        elif not adopted:
            info.update(name=name if name is not None else info["name"], pid=pid if pid is not None else info["pid"], host=host if host is not None else info["host"], adopted=False)
        info["timeout"] = timeout
        info["last_seen"] = now

    def close_session(self, session: str) -> str:
        """Close a client session now: workers drop its queued tasks and delete its values.

        Closing a session this Center does not know (it restarted since)
        still tells the workers; closing one twice is harmless.
        """
        _check_session(session)
        self._close_session(session)
        return "OK"

    def _close_session(self, session: str) -> None:
        info = self.sessions.pop(session, None)
        self.activity_table.remove_session(session)
        if info is not None:
            logger.info("client session %s (%s) closed", session, info["name"])
        closed = self.closed_sessions
        closed[session] = time.time()
        closed.move_to_end(session)
        while len(closed) > CLOSED_SESSIONS_KEPT:
            closed.popitem(last=False)
        if self.replica_session:  # its keys need no more copies
            for key in [key for key, owner in self.replica_session.items() if owner == session]:
                del self.replica_session[key]
                self.replicas.pop(key, None)
        if self._peers is not None:
            for address in self.worker_info:
                self._peers.get(address).send("release_session", session=session)

    def _session_heartbeat(self, session: str) -> str:
        """``info(session=...)``: ``'open'`` (refreshed, or reopened if unknown) or ``'closed'``."""
        _check_session(session)
        if session in self.closed_sessions:
            return "closed"
        info = self.sessions.get(session)
        if info is None:  # e.g. this Center restarted since the client opened it
            self._open(session, self.session_timeout, None, None, None)
        else:
            info["last_seen"] = time.time()
        return "open"

    def list_sessions(self) -> dict:
        """The open client sessions: id → {name, pid, host, timeout, opened, last_seen, adopted}."""
        return {session: dict(info) for session, info in self.sessions.items()}

    # -------------------------------------------------------------- keys

    def add_keys(self, address: str, keys: dict | list) -> str:
        """``keys`` maps each key to its size in bytes (or is a plain list of keys)."""
        holdings = self.has_what_table.get(address)
        if holdings is None:
            raise KeyError(f"worker {address} is not registered; register before reporting keys")
        info = self.worker_info[address]
        info["last_seen"] = time.time()
        held = self.key_bytes[address]
        sizes = keys if isinstance(keys, dict) else dict.fromkeys(keys, 0)
        table = self.who_has_table
        for key, nbytes in sizes.items():
            nbytes = nbytes if isinstance(nbytes, int) and nbytes > 0 else 0
            if key not in holdings:
                holdings.add(key)
                info["nkeys"] += 1
            # A key reported again (stored anew, another size) replaces its old size.
            info["nbytes"] += nbytes - held.get(key, 0)
            held[key] = nbytes
            holders = table.get(key)
            if holders is None:
                table[key] = address
            elif type(holders) is str:
                if holders != address:
                    table[key] = {holders, address}
            else:
                holders.add(address)
            if nbytes:
                self.nbytes_table[key] = nbytes
        return "OK"

    def _drop_holder(self, key: Any, address: str) -> bool:
        """``address`` no longer holds ``key``; True if nobody does any more (the key is gone)."""
        table = self.who_has_table
        holders = table.get(key)
        if holders is None:
            return False
        if type(holders) is str:
            if holders != address:
                return False
            del table[key]
            return True
        holders.discard(address)
        if len(holders) == 1:
            table[key] = next(iter(holders))
        return False

    def remove_keys(self, address: str, keys: Iterable) -> str:
        holdings = self.has_what_table.get(address)
        if holdings is None:
            return "OK"  # already gone with its worker
        info = self.worker_info[address]
        for key in keys:
            if key in holdings:
                holdings.discard(key)
                info["nkeys"] -= 1
                info["nbytes"] -= self.key_bytes[address].pop(key, 0)
            if self._drop_holder(key, address):
                self.nbytes_table.pop(key, None)
                self.replicas.pop(key, None)
                self.replica_session.pop(key, None)
        return "OK"

    # -------------------------------------------------------------- queries

    def who_has(self, keys: Iterable | None = None) -> dict:
        """``{key: set of worker addresses}``; an unknown key maps to an empty set.

        One request for any number of keys (ask for all you need at once): the
        answer travels as one :class:`~zdist.protocol.SetMap`, not a set per key.
        """
        if keys is None:
            return SetMap((key, _holders(holders)) for key, holders in self.who_has_table.items())
        get = self.who_has_table.get
        return SetMap((key, _holders(get(key))) for key in keys)

    def _who_has_for_peer(self, keys: Iterable | None = None) -> SetMap:
        """:meth:`who_has` over the wire: the table's entries as they are, no set made per key.

        The reply is encoded before anything can change them (the handler
        answers at once), and a one-holder entry (a string) travels as a
        one-member set.
        """
        if keys is None:
            return SetMap(self.who_has_table)
        get = self.who_has_table.get
        return SetMap((key, get(key, ())) for key in keys)

    def has_what(self, workers: Iterable[str] | None = None) -> dict:
        if workers is None:
            return SetMap((address, set(keys)) for address, keys in self.has_what_table.items())
        return SetMap((w, set(self.has_what_table.get(normalize_address(w), ()))) for w in workers)

    def nbytes(self, keys: Iterable | None = None) -> dict:
        if keys is None:
            return dict(self.nbytes_table)
        return {key: self.nbytes_table.get(key, 0) for key in keys}

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
        status = self._session_heartbeat(session) if session is not None else None
        if submitted is not None and session is not None:  # the session's tasks per group so far: numbers only
            self.activity_table.note_submitted(session, submitted)
        summary = {
            "address": self.address,
            "id": self.id,
            "version": self.membership.version,
            "generation": self.generation,
            "removed": [list(entry) for entry in self.removed_workers[-20:]],
            "nkeys": len(self.who_has_table),
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


def _holders(entry: str | set | None) -> set:
    """A ``who_has_table`` entry as a new set of addresses."""
    if entry is None:
        return set()
    return {entry} if type(entry) is str else set(entry)


def _check_session(session: Any) -> None:
    if not isinstance(session, str) or not session or len(session) > MAX_SESSION_ID:
        shown = f"{type(session).__name__} {session!r:.40}" if not isinstance(session, str) else f"a string of {len(session)} characters"
        raise TypeError(f"a session id is a non-empty string of at most {MAX_SESSION_ID} characters (a uuid hex), got {shown}")
