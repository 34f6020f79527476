"""Memory limits of workers: parsing them, and the thresholds in one place.

A worker given a memory limit acts at fractions of it (the defaults are
dask.distributed's, so that people who come from it find what they know):

========= ======== ==================================================================
threshold default  what happens
========= ======== ==================================================================
target    0.60     the data's own size (``sizeof``) above this: least recently used
                   values move to disk (spill)
spill     0.70     the process's memory (RSS) above this: spill values until it is
                   below ``target`` again, or nothing is left in memory
pause     0.80     RSS above this: the worker starts no new task (it still serves
                   ``get_data`` and deletions); below it again, it resumes
terminate 0.95     RSS above this: the nanny kills the worker and starts it again
========= ======== ==================================================================

Any of them may be ``None`` (off). docs/memory.md says more.

>>> parse_memory_limit('4GB'), parse_memory_limit('4GiB'), parse_memory_limit(1000)
(4000000000, 4294967296, 1000)
>>> parse_memory_limit('0.5', total=8_000_000_000), parse_memory_limit('auto', total=8_000_000_000, nworkers=4)
(4000000000, 2000000000)
>>> parse_memory_limit(None) is None
True
>>> parse_memory_limit('10XB')
Traceback (most recent call last):
...
ValueError: memory limit '10XB': unknown unit 'XB'; use a byte count, a size such as 4GB or 4GiB, a fraction of this machine's memory such as 0.5, or auto
>>> MemoryThresholds(pause=0.9).pause, MemoryThresholds().target
(0.9, 0.6)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

#: Units a memory size may be written in (case does not matter): decimal and binary.
UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

_HOW = "use a byte count, a size such as 4GB or 4GiB, a fraction of this machine's memory such as 0.5, or auto"


def total_memory() -> int:
    """This machine's memory in bytes (what ``auto`` and fractions are of)."""
    import psutil

    return int(psutil.virtual_memory().total)


def parse_memory_limit(value: Any, *, total: int | None = None, nworkers: int = 1) -> int | None:
    """A memory limit in bytes, from ``4GB``, ``4GiB``, ``123456``, ``0.5`` (of ``total``) or ``auto``.

    ``auto`` is ``total / nworkers``; ``total`` defaults to this machine's
    memory. ``None``, ``''``, ``'none'`` and ``'off'`` mean no limit (None).
    Zero, a negative number, an unknown unit, or a limit above the
    machine's memory is refused with a :class:`ValueError` that says why.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, bool):
        raise TypeError(f"memory limit {value!r}: {_HOW}")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return int((total or total_memory()) // max(1, nworkers))
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value)
        if value.strip().startswith("-"):
            raise ValueError(f"memory limit {text}: a limit must be positive")
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"memory limit {text}: not a size; {_HOW}")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in UNITS:
            raise ValueError(f"memory limit {text}: unknown unit {match.group(2)!r}; {_HOW}")
    else:
        raise TypeError(f"memory limit {value!r}: {_HOW}")
    if not number > 0:
        raise ValueError(f"memory limit {text}: a limit must be positive (leave it out for no limit)")
    if unit == "" and number <= 1:
        return int((total or total_memory()) * number)  # a fraction of the machine
    if unit == "" and number != int(number):
        raise ValueError(f"memory limit {text}: a byte count is a whole number (a fraction is at most 1)")
    return int(number * UNITS[unit])


def parse_ncores(value: Any) -> int:
    """A positive number of cores, or a :class:`ValueError` that says what is wrong.

    >>> parse_ncores('3')
    3
    >>> parse_ncores(0)
    Traceback (most recent call last):
    ...
    ValueError: --ncores 0: a worker needs at least one core (leave --ncores out to use all of this machine's)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not re.fullmatch(r"\s*-?[0-9]+\s*", value)):
        raise ValueError(f"--ncores {value!r}: not a whole number of cores")
    n = int(value)
    if n < 1:
        raise ValueError(f"--ncores {value}: a worker needs at least one core (leave --ncores out to use all of this machine's)")
    return n


@dataclasses.dataclass(frozen=True)
class MemoryThresholds:
    """Fractions of a worker's memory limit at which it acts (None: never); see the module's table."""

    target: float | None = 0.60
    spill: float | None = 0.70
    pause: float | None = 0.80
    terminate: float | None = 0.95

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"memory threshold {field.name}={value!r}: a fraction of the limit above 0 and at most 1, or None (off)")

    @classmethod
    def of(cls, value: MemoryThresholds | dict | None) -> MemoryThresholds:
        """The thresholds from an instance, a dict of some of them, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown memory thresholds {sorted(unknown)}; they are target, spill, pause and terminate")
            return cls(**value)
        raise TypeError(f"memory thresholds: a MemoryThresholds or a dict, got {type(value).__name__}")


def parse_fraction(value: str) -> float | None:
    """A threshold from the command line: a fraction such as ``0.7``, or ``off``.

    >>> parse_fraction('0.7'), parse_fraction('off')
    (0.7, None)
    """
    if value.strip().lower() in ("off", "none", "false"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a fraction such as 0.7, or off") from None
    if not 0 < number <= 1:
        raise ValueError(f"{value!r}: a fraction of the memory limit above 0 and at most 1, or off")
    return number
