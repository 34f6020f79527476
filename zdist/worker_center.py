"""A worker's link to its Center: registration, heartbeats, and the key reports.

:class:`CenterLink` keeps the worker known to the Center: it registers (with
every key the worker holds), heartbeats at the interval the Center asks for,
registers again when the Center forgets the worker, and stops the worker
when no Center answers for ``death_timeout`` seconds. Between heartbeats it
gathers the keys the worker gains and drops, and tells the Center in one
message per :data:`REPORT_DELAY`, however many keys changed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

from .errors import EXIT_NO_CENTER
from .loop import Later
from .rpc import CommClosedError, RPCTimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

logger = logging.getLogger("zdist.worker")  # a part of the worker logs as the worker: what `zdist logs` shows and users filter on

#: Heartbeats left unanswered in a row before a worker takes the Center for
#: gone and registers again (with every key it holds).
HEARTBEAT_MISSES = 3
#: The longest heartbeat interval a worker accepts from a Center.
MAX_HEARTBEAT_INTERVAL = 60.0

#: How long a worker gathers key changes before telling the Center (one message).
REPORT_DELAY = 0.005


class CenterLink:
    """What a :class:`~zdist.worker.Worker` tells its Center, and when.

    Owns whether the worker is registered (``registered``), the heartbeat
    interval the Center last asked for, the keys gained and dropped since
    the last report, and the bytes per peer as of the last heartbeat. It
    reads the worker's settings and counters (address, cores, keys held,
    activity) to fill its messages, and talks through the worker's
    connection pool (``worker.peers``).
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        self.registered = asyncio.Event()
        self.told_heartbeat_interval = 0.0  # what the Center last asked for (it stretches with the cluster)
        self._report_add: dict[Any, int] = {}
        self._report_remove: set = set()
        # Batched on a short timer: one message for however many keys changed
        # meanwhile, and the Center (one more process on the same cores) is
        # not woken in the middle of every task's round trip. Ops whose
        # callers may ask the Center right away flush before replying.
        self._report_later = Later(REPORT_DELAY, self.flush_reports)
        self._peer_bytes_sent: dict[str, int] = {}  # worker.fetcher.peer_bytes as of the last heartbeat

    @property
    def current_heartbeat_interval(self) -> float:
        """Seconds between heartbeats now: the Center's wish or the worker's own, whichever is longer."""
        return max(self.worker.heartbeat_interval, self.told_heartbeat_interval)

    # -------------------------------------------------------------- registration

    async def _register(self) -> None:
        worker = self.worker
        center = worker.peers.get(worker.center_address)
        args = {
            "address": worker.address,
            "ncores": worker.ncores,
            "name": worker.name,
            "keys": dict(worker.nbytes),
            "pid": os.getpid(),
            "restarts": worker.restarts,
            **({"memory_limit": worker.memory_limit} if worker.memory_limit else {}),
            **({"resources": worker.resources} if worker.resources else {}),
            **({"nanny": worker.nanny, "replaces": worker.replaces} if worker.nanny is not None else {}),
            **({"sessions": list(worker.sessions.session_keys)} if worker.sessions.session_keys else {}),
            **({"public_key": worker.security.public_key_text} if worker.security else {}),
        }
        # Cleared when the snapshot is taken, not when the Center answers:
        # keys gained or dropped meanwhile (e.g. a session the Center
        # releases as we register) are still reported afterwards.
        self._report_add.clear()
        self._report_remove.clear()
        await center.request("register", args, timeout=max(2.0, worker.heartbeat_interval * 4))

    async def stay_registered(self) -> None:
        """Register, then heartbeat; register again whenever the Center forgets the worker.

        The Center says in each heartbeat's answer how often it wants to hear
        from this worker (less often in a large cluster, so that it handles a
        bounded number of heartbeats a second); the worker heartbeats at that
        interval or its own ``heartbeat_interval``, whichever is longer, give
        or take 10% so that a fleet started at once does not beat in step.
        A heartbeat left unanswered is not yet a lost Center: a busy one
        answers late. Only after :data:`HEARTBEAT_MISSES` in a row does the
        worker start over (a fresh socket, registering again with every key).
        """
        worker = self.worker
        said_waiting = False
        last_contact = time.monotonic()
        misses = 0
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                    self.registered.set()
                    self.flush_reports()  # what changed while registering
                    logger.info("registered with center at %s", worker.center_address)
                    said_waiting = False
                    last_contact = time.monotonic()
                    misses = 0
                await asyncio.sleep(self.current_heartbeat_interval * random.uniform(0.9, 1.1))
                answer = await worker.peers.get(worker.center_address).request(
                    "heartbeat", {"address": worker.address, **self.heartbeat_metrics()}, timeout=max(2.0, self.current_heartbeat_interval * 4)
                )
                last_contact = time.monotonic()
                misses = 0
                if answer == "unknown" or (isinstance(answer, dict) and answer.get("status") == "unknown"):
                    logger.warning("center at %s does not know this worker (restarted?); registering again", worker.center_address)
                    self.registered.clear()
                elif isinstance(answer, dict) and isinstance(answer.get("interval"), (int, float)):
                    self.told_heartbeat_interval = min(float(answer["interval"]), MAX_HEARTBEAT_INTERVAL)
            except (RPCTimeoutError, CommClosedError, ConnectionError) as exc:
                if worker.death_timeout is not None and time.monotonic() - last_contact >= worker.death_timeout:
                    self._die_without_center()
                    return
                misses += 1
                if misses < HEARTBEAT_MISSES and self.registered.is_set() and isinstance(exc, RPCTimeoutError):
                    logger.info("center at %s did not answer a heartbeat in time (%s); trying again", worker.center_address, exc)
                    continue
                if not said_waiting:
                    how_long = f"for {worker.death_timeout:g} s (--death-timeout)" if worker.death_timeout is not None else ""
                    logger.warning("center at %s is not answering (%s); will keep trying %s", worker.center_address, exc, how_long)
                    said_waiting = True
                self.registered.clear()
                # A fresh socket so that stale requests queued for a dead Center are dropped.
                worker.peers.remove(worker.center_address)
                await asyncio.sleep(min(1.0, worker.heartbeat_interval))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("unexpected error talking to the center")
                await asyncio.sleep(1.0)

    def _die_without_center(self) -> None:
        """No Center for ``death_timeout`` seconds: stop, with :data:`~zdist.errors.EXIT_NO_CENTER` as exit code."""
        worker = self.worker
        logger.error(
            "no center at %s for %g s (--death-timeout): worker %s exits (status %d); its data is dropped",
            worker.center_address, worker.death_timeout, worker.address, EXIT_NO_CENTER,
        )
        worker.exit_code = EXIT_NO_CENTER
        self.registered.clear()  # nothing to unregister from
        asyncio.ensure_future(worker.stop())

    async def unregister(self) -> None:
        """Tell the Center the worker leaves (with the last key changes first), if it is registered."""
        worker = self.worker
        if self.registered.is_set() and worker.peers is not None:
            try:
                self.flush_reports()
                await worker.peers.get(worker.center_address).request("unregister", {"address": worker.address}, timeout=1.0)
            except Exception as exc:  # the Center may be gone already
                logger.info("could not unregister from %s: %s", worker.center_address, exc)

    async def ask(self, op: str, args: dict) -> Any:
        """A request to the Center that waits out a Center restart (up to the worker's ``peer_timeout``)."""
        worker = self.worker
        deadline = time.monotonic() + worker.peer_timeout
        while True:
            try:
                return await worker.peers.get(worker.center_address).request(op, args, timeout=max(2.0, worker.heartbeat_interval * 4))
            except (RPCTimeoutError, CommClosedError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"center {worker.center_address} did not answer {op!r} for {worker.peer_timeout} s") from exc
                worker.peers.remove(worker.center_address)
                await asyncio.sleep(0.2)

    # -------------------------------------------------------------- heartbeats

    def heartbeat_metrics(self) -> dict:
        """What a heartbeat tells the Center besides the address: keys, memory, activity, paused or not."""
        worker = self.worker
        metrics = {"nkeys_local": len(worker.data), "memory": rss(), **self._activity()}
        if worker.memory is not None:
            metrics.update((k, v) for k, v in worker.memory.metrics().items() if v is not None)
        if worker.retiring:  # clients see it as paused: no new tasks
            metrics.update(status="paused", retiring=1)
        return metrics

    def _activity(self) -> dict:
        """Tasks executing (in a thread now), queued here, done and erred, per group as they changed; bytes moved.

        A few numbers per group that changed since the last heartbeat: what
        the dashboard shows as it happens, at a cost the Center does not feel.
        """
        worker = self.worker
        progress = worker.batches.progress.report()
        activity: dict[str, Any] = {
            "executing": progress["executing"],
            "queued": progress["queued"],
            "tasks_done": progress["done"],
            "tasks_failed": progress["erred"],
            "bytes_fetched": worker.fetcher.bytes_fetched,
            "bytes_served": worker.bytes_served,
        }
        if progress["groups"]:
            activity["task_groups"] = progress["groups"]
        sent = self._peer_bytes_sent
        moved = {peer: n for peer, n in worker.fetcher.peer_bytes.items() if sent.get(peer) != n}
        if moved:
            activity["transfers"] = moved
            sent.update(moved)
        return activity

    def heartbeat_now(self) -> None:
        """Paused, resumed or retiring: tell the Center now, not at the next heartbeat (clients send work elsewhere meanwhile)."""
        worker = self.worker
        if self.registered.is_set() and worker.peers is not None:
            worker.peers.get(worker.center_address).send("heartbeat", address=worker.address, **self.heartbeat_metrics())

    # -------------------------------------------------------------- key reports

    def gained(self, key: Any, nbytes: int) -> None:
        """The worker now holds ``key`` (``nbytes`` bytes): the Center hears within :data:`REPORT_DELAY`."""
        self._report_remove.discard(key)
        self._report_add[key] = nbytes
        self._report_later.schedule()

    def dropped(self, key: Any) -> None:
        """The worker no longer holds ``key``: the Center hears within :data:`REPORT_DELAY`."""
        # Reported removed even if gained since the last report: it may have
        # been stored before that too (the Center knows it), and removing a
        # key the Center never heard of costs nothing.
        self._report_add.pop(key, None)
        self._report_remove.add(key)
        self._report_later.schedule()

    def flush_reports(self) -> None:
        """Send the keys gained and dropped since the last report, as one message each."""
        self._report_later.cancel()
        worker = self.worker
        if not self.registered.is_set() or worker.peers is None:
            return  # registration sends every key we hold
        center = worker.peers.get(worker.center_address)
        if self._report_remove:
            center.send("remove_keys", address=worker.address, keys=list(self._report_remove))
            self._report_remove = set()
        if self._report_add:
            center.send("add_keys", address=worker.address, keys=self._report_add)
            self._report_add = {}


def rss() -> int:
    """This process's resident memory in bytes (0 where psutil cannot say)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return 0
