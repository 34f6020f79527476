"""The Center's web dashboard: a live page and JSON for scripts, beside the ZeroMQ port.

A view of what the Center answers to ``info()``, nothing more: it never
reads the Center's tables, and the Center does not know it exists (beyond
the ``dashboard_url`` its ``info()`` reports). Whoever starts a Center
starts its dashboard: ``zdist-center`` and ``LocalCluster(dashboard=True)``
call :func:`serve_dashboard`, which serves, on the same asyncio loop as the
Center's ROUTER socket (aiohttp; ``pip install '.[dashboard]'`` from a clone):

- ``/`` — a page that polls the JSON below every second: the workers, the
  totals, tasks running and done per second as a plot (uPlot, shipped in
  ``zdist/static``, so the page needs no internet), and a task stream;
- ``/api/workers`` — one entry per worker: address, name, cores, keys and
  bytes held, process memory, tasks running and done, last heartbeat;
- ``/api/keys`` — keys and bytes per worker, plus the cluster's totals;
- ``/api/tasks`` — tasks done per second and tasks running, one point a
  second over the last minutes (``?window=SECONDS``, at most 600);
- ``/api/task-stream`` — which worker ran which key, when, for how long
  (``?after=SEQ`` for only the entries newer than an earlier answer's ``seq``);
- ``/metrics`` — the same numbers for Prometheus (:mod:`zdist.metrics`).
- ``/api/activity`` — per task group (one ``pool.map``, one layer of a dask
  graph) tasks queued, executing, done and erred, and the bytes workers
  fetched from each other, as the workers' heartbeats tell the Center
  (``Center.activity``, :mod:`zdist.taskprogress`).

Executing means running in a worker's thread now (at most its cores);
queued means handed to a worker and waiting there. Workers count both, and
done and erred, as each task starts and ends, and say so with every
heartbeat (every 0.5 s by default): the page follows a map as it runs.

What it costs the Center: one ``info()`` call a second, and one per HTTP
request. Task rates come from the heartbeats the Center receives anyway: each
worker's ``tasks_done`` counter, as of its ``last_seen``, and the deltas
between two readings spread over the time between them. Only while someone has
looked at the page or at ``/api/task-stream`` in the last
:data:`VIEW_TIMEOUT` seconds does it also ask each worker for its task log
(``get_task_log(since=...)``), once a second, without waiting on the answer
in anything the ZeroMQ side does.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable

try:
    from aiohttp import web
except ImportError:  # pragma: no cover - exercised by hiding aiohttp in a test
    web = None  # type: ignore[assignment]

from dask.utils import key_split

from .summary import number, summarize

logger = logging.getLogger(__name__)

#: Where the page, its script and the vendored chart library live.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Seconds of task-rate history kept (and the most ``/api/tasks`` returns).
HISTORY_SECONDS = 600
#: The task logs are polled while the page was viewed within this many seconds.
VIEW_TIMEOUT = 10.0
#: How often the sampler and the task-log poller wake.
INTERVAL = 1.0
#: Most task-stream entries kept in the Center, and taken from one worker per poll.
STREAM_LENGTH = 20_000
STREAM_PER_POLL = 2_000
#: How long the Center waits for a worker's task log.
LOG_TIMEOUT = 2.0
#: A worker's tasks/s in the table is averaged over its heartbeats of this many seconds.
RATE_WINDOW = 5.0

#: zdist is not on a package index: the extra is installed from a clone of its source.
INSTALL_HINT = "the zdist dashboard needs aiohttp: in zdist's source directory, pip install '.[dashboard]'  (or: pip install aiohttp)"


#: The cookie a browser keeps the dashboard's token in, once it opened the URL with ``?token=``.
TOKEN_COOKIE = "zdist_dashboard_token"


def needs_token(host: str) -> bool:
    """A dashboard served beyond loopback asks for a token (as Jupyter does); on loopback it does not.

    >>> needs_token('127.0.0.1'), needs_token('localhost'), needs_token('0.0.0.0'), needs_token('10.0.0.5')
    (False, False, True, True)
    """
    import ipaddress

    if host in ("localhost", "::1"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return True


def require_aiohttp() -> None:
    """Raise a clear :class:`ImportError` if aiohttp, which serves the dashboard, is missing."""
    if web is None:
        raise ImportError(INSTALL_HINT)


def key_text(key: Any) -> str:
    """A key as the page shows it: str keys as they are, others as their repr."""
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode(errors="replace")
    return repr(key)


async def serve_dashboard(center: Any, port: int = 0, host: str | None = None) -> "Dashboard":
    """Start the dashboard of a started, in-process Center; stop it before or with the Center.

    It calls the Center's ``info`` handler directly (same process, same loop:
    no request over the network, no key needed to reach the Center) and tells
    the Center its address, which ``info()['dashboard']`` then reports.
    """
    if host is None:  # beside the Center; a Center on Unix sockets (ipc://) is served on loopback
        host = "127.0.0.1" if center.host.startswith("ipc://") else center.host
    dashboard = await Dashboard(center.info, host=host, port=port, security=center.security, activity=center.activity).start()
    center.dashboard_url = dashboard.url
    return dashboard


class TaskRates:
    """Task rates from the workers' heartbeats: no I/O, fed what the Center's ``info()`` says.

    Each worker's ``tasks_done`` grows between heartbeats; :meth:`observe`
    spreads each increase evenly over the seconds since the last one (into
    one-second bins) and keeps a per-worker rate over :data:`RATE_WINDOW`.

    >>> rates = TaskRates(started=100.0)
    >>> rates.observe('w', {'tasks_done': 0, 'last_seen': 100.0})
    >>> rates.observe('w', {'tasks_done': 20, 'last_seen': 102.0})
    >>> rates.tasks_done_total, rates.done_bins, rates.worker_rate
    (20, {100: 10.0, 101: 10.0}, {'w': 10.0})
    """

    def __init__(self, started: float):
        self.started = started
        self.done_bins: dict[int, float] = {}  # second -> tasks done in it
        self.running: dict[int, int] = {}  # second -> tasks running when sampled
        self.heartbeats: dict[str, deque] = {}  # address -> (last_seen, tasks_done) of its recent heartbeats
        self.worker_rate: dict[str, float] = {}  # address -> tasks/s over its last RATE_WINDOW seconds
        self.tasks_done_total = 0  # every increase seen since the start

    def observe(self, address: str, worker: dict) -> None:
        """A worker's ``tasks_done`` as of its last heartbeat: turn its delta into rates. O(1)."""
        done = worker.get("tasks_done")
        now = worker.get("last_seen")
        if not isinstance(done, int) or not isinstance(now, (int, float)):
            return
        recent = self.heartbeats.get(address)
        if recent is None:
            self.heartbeats[address] = deque([(now, done)])
            return  # the first reading only sets the baseline
        then, done_then = recent[-1]
        if now <= then:
            return  # no heartbeat since the last reading
        if done < done_then:  # a smaller count: the worker restarted
            recent.clear()
            recent.append((then, 0))
            done_then = 0
        delta = done - done_then
        elapsed = max(now - then, 1e-6)
        recent.append((now, done))
        while len(recent) > 2 and recent[1][0] <= now - RATE_WINDOW:
            recent.popleft()
        first_time, first_done = recent[0]
        self.worker_rate[address] = (done - first_done) / max(now - first_time, 1e-6)
        if delta <= 0:
            return
        self.tasks_done_total += delta
        # Spread the delta evenly over [then, now] into one-second bins.
        per_second = delta / elapsed
        second = int(then)
        while second < now:
            overlap = min(now, second + 1) - max(then, second)
            if overlap > 0:
                self.done_bins[second] = self.done_bins.get(second, 0.0) + per_second * overlap
            second += 1

    def sample(self, workers: dict) -> None:
        """Once a second: the tasks running now (from the Center's ``info()['workers']``); forget old seconds and gone workers."""
        now = time.time()
        self.running[int(now)] = int(sum(number(info.get("executing")) for info in workers.values()))
        oldest = int(now) - HISTORY_SECONDS - 5
        for table in (self.done_bins, self.running):
            if table and min(table) < oldest:
                for second in [s for s in table if s < oldest]:
                    del table[second]
        for table in (self.heartbeats, self.worker_rate):
            for address in [a for a in table if a not in workers]:
                del table[address]

    def tasks_data(self, window: int = 300) -> dict:
        """``/api/tasks``: tasks done per second and tasks running, over the last ``window`` seconds."""
        now = time.time()
        window = max(10, min(int(window), HISTORY_SECONDS))
        # The newest second still gets counts from heartbeats on their way; stop a second short.
        end = int(now - 1.0)
        seconds = list(range(max(end - window + 1, int(self.started)), end + 1))
        return {
            "time": now,
            "interval": INTERVAL,
            "times": seconds,
            "done_per_s": [round(self.done_bins.get(s, 0.0), 3) for s in seconds],
            "running": [self.running.get(s) for s in seconds],
            "tasks_done_total": self.tasks_done_total,
        }


