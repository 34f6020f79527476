"""Task controls: retries, priority, resources and worker restrictions, as plain data. No I/O.

Every client takes the same keyword arguments (``retries=``,
``priority=``, ``resources=``, ``workers=``, ``allow_other_workers=``)
and turns them into one :class:`Controls` with :func:`controls_from`,
which the scheduling core reads when it places a task
(:mod:`zdist.scheduling.dispatch`) and when a task fails. A task with no
controls carries ``None``: the common case costs nothing.

>>> c = controls_from(retries=2, resources={'GPU': 1})
>>> c.retries, dict(c.resources), c.restricts
(2, {'GPU': 1.0}, True)
>>> controls_from() is None
True
>>> controls_from(retries=-1)
Traceback (most recent call last):
...
ValueError: retries must be a non-negative integer, got -1
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

#: Priorities are folded into task ids (lower id runs first): ``id - priority << PRIORITY_SHIFT``.
PRIORITY_SHIFT = 40
PRIORITY_LIMIT = 2**20

#: The keyword arguments every client accepts, with their defaults.
CONTROL_NAMES = ("retries", "priority", "resources", "workers", "allow_other_workers")


@dataclass(frozen=True, slots=True)
class Controls:
    """How one task may run: see the module's docstring. Made by :func:`controls_from`, which checks the values."""

    retries: int = 0
    priority: int = 0
    resources: tuple = ()  # ((name, amount), ...), sorted
    workers: frozenset | None = None
    allow_other_workers: bool = False

    @property
    def restricts(self) -> bool:
        """Does it limit where the task may run (beyond the usual data-local choice)?"""
        return bool(self.resources) or (self.workers is not None and not self.allow_other_workers)

    @property
    def places(self) -> bool:
        """Does the core place it by its controls rather than by data alone?"""
        return bool(self.resources) or self.workers is not None

    @property
    def prefers(self) -> frozenset | None:
        """Workers to try first, when ``allow_other_workers`` lets the task go elsewhere too."""
        return self.workers if self.allow_other_workers else None

    def describe(self) -> str:
        """What this task waits for, in words, for a repr or a status line."""
        parts = []
        if self.resources:
            parts.append("resources " + ", ".join(f"{name}={amount:g}" for name, amount in self.resources))
        if self.workers is not None and not self.allow_other_workers:
            parts.append("one of the workers " + ", ".join(sorted(self.workers)))
        return " and ".join(parts) or "a worker"


def controls_from(
    retries: int | None = None,
    priority: int | float | None = None,
    resources: Mapping[str, float] | None = None,
    workers: Iterable[str] | str | None = None,
    allow_other_workers: bool | None = None,
    *,
    defaults: Controls | None = None,
    normalize: Any = None,
) -> Controls | None:
    """Check the task-control keywords and make a :class:`Controls` (``None`` when nothing is asked).

    ``normalize`` turns a worker address as the user wrote it into the
    cluster's form (``comm.normalize_address``).

    >>> controls_from(priority=5).priority
    5
    >>> controls_from(workers='127.0.0.1:9000').workers
    frozenset({'127.0.0.1:9000'})
    >>> controls_from(resources={'GPU': 'one'})
    Traceback (most recent call last):
    ...
    ValueError: resources must map names to non-negative numbers, e.g. {'GPU': 1}; got {'GPU': 'one'}
    """
    fields: dict[str, Any] = {}
    if retries is not None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        fields["retries"] = retries
    if priority is not None:
        if not isinstance(priority, (int, float)) or isinstance(priority, bool) or not -PRIORITY_LIMIT < priority < PRIORITY_LIMIT:
            raise ValueError(f"priority must be a number between {-PRIORITY_LIMIT} and {PRIORITY_LIMIT} (higher runs first), got {priority!r}")
        fields["priority"] = int(round(priority))
    if resources:
        if not isinstance(resources, Mapping) or not all(
            isinstance(name, str) and isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0
            for name, amount in resources.items()
        ):
            raise ValueError(f"resources must map names to non-negative numbers, e.g. {{'GPU': 1}}; got {resources!r}")
        fields["resources"] = tuple(sorted((name, float(amount)) for name, amount in resources.items() if amount))
    if workers is not None:
        names = [workers] if isinstance(workers, str) else list(workers)
        if not names or not all(isinstance(w, str) for w in names):
            raise ValueError(f"workers must be a worker address or a non-empty list of them, got {workers!r}")
        fields["workers"] = frozenset(normalize(w) if normalize else w for w in names)
    if allow_other_workers is not None:
        fields["allow_other_workers"] = bool(allow_other_workers)
    if not fields:
        return defaults
    return replace(defaults or Controls(), **fields)


def parse_resources(text: str) -> dict[str, float]:
    """``'GPU=2,MEM=64e9'`` (a worker's ``--resources``) as ``{'GPU': 2.0, 'MEM': 64e9}``.

    >>> parse_resources('GPU=2, MEM=64e9')
    {'GPU': 2.0, 'MEM': 64000000000.0}
    >>> parse_resources('GPU')
    Traceback (most recent call last):
    ...
    ValueError: resources look like NAME=AMOUNT[,NAME=AMOUNT...], e.g. GPU=2,MEM=64e9; got 'GPU'
    """
    resources: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, amount = part.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise ValueError(f"resources look like NAME=AMOUNT[,NAME=AMOUNT...], e.g. GPU=2,MEM=64e9; got {text!r}")
        resources[name.strip()] = value
    return resources


def fits(need: tuple, have: Mapping[str, float], used: Mapping[str, float]) -> bool:
    """Are ``need``'s resources free on a worker that has ``have`` and has ``used`` of them taken?

    >>> fits((('GPU', 1.0),), {'GPU': 2.0}, {'GPU': 1.0}), fits((('GPU', 1.0),), {'GPU': 1.0}, {'GPU': 1.0})
    (True, False)
    """
    return all(have.get(name, 0.0) - used.get(name, 0.0) >= amount for name, amount in need)


def could_fit(need: tuple, have: Mapping[str, float]) -> bool:
    """Could a worker that has ``have`` ever run a task that needs ``need``?"""
    return all(have.get(name, 0.0) >= amount for name, amount in need)
