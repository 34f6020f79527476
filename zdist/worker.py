"""The Worker: serves its local ``data`` dict and runs functions on it.

Inputs it lacks it fetches peer to peer, after asking the Center who has
them; every key it gains or drops it reports to the Center (batched: one
message per turn of the event loop, however many keys changed).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
import traceback
import uuid
import warnings
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from .errors import MissingDataError, SessionClosedError
from .loop import Later
from .node import Node
from .protocol import Ref, error_fields, serialize
from .rpc import CommClosedError, ConnectionPool, RPCTimeoutError, rebuild_exception, unwrap_value
from .comm import normalize_address

logger = logging.getLogger(__name__)

try:  # dask knows the true size of NumPy, pandas and container values
    from dask.sizeof import sizeof as _sizeof
except ImportError:  # pragma: no cover - dask is a dependency
    _sizeof = sys.getsizeof


def sizeof(value: Any) -> int:
    """Bytes a value holds: buffer sizes for NumPy/pandas, ``sys.getsizeof`` otherwise."""
    try:
        return int(_sizeof(value))
    except Exception:
        return sys.getsizeof(value, 0)


def substitute(obj: Any, data: dict) -> Any:
    """``obj`` with every :class:`Ref` replaced by the value it names (any depth)."""
    cls = type(obj)
    if cls is Ref:
        try:
            return data[obj.key]
        except KeyError:
            # Deleted between the batch's check and this thread running it: missing
            # data (which a scheduler recovers from), not the user's KeyError.
            raise MissingDataError([obj.key], "deleted on this worker before the task that needs it ran") from None
    if cls is tuple or cls is list:
        return cls(substitute(item, data) for item in obj)
    if cls is dict:
        return {key: substitute(value, data) for key, value in obj.items()}
    return obj


def _run_tasks(tasks: list, data: dict, deadline: float | None = None, session: str | None = None, released: Any = ()) -> list:
    """Run a batch in one thread-pool job: [(ok, value_or_error, nbytes, start, stop)].

    A task of a client ``session`` found in ``released`` (the session was
    closed meanwhile) is not run: it fails with :class:`SessionClosedError`.

    With a ``deadline`` (a ``time.time()``: the batch runs on the event
    loop), stop once it has passed: the results then cover only the first
    tasks (at least one). Also stop *before* a task that failed only because
    it runs on a loop's thread (``asyncio.run`` inside it): the caller runs
    it again in the thread pool.
    """
    results = []
    for key, function, args, kwargs, deps in tasks:
        if deadline is not None and results and results[-1][4] > deadline:
            break
        start = time.time()
        if session is not None and session in released:
            results.append((False, SessionClosedError(session, "the task had not started"), "", start, start))
            continue
        try:
            if deps:
                args = substitute(args, data)
                kwargs = substitute(kwargs, data) if kwargs else kwargs
            value = function(*args, **kwargs) if kwargs else function(*args)
        except Exception as exc:  # noqa: BLE001 - the user's function failed; report it
            if deadline is not None and _refuses_running_loop(exc):
                with warnings.catch_warnings():  # its coroutine, never awaited here, is awaited in the pool
                    warnings.simplefilter("ignore", RuntimeWarning)
                    exc.__traceback__ = None
                    del exc
                break
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None))
            results.append((False, exc, tb, start, time.time()))
            continue
        results.append((True, value, sizeof(value), start, time.time()))
    return results


def _refuses_running_loop(exc: BaseException) -> bool:
    """asyncio's error for ``asyncio.run`` (or ``run_until_complete``) on a thread whose loop runs."""
    return isinstance(exc, RuntimeError) and ("running event loop" in str(exc) or "loop is already running" in str(exc))