class Dashboard:
    """Serves a dashboard of the Center whose ``info()`` is ``info``, on ``host:port``.

    Served beyond loopback (``host`` not 127.x), it asks for a token: its
    :attr:`url` (which ``zdist-center`` prints as ``Dashboard at ...``)
    carries ``?token=...``; a browser that opened it keeps the token in a
    cookie, and scripts may send ``?token=`` or ``Authorization: token ...``.
    ``token=True`` asks for one on loopback too, ``token='...'`` sets it.

    ``info`` is a callable that returns the Center's ``info()`` answer, or an
    awaitable of it: a Center's own ``info`` method, or ``rpc(address).info``
    for a Center in another process. ``security`` is the key with which to ask
    the workers for their task logs. ``url`` is known once started; a port
    already in use falls back to a free one, with a warning, as dask's
    dashboard does.
    """

    def __init__(
        self,
        info: Callable[[], dict | Awaitable[dict]],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        security: Any = None,
        activity: Callable[[], dict | Awaitable[dict]] | None = None,
        token: bool | str | None = None,
    ):
        require_aiohttp()
        if token is None:
            token = needs_token(host)
        self.token: str | None = token if isinstance(token, str) else (secrets.token_urlsafe(24) if token else None)
        self.info = info
        self.activity = activity  # the Center's activity() (task groups, transfers), or an rpc proxy's
        self.host = host
        self.port = port
        self.security = security
        self.runner: Any = None
        self.started = time.time()
        self.rates = TaskRates(self.started)
        # Task stream.
        self.stream: deque = deque(maxlen=STREAM_LENGTH)  # dicts with a growing "seq"
        self._seq = 0
        self._log_since: dict[str, float] = {}  # address -> stop time of the newest entry taken
        self._viewed = -math.inf  # monotonic time the page (or /api/task-stream) was last asked for
        self._wake = asyncio.Event()  # binds to the loop on first use
        self._tasks: list[asyncio.Task] = []
        self._peers: Any = None
        self._index_html = b""

    # -------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str | None:
        """``http://HOST:PORT/`` once started, else None."""
        if self.runner is None:
            return None
        return f"http://{self.host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    async def start(self) -> "Dashboard":
        from .rpc import ConnectionPool

        with open(os.path.join(STATIC_DIR, "dashboard.html"), "rb") as f:
            self._index_html = f.read()
        app = web.Application(middlewares=[self._check_token] if self.token else [])
        app.router.add_get("/", self.handle_index)
        app.router.add_get("/api/workers", self.handle_workers)
        app.router.add_get("/api/keys", self.handle_keys)
        app.router.add_get("/api/tasks", self.handle_tasks)
        app.router.add_get("/api/task-stream", self.handle_task_stream)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/api/activity", self.handle_activity)
        app.router.add_static("/static/", STATIC_DIR, show_index=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        host = self.host
        try:
            await web.TCPSite(runner, host, self.port).start()
        except OSError as exc:
            if not self.port:
                await runner.cleanup()
                raise
            logger.warning("dashboard port %d on %s is not free (%s); serving the dashboard on a free port instead", self.port, host, exc.strerror or exc)
            try:
                await web.TCPSite(runner, host, 0).start()
            except BaseException:
                await runner.cleanup()
                raise
        self.runner = runner
        self.port = runner.addresses[0][1]
        self._peers = ConnectionPool(timeout=LOG_TIMEOUT, security=self.security)
        self._tasks = [asyncio.ensure_future(self._sample_forever()), asyncio.ensure_future(self._poll_logs_forever())]
        logger.info("dashboard at %s", self.url)
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    # -------------------------------------------------------------- bookkeeping

    async def read_info(self) -> dict:
        """The Center's ``info()`` now; each reading also notes every worker's ``tasks_done``."""
        info = self.info()
        if inspect.isawaitable(info):
            info = await info
        for address, worker in info.get("workers", {}).items():
            self.rates.observe(address, worker)
        return info

    async def _sample_forever(self) -> None:
        while True:
            try:
                workers = (await self.read_info()).get("workers", {})
                self.rates.sample(workers)
                for address in [a for a in self._log_since if a not in workers]:
                    del self._log_since[address]
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never let the dashboard take the Center down
                logger.exception("dashboard sampler failed")
            await asyncio.sleep(INTERVAL)

    # -------------------------------------------------------------- task stream

    @property
    def viewed(self) -> bool:
        return time.monotonic() - self._viewed < VIEW_TIMEOUT

    def _mark_viewed(self) -> None:
        was = self.viewed
        self._viewed = time.monotonic()
        if not was:
            self._wake.set()

    async def _poll_logs_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self.viewed:
                continue
            try:
                await self.poll_task_logs()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                logger.exception("dashboard could not poll the task logs")

    async def poll_task_logs(self) -> int:
        """Ask every worker for the tasks it finished since the last poll; return how many came."""
        workers = (await self.read_info()).get("workers", {})
        now = time.time()
        addresses = list(workers)
        requests = []
        for address in addresses:
            # After a pause (nobody looking), start from the last minute, not from where we left off.
            since = max(self._log_since.get(address, 0.0), now - 60.0)
            requests.append(self._peers.get(address).request("get_task_log", {"since": since}, timeout=LOG_TIMEOUT))
        results = await asyncio.gather(*requests, return_exceptions=True)
        added = 0
        for address, result in zip(addresses, results):
            if isinstance(result, BaseException):
                logger.debug("task log of %s: %s", address, result)
                if not isinstance(result, asyncio.TimeoutError):
                    self._peers.remove(address)
                continue
            entries = [e for e in result if isinstance(e, (list, tuple)) and len(e) >= 4][-STREAM_PER_POLL:]
            if not entries:
                continue
            name = workers[address].get("name", address)
            newest = self._log_since.get(address, 0.0)
            entries.sort(key=lambda e: number(e[2]))
            for key, start, stop, ok, *_ in entries:
                start, stop = number(start), number(stop)
                self._seq += 1
                self.stream.append(
                    {
                        "seq": self._seq,
                        "worker": address,
                        "name": name,
                        "key": key_text(key),
                        "group": key_split(key),
                        "start": start,
                        "stop": stop,
                        "duration": max(0.0, stop - start),
                        "ok": bool(ok),
                    }
                )
                newest = max(newest, stop)
                added += 1
            # get_task_log answers entries with stop >= since: step past the newest one taken.
            self._log_since[address] = newest + 1e-6
        return added

    # -------------------------------------------------------------- data for the API

    def workers_data(self, info: dict) -> dict:
        """``/api/workers`` from the Center's ``info()``: :func:`zdist.summary.summarize`, with the task rates measured here."""
        return summarize(info, self.rates.worker_rate)

    def keys_data(self, info: dict) -> dict:
        """``/api/keys`` from the Center's ``info()``."""
        workers = {
            address: {"name": str(worker.get("name", address)), "nkeys": worker.get("nkeys", 0), "nbytes": worker.get("nbytes", 0)}
            for address, worker in sorted(info.get("workers", {}).items())
        }
        return {
            "time": time.time(),
            "workers": workers,
            "total": {
                "nkeys": info.get("nkeys", 0),
                "nkeys_held": sum(number(w["nkeys"]) for w in workers.values()),
                "nbytes": sum(number(w["nbytes"]) for w in workers.values()),
            },
        }

    def task_stream_data(self, after: int | None = None, limit: int = 1000) -> dict:
        limit = max(1, min(int(limit), STREAM_LENGTH))
        if after is None:
            entries = list(self.stream)[-limit:]
        else:
            entries = []
            for entry in reversed(self.stream):  # newest first; stop at what the caller has
                if entry["seq"] <= after or len(entries) >= limit:
                    break
                entries.append(entry)
            entries.reverse()
        return {"time": time.time(), "seq": self._seq, "polling": self.viewed, "tasks": entries}

    # -------------------------------------------------------------- HTTP handlers

    @web.middleware if web is not None else (lambda f: f)
    async def _check_token(self, request: Any, handler: Any) -> Any:
        """Every request shows the token: in the query, a cookie set by an earlier one, or an Authorization header."""
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or request.headers.get("Authorization", "").removeprefix("token ").strip()
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise web.HTTPForbidden(text="this zdist dashboard asks for its token: open the URL the Center printed at start-up (Dashboard at http://...?token=...)")
        response = await handler(request)
        if request.query.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
        return response

    @staticmethod
    def _json(data: Any) -> Any:
        return web.json_response(data, dumps=_dumps, headers={"Cache-Control": "no-store"})

    async def handle_index(self, request: Any) -> Any:
        self._mark_viewed()
        return web.Response(body=self._index_html, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"})

    async def handle_workers(self, request: Any) -> Any:
        return self._json(self.workers_data(await self.read_info()))

    async def handle_keys(self, request: Any) -> Any:
        return self._json(self.keys_data(await self.read_info()))

    async def handle_tasks(self, request: Any) -> Any:
        try:
            window = int(request.query.get("window", 300))
        except ValueError:
            raise web.HTTPBadRequest(text="window must be an integer number of seconds") from None
        return self._json(self.rates.tasks_data(window))

    async def handle_activity(self, request: Any) -> Any:
        answer: dict = {"groups": {}, "touched": {}, "transfers": []}
        if self.activity is not None:
            answer = self.activity()
            if inspect.isawaitable(answer):
                answer = await answer
        return self._json(activity_data(answer, await self.read_info()))

    async def handle_task_stream(self, request: Any) -> Any:
        self._mark_viewed()
        try:
            after = request.query.get("after")
            after = int(after) if after not in (None, "") else None
            limit = int(request.query.get("limit", 1000))
        except ValueError:
            raise web.HTTPBadRequest(text="after and limit must be integers") from None
        return self._json(self.task_stream_data(after, limit))

    async def handle_metrics(self, request: Any) -> Any:
        """Prometheus metrics (:mod:`zdist.metrics`) of the Center's ``info()`` as of this scrape."""
        from .metrics import render

        try:
            body, content_type = render(await self.read_info())
        except ImportError as exc:
            raise web.HTTPNotImplemented(text=str(exc)) from None
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def activity_data(activity: dict, info: dict) -> dict:
    """``/api/activity``: task groups with a label and their counts; transfers between workers by name."""
    names = {address: str(worker.get("name", address)) for address, worker in info.get("workers", {}).items()}
    groups = []
    for group, counts in activity.get("groups", {}).items():
        groups.append({"group": group, "label": key_split(group), "last_change": activity.get("touched", {}).get(group), **counts})
    transfers = [{**t, "from_name": names.get(t["from"], t["from"]), "to_name": names.get(t["to"], t["to"])} for t in activity.get("transfers", [])]
    return {
        "time": time.time(),
        "groups": groups,
        "waiting": sum(number(g.get("waiting")) for g in groups),  # submitted, still in the clients
        "transfers": transfers,
        "bytes_moved": sum(number(t.get("bytes")) for t in transfers),
    }


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))

