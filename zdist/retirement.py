"""Graceful retirement: a worker hands every key no other worker holds to the others, then leaves.

What starts it: SIGTERM to the worker (or to its nanny, which passes it on),
``zdist retire CENTER WORKER...`` (the worker's ``retire`` op), and the end of
its ``--lifetime``. The retiring worker stops taking tasks (it reports itself
paused, so clients send work elsewhere), asks the Center which of its keys
have no other holder, and asks the least loaded other workers to copy them
(``fetch_keys``: they fetch from it peer to peer, spilled values straight from
disk), in chunks of at most :data:`CHUNK_BYTES`. It waits until the Center
lists another holder for each, then unregisters and stops. A key of a client
session stays that session's on its new worker. With no other worker, it
says so and stops without waiting.

>>> parse_duration('2h'), parse_duration('90s'), parse_duration('1.5m'), parse_duration('30')
(7200.0, 90.0, 90.0, 30.0)
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

logger = logging.getLogger(__name__)

#: One fetch_keys request moves at most this many bytes (a message stays well under the size limit).
CHUNK_BYTES = 256 * 2**20
#: How long a retirement may take before the worker leaves anyway, saying what it could not move.
RETIRE_TIMEOUT = 300.0
#: Rounds of "which keys only I hold? hand them over": a round repeats what a refusing target did not take.
ATTEMPTS = 5

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float) -> float:
    """Seconds from ``'90'``, ``'90s'``, ``'15m'``, ``'2h'``, ``'1d'``; a ValueError that says why otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"{text!r} is not a duration such as 90s, 15m or 2h")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return seconds


async def retire(worker: Worker, timeout: float = RETIRE_TIMEOUT, leaving: set | None = None) -> dict:
    """Move the keys only ``worker`` holds to other workers; ``{'moved': n, 'to': {address: n}, 'left': [...]}``.

    A copy on a worker that is leaving too (in ``leaving``, or retiring by
    the Center's table) does not count: two workers retiring together must not
    each leave a key in the belief that the other keeps it. The worker is left
    running (paused for tasks); the caller stops it.
    """
    leaving = {worker.address, *(leaving or ())}
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {"moved": 0, "to": {}, "left": []}
    if not worker.data:
        return result
    worker.flush_reports()
    handed: dict = {}  # every key this retirement tried to hand over, in order
    failed = False  # a target refused or failed in the last round
    for attempt in range(ATTEMPTS):
        # What the worker holds now, not at the start: keys can still arrive (a task that
        # finished, a peer's copy) until the Center has told everyone this one is retiring.
        # After a round that went well, wait (bounded) for the copies' reports to reach the Center.
        alone = await _alone(worker, list(worker.data), leaving, settle=attempt > 0 and not failed)
        if not alone:
            break
        targets = await _targets(worker, leaving)
        if not targets:
            logger.warning("retiring %s: no other worker to hand %d keys to; they leave with it", worker.address, len(alone))
            result["left"] = alone
            return result
        plan = _plan(worker, alone, targets)
        logger.info("retiring %s: handing %d keys to %d workers", worker.address, len(alone), len(plan))
        jobs = [(target, session, chunk) for (target, session), chunks in plan.items() for chunk in chunks]
        outcomes = await asyncio.gather(*(_copy(worker, *job, deadline) for job in jobs), return_exceptions=True)
        failed = False
        for (target, _, chunk), outcome in zip(jobs, outcomes):
            if isinstance(outcome, BaseException):
                # e.g. a target that is retiring too (it refuses): the next attempt asks the Center again
                logger.warning("retiring %s: %s could not take %d keys: %s", worker.address, target, len(chunk), outcome)
                failed = True
            else:
                result["to"][target] = result["to"].get(target, 0) + len(chunk)
        handed.update(dict.fromkeys(alone))
        if time.monotonic() > deadline:
            break
        if failed:
            await asyncio.sleep(0.2 * (attempt + 1))  # bounded: the others' retiring news reaches the Center
    if not handed:
        return result
    left = await _alone(worker, list(worker.data), leaving, settle=True)
    result["moved"] = sum(1 for key in handed if key not in left)
    result["left"] = left
    if left:
        logger.warning("retiring %s: %d keys could not be handed over: %r", worker.address, len(left), left[:10])
    return result


