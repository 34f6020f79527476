"""One summary of a cluster, made from the Center's ``info()`` reply: no I/O here.

``zdist status`` prints it (as a table, or as JSON with ``--json``) and the
dashboard serves it at ``/api/workers``: one row per worker (address, name,
cores, keys, bytes, memory against its limit, what it is running and has
run, restarts, status, when it was last heard from) and the totals. Ages are
counted on the Center's clock (``info()['time']``), so they are right when
the caller's clock is not.

>>> info = {"address": "127.0.0.1:8786", "time": 100.0, "nkeys": 3,
...         "workers": {"127.0.0.1:9000": {"name": "a", "ncores": 2, "nkeys": 3, "nbytes": 24, "last_seen": 99.5}}}
>>> summary = summarize(info)
>>> row = summary["workers"][0]
>>> row["name"], row["last_seen_age"], row["bytes_in_memory"]
('a', 0.5, 24)
>>> summary["totals"]["ncores"], summary["totals"]["nkeys"]
(2, 3)
"""
from __future__ import annotations

import math
import time
from typing import Any


def number(value: Any, default: float = 0) -> float:
    """``value`` if it is a finite int or float (not a bool), else ``default``: what a field from a peer is worth in a sum.

    >>> number(3), number(None), number(float("nan"), -1), number(True)
    (3, 0, -1, 0)
    """
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else default


def worker_row(address: str, worker: dict, now: float, task_rate: float = 0.0) -> dict:
    """One worker's row, from its entry in ``info()['workers']`` (the numbers its heartbeats carry)."""
    last_seen = number(worker.get("last_seen"), now)
    return {
        "address": address,
        "name": str(worker.get("name", address)),
        "ncores": worker.get("ncores"),
        "nkeys": worker.get("nkeys", 0),
        "nbytes": worker.get("nbytes", 0),
        "memory": worker.get("memory"),
        "memory_limit": worker.get("memory_limit"),
        "bytes_in_memory": worker.get("bytes_in_memory", worker.get("nbytes", 0)),
        "bytes_on_disk": worker.get("bytes_on_disk", 0),
        "spill_error": worker.get("spill_error") or "",  # a full disk, and what to do about it
        "executing": worker.get("executing", 0),  # running in its threads now
        "queued": worker.get("queued", 0),  # handed to it, waiting
        "tasks_done": worker.get("tasks_done", 0),
        "tasks_failed": worker.get("tasks_failed", 0),
        "task_rate": round(task_rate, 3),
        "bytes_fetched": worker.get("bytes_fetched", 0),  # from other workers
        "bytes_served": worker.get("bytes_served", 0),  # to other workers and clients
        "restarts": worker.get("restarts", 0),  # how often its nanny started it again
        "status": "retiring" if worker.get("retiring") else worker.get("status", "running"),
        "pid": worker.get("pid"),
        "last_seen": last_seen,
        "last_seen_age": round(max(0.0, now - last_seen), 3),
    }


_SUMMED = ("ncores", "nbytes", "memory", "bytes_in_memory", "bytes_on_disk", "executing", "queued", "tasks_done",
           "tasks_failed", "bytes_fetched", "bytes_served", "restarts")


def totals(rows: list[dict], nkeys: int | None = None) -> dict:
    """The cluster's totals over worker rows; ``nkeys`` is the Center's count of distinct keys (a key held twice counts once)."""
    out: dict = {"workers": len(rows)}
    out.update((field, sum(number(row[field]) for row in rows)) for field in _SUMMED)
    held = sum(number(row["nkeys"]) for row in rows)
    out["nkeys"] = held if nkeys is None else nkeys
    out["nkeys_held"] = held  # a key held by two workers counts twice
    out["task_rate"] = round(sum(number(row["task_rate"]) for row in rows), 3)
    return out


def summarize(info: dict, task_rates: dict | None = None) -> dict:
    """The Center's ``info()`` as one summary: ``{center, dashboard, time, heartbeat_timeout, workers, totals}``.

    ``task_rates`` (address → tasks a second) is what the dashboard measures
    between looks; without it every rate is 0.
    """
    now = number(info.get("time")) or time.time()
    rates = task_rates or {}
    rows = [worker_row(address, worker, now, rates.get(address, 0.0)) for address, worker in sorted(info.get("workers", {}).items())]
    return {
        "center": info.get("address"),
        "dashboard": info.get("dashboard"),
        "time": now,
        "heartbeat_timeout": info.get("heartbeat_timeout"),
        "workers": rows,
        "totals": totals(rows, info.get("nkeys")),
    }