class Worker(Node):
    """A node that holds data and runs functions on it.

    >>> import asyncio
    >>> from zdist.center import Center
    >>> async def demo():
    ...     async with Center() as center:
    ...         async with Worker(center.address) as worker:
    ...             worker.update_data(data={'x': 1, 'y': 2})
    ...             status, meta = await worker.compute(function=lambda a, b: a + b, keys=['x', 'y'], key='z')
    ...             return status, meta['key'], worker.data['z']
    >>> asyncio.run(demo())
    (b'OK', 'z', 3)
    """

    def __init__(
        self,
        center_address: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ncores: int | None = None,
        name: str | None = None,
        local_dir: str | None = None,
        heartbeat_interval: float = 0.5,
        peer_timeout: float = 60.0,
        **kwargs: Any,
    ):
        super().__init__(host, port, **kwargs)
        self.center_address = normalize_address(center_address)
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.local_dir = local_dir
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self.data: dict[Any, Any] = {}
        self.nbytes: dict[Any, int] = {}
        self.executor: ThreadPoolExecutor | None = None
        self.peers: ConnectionPool | None = None
        self.registered = asyncio.Event()
        self.tasks_done = 0
        self.tasks_failed = 0
        self.executing = 0
        self.bytes_fetched = 0
        self.bytes_served = 0
        self.task_log: deque = deque(maxlen=10_000)  # (key, start, stop, ok)
        self._fetching: dict[Any, asyncio.Future] = {}
        # Keys stored on behalf of a client session (results, scattered
        # values, copies fetched for its tasks); untagged keys are not here.
        self.key_session: dict[Any, str] = {}
        self.session_keys: dict[str, set] = {}
        # Sessions released lately (oldest first), to refuse their late requests.
        self.released_sessions: OrderedDict[str, float] = OrderedDict()
        self._fast_runs: dict[Any, int] = {}  # function -> fast runs seen (-1: seen slow)
        self._report_add: dict[Any, int] = {}
        self._report_remove: set = set()
        # Batched on a short timer: one message for however many keys changed
        # meanwhile, and the Center (one more process on the same cores) is
        # not woken in the middle of every task's round trip. Ops whose
        # callers may ask the Center right away flush before replying.
        self._report_later = Later(REPORT_DELAY, self.flush_reports)
        self._background: list[asyncio.Task] = []
        self.handlers.update(
            {
                "get_data": self.get_data,
                "update_data": self.update_data,
                "delete_data": self.delete_data,
                "compute": self.compute,
                "compute_batch": self.compute_batch,
                "keys": self.keys,
                "metrics": self.metrics,
                "get_task_log": self.get_task_log,
                "fetch_keys": self.fetch_keys,
                "release_session": self.release_session,
            }
        )

    # -------------------------------------------------------------- lifecycle

    async def on_start(self) -> None:
        if self.local_dir:
            os.makedirs(self.local_dir, exist_ok=True)
        if self.name is None:
            self.name = self.address
        self.executor = ThreadPoolExecutor(self.ncores, thread_name_prefix=f"zdist-worker-{self.port}")
        self.peers = ConnectionPool(timeout=self.peer_timeout, security=self.security)
        self._background.append(asyncio.ensure_future(self._stay_registered()))

    async def on_stop(self) -> None:
        for task in self._background:
            task.cancel()
        if self.registered.is_set() and self.peers is not None:
            try:
                self.flush_reports()
                await self.peers.get(self.center_address).request("unregister", {"address": self.address}, timeout=1.0)
            except Exception as exc:  # the Center may be gone already
                logger.info("could not unregister from %s: %s", self.center_address, exc)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.peers is not None:
            self.peers.close()

    async def _register(self) -> None:
        center = self.peers.get(self.center_address)
        args = {
            "address": self.address,
            "ncores": self.ncores,
            "name": self.name,
            "keys": dict(self.nbytes),
            "pid": os.getpid(),
            **({"sessions": list(self.session_keys)} if self.session_keys else {}),
            **({"public_key": self.security.public_key_text} if self.security else {}),
        }
        # Cleared when the snapshot is taken, not when the Center answers:
        # keys gained or dropped meanwhile (e.g. a session the Center
        # releases as we register) are still reported afterwards.
        self._report_add.clear()
        self._report_remove.clear()
        await center.request("register", args, timeout=max(2.0, self.heartbeat_interval * 4))

    async def _stay_registered(self) -> None:
        """Register, then heartbeat; register again whenever the Center forgets us."""
        said_waiting = False
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                    self.registered.set()
                    self.flush_reports()  # what changed while registering
                    logger.info("registered with center at %s", self.center_address)
                    said_waiting = False
                await asyncio.sleep(self.heartbeat_interval)
                answer = await self.peers.get(self.center_address).request(
                    "heartbeat", {"address": self.address, **self._heartbeat_metrics()}, timeout=max(2.0, self.heartbeat_interval * 4)
                )
                if answer == "unknown":
                    logger.warning("center at %s does not know this worker (restarted?); registering again", self.center_address)
                    self.registered.clear()
            except (RPCTimeoutError, CommClosedError, ConnectionError) as exc:
                if not said_waiting:
                    logger.warning("center at %s is not answering (%s); will keep trying", self.center_address, exc)
                    said_waiting = True
                self.registered.clear()
                # A fresh socket so that stale requests queued for a dead Center are dropped.
                self.peers.remove(self.center_address)
                await asyncio.sleep(min(1.0, self.heartbeat_interval))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("unexpected error talking to the center")
                await asyncio.sleep(1.0)

    def _heartbeat_metrics(self) -> dict:
        return {"executing": self.executing, "tasks_done": self.tasks_done, "nkeys_local": len(self.data), "memory": _rss()}

    # -------------------------------------------------------------- reporting to the Center

    def _gained(self, key: Any, nbytes: int) -> None:
        self._report_remove.discard(key)
        self._report_add[key] = nbytes
        self._schedule_report()

    def _dropped(self, key: Any) -> None:
        if self._report_add.pop(key, None) is None:
            self._report_remove.add(key)
        self._schedule_report()

    def _schedule_report(self) -> None:
        self._report_later.schedule()

    def flush_reports(self) -> None:
        """Send the keys gained and dropped since the last report, as one message each."""
        self._report_later.cancel()
        if not self.registered.is_set() or self.peers is None:
            return  # registration sends every key we hold
        center = self.peers.get(self.center_address)
        if self._report_remove:
            center.send("remove_keys", address=self.address, keys=list(self._report_remove))
            self._report_remove = set()
        if self._report_add:
            center.send("add_keys", address=self.address, keys=self._report_add)
            self._report_add = {}

    def _store(self, key: Any, value: Any, nbytes: int | None = None, session: str | None = None) -> int:
        if nbytes is None:
            nbytes = sizeof(value)
        self.data[key] = value
        self.nbytes[key] = nbytes
        if session is not None or self.key_session:
            self._tag(key, session)
        self._gained(key, nbytes)
        return nbytes

    # -------------------------------------------------------------- client sessions

    def _tag(self, key: Any, session: str | None) -> None:
        """``key`` now belongs to ``session`` (None: to no session); the last store decides."""
        old = self.key_session.pop(key, None)
        if old is not None:
            keys = self.session_keys[old]
            keys.discard(key)
            if not keys:
                del self.session_keys[old]
        if session is not None:
            self.key_session[key] = session
            self.session_keys.setdefault(session, set()).add(key)

    def _check_session(self, session: Any) -> None:
        """Refuse a request of a session that is not a string, or that was released."""
        if session is None:
            return
        if not isinstance(session, str) or not session:
            raise TypeError(f"session must be a non-empty string (a session id) or None, got {type(session).__name__} {session!r:.40}")
        if session in self.released_sessions:
            raise SessionClosedError(session, f"worker {self.address} refuses its late request")

    def release_session(self, session: str) -> str:
        """A client session closed: delete its keys here and drop its tasks not yet started.

        Tasks of it that finish later are answered with
        :class:`SessionClosedError` and their results not kept; later
        requests of it are refused with that error. The Center sends this to
        every worker when it closes a session.
        """
        if not isinstance(session, str) or not session:
            raise TypeError(f"session must be a non-empty string (a session id), got {type(session).__name__} {session!r:.40}")
        released = self.released_sessions
        released[session] = time.time()
        released.move_to_end(session)
        while len(released) > RELEASED_SESSIONS_KEPT:
            released.popitem(last=False)
        keys = self.session_keys.pop(session, ())
        for key in keys:
            del self.key_session[key]
            if key in self.data:
                del self.data[key]
                self.nbytes.pop(key, None)
                self._dropped(key)
        if keys:
            logger.info("client session %s closed: deleted its %d keys", session, len(keys))
            self.flush_reports()
        return "OK"

    # -------------------------------------------------------------- data ops

    def get_data(self, keys: Iterable) -> dict:
        """``{key: value}`` for keys held here; a missing key is an error naming it."""
        data = self.data
        missing = [key for key in keys if key not in data]
        if missing:
            raise MissingDataError(missing, f"not held by worker {self.address}")
        out = {}
        for key in keys:
            try:
                out[key] = serialize(data[key])
            except Exception as exc:
                raise TypeError(f"the value of key {key!r} cannot be serialized to send it: {type(exc).__name__}: {exc}") from None
        self.bytes_served += sum(self.nbytes.get(key, 0) for key in keys)
        return out

    def update_data(self, data: dict, report: bool = True, session: str | None = None) -> tuple:
        """Store values; answers ``(b'OK', {'nbytes': {key: bytes}})``.

        With ``session``, the values belong to that client session: they are
        deleted when it closes.
        """
        if not isinstance(data, dict):
            raise TypeError(f"update_data needs a dict of key: value, got {type(data).__name__}")
        self._check_session(session)
        sizes = {}
        for key, value in data.items():
            if report:
                sizes[key] = self._store(key, value, session=session)
            else:
                self.data[key] = value
                sizes[key] = self.nbytes[key] = sizeof(value)
                if session is not None or self.key_session:
                    self._tag(key, session)
        if report:
            self.flush_reports()  # tell the Center before the caller hears back
        return (b"OK", {"nbytes": sizes})

    def delete_data(self, keys: Iterable, report: bool = True) -> str:
        """Forget values; keys not held here are ignored."""
        for key in keys:
            if key in self.data:
                del self.data[key]
                self.nbytes.pop(key, None)
                if self.key_session:
                    self._tag(key, None)
                if report:
                    self._dropped(key)
        return "OK"

    def keys(self) -> list:
        return list(self.data)

    def metrics(self) -> dict:
        return {
            "address": self.address,
            "name": self.name,
            "ncores": self.ncores,
            "nkeys": len(self.data),
            "nbytes": sum(self.nbytes.values()),
            "executing": self.executing,
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "bytes_fetched": self.bytes_fetched,
            "bytes_served": self.bytes_served,
            "ops_served": dict(self.ops_served),
            "memory": _rss(),
            "pid": os.getpid(),
            "sessions": len(self.session_keys),
        }

    def get_task_log(self, since: float = 0.0) -> list:
        return [entry for entry in self.task_log if entry[2] >= since]

    # -------------------------------------------------------------- peer to peer

    async def fetch_keys(self, keys: Iterable) -> str:
        """Copy keys here from the workers that hold them (to restore replicas)."""
        await self.gather_deps(list(keys))
        return "OK"

    async def _ask_center(self, op: str, args: dict) -> Any:
        """A request to the Center that waits out a Center restart (up to ``peer_timeout``)."""
        deadline = time.monotonic() + self.peer_timeout
        while True:
            try:
                return await self.peers.get(self.center_address).request(op, args, timeout=max(2.0, self.heartbeat_interval * 4))
            except (RPCTimeoutError, CommClosedError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"center {self.center_address} did not answer {op!r} for {self.peer_timeout} s") from exc
                self.peers.remove(self.center_address)
                await asyncio.sleep(0.2)

    async def gather_deps(self, keys: Iterable, who_has: dict | None = None, session: str | None = None) -> None:
        """Make sure every key is held here, fetching missing ones from peers.

        ``who_has`` (key → worker addresses), where the caller knows, saves
        asking the Center; the Center is asked when those holders fail.
        Copies fetched for a client ``session``'s tasks belong to it.
        """
        missing = [key for key in dict.fromkeys(keys) if key not in self.data]
        if not missing:
            return
        waiting = [self._fetching[key] for key in missing if key in self._fetching]
        to_fetch = [key for key in missing if key not in self._fetching]
        if to_fetch:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            for key in to_fetch:
                self._fetching[key] = future
            try:
                await self._fetch(to_fetch, who_has, session)
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved
                raise
            finally:
                for key in to_fetch:
                    if self._fetching.get(key) is future:
                        del self._fetching[key]
        if waiting:
            await asyncio.gather(*waiting)
        still = [key for key in missing if key not in self.data]
        if still:
            raise MissingDataError(still, f"fetched but then deleted on worker {self.address}")

    async def _fetch(self, keys: list, hints: dict | None = None, session: str | None = None) -> None:
        who_has: dict = {}
        if hints:
            for key in keys:
                holders = hints.get(key)
                if holders:
                    who_has[key] = holders
        unknown = [key for key in keys if key not in who_has]
        if unknown:
            who_has.update(await self._ask_center("who_has", {"keys": unknown}))
        tried: dict[Any, set] = {key: set() for key in keys}
        remaining = list(keys)
        for _attempt in range(3):
            by_worker: dict[str, list] = {}
            lost = []
            for key in remaining:
                holders = [w for w in who_has.get(key, ()) if w not in tried[key] and w != self.address]
                if not holders:
                    lost.append(key)
                    continue
                by_worker.setdefault(random.choice(holders), []).append(key)
            if lost:
                raise MissingDataError(lost, f"needed on worker {self.address}")
            results = await asyncio.gather(*(self._fetch_from(w, ks) for w, ks in by_worker.items()), return_exceptions=True)
            remaining = []
            for (address, ks), result in zip(by_worker.items(), results):
                if isinstance(result, BaseException):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    logger.info("fetching %d keys from %s failed: %s", len(ks), address, result)
                    for key in ks:
                        tried[key].add(address)
                    remaining.extend(ks)
                    continue
                if session is not None and session in self.released_sessions:
                    continue  # released while fetching: keep no copy (its tasks will not run)
                for key, value in result.items():
                    nbytes = self._store(key, value, session=session)
                    self.bytes_fetched += nbytes
            if not remaining:
                return
            who_has = await self._ask_center("who_has", {"keys": remaining})
        raise MissingDataError(remaining, f"every holder failed to send them to worker {self.address}")

    async def _fetch_from(self, address: str, keys: list) -> dict:
        """get_data from a peer; give up early if the Center drops that peer meanwhile."""
        if self.security is not None and address not in self.security.server_keys and address not in self.peers.connections:
            # The peer may have a key pair of its own: the Center knows its public key.
            self.security.learn(await self.peers.get(self.center_address).request("workers", {}))
        request = self.peers.get(address).request("get_data", {"keys": keys})
        absent = 0
        while True:
            done, _ = await asyncio.wait({request}, timeout=max(1.0, self.heartbeat_interval * 2))
            if done:
                return request.result()
            try:
                workers = await self.peers.get(self.center_address).request("ncores", {}, timeout=5.0)
            except Exception:
                continue
            # Absent several times in a row: a restarted Center lists workers
            # again only as they re-register.
            absent = absent + 1 if address not in workers else 0
            if absent >= 3:
                request.cancel()
                self.peers.remove(address)
                raise ConnectionError(f"peer {address} died while sending {len(keys)} keys")

    # -------------------------------------------------------------- compute

    async def compute(
        self,
        function: Callable,
        keys: Iterable = (),
        key: Any = None,
        args: Iterable = (),
        kwargs: dict | None = None,
        return_value: int = 0,
        session: str | None = None,
    ) -> tuple:
        """Run ``function(*[data[k] for k in keys], *args, **kwargs)`` and keep the result.

        Answers ``(b'OK', {'key': key, 'nbytes': n})``; with ``return_value=N``
        a result of at most N bytes also comes back as ``'value'``. With
        ``session``, the result belongs to that client session (see
        :meth:`compute_batch`).
        """
        if not callable(function):
            raise TypeError(f"compute needs a callable function, got {type(function).__name__}")
        keys = list(keys)
        if key is None:
            key = f"{getattr(function, '__name__', 'result')}-{uuid.uuid4().hex}"
        task = [key, function, tuple(Ref(k) for k in keys) + tuple(args), kwargs or {}, keys]
        # Reported to the Center before the reply: a caller may ask it right away.
        replies = self._start_batch([task], return_value, False, None, report_now=True, session=session)
        if not isinstance(replies, list):  # a future or a coroutine of them
            replies = await replies
        result = replies[0]
        if result[1] == "error":
            fields = result[2]
            error = rebuild_exception({**fields, "exception": unwrap_value(fields.get("exception"))})
            error.zdist_traceback = fields.get("traceback")  # the node replies with the task's traceback
            raise error
        meta = {"key": key, "nbytes": result[2]}
        if len(result) > 3:
            meta["value"] = result[3]
        return (b"OK", meta)

    def compute_batch(self, tasks: list, return_values: int = 0, inline: bool = False, who_has: dict | None = None, session: str | None = None) -> Any:
        """Run many tasks ``[key, function, args, kwargs, deps]``; ``Ref(k)`` in args is ``data[k]``.

        Answers one entry per task: ``[key, 'ok', nbytes]`` (plus the value if
        it is at most ``return_values`` bytes and can be serialized), or
        ``[key, 'error', {type, message, traceback, exception}]``. Missing
        inputs are fetched from peers first; a task whose inputs cannot be
        found fails with :class:`MissingDataError`.

        With ``inline=True`` the caller allows functions this worker has seen
        to be tiny to run on its event loop rather than in its thread pool
        (see :meth:`_runs_inline`). ``who_has`` tells where inputs are, as
        in :meth:`gather_deps`. The Center hears of the new keys within
        :data:`REPORT_DELAY`, not before the reply: a scheduler that sends
        this knows where they are, and passes ``who_has`` on.

        With ``session``, the tasks belong to that client session: their
        results (and inputs copied here for them) are deleted when it
        closes; its tasks not started by then fail with
        :class:`SessionClosedError`, and a batch of a session already
        closed is refused with it.
        """
        return self._start_batch(tasks, return_values, inline, who_has, report_now=False, session=session)

    def _start_batch(self, tasks: list, return_values: int, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None) -> Any:
        """The replies to a batch, or a future or coroutine of them."""
        if not isinstance(tasks, list):
            raise TypeError("compute_batch needs a list of [key, function, args, kwargs, deps] tasks")
        self._check_session(session)
        data = self.data
        needed = []
        for task in tasks:
            if not (isinstance(task, (list, tuple)) and len(task) == 5 and callable(task[1])):
                raise TypeError(f"each task is [key, function, args, kwargs, deps] with a callable function; got {task!r:.200}")
            for dep in task[4]:
                if dep not in data:
                    needed.append(dep)
        if needed:
            return self._fetch_then_run(tasks, return_values, needed, inline, who_has, report_now, session)
        # The common case, all inputs here: no coroutine, no task; the replies
        # themselves when every task ran on the loop, else a future of them.
        return self._run_batch(tasks, return_values, {}, inline, report_now, session)

    async def _fetch_then_run(self, tasks: list, return_values: int, needed: list, inline: bool, who_has: dict | None, report_now: bool, session: str | None = None) -> list:
        failed: dict[int, BaseException] = {}
        try:
            await self.gather_deps(needed, who_has, session)
        except MissingDataError:
            # Run what we can; tasks whose inputs are gone report which.
            for index, task in enumerate(tasks):
                absent = [dep for dep in task[4] if dep not in self.data]
                if absent:
                    failed[index] = MissingDataError(absent, f"needed on worker {self.address}")
        if session is not None and session in self.released_sessions:
            closed = SessionClosedError(session, "while the inputs of its tasks were being fetched")
            failed = dict.fromkeys(range(len(tasks)), closed)
        replies = self._run_batch(tasks, return_values, failed, inline, report_now, session)
        return (await replies) if isinstance(replies, asyncio.Future) else replies

    def _runs_inline(self, tasks: list) -> bool:
        """Whether every task's function is one seen to be tiny, so the batch may run on the loop.

        Handing a task to the thread pool and back costs two thread wake-ups
        (and the GIL handed over twice): on a VM that is most of a small
        task's round trip. A function runs on the loop only after it ran
        :data:`INLINE_AFTER` times, each within :data:`INLINE_TASK_SECONDS`,
        and never slower; one slow run sends it back to the pool for good.
        """
        fast = self._fast_runs
        for task in tasks:
            try:
                if fast.get(task[1], 0) < INLINE_AFTER:
                    return False
            except TypeError:  # an unhashable callable: never inline
                return False
        return True

    def _learn_durations(self, tasks: list, outcomes: list) -> None:
        fast = self._fast_runs
        if len(fast) > 4096:
            fast.clear()  # bounded: functions are cheap to learn again
        for task, outcome in zip(tasks, outcomes):
            function = task[1]
            try:
                runs = fast.get(function, 0)
            except TypeError:
                continue
            if runs < 0:
                continue
            if outcome[4] - outcome[3] > INLINE_TASK_SECONDS:
                fast[function] = -1  # seen slow: never on the loop
            elif runs < INLINE_AFTER:
                fast[function] = runs + 1

    def _run_batch(self, tasks: list, return_values: int, failed: dict, inline: bool, report_now: bool, session: str | None = None) -> list | asyncio.Future:
        runnable = [task for index, task in enumerate(tasks) if index not in failed] if failed else tasks
        done_here: list = []
        if inline and runnable and self._runs_inline(runnable):
            # On the loop, for at most a slice of time; the rest goes to the pool.
            deadline = time.time() + INLINE_SLICE_SECONDS
            done_here = _run_tasks(runnable, self.data, deadline, session, self.released_sessions)
            self._learn_durations(runnable, done_here)
            if len(done_here) < len(runnable) and not (done_here and done_here[-1][4] > deadline):
                self._fast_runs[runnable[len(done_here)][1]] = -1  # it needs a thread of its own
        rest = runnable[len(done_here):] if done_here else runnable
        chunks = _split(rest, self.ncores)
        if not chunks:
            return self._batch_replies(tasks, done_here, failed, return_values, report_now, session)
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        outcomes: list = [None] * len(chunks)
        remaining = [len(chunks)]
        self.executing += len(rest)

        def chunk_done(index: int, future: asyncio.Future) -> None:
            remaining[0] -= 1
            if future.cancelled():
                outcomes[index] = [(False, ConnectionAbortedError("worker shutting down"), "", 0.0, 0.0)] * len(chunks[index])
            elif future.exception() is not None:
                outcomes[index] = [(False, future.exception(), "", 0.0, 0.0)] * len(chunks[index])
            else:
                outcomes[index] = future.result()
            if remaining[0] == 0:
                self.executing -= len(rest)
                if result.done():
                    return
                try:
                    pooled = [e for chunk in outcomes for e in chunk]
                    if inline:
                        self._learn_durations(rest, pooled)
                    result.set_result(self._batch_replies(tasks, done_here + pooled, failed, return_values, report_now, session))
                except Exception as exc:  # noqa: BLE001 - reply with the error rather than hang
                    result.set_exception(exc)

        data = self.data
        for index, chunk in enumerate(chunks):
            future = loop.run_in_executor(self.executor, _run_tasks, chunk, data, None, session, self.released_sessions)
            future.add_done_callback(lambda f, i=index: chunk_done(i, f))
        return result

    def _batch_replies(self, tasks: list, outcomes: list, failed: dict, return_values: int, report_now: bool, session: str | None = None) -> list:
        flat = iter(outcomes)
        replies = []
        closed = session is not None and session in self.released_sessions
        for index, task in enumerate(tasks):
            key = task[0]
            if index in failed:
                replies.append([key, "error", error_fields(failed[index], "")])
                self.tasks_failed += 1
                continue
            ok, value, extra, start, stop = next(flat)
            self.task_log.append((key, start, stop, ok))
            if ok and closed:  # finished after its session closed: not kept
                ok, value, extra = False, SessionClosedError(session, "the task finished after that; its result was not kept"), ""
            if not ok:
                if type(value) is not SessionClosedError:
                    logger.warning("task %r failed on %s:\n%s", key, self.address, extra)
                replies.append([key, "error", error_fields(value, extra)])
                self.tasks_failed += 1
                continue
            self.tasks_done += 1
            self._store(key, value, extra, session)
            entry = [key, "ok", extra]
            if return_values and extra <= return_values:
                if type(value) in _MSGPACK_NATIVE:
                    entry.append(value)  # msgpack carries it as it is: no pickle either way
                else:
                    try:
                        entry.append(serialize(value))
                    except Exception:
                        pass
            replies.append(entry)
        if report_now:
            self.flush_reports()  # tell the Center before the caller hears back
        return replies


#: A worker remembers this many released client sessions, to refuse their late requests.
RELEASED_SESSIONS_KEPT = 1000

#: How long a worker gathers key changes before telling the Center (one message).
REPORT_DELAY = 0.005

#: A function runs on the worker's event loop (see ``Worker._runs_inline``)
#: once it ran this many times, each within INLINE_TASK_SECONDS.
INLINE_AFTER = 2
INLINE_TASK_SECONDS = 0.0005
#: At most this long on the loop per batch; the rest of it goes to the pool.
INLINE_SLICE_SECONDS = 0.005

_MSGPACK_NATIVE = frozenset({int, float, str, bytes, bool, type(None)})


def _split(tasks: list, n: int) -> list[list]:
    """Split a batch into at most ``n`` contiguous chunks of near-equal size."""
    if n <= 1 or len(tasks) <= 1:
        return [tasks] if tasks else []
    n = min(n, len(tasks))
    size, extra = divmod(len(tasks), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(tasks[start:end])
        start = end
    return chunks


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return 0