async def _alone(worker: Worker, keys: list, leaving: set, settle: bool = False) -> list:
    """The keys the Center lists no holder for but workers that are leaving (after a short wait for reports in flight, if ``settle``)."""
    for _ in range(40 if settle else 1):  # bounded: 2 s at most
        who_has = await worker.center_link.ask("who_has", {"keys": keys})
        gone = leaving | _retiring(await worker.center_link.ask("workers", {}))
        alone = [key for key in keys if key in worker.data and not (set(who_has.get(key, ())) - gone)]
        if not alone or not settle:
            return alone
        await asyncio.sleep(0.05)
    return alone


def _retiring(infos: dict) -> set:
    """Workers the Center's table says are retiring."""
    return {address for address, info in infos.items() if info.get("retiring")}


async def _targets(worker: Worker, leaving: set) -> dict:
    """Other workers that take data: address → bytes they hold (retiring and leaving ones left out)."""
    infos = await worker.center_link.ask("workers", {})
    gone = leaving | _retiring(infos)
    return {address: info.get("nbytes", 0) for address, info in infos.items() if address not in gone}


def _plan(worker: Worker, keys: list, load: dict) -> dict:
    """(target, session) → chunks of keys: each key to the worker with the fewest bytes so far."""
    plan: dict[tuple[str, str | None], list[list]] = {}
    sizes: dict[tuple[str, str | None], int] = {}
    for key in sorted(keys, key=lambda k: -worker.nbytes.get(k, 0)):
        target = min(load, key=load.get)
        nbytes = worker.nbytes.get(key, 0)
        load[target] += nbytes
        group = (target, worker.key_session.get(key))
        chunks = plan.setdefault(group, [[]])
        if chunks[-1] and sizes.get(group, 0) + nbytes > CHUNK_BYTES:
            chunks.append([])
            sizes[group] = 0
        chunks[-1].append(key)
        sizes[group] = sizes.get(group, 0) + nbytes
    return plan


async def _copy(worker: Worker, target: str, session: str | None, keys: list, deadline: float) -> None:
    args: dict[str, Any] = {"keys": keys}
    if session is not None:
        args["session"] = session
    await worker.peers.get(target).request("fetch_keys", args, timeout=max(5.0, deadline - time.monotonic()))


async def retire_workers(center_address: str, wanted: list[str], timeout: float = RETIRE_TIMEOUT, security: Any = None) -> dict:
    """Ask workers (addresses or names, as ``zdist status`` shows them) to retire; address → their answer or exception.

    Each hands the keys only it holds to the others and exits (its nanny
    too). A name or address the Center does not know raises
    :class:`LookupError`. ``zdist retire`` and cluster objects' ``scale``
    call this.
    """
    from .rpc import rpc  # the client side of retirement; the worker side above needs no rpc

    async with rpc(center_address, timeout=min(timeout, 10.0), security=security) as center:
        workers = await center.workers()
    chosen, unknown = {}, []
    for name in wanted:
        matches = [a for a, info in workers.items() if name in (a, str(info.get("name")))]
        if matches:
            chosen.update(dict.fromkeys(matches))
        else:
            unknown.append(name)
    if unknown:
        raise LookupError(f"no worker named {', '.join(unknown)} at {center_address}; `zdist status {center_address}` lists them")

    async def one(address: str) -> Any:
        async with rpc(address, timeout=timeout, security=security) as worker:
            return await worker.retire(leaving=[other for other in chosen if other != address])

    results = await asyncio.gather(*(one(a) for a in chosen), return_exceptions=True)
    return dict(zip(chosen, results))
