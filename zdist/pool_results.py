"""Where a Pool's calling threads wait for the loop thread, and take values out of finished tasks.

The loop thread alone changes task states (:mod:`zdist.scheduling`); a
calling thread that waits for some (``map``, ``gather``, ``result()``)
sleeps on the pool's one condition, which the loop notifies after each
step that finished something, and looks again.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from .handles import RemoteData, _call_each, _fresh, _ItemData, _local_value
from .output import reemit_warnings
from .protocol import Serialized, deserialize
from .scheduling import NO_VALUE, events
from .scheduling.state import ERRED

if TYPE_CHECKING:
    from .pool import Pool


class Results:
    """A pool's waiting: one condition for all its handles (``changed``), the warnings raised here again, the callback thread."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.changed = threading.Condition()
        self.warned = False  # some task raised a warning: results are looked at for them
        self.warning_registry: dict = {}  # warnings raised again here: one per place and message, as Python does
        self._callbacks: ThreadPoolExecutor | None = None

    def values(self, handles: list[RemoteData], timeout: float | None) -> list:
        for handle in handles:
            if not isinstance(handle, RemoteData):
                raise TypeError(f"gather takes RemoteData handles, got {type(handle).__name__}")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait(handles, timeout, raise_errors=True)
        missing = list({h._task: None for h in handles if _local_value(h) is NO_VALUE})  # one per task: a chunk's items share theirs
        if missing:
            self.pool._shell.post(events.Wanted(missing), urgent=True)
            self.until(lambda: all(ts.value is not NO_VALUE or ts.state == ERRED for ts in missing), deadline, timeout)
            for ts in missing:
                if ts.value is NO_VALUE and ts.state == ERRED:
                    raise _fresh(ts.error)
        self.reemit_warnings(handles)
        values = []
        loaded: dict = {}  # task -> its value, deserialized once (a chunk's, for its many items)
        for handle in handles:
            ts = handle._task
            value = loaded.get(ts, NO_VALUE)
            if value is NO_VALUE:
                value = _local_value(handle)
                if value is NO_VALUE:
                    value = ts.value
                if isinstance(value, Serialized):
                    value = deserialize(value.kind, value.blob, value.buffers)
                loaded[ts] = value
            values.append(value[handle._index] if type(handle) is _ItemData else value)
        return values

    def reemit_warnings(self, handles: list[RemoteData]) -> None:
        """Raise here the warnings the tasks of ``handles`` raised on their workers, once each (see :mod:`zdist.output`)."""
        if not self.warned:
            return
        for handle in handles:
            owner = handle._task.handle() if handle._warnings is None else handle  # an item's warnings are its chunk's
            if owner is not None and owner._warnings is not None:
                (worker, found), owner._warnings = owner._warnings, None
                reemit_warnings(found, owner.key, worker, self.warning_registry)

    def wait(self, handles: list[RemoteData], timeout: float | None, raise_errors: bool, progress: bool = False) -> None:
        """Wait until every handle is ready; raise the first failure (in order) once all before it are done."""
        bar = progress_bar(len(handles), "tasks") if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        position = [0]  # handles[:position] are done: each look starts past them

        def all_done() -> bool:
            i, count = position[0], len(handles)
            while i < count and handles[i].ready():
                if raise_errors:
                    error = handles[i]._error()
                    if error is not None:
                        self.reemit_warnings([handles[i]])
                        raise _fresh(error)
                i += 1
            position[0] = i
            if bar is not None:
                bar.update(i - bar.n)
            return i == count

        try:
            self.until(all_done, deadline, timeout)
        finally:
            if bar is not None:
                bar.close()

    def until(self, condition: Callable[[], bool], deadline: float | None, timeout: float | None) -> None:
        with self.changed:
            while not condition():
                if self.pool._state != "running":
                    raise RuntimeError("the Pool was closed while waiting for results")
                if self.pool._shell.fatal is not None:
                    raise self.pool._shell.fatal
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"results not ready within {timeout} s")
                self.changed.wait(0.5 if remaining is None else min(remaining, 0.5))

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def run_callbacks(self, handle: RemoteData, callbacks: list) -> None:
        """Run done-callbacks in order on the pool's callback thread: one may call ``result()``, which needs the loop."""
        with self.changed:
            if self._callbacks is None:
                self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="zdist-callbacks")
        self._callbacks.submit(_call_each, handle, callbacks)


def progress_bar(total: int, unit: str) -> Any:
    """A tqdm bar that suits where we run: a widget in Jupyter, text in a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.2)
