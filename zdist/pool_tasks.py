"""How a Pool's calls become tasks: keys, the initializer, default controls, chunks.

:class:`TaskMaker` is the part of a :class:`~zdist.Pool` (and of the
:class:`~zdist.Executor` over it) that turns ``f(*args)`` calls into
:class:`~zdist.scheduling.TaskState`\\ s wrapped in handles; the functions
below it are what a worker runs for a chunked map and for a pool's
initializer (they import nothing of the client, so that a worker
unpickling them loads no client code).

>>> maker = TaskMaker(prefix='abc')
>>> maker.key_prefix(len)
'len-abc-'
>>> [list(chunk) for chunk in chunks(range(5), 2)]
[[0, 1], [2, 3], [4]]
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Iterable, Iterator


class TaskMaker:
    """A pool's task keys (``{function name}-{prefix}-{n}``), its initializer and its default task controls.

    ``initializer(*initargs)`` runs once per worker process before the
    first task of this pool there: every function sent is wrapped (one
    wrapper per function, so that it is pickled and sent once).
    """

    def __init__(self, prefix: str, initializer: Callable | None = None, initargs: tuple = (), controls: Any = None):
        self.prefix = prefix
        self.counter = itertools.count()
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.controls = controls  # a zdist.scheduling.controls.Controls, or None
        self._wrapped: dict = {}

    def key_prefix(self, function: Callable) -> str:
        name = getattr(function, "__name__", "task")
        return f"{'lambda' if name == '<lambda>' else name}-{self.prefix}-"

    def next_key(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def wrap(self, function: Callable) -> Callable:
        """``function``, preceded once per worker process by the initializer (``function`` itself when there is none)."""
        if self.initializer is None or function in (run_chunk, run_star_chunk):
            return function
        wrapped = self._wrapped.get(function)
        if wrapped is None:
            token, initializer, initargs = self.prefix, self.initializer, self.initargs

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                run_initializer(token, initializer, initargs)
                return function(*args, **kwargs)

            wrapped.__name__ = getattr(function, "__name__", "task")
            self._wrapped[function] = wrapped
        return wrapped


# ---------------------------------------------------------------------------- run on workers

_initialized: set = set()
_initializing = threading.Lock()


def run_initializer(token: str, initializer: Callable, initargs: tuple) -> None:
    """Run a pool's initializer once in this worker process (every task of the pool calls this first)."""
    if token in _initialized:
        return
    with _initializing:
        if token not in _initialized:
            initializer(*initargs)
            _initialized.add(token)


def run_chunk(fn: Callable, chunk: list) -> list:
    """One task of a chunked map: ``fn`` over a chunk of single arguments (a plain list: cheap to scan and send)."""
    return [fn(item) for item in chunk]


def run_star_chunk(fn: Callable, chunk: list) -> list:
    return [fn(*args) for args in chunk]


# ---------------------------------------------------------------------------- chunks


def checked_chunksize(chunksize: Any) -> int:
    """``chunksize`` as given (None: 1), or a clear error."""
    if chunksize is None:
        return 1
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
    return chunksize


def chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    return iter(lambda: list(itertools.islice(it, size)), [])
