"""The copies the Center keeps of keys asked for more than once, and who should make a missing one. No I/O.

>>> from zdist.keytable import KeyTable
>>> table = KeyTable()
>>> for address in ('a:1', 'b:2', 'c:3'): table.add_holder(address)
>>> table.add('a:1', {'x': 8})
>>> replicas = Replicas()
>>> replicas.want({'x': 2})
>>> replicas.copies_to_make(['x'], table, {'a:1': {'nbytes': 8}, 'b:2': {'nbytes': 0}, 'c:3': {'nbytes': 100}})
{('b:2', None): ['x']}
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from .keytable import KeyTable


class Replicas:
    """Copies wanted of keys: when a holder of one dies, another worker should copy it.

    Data model:

    ``wanted``   key → copies wanted; only keys asking for more than one.
    ``session``  key → the client session its copies belong to (deleted when
                 it closes), for keys asked for within one.

    ``session``'s keys are a subset of ``wanted``'s.
    """

    __slots__ = ("wanted", "session")

    def __init__(self) -> None:
        self.wanted: dict[Any, int] = {}
        self.session: dict[Any, str] = {}

    def __len__(self) -> int:
        """The number of keys with copies wanted."""
        return len(self.wanted)

    def want(self, keys: dict, session: str | None = None) -> None:
        """``{key: n}``: keep n copies of each (1: no extra copies); see :func:`check_copies`."""
        check_copies(keys)
        for key, n in keys.items():
            if n > 1:
                self.wanted[key] = n
                if session is not None:
                    self.session[key] = session
                else:
                    self.session.pop(key, None)
            else:
                self.forget(key)

    def forget(self, key: Any) -> None:
        """No copies of ``key`` wanted any more (nobody holds it, or it was asked for once)."""
        self.wanted.pop(key, None)
        self.session.pop(key, None)

    def forget_session(self, session: str) -> None:
        """``session`` closed: its keys need no more copies."""
        if self.session:
            for key in [key for key, owner in self.session.items() if owner == session]:
                del self.session[key]
                self.wanted.pop(key, None)

    def copies_to_make(self, keys: Iterable, table: KeyTable, workers: dict[str, dict]) -> dict[tuple[str, str | None], list]:
        """Which workers should copy which of ``keys`` to restore the copies wanted of them.

        ``{(address, session or None): [keys]}``: a worker that lacks a copy
        fetches it from a surviving holder (peer to peer). The least loaded
        workers (by their ``'nbytes'`` in ``workers``, plus what this plan
        adds) are picked first; a retiring worker never, since it would leave
        with the copy. A key no one holds any more cannot be restored.
        """
        plan: dict[tuple[str, str | None], list] = defaultdict(list)
        load = {address: info["nbytes"] for address, info in workers.items()}
        for key in keys:
            n = self.wanted.get(key)
            holders = table.holders(key)
            if not n or not holders:
                continue
            candidates = sorted((a for a, info in workers.items() if a not in holders and not info.get("retiring")), key=lambda a: load[a])
            for address in candidates[: max(0, n - len(holders))]:
                plan[address, self.session.get(key)].append(key)
                load[address] += table.nbytes.get(key, 0)
        return dict(plan)


def check_copies(keys: dict) -> None:
    """Raise ValueError unless ``keys`` maps each key to a positive int (the copies wanted)."""
    for key, n in keys.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"replicas must be a positive integer, got {n!r} for {key!r}")
