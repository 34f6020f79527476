"""``performance_report``: one self-contained HTML file of what the cluster did during a block of code.

>>> import os, tempfile
>>> from zdist import Pool, performance_report
>>> path = os.path.join(tempfile.mkdtemp(), 'report.html')
>>> with performance_report(path):
...     with Pool(processes=2) as pool:
...         total = sum(pool.gather(pool.map(abs, range(-50, 50))))
>>> total
2500
>>> html = open(path).read()
>>> 'zdist performance report' in html and '"abs"' in html
True

While the block runs, a recorder rides along with every client session of
this process (:mod:`zdist.session`): each look the session takes at the
Center anyway (every 0.25 s) is also a sample of every worker's memory
and counters, and once a second it asks each worker for the tasks it
finished (``get_task_log``, the dashboard's task stream). When a client
closes (a Pool, an Executor, a ``zdist.dask.get``) the recorder takes a last
look first, so a ``Pool()`` whose own cluster ends inside the block is
recorded to its end. The same data the dashboard serves, kept.

The file needs no network: its script and style are inline. It shows the
cluster's summary, the task stream (one row per worker, a bar per task),
durations by function, bytes moved between workers (fetched from peers,
served to them) and memory over time per worker.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from dask.utils import key_split

from . import session as _session

#: Most tasks kept in a report (the newest are dropped beyond it).
MAX_TASKS = 200_000
#: How often the recorder asks workers for their task logs.
LOG_INTERVAL = 1.0


#: What a worker's ``metrics`` answer adds to the last look, fresher than its heartbeat.
_COUNTERS = frozenset({"memory", "nbytes", "tasks_done", "tasks_failed", "bytes_fetched", "bytes_served", "executing"})


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


class Recorder:
    """What one ``performance_report`` has seen: info samples and task logs, per Center."""

    def __init__(self):
        self.started = time.time()
        self.stopped: float | None = None
        self.samples: list[dict] = []  # {time, center, workers: {address: {...}}}
        self.tasks: list[dict] = []
        self.first: dict[str, dict] = {}  # address -> its first sample (counters at the start)
        self.last: dict[str, dict] = {}
        self.names: dict[str, str] = {}
        self.centers: set[str] = set()
        self._since: dict[str, float] = {}  # worker -> stop time of the newest task taken
        self._last_poll: dict[str, float] = {}  # center -> loop time of the last task-log poll
        self._lock = threading.Lock()
        self._polling: asyncio.Lock | None = None  # made on the client loop, on first use

    # on the client loop -------------------------------------------------

    def on_info(self, session: Any, info: dict) -> None:
        """A look of ``session`` at its Center: keep the workers' numbers; now and then poll the task logs."""
        now = time.time()
        workers = {}
        for address, worker in info.get("workers", {}).items():
            entry = {k: worker.get(k) for k in ("memory", "nbytes", "nkeys", "ncores", "executing", "tasks_done", "tasks_failed", "bytes_fetched", "bytes_served", "bytes_on_disk", "memory_limit")}
            workers[address] = entry
            self.first.setdefault(address, entry)
            self.last[address] = entry
            self.names[address] = str(worker.get("name", address))
        with self._lock:
            self.centers.add(session.address)
            self.samples.append({"time": now, "center": session.address, "workers": workers})
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_poll.get(session.address, -1e9) >= LOG_INTERVAL:
            self._last_poll[session.address] = loop.time()
            task = asyncio.ensure_future(self.poll(session, list(workers)))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def poll(self, session: Any, workers: list | None = None) -> None:
        """Take the tasks each worker finished since the last poll."""
        if self._polling is None:
            self._polling = asyncio.Lock()
        async with self._polling:  # one poll at a time: each starts where the last one ended
            await self._poll(session, workers)

    async def _poll(self, session: Any, workers: list | None) -> None:
        if workers is None:
            workers = list(session.info.get("workers", {}))
        requests = [session.connections.get(a).request("get_task_log", {"since": self._since.get(a, self.started)}, timeout=2.0) for a in workers]
        results = await asyncio.gather(*requests, return_exceptions=True)
        for address, entries in zip(workers, results):
            if isinstance(entries, BaseException):
                continue
            newest = self._since.get(address, self.started)
            for key, start, stop, ok, *_ in entries:
                if start < self.started or stop <= self._since.get(address, 0.0):
                    continue
                if len(self.tasks) < MAX_TASKS:
                    self.tasks.append({"worker": address, "key": _key_text(key), "group": key_split(key), "start": start, "stop": stop, "ok": bool(ok)})
                newest = max(newest, stop)
            self._since[address] = newest

    async def before_release(self, session: Any) -> None:
        """A client of ``session`` is closing: one last look, before its cluster may go away."""
        try:
            info = await session.center.request("info", {}, timeout=2.0)
            workers = list(info.get("workers", {}))
            # The workers' own counters now, not as of their last heartbeat.
            fresh = await asyncio.gather(*(session.connections.get(a).request("metrics", {}, timeout=2.0) for a in workers), return_exceptions=True)
            for address, metrics in zip(workers, fresh):
                if isinstance(metrics, dict):
                    info["workers"][address].update({k: v for k, v in metrics.items() if k in _COUNTERS})
            self.on_info(session, info)
            await self.poll(session, workers)
        except Exception:  # noqa: BLE001 - the Center may be gone: keep what was seen
            pass

    # the report --------------------------------------------------------------

    def data(self) -> dict:
        """What the page shows, as plain JSON-able data."""
        stopped = self.stopped or time.time()
        tasks = sorted(self.tasks, key=lambda t: t["start"])
        groups: dict[str, dict] = {}
        for task in tasks:
            duration = max(0.0, task["stop"] - task["start"])
            group = groups.setdefault(task["group"], {"group": task["group"], "count": 0, "failed": 0, "total": 0.0, "max": 0.0})
            group["count"] += 1
            group["failed"] += 0 if task["ok"] else 1
            group["total"] += duration
            group["max"] = max(group["max"], duration)
        for group in groups.values():
            group["mean"] = group["total"] / group["count"]
        transfers = []
        for address, last in sorted(self.last.items()):
            first = self.first.get(address, {})
            transfers.append(
                {
                    "worker": address,
                    "name": self.names.get(address, address),
                    "fetched": _delta(last, first, "bytes_fetched"),
                    "served": _delta(last, first, "bytes_served"),
                }
            )
        memory = {}
        for sample in self.samples:
            for address, worker in sample["workers"].items():
                if isinstance(worker.get("memory"), (int, float)):  # absent until the worker's first heartbeat
                    memory.setdefault(address, []).append([sample["time"], worker["memory"], worker.get("nbytes") or 0])
        workers = sorted({t["worker"] for t in tasks} | set(self.last))
        return {
            "title": "zdist performance report",
            "started": self.started,
            "stopped": stopped,
            "centers": sorted(self.centers),
            "summary": {
                "duration": stopped - self.started,
                "workers": len(self.last),
                "cores": sum((w.get("ncores") or 0) for w in self.last.values()),
                "tasks": len(tasks),
                "failed": sum(1 for t in tasks if not t["ok"]),
                "task_seconds": sum(g["total"] for g in groups.values()),
                "bytes_fetched": sum(t["fetched"] for t in transfers),
                "peak_memory": max((m[1] for series in memory.values() for m in series), default=0),
            },
            "workers": [{"address": a, "name": self.names.get(a, a)} for a in workers],
            "tasks": tasks,
            "groups": sorted(groups.values(), key=lambda g: -g["total"]),
            "transfers": transfers,
            "memory": memory,
        }


