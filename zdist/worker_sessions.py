"""Which of a worker's keys belong to which client session, and which sessions have closed.

A client session (:mod:`zdist.session`) tags what it stores on a worker: its
results, its scattered values, the inputs copied for its tasks. When the
session closes, the Center tells every worker (``release_session``), and
each deletes that session's keys and refuses the session's late requests.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .errors import SessionClosedError

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

#: A worker remembers this many released client sessions, to refuse their late requests.
RELEASED_SESSIONS_KEPT = 1000


class ClientSessions:
    """A worker's record of its client sessions.

    Owns ``key_session`` (key → session, for tagged keys only),
    ``session_keys`` (session → its keys) and ``released`` (sessions closed
    lately, oldest first, with the time each closed). Deleting the keys of a
    released session from the worker's ``data`` is the worker's part; of the
    worker it reads only the address, for its error messages.
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        # Keys stored on behalf of a client session (results, scattered
        # values, copies fetched for its tasks); untagged keys are not here.
        self.key_session: dict[Any, str] = {}
        self.session_keys: dict[str, set] = {}
        self.released: OrderedDict[str, float] = OrderedDict()

    def tag(self, key: Any, session: str | None) -> None:
        """``key`` now belongs to ``session`` (None: to no session); the last store decides."""
        old = self.key_session.pop(key, None)
        if old is not None:
            keys = self.session_keys[old]
            keys.discard(key)
            if not keys:
                del self.session_keys[old]
        if session is not None:
            self.key_session[key] = session
            self.session_keys.setdefault(session, set()).add(key)

    def check(self, session: Any) -> None:
        """Refuse a request of a session that is not a string, or that was released."""
        if session is None:
            return
        if not isinstance(session, str) or not session:
            raise TypeError(f"session must be a non-empty string (a session id) or None, got {type(session).__name__} {session!r:.40}")
        if session in self.released:
            raise SessionClosedError(session, f"worker {self.worker.address} refuses its late request")

    def release(self, session: str) -> set:
        """Remember ``session`` as closed and forget its tags; the keys it had (for the worker to delete)."""
        if not isinstance(session, str) or not session:
            raise TypeError(f"session must be a non-empty string (a session id), got {type(session).__name__} {session!r:.40}")
        released = self.released
        released[session] = time.time()
        released.move_to_end(session)
        while len(released) > RELEASED_SESSIONS_KEPT:
            released.popitem(last=False)
        keys = self.session_keys.pop(session, set())
        for key in keys:
            del self.key_session[key]
        return keys
