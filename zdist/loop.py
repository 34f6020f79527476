"""An asyncio loop on a daemon thread, for synchronous clients.

A synchronous API (``Pool``, ``zdist.dask.get``) hands its coroutines to
this loop with ``asyncio.run_coroutine_threadsafe``; that also works from
inside a running loop such as Jupyter's, where ``asyncio.run`` would fail.

>>> import asyncio
>>> thread = LoopThread()
>>> thread.run(asyncio.sleep(0, result=42))
42
>>> thread.stop()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable


class Later:
    """Call ``function`` once, ``delay`` seconds after the first :meth:`schedule` since it last ran.

    For work gathered in batches (reports, deletions): however often
    ``schedule()`` is called meanwhile, one call follows. Whoever runs the
    batch early calls :meth:`cancel` first.

    >>> async def demo():
    ...     calls = []
    ...     later = Later(0.01, lambda: calls.append('flush'))
    ...     later.schedule(); later.schedule()
    ...     await asyncio.sleep(0.05)
    ...     return calls
    >>> asyncio.run(demo())
    ['flush']
    """

    __slots__ = ("delay", "function", "_handle")

    def __init__(self, delay: float, function: Callable[[], Any]):
        self.delay = delay
        self.function = function
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        """Make sure the call comes (on the running loop), within ``delay``."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.function()


class LoopThread:
    def __init__(self, name: str = "zdist-loop"):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coroutine: Awaitable) -> concurrent.futures.Future:
        """Schedule ``coroutine`` on the loop; return a concurrent future of its result."""
        if self.loop.is_closed():
            raise RuntimeError("this client's event loop has been stopped; create a new client")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Awaitable, timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (or raise its error)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("LoopThread.run called from its own loop: it would deadlock")
        future = self.submit(coroutine)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # Since Python 3.11 this is the builtin TimeoutError: the coroutine's
            # own (an RPCTimeoutError naming its address) must come through as it is.
            if future.done():
                raise
            future.cancel()
            raise TimeoutError(f"operation did not finish within {timeout} s") from None

    def call(self, function: Any, *args: Any) -> Any:
        """Run a plain function on the loop thread and return its result."""

        async def wrapper() -> Any:
            return function(*args)

        return self.run(wrapper())

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is still running, stop the loop and join the thread."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            try:
                self.run(cancel_all(), timeout)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()
