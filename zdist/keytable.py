"""The Center's key table: which worker holds which key, and how large it is. No I/O.

>>> table = KeyTable()
>>> table.add_holder('a:1'); table.add_holder('b:2')
>>> table.add('a:1', {'x': 8, 'y': 16}); table.add('b:2', ['x'])
>>> table.holders_of(['x', 'y', 'z']) == {'x': {'a:1', 'b:2'}, 'y': {'a:1'}, 'z': set()}
True
>>> table.held('a:1'), table.remove('a:1', ['y']), sorted(table.remove_holder('b:2'))
((2, 24), ['y'], ['x'])
"""
from __future__ import annotations

from itertools import repeat
from typing import Any, Iterable

from .protocol import SetMap


class KeyTable:
    """``who_has`` (key → holders) and ``has_what`` (holder → keys), kept in step, with sizes.

    Data model (a holder is a worker's address, a key anything hashable):

    ``who_has``   key → its holder's address (a ``str``) when one worker holds
                  it, or a ``set`` of two or more addresses. Most keys have
                  one holder, and a set costs 216 bytes a key; a key nobody
                  holds is absent.
    ``has_what``  holder → the set of keys it holds. Every holder added with
                  :meth:`add_holder` is here, with an empty set until it reports.
    ``nbytes``    key → the last non-zero size anyone reported for it.
    ``key_bytes`` holder → {key: its size as that holder last reported it}:
                  a holder's byte count is their sum, exact under any order of
                  reports (``nbytes`` keeps only the last size anyone reported).

    Invariant: ``key in has_what[h]`` exactly when ``h`` is (or is in)
    ``who_has[key]``. Only this class writes the tables; read them freely.
    """

    __slots__ = ("who_has", "has_what", "nbytes", "key_bytes", "_bytes_held")

    def __init__(self) -> None:
        self.who_has: dict[Any, str | set[str]] = {}
        self.has_what: dict[str, set] = {}
        self.nbytes: dict[Any, int] = {}
        self.key_bytes: dict[str, dict[Any, int]] = {}
        self._bytes_held: dict[str, int] = {}  # holder → sum of its key_bytes, kept as they change

    def __len__(self) -> int:
        """The number of keys someone holds."""
        return len(self.who_has)

    def __contains__(self, holder: object) -> bool:
        """Whether ``holder`` was added (and not removed since)."""
        return holder in self.has_what

    def held(self, holder: str) -> tuple[int, int]:
        """``(number of keys, bytes)`` that ``holder`` holds, by its own reports."""
        return len(self.has_what[holder]), self._bytes_held[holder]

    # -------------------------------------------------------------- changes

    def add_holder(self, holder: str) -> None:
        """A holder with no keys yet (a worker that registered)."""
        self.has_what[holder] = set()
        self.key_bytes[holder] = {}
        self._bytes_held[holder] = 0

    def remove_holder(self, holder: str) -> set:
        """Forget ``holder`` and its copies; returns the keys it held (some may have no holder left)."""
        keys = self.has_what.pop(holder, set())
        self.key_bytes.pop(holder, None)
        self._bytes_held.pop(holder, None)
        for key in keys:
            if self._drop_holder(key, holder):
                self.nbytes.pop(key, None)
        return keys

    def add(self, holder: str, keys: dict | list) -> None:
        """``holder`` holds ``keys``: a dict of key → size in bytes, or a plain list of keys (size 0).

        A key reported again (stored anew, another size) replaces its old size.
        Raises KeyError for a holder not added.
        """
        holdings = self.has_what[holder]
        held = self.key_bytes[holder]
        sizes = keys if isinstance(keys, dict) else dict.fromkeys(keys, 0)
        table = self.who_has
        nbytes_table = self.nbytes
        delta = 0
        for key, nbytes in sizes.items():
            nbytes = nbytes if isinstance(nbytes, int) and nbytes > 0 else 0
            holdings.add(key)
            delta += nbytes - held.get(key, 0)
            held[key] = nbytes
            holders = table.get(key)
            if holders is None:
                table[key] = holder
            elif type(holders) is str:
                if holders != holder:
                    table[key] = {holders, holder}
            else:
                holders.add(holder)
            if nbytes:
                nbytes_table[key] = nbytes
        self._bytes_held[holder] += delta

    def remove(self, holder: str, keys: Iterable) -> list:
        """``holder`` dropped ``keys``; returns those of them that nobody holds any more.

        A holder not added (gone already) changes nothing.
        """
        holdings = self.has_what.get(holder)
        if holdings is None:
            return []
        held = self.key_bytes[holder]
        gone = []
        for key in keys:
            if key in holdings:
                holdings.discard(key)
                self._bytes_held[holder] -= held.pop(key, 0)
            if self._drop_holder(key, holder):
                self.nbytes.pop(key, None)
                gone.append(key)
        return gone

    def _drop_holder(self, key: Any, holder: str) -> bool:
        """``holder`` no longer holds ``key``; True if nobody does any more (the key is gone)."""
        table = self.who_has
        holders = table.get(key)
        if holders is None:
            return False
        if type(holders) is str:
            if holders != holder:
                return False
            del table[key]
            return True
        holders.discard(holder)
        if len(holders) == 1:
            table[key] = next(iter(holders))
        return False

    # -------------------------------------------------------------- queries

    def holders(self, key: Any) -> set:
        """A new set of the addresses that hold ``key`` (empty if none)."""
        return _holders(self.who_has.get(key))

    def holders_of(self, keys: Iterable | None = None) -> SetMap:
        """``{key: a new set of its holders}``; an unknown key maps to an empty set. None: every key."""
        if keys is None:
            return SetMap((key, _holders(holders)) for key, holders in self.who_has.items())
        get = self.who_has.get
        return SetMap((key, _holders(get(key))) for key in keys)

    def holders_to_send(self, keys: Iterable | None = None) -> SetMap:
        """:meth:`holders_of` for a reply: the table's entries as they are, no set made per key.

        Encode it before the table changes (a handler's reply is encoded at
        once); a one-holder entry (a string) travels as a one-member set.
        Built by C loops (``zip``, ``map``), no Python code run a key: a
        query of 1,000 keys among 10^6 is spent in the table's memory.
        """
        if keys is None:
            return SetMap(self.who_has)
        keys = keys if type(keys) is list else list(keys)
        return SetMap(zip(keys, map(self.who_has.get, keys, repeat(()))))

    def keys_of(self, holder: str) -> set:
        """A new set of the keys ``holder`` holds (empty for a holder not added)."""
        return set(self.has_what.get(holder, ()))

    def has_what_sets(self) -> SetMap:
        """``{holder: a new set of its keys}`` for every holder."""
        return SetMap((holder, set(keys)) for holder, keys in self.has_what.items())

    def sizes(self, keys: Iterable | None = None) -> dict:
        """``{key: size in bytes}`` (0 if unknown); None: every key of known size."""
        if keys is None:
            return dict(self.nbytes)
        get = self.nbytes.get
        return {key: get(key, 0) for key in keys}


def _holders(entry: str | set | None) -> set:
    """A ``who_has`` entry as a new set of addresses."""
    if entry is None:
        return set()
    return {entry} if type(entry) is str else set(entry)
