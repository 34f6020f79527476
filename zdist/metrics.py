"""Prometheus metrics of a cluster, from the Center's ``info()``: what ``/metrics`` on the dashboard's port serves.

A view, like the dashboard: it reads one ``info()`` answer (the Center's
tables as of the scrape, heartbeats included) and never the Center's
internals. :class:`InfoCollector` is a prometheus-client custom collector
over that answer, made per scrape, so nothing is counted twice and no
counter is mutated from two threads: the Center's own numbers (each
worker's ``tasks_done``, ``bytes_fetched``...) are the counters.

>>> info = {'nkeys': 3, 'sessions': 1, 'time': 100.0, 'workers': {'127.0.0.1:9000': {
...     'name': 'w0', 'ncores': 2, 'nkeys': 3, 'nbytes': 300, 'last_seen': 99.5, 'tasks_done': 7}}}
>>> text = render(info)[0].decode()
>>> print([line for line in text.splitlines() if line.startswith('zdist_worker_tasks_done_total')][0])
zdist_worker_tasks_done_total{name="w0",worker="127.0.0.1:9000"} 7.0
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

INSTALL_HINT = "zdist's /metrics needs prometheus-client: pip install '.[dashboard]' from a clone of zdist (or: pip install prometheus-client)"

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised by hiding the package in a test
    CollectorRegistry = None  # type: ignore[assignment,misc]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


#: Per-worker series: (metric name, kind, help, how to read it from the worker's info).
_PER_WORKER = [
    ("zdist_worker_cores", "gauge", "Threads for tasks on the worker", lambda w: w.get("ncores")),
    ("zdist_worker_keys", "gauge", "Keys the worker holds", lambda w: w.get("nkeys")),
    ("zdist_worker_executing", "gauge", "Tasks running on the worker now", lambda w: w.get("executing")),
    ("zdist_worker_process_memory_bytes", "gauge", "Resident memory of the worker process", lambda w: w.get("memory")),
    ("zdist_worker_memory_limit_bytes", "gauge", "The worker's memory limit (absent: none)", lambda w: w.get("memory_limit") or None),
    ("zdist_worker_tasks_done", "counter", "Tasks the worker finished successfully", lambda w: w.get("tasks_done")),
    ("zdist_worker_tasks_failed", "counter", "Tasks that failed on the worker", lambda w: w.get("tasks_failed")),
    ("zdist_worker_fetched_bytes", "counter", "Bytes the worker fetched from its peers", lambda w: w.get("bytes_fetched")),
    ("zdist_worker_served_bytes", "counter", "Bytes the worker sent to peers and clients", lambda w: w.get("bytes_served")),
    ("zdist_worker_spilled", "counter", "Values the worker spilled to disk", lambda w: w.get("spilled")),
    ("zdist_worker_restarts", "counter", "Times the worker's nanny started it again", lambda w: w.get("restarts")),
]


class InfoCollector:
    """A prometheus-client collector over one ``info()`` answer of the Center."""

    def __init__(self, info: dict):
        self.info = info

    def collect(self) -> Iterator[Any]:
        info = self.info
        workers = info.get("workers", {}) or {}
        now = _number(info.get("time")) or time.time()
        totals = [
            ("zdist_workers", "Workers registered with the Center", len(workers)),
            ("zdist_cores", "Threads for tasks on all workers", sum(_number(w.get("ncores")) or 0 for w in workers.values())),
            ("zdist_keys", "Distinct keys held on the cluster", _number(info.get("nkeys")) or 0),
            ("zdist_sessions", "Client sessions open with the Center", _number(info.get("sessions")) or 0),
        ]
        for name, help_text, value in totals:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        labels = ["worker", "name"]
        rows = [([address, str(w.get("name", address))], w) for address, w in sorted(workers.items())]
        for name, kind, help_text, read in _PER_WORKER:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=labels)
            for label_values, worker in rows:
                value = _number(read(worker))
                if value is not None:
                    family.add_metric(label_values, value)
            yield family
        held = GaugeMetricFamily("zdist_worker_bytes", "Bytes of data the worker holds, in memory and spilled to disk", labels=[*labels, "where"])
        for label_values, worker in rows:
            on_disk = _number(worker.get("bytes_on_disk")) or 0.0
            in_memory = _number(worker.get("bytes_in_memory"))
            if in_memory is None:
                in_memory = max(0.0, (_number(worker.get("nbytes")) or 0.0) - on_disk)
            held.add_metric([*label_values, "memory"], in_memory)
            held.add_metric([*label_values, "disk"], on_disk)
        yield held
        age = GaugeMetricFamily("zdist_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat reached the Center", labels=labels)
        for label_values, worker in rows:
            seen = _number(worker.get("last_seen"))
            if seen is not None:
                age.add_metric(label_values, max(0.0, now - seen))
        yield age


def render(info: dict) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``info`` and its content type."""
    if CollectorRegistry is None:
        raise ImportError(INSTALL_HINT)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InfoCollector(info))
    return generate_latest(registry), CONTENT_TYPE_LATEST