def _delta(last: dict, first: dict, field: str) -> int:
    now, then = last.get(field), first.get(field)
    if not isinstance(now, (int, float)):
        return 0
    return int(max(0, now - (then if isinstance(then, (int, float)) and then <= now else 0)))


class performance_report:  # noqa: N801 - a context manager named like dask's
    """Write an HTML report of the cluster's work during the ``with`` block to ``filename``.

    Covers every Pool, Executor and ``zdist.dask.get`` of this process in
    the block (any Center): see :mod:`zdist.report`. The file opens in any
    browser without a network.
    """

    def __init__(self, filename: str | os.PathLike = "zdist-report.html"):
        self.filename = os.fspath(filename)
        self.recorder: Recorder | None = None

    def __enter__(self) -> "performance_report":
        self.recorder = Recorder()
        _session.recorders.add(self.recorder)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        recorder = self.recorder
        try:
            loop = _session.client_loop()
            sessions = [s for s in list(_session._sessions.values()) if not s.closed]
            if sessions:

                async def last_looks() -> None:
                    await asyncio.gather(*(recorder.before_release(s) for s in sessions))

                loop.run(last_looks(), 10)
        finally:
            _session.recorders.discard(recorder)
            recorder.stopped = time.time()
        write_report(self.filename, recorder.data())


def write_report(filename: str, data: dict) -> None:
    """The page: inline style, script and data (no request leaves the file)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "report.html"), encoding="utf-8") as f:
        template = f.read()
    payload = json.dumps(data, separators=(",", ":"), default=str).replace("</", "<\\/")
    html = template.replace("/*ZDIST_REPORT_DATA*/null", payload)
    with open(filename, "w", encoding="utf-8") as f:
        f.write(html)
