"""A worker's copies of keys it lacks, fetched peer to peer.

:class:`PeerFetcher` finds which workers hold a key (the caller's hints, or
the Center's ``who_has``), asks them for it (``get_data``), and tries the
other holders when one fails or dies meanwhile. Each key is fetched once
however many batches need it at the same time.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, Iterable

from .errors import MissingDataError, WorkerRetiringError

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

logger = logging.getLogger("zdist.worker")  # a part of the worker logs as the worker: what `zdist logs` shows and users filter on


class PeerFetcher:
    """Copies keys from other workers into a :class:`~zdist.worker.Worker`'s ``data``.

    Serves the ``fetch_keys`` op. Owns the fetches under way (``in_flight``: key → the future its fetch
    resolves) and the byte counts of what came in (``bytes_fetched``, and
    ``peer_bytes``: peer address → bytes fetched from it). It stores what it
    fetched with :meth:`Worker.keep <zdist.worker.Worker.keep>` and asks the
    Center through the worker's :class:`~zdist.worker_center.CenterLink`.
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        self.in_flight: dict[Any, asyncio.Future] = {}
        self.bytes_fetched = 0
        self.peer_bytes: dict[str, int] = {}

    async def fetch_keys(self, keys: Iterable, session: str | None = None) -> str:
        """The ``fetch_keys`` op: copy keys to this worker from the workers that hold them (to restore replicas).

        With ``session``, the copies belong to that client session; none is
        made once it closed.
        """
        worker = self.worker
        if session is not None and session in worker.sessions.released:
            return "OK"
        worker.sessions.check(session)
        if worker.retiring:  # it would leave with them: the asker hands them to another worker
            raise WorkerRetiringError(f"worker {worker.address} is retiring and takes no keys; ask another worker")
        await self.gather_deps(list(keys), session=session)
        return "OK"

    async def gather_deps(self, keys: Iterable, who_has: dict | None = None, session: str | None = None) -> None:
        """Make sure every key is held by the worker, fetching missing ones from peers.

        ``who_has`` (key → worker addresses), where the caller knows, saves
        asking the Center; the Center is asked when those holders fail.
        Copies fetched for a client ``session``'s tasks belong to it.
        """
        data = self.worker.data
        missing = [key for key in dict.fromkeys(keys) if key not in data]
        if not missing:
            return
        in_flight = self.in_flight
        waiting = [in_flight[key] for key in missing if key in in_flight]
        to_fetch = [key for key in missing if key not in in_flight]
        if to_fetch:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            for key in to_fetch:
                in_flight[key] = future
            try:
                await self._fetch(to_fetch, who_has, session)
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved
                raise
            finally:
                for key in to_fetch:
                    if in_flight.get(key) is future:
                        del in_flight[key]
        if waiting:
            await asyncio.gather(*waiting)
        still = [key for key in missing if key not in data]
        if still:
            raise MissingDataError(still, f"fetched but then deleted on worker {self.worker.address}")

    async def _fetch(self, keys: list, hints: dict | None = None, session: str | None = None) -> None:
        worker = self.worker
        who_has: dict = {}
        if hints:
            for key in keys:
                holders = hints.get(key)
                if holders:
                    who_has[key] = holders
        unknown = [key for key in keys if key not in who_has]
        if unknown:
            who_has.update(await worker.center_link.ask("who_has", {"keys": unknown}))
        tried: dict[Any, set] = {key: set() for key in keys}
        remaining = list(keys)
        for _attempt in range(3):
            by_worker: dict[str, list] = {}
            lost = []
            for key in remaining:
                holders = [w for w in who_has.get(key, ()) if w not in tried[key] and w != worker.address]
                if not holders:
                    lost.append(key)
                    continue
                by_worker.setdefault(random.choice(holders), []).append(key)
            if lost:
                raise MissingDataError(lost, f"needed on worker {worker.address}")
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
                if session is not None and session in worker.sessions.released:
                    continue  # released while fetching: keep no copy (its tasks will not run)
                fetched = 0
                for key, value in result.items():
                    fetched += worker.keep(key, value, session=session)
                self.bytes_fetched += fetched
                self.peer_bytes[address] = self.peer_bytes.get(address, 0) + fetched
            if not remaining:
                return
            who_has = await worker.center_link.ask("who_has", {"keys": remaining})
        raise MissingDataError(remaining, f"every holder failed to send them to worker {worker.address}")

    async def _fetch_from(self, address: str, keys: list) -> dict:
        """get_data from a peer; give up early if the Center drops that peer meanwhile."""
        worker = self.worker
        peers = worker.peers
        if worker.security is not None and address not in worker.security.server_keys and address not in peers.connections:
            # The peer may have a key pair of its own: the Center knows its public key.
            worker.security.learn(await peers.get(worker.center_address).request("workers", {}))
        request = peers.get(address).request("get_data", {"keys": keys})
        absent = 0
        while True:
            done, _ = await asyncio.wait({request}, timeout=max(1.0, worker.heartbeat_interval * 2))
            if done:
                return request.result()
            try:
                workers = await peers.get(worker.center_address).request("alive", {"workers": [address]}, timeout=5.0)
            except Exception:
                continue
            # Absent several times in a row: a restarted Center lists workers
            # again only as they re-register.
            absent = absent + 1 if address not in workers else 0
            if absent >= 3:
                request.cancel()
                peers.remove(address)
                raise ConnectionError(f"peer {address} died while sending {len(keys)} keys")
