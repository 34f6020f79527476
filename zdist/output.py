"""What tasks print and what nodes log: captured per task, kept in a ring, shown to the user.

Three pieces, used by nodes and clients alike (nothing here imports either):

- **Per-task capture.** A worker runs many tasks at once in its thread
  pool (and coroutine tasks on its loop), so ``sys.stdout`` cannot simply
  be swapped for one task. Instead :func:`install` puts a proxy in front of
  ``sys.stdout`` and ``sys.stderr`` once; the proxy looks up a
  :class:`contextvars.ContextVar` naming the task that runs in the current
  thread (or asyncio task) and appends what is written to that task's
  output, or passes it through to the real stream when no task is being
  captured. :func:`capture` sets that variable around one task: one
  ``ContextVar.set`` and ``reset`` per task, nothing allocated, so a task
  that prints nothing costs (next to) nothing. Log records emitted in a
  captured task join its output too (:class:`LogRing` does that).
- **A ring of recent log records** per process (:class:`LogRing`, on the
  root logger): ``get_logs`` of every node answers from it, for ``zdist
  logs`` and ``Pool.get_worker_logs``.
- **Showing forwarded output** on the client: :func:`show_output` prints
  each line with a ``[worker key]`` prefix, stdout to stdout and stderr to
  stderr.

>>> outputs = {}
>>> install()
>>> with capture('task-1', outputs):
...     print('hello from a task')
>>> outputs
{'task-1': [['stdout', 'hello from a task\\n']]}
>>> show_output('worker-0', outputs)
[worker-0 task-1] hello from a task
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import sys
import threading
import time
import warnings
from collections import deque
from typing import Any, Iterator

#: Log records each process keeps for ``get_logs``.
LOG_RING_SIZE = 1000

#: The task whose output is being captured here: ``[key, outputs]`` or None.
_current: contextvars.ContextVar = contextvars.ContextVar("zdist_task_output", default=None)


class _StreamProxy:
    """Stands in for ``sys.stdout`` or ``sys.stderr``: a captured task's writes go to its output, others through."""

    def __init__(self, stream: Any, name: str):
        self._zdist_stream = stream
        self._zdist_name = name

    def write(self, text: str) -> int:
        current = _current.get()
        if current is None:
            return self._zdist_stream.write(text)
        if text:
            _append(current, self._zdist_name, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _current.get() is None:
            self._zdist_stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer...
        return getattr(self._zdist_stream, name)


def _append(current: tuple, stream: str, text: str) -> None:
    key, outputs = current
    chunks = outputs.get(key)
    if chunks is None:
        outputs[key] = [[stream, text]]
    elif chunks[-1][0] == stream:
        chunks[-1][1] += text
    else:
        chunks.append([stream, text])


_install_lock = threading.Lock()


def install() -> None:
    """Put the capturing proxies in front of ``sys.stdout``/``sys.stderr`` (again if someone replaced them).

    Cheap to call often: a worker calls it for every batch whose output is
    forwarded, since a test harness or a user may have swapped the streams.
    """
    if type(sys.stdout) is _StreamProxy and type(sys.stderr) is _StreamProxy:
        return
    with _install_lock:
        if type(sys.stdout) is not _StreamProxy and sys.stdout is not None:
            sys.stdout = _StreamProxy(sys.stdout, "stdout")
        if type(sys.stderr) is not _StreamProxy and sys.stderr is not None:
            sys.stderr = _StreamProxy(sys.stderr, "stderr")
    install_log_ring()


@contextlib.contextmanager
def capture(key: Any, outputs: dict) -> Iterator[None]:
    """Within this block (this thread or asyncio task), what is printed or logged goes to ``outputs[key]``."""
    token = _current.set([key, outputs])
    try:
        yield
    finally:
        _current.reset(token)


def begin_batch(capture: list) -> Any:
    """Capture into ``capture``, a list ``[key, outputs]`` whose key the caller changes task by task; a token for :func:`end`.

    For the worker's task loop: one ContextVar set per batch rather than per task.
    """
    return _current.set(capture)


def end(token: Any) -> None:
    _current.reset(token)


# ------------------------------------------------------------------ the ring of log records


class LogRing(logging.Handler):
    """Keeps the last :data:`LOG_RING_SIZE` records of this process; a captured task's records also join its output."""

    def __init__(self, size: int = LOG_RING_SIZE):
        super().__init__(logging.NOTSET)
        self.records: deque = deque(maxlen=size)
        self.seq = 0
        self.setFormatter(logging.Formatter("%(message)s"))
        self._text = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - a record whose arguments do not format: keep what can be kept
            message = str(record.msg)
        self.seq += 1  # under the handler's lock (Handler.handle takes it)
        self.records.append(
            {"seq": self.seq, "time": record.created, "level": record.levelname, "name": record.name, "message": message, "thread": record.threadName}
        )
        current = _current.get()
        if current is not None:
            _append(current, "stderr", f"{record.levelname} {record.name}: {message}\n")

    def since(self, seq: int = 0, limit: int = LOG_RING_SIZE) -> list[dict]:
        with self.lock:
            records = [r for r in self.records if r["seq"] > seq]
        return records[-limit:] if limit else records


_ring: LogRing | None = None


def install_log_ring() -> LogRing:
    """This process's :class:`LogRing`, added to the root logger on first call."""
    global _ring
    if _ring is None:
        with _install_lock:
            if _ring is None:
                ring = LogRing()
                logging.getLogger().addHandler(ring)
                _ring = ring
    return _ring


def recent_logs(since: int = 0, limit: int = LOG_RING_SIZE) -> dict:
    """``{'seq': newest, 'records': [...]}``: this process's records after ``since`` (at most ``limit``)."""
    ring = install_log_ring()
    return {"seq": ring.seq, "records": ring.since(since, limit), "time": time.time()}


def format_record(record: dict, node: str = "") -> str:
    """One record as a line: ``[node] HH:MM:SS.mmm LEVEL name: message``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(record.get("time", 0))) + f".{int((record.get('time', 0) % 1) * 1000):03d}"
    prefix = f"[{node}] " if node else ""
    return f"{prefix}{stamp} {record.get('level', '')} {record.get('name', '')}: {record.get('message', '')}"


# ------------------------------------------------------------------ on the client


def show_output(worker: str, outputs: dict, names: Any = None) -> None:
    """Print forwarded output: every line as ``[worker key] line``, on this process's stdout or stderr.

    ``outputs`` is ``{key: [[stream, text], ...]}``; ``names`` maps a key to
    what to show for it (the dask key of a ``zdist.dask.get`` task).
    """
    for key, chunks in outputs.items():
        shown = key if names is None else names(key)
        prefix = f"[{worker} {shown}] "
        for stream, text in chunks:
            target = sys.stderr if stream == "stderr" else sys.stdout
            lines = text.splitlines()
            if lines:
                target.write("".join(f"{prefix}{line}\n" for line in lines))
                target.flush()


# ------------------------------------------------------------------ warnings raised in tasks

#: The task whose warnings are being recorded here: ``[key, found]`` or None.
_warning_task: contextvars.ContextVar = contextvars.ContextVar("zdist_task_warnings", default=None)
_original_showwarning: Any = None


def install_warning_capture() -> None:
    """Route warnings raised in a task (see :func:`record_warnings`) to that task's record instead of stderr. Once per process."""
    global _original_showwarning
    if _original_showwarning is not None:
        return
    with _install_lock:
        if _original_showwarning is None:
            _original_showwarning = warnings.showwarning
            warnings.showwarning = _showwarning


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    current = _warning_task.get()
    if current is None:
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    key, found = current
    found.setdefault(key, []).append([f"{category.__module__}:{category.__qualname__}", str(message), filename, lineno])


def record_warnings(capture: list) -> Any:
    """Record warnings into ``capture``, a list ``[key, found]`` whose key the caller changes task by task; a token for :func:`end_warnings`.

    Python shows a warning from one place once; forgetting which were
    shown (as changing the filters does) lets every batch report its own.
    """
    warnings._filters_mutated()  # type: ignore[attr-defined]
    return _warning_task.set(capture)


def end_warnings(token: Any) -> None:
    _warning_task.reset(token)


def reemit_warnings(found: list, key: Any, worker: str, registry: dict | None = None) -> None:
    """Raise again here, in the calling thread, the warnings a task raised on ``worker`` (``found`` as recorded).

    They pass through this process's warning filters (``-W error`` makes
    them errors, as it would locally); ``registry`` keeps one shown per
    place and message, as Python does for a module.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter('always')
    ...     reemit_warnings([['builtins:RuntimeWarning', 'divide by zero', 'f.py', 3]], 'task-1', 'worker-0')
    >>> str(caught[0].message), caught[0].category.__name__
    ('divide by zero (in task task-1 on worker-0)', 'RuntimeWarning')
    """
    for category_name, message, filename, lineno in found:
        warnings.warn_explicit(f"{message} (in task {key} on {worker})", _category(category_name), filename, lineno, registry=registry)


def _category(name: str) -> type:
    """The warning class named ``module:qualname``; UserWarning when this process cannot import it."""
    module_name, _, qualname = name.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:  # noqa: BLE001 - a warning class only the worker has
        return UserWarning
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning
