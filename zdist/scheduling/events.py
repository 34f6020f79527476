"""What the scheduling core takes in (events) and gives out (commands): plain data, no I/O.

A client shell turns replies, Center news and calls of its user into
events, hands them to :meth:`~zdist.scheduling.Scheduler.handle`, and
carries out the commands it gets back with ``rpc``.

>>> Delete('127.0.0.1:9000', ['x', 'y'], nbytes=16)
Delete(worker='127.0.0.1:9000', keys=['x', 'y'], nbytes=16)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- events


@dataclass(slots=True)
class Submit:
    """New tasks, in priority order (earlier first). ``sent_to``/``batch_id``: the shell sent them itself."""

    tasks: list
    sent_to: str | None = None
    batch_id: int | None = None


@dataclass(slots=True)
class DataPlaced:
    """Values put on workers by the client (scatter) or found there (inputs it did not make)."""

    tasks: list


@dataclass(slots=True)
class BatchDone:
    """A worker answered a batch: one reply ``[key, 'ok', nbytes(, value)]`` or ``[key, 'error', exception]`` per task."""

    worker: str
    batch_id: int
    replies: list


@dataclass(slots=True)
class BatchFailed:
    """A batch got no answer: its worker may be dying (``ConnectionError``), or could not read it."""

    worker: str
    batch_id: int
    error: BaseException


@dataclass(slots=True)
class WorkersSeen:
    """The Center's list of live workers: ``{address: {'ncores': n, 'pid': p, 'status': s}}``."""

    workers: dict
    center_id: str | None = None
    heartbeat_timeout: float = 5.0


@dataclass(slots=True)
class Released:
    """The client dropped one reference to each of ``tasks`` (a handle, or an output it has)."""

    tasks: list


@dataclass(slots=True)
class Cancel:
    """The client cancels ``tasks``: those not sent to a worker yet fail with ``CancelledError``, and what waits for them."""

    tasks: list


@dataclass(slots=True)
class Wanted:
    """The client wants the values of ``tasks`` here: fetch them (recompute what was lost)."""

    tasks: list


@dataclass(slots=True)
class Fetched:
    """Values fetched from ``worker``: ``{key: value}``."""

    worker: str
    values: dict


@dataclass(slots=True)
class FetchFailed:
    worker: str
    keys: list
    error: BaseException


@dataclass(slots=True)
class HoldersFound:
    """The Center's answer to :class:`AskWhoHas`: ``{key: [address, ...]}``."""

    holders: dict


@dataclass(slots=True)
class Close:
    """The client is done: delete everything it still has on the cluster.

    After a failure the records may have missed a copy (inputs fetched by a
    task that then failed): every live worker is told to delete ``sweep``
    (default: every key the core still knows).
    """

    sweep: list | None = None


# ---------------------------------------------------------------- commands


@dataclass(slots=True)
class SendBatch:
    """Run ``tasks`` on ``worker``; results of at most ``return_limit`` bytes come back with the answer."""

    worker: str
    batch_id: int
    tasks: list
    who_has: dict = field(default_factory=dict)
    return_limit: int = 0


@dataclass(slots=True)
class Delete:
    worker: str
    keys: list
    nbytes: int = 0


@dataclass(slots=True)
class DeleteEverywhere:
    """Delete keys that the Center keeps several copies of, wherever they are."""

    keys: list


@dataclass(slots=True)
class Fetch:
    worker: str
    keys: list


@dataclass(slots=True)
class Finished:
    """These tasks are done; their results are on the cluster (small ones also in ``value``)."""

    tasks: list


@dataclass(slots=True)
class Delivered:
    """The value of a wanted task is here, in its ``value``."""

    task: Any


@dataclass(slots=True)
class Erred:
    """A task failed; its ``error`` says why."""

    task: Any


@dataclass(slots=True)
class AskWhoHas:
    keys: list


@dataclass(slots=True)
class PollCenter:
    """Ask the Center which workers live now rather than at the next interval."""
