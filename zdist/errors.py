"""Exceptions that more than one part of zdist raises or catches."""
from __future__ import annotations

from typing import Any, Iterable

#: The exit status of a worker that stopped because no Center answered for
#: its ``--death-timeout``: its nanny does not start it again, and a batch
#: job's script can tell it from a crash (1) or a clean stop (0).
EXIT_NO_CENTER = 3


class MissingDataError(KeyError):
    """Some keys a task needs are held by no live worker.

    ``keys`` lists them. A scheduler that knows how they were made can
    recompute them and try again.
    """

    def __init__(self, keys: Iterable[Any], detail: str = ""):
        self.keys = list(keys)
        self.detail = detail
        super().__init__(self.keys)

    def __str__(self) -> str:
        shown = ", ".join(repr(k) for k in self.keys[:5]) + (" ..." if len(self.keys) > 5 else "")
        return f"no live worker holds {shown}" + (f" ({self.detail})" if self.detail else "")

    def __reduce__(self):
        return (type(self), (self.keys, self.detail))


class LostDataError(Exception):
    """A value that cannot be recomputed was lost with the worker that held it."""

    def __init__(self, key: Any, worker: str | None = None, detail: str = ""):
        self.key = key
        self.worker = worker
        self.detail = detail
        where = f" when worker {worker} died" if worker else ""
        message = f"the value of key {key!r} was lost{where} and cannot be recomputed" + (f": {detail}" if detail else "")
        message += "; scatter it again (or scatter with replicas=2 to survive the loss of a worker)"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.key, self.worker, self.detail))


class WorkerDiedError(ConnectionError):
    """A worker died (or was dropped by the Center) while a request to it was waiting."""


class NoWorkersError(RuntimeError):
    """The cluster has no live workers left to run anything on."""


class WorkerRetiringError(RuntimeError):
    """The worker asked to take keys is retiring itself; they would leave with it: ask another."""


class SessionClosedError(RuntimeError):
    """The client session a task or value belonged to was closed.

    A client holds a session with the Center; when the client closes it, or
    falls silent for the session's timeout (it exited, crashed or was
    killed), the cluster drops the session's queued tasks and deletes its
    values. A task that had not started, a result that came after, and any
    later request of that session get this error.
    """

    def __init__(self, session: str = "", detail: str = ""):
        self.session = session
        self.detail = detail
        message = f"the client's session {session!r} was closed" if session else "the client's session was closed"
        message += " (the client closed it, or fell silent longer than its timeout); its queued tasks were dropped and its values deleted"
        if detail:
            message += f": {detail}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.session, self.detail))


class TaskKilledWorkersError(WorkerDiedError):
    """A task was in flight on ``max_worker_deaths`` workers that died: it probably kills them."""

    def __init__(self, key: Any, workers: list[str]):
        self.key = key
        self.workers = list(workers)
        super().__init__(
            f"task {key!r} was running on {len(self.workers)} workers that died ({', '.join(self.workers)}); "
            "its workers kept dying, so it is not retried again (does it crash its process: a segfault, "
            "os._exit, running out of memory?)"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.workers))


class CenterUnreachableError(ConnectionError):
    """A client could not reach its Center within its timeout."""

    def __init__(self, address: str, seconds: float | None = None, cause: BaseException | None = None):
        self.address = address
        self.seconds = seconds
        within = f" within {seconds:.1f} s" if seconds is not None else ""
        because = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"could not reach the Center at {address}{within}{because}. Is it running (start one with `zdist-center`)? "
            "Is the address right (host and port as `zdist-center` printed them)? If the cluster uses CURVE "
            "security, is this client's public key authorized?"
        )

    def __reduce__(self):
        return (type(self), (self.address, self.seconds))


def noted(error: BaseException, key: Any, worker: str | None = None) -> BaseException:
    """``error``, with a note naming the key (and worker) whose computation raised it.

    >>> str(noted(ValueError('bad'), 'x-1', '127.0.0.1:9000').__notes__[0])
    "(while computing key 'x-1' on worker 127.0.0.1:9000 on the zdist cluster)"
    """
    if hasattr(error, "add_note"):
        where = f" on worker {worker}" if worker else ""
        note = f"(while computing key {key!r}{where} on the zdist cluster)"
        # One such note: the same error object can pass through twice (shell and
        # core), or fail every task of a batch (a lost session: 10^4 notes).
        if not any(str(n).startswith("(while computing key ") for n in getattr(error, "__notes__", ())):
            error.add_note(note)
    return error
