"""Holding off Python's cyclic garbage collector while a client makes many task states at once.

The scheduling core's objects (:class:`~zdist.scheduling.TaskState`, their
sets and heaps) are freed by reference counting: the core breaks the only
cycles they form (inputs and dependents) when it forgets a task. Yet each
counts towards the collector's next run, and a full run walks every object
alive, so a client that makes 10,000 of them triggers several full runs
over all it holds. Both client shells make and change them in bulk under
:func:`gc_paused`. While a big computation runs, :func:`gc_frozen` keeps
its task states (and the graph) out of the collector's runs altogether: at
3.4 million tasks each full run walked them for 5 s, all on the client loop,
and at 10^7 tasks the loop fell silent past the session's 10 s.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_gc_lock = threading.Lock()
_gc_pausers = 0  # threads inside gc_paused() now
_gc_was_enabled = False  # whether the first of them found the collector on
_gc_freezers = 0  # computations inside gc_frozen() now
_gc_unfreeze = False  # whether the last of them should unfreeze (no freeze of the program's own was there)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while many long-lived objects are made at once.

    Why: a 13,000-task graph's scheduler state is some 100,000 small objects;
    each counts towards the collector's next run, and its full runs walk every
    object alive (the whole graph, again and again). Only for code that makes
    no cyclic garbage: garbage held meanwhile raises the peak memory (around
    ``dask.order``, whose temporaries have cycles, it did 4x). The collector is
    on again (if it was) when the last thread inside leaves.

    >>> import gc
    >>> with gc_paused():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Keep every object alive now out of the cyclic collector's runs until the block ends (``gc.freeze``).

    For a computation that holds millions of long-lived objects (a graph and
    its task states): the collector's full runs would walk them all, again
    and again, holding the GIL for seconds on the client loop. Objects are
    still freed by reference counting meanwhile; only cyclic garbage among
    them waits for the end of the block. Blocks may overlap (threads): the
    last to leave unfreezes, unless the program had frozen objects itself
    before the first entered (``gc.get_freeze_count()``), whose freeze stays.

    >>> import gc
    >>> with gc_frozen():
    ...     gc.get_freeze_count() > 0
    True
    >>> gc.get_freeze_count()
    0
    """
    global _gc_freezers, _gc_unfreeze
    with _gc_lock:
        if _gc_freezers == 0:
            _gc_unfreeze = gc.get_freeze_count() == 0
        _gc_freezers += 1
        gc.freeze()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_freezers -= 1
            if _gc_freezers == 0 and _gc_unfreeze:
                gc.unfreeze()
