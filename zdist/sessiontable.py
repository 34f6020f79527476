"""The Center's table of client sessions: which are open, which closed lately. No I/O.

What closing a session does to the cluster (workers told to drop its tasks
and values) is the Center's part; this table only decides and remembers.

>>> table = SessionTable(timeout=10.0)
>>> table.open_session('s1', name='job'), table.heartbeat('s1'), len(table)
('OK', 'open', 1)
>>> table.close('s1')['name'], table.open_session('s1'), table.heartbeat('s1'), len(table)
('job', 'closed', 'closed', 0)
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger("zdist.center")  # what it logs is the Center's news

#: Closed sessions are remembered (to tell late heartbeats and re-registering
#: workers) for this long, and at most this many of them.
CLOSED_SESSION_MEMORY = 3600.0
CLOSED_SESSIONS_KEPT = 10_000
#: The longest session id accepted (clients use a uuid hex: 32 characters).
MAX_SESSION_ID = 256


class SessionTable:
    """Client sessions by id: open ones, with their timeouts, and those closed lately.

    Data model:

    ``open``     id → ``{opened, name, pid, host, adopted, timeout, last_seen}``
                 (times from :func:`time.time`; ``adopted``: known only from
                 a worker that holds its keys, after a Center restart).
    ``closed``   id → when it closed, oldest first; at most
                 :data:`CLOSED_SESSIONS_KEPT` of them, each for
                 :data:`CLOSED_SESSION_MEMORY` seconds. A closed id never
                 opens again: its values are gone.
    ``timeout``  seconds of silence after which a session opened without a
                 timeout of its own (or adopted, or reopened by a heartbeat)
                 is due to close.

    An id is in at most one of ``open`` and ``closed``.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.open: dict[str, dict] = {}
        self.closed: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """The number of open sessions."""
        return len(self.open)

    def open_session(self, session: str, timeout: float | None = None, name: str | None = None, pid: int | None = None, host: str | None = None) -> str:
        """A client opens its session (the Center's ``open_session`` op): ``session`` is an id it chose (a uuid hex).

        The session stays open while the client calls this again or
        ``info(session=...)`` at least every ``timeout`` seconds (None: the
        Center's ``session_timeout``, 10 s unless configured); it closes
        when the client calls ``close_session`` or falls silent. Closing
        drops the session's queued tasks and deletes its values on every
        worker. Opening an open session again refreshes it (and its timeout,
        name, pid and host). Answers ``'OK'``, or ``'closed'`` when this id
        was closed recently: a closed session stays closed (its values are
        gone); open a new one with a fresh id.
        """
        check_session(session)
        if timeout is None:
            timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"session timeout must be a positive number of seconds, got {timeout!r}")
        for field, value, kind in (("name", name, str), ("pid", pid, int), ("host", host, str)):
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise TypeError(f"session {field} must be a {kind.__name__} or None, got {type(value).__name__}")
        if session in self.closed:
            return "closed"
        self._open(session, float(timeout), name, pid, host)
        return "OK"

    def adopt(self, session: str) -> bool:
        """A worker holds keys of ``session``: False if it is closed; else open it (if unknown) and True.

        An adopted session closes after :attr:`timeout` unless its client is
        still there to heartbeat.
        """
        if session in self.closed:
            return False
        if session not in self.open:
            self._open(session, self.timeout, None, None, None, adopted=True)
        return True

    def _open(self, session: str, timeout: float, name: str | None, pid: int | None, host: str | None, adopted: bool = False) -> None:
        now = time.time()
        info = self.open.get(session)
        if info is None:
            info = self.open[session] = {"opened": now, "name": name, "pid": pid, "host": host, "adopted": adopted}
            logger.info("client session %s opened (%s, pid %s on %s, timeout %.1f s)", session, name, pid, host, timeout)
        elif not adopted:
            info.update(name=name if name is not None else info["name"], pid=pid if pid is not None else info["pid"], host=host if host is not None else info["host"], adopted=False)
        info["timeout"] = timeout
        info["last_seen"] = now

    def heartbeat(self, session: str) -> str:
        """The client is there: ``'open'`` (refreshed, or reopened if unknown) or ``'closed'``."""
        check_session(session)
        if session in self.closed:
            return "closed"
        info = self.open.get(session)
        if info is None:  # e.g. the Center restarted since the client opened it
            self._open(session, self.timeout, None, None, None)
        else:
            info["last_seen"] = time.time()
        return "open"

    def close(self, session: str) -> dict | None:
        """Mark ``session`` closed (again, or unknown: harmless); returns its entry if it was open."""
        info = self.open.pop(session, None)
        if info is not None:
            logger.info("client session %s (%s) closed", session, info["name"])
        closed = self.closed
        closed[session] = time.time()
        closed.move_to_end(session)
        while len(closed) > CLOSED_SESSIONS_KEPT:
            closed.popitem(last=False)
        return info

    def silent(self, now: float) -> list[str]:
        """Open sessions not heard from within their timeout as of ``now``: due to close.

        Also forgets closed sessions older than :data:`CLOSED_SESSION_MEMORY`.
        """
        closed = self.closed
        while closed and next(iter(closed.values())) < now - CLOSED_SESSION_MEMORY:
            closed.popitem(last=False)
        return [session for session, info in self.open.items() if info["last_seen"] < now - info["timeout"]]

    def listing(self) -> dict:
        """The open sessions (the Center's ``sessions`` op): id → {name, pid, host, timeout, opened, last_seen, adopted}."""
        return {session: dict(info) for session, info in self.open.items()}


def check_session(session: Any) -> None:
    """Raise TypeError unless ``session`` is a valid session id (a non-empty string, not too long)."""
    if not isinstance(session, str) or not session or len(session) > MAX_SESSION_ID:
        shown = f"{type(session).__name__} {session!r:.40}" if not isinstance(session, str) else f"a string of {len(session)} characters"
        raise TypeError(f"a session id is a non-empty string of at most {MAX_SESSION_ID} characters (a uuid hex), got {shown}")
