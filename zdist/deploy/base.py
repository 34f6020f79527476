"""The interface every zdist cluster object has: :class:`Cluster`.

A cluster starts a Center and runs workers in **units**: one worker
process, one remote ``zdist-worker --nworkers K`` over SSH, one batch job,
one pod. A subclass says how to start and stop units; the base class does
the rest the same way for all of them:

- ``center_address``, ``security``, ``dashboard_link``: what a client needs
  (``Pool(cluster)``, ``Executor(cluster)``, ``zdist.dask.get(cluster, ...)``
  take the address and the keys from the cluster);
- ``scale(n)``: start units, or retire workers gracefully (their data goes
  to other workers first) and stop their units, until ``n`` workers are asked for;
- ``adapt(minimum=, maximum=)``: the same, driven by the Center's view of
  waiting and idle work (:mod:`zdist.deploy.adaptive`);
- ``close()``, ``with``, and a repr that lists the units.

A subclass sets ``center_address`` (and ``security``) once its Center runs,
keeps ``units`` (name → whatever it needs to stop the unit) and implements
:meth:`Cluster._start_units`, :meth:`Cluster._stop_units`,
:meth:`Cluster._unit_alive` and :meth:`Cluster._close`. A worker belongs to
the unit its Center-side name is (or, with ``--nworkers``, ``NAME-i``).

>>> class Nothing(Cluster):
...     def _start_units(self, n): self.units.update({f'u{len(self.units) + i}': None for i in range(n)})
...     def _stop_units(self, names): [self.units.pop(name) for name in names]
>>> with Nothing() as cluster:
...     cluster.scale(2)
...     cluster.planned_workers(), sorted(cluster.units)
(2, ['u0', 'u1'])
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import Any

from ..loop import LoopThread
from ..retirement import retire_workers
from ..rpc import rpc
from .adaptive import DEFAULT_INTERVAL, DEFAULT_WAIT, Adaptive

logger = logging.getLogger(__name__)

#: How long a graceful retirement (moving the worker's data) may take before its unit is stopped anyway.
RETIRE_TIMEOUT = 120.0


class Cluster:
    """What every zdist cluster object has (see the module's docstring)."""

    #: Workers one unit runs (``--nworkers`` of the unit's zdist-worker).
    workers_per_unit: int = 1

    def __init__(self, *, security: Any = None):
        self.center_address: str = ""
        self.security = security
        self.dashboard_link: str | None = None
        self.units: dict[str, Any] = {}
        self.status = "created"
        self._adaptive: Adaptive | None = None
        self._scale_lock = threading.RLock()

    # -------------------------------------------------------------- what a subclass provides

    def _start_units(self, n: int) -> None:
        """Start ``n`` more units and add them to :attr:`units` (need not wait for their workers)."""
        raise NotImplementedError

    def _stop_units(self, names: list[str]) -> None:
        """Stop these units (their workers have retired, or are to go now) and remove them from :attr:`units`."""
        raise NotImplementedError

    def _unit_alive(self, name: str) -> bool:
        """False once the unit is gone by itself (its worker retired at ``--lifetime``, its job ended)."""
        return True

    def _close(self) -> None:
        """Stop every unit and the Center."""

    # -------------------------------------------------------------- the interface

    def start(self) -> "Cluster":
        self.status = "running"
        return self

    def __enter__(self) -> "Cluster":
        return self.start() if self.status == "created" else self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop adapting, every unit and the Center; idempotent."""
        if self.status == "closed":
            return
        self.status = "closed"
        if self._adaptive is not None:
            self._adaptive.stop()
            self._adaptive = None
        self._close()

    def planned_workers(self) -> int:
        """Workers asked for: those of every unit started (registered or still starting) and not gone."""
        with self._scale_lock:
            for name in [name for name in self.units if not self._unit_alive(name)]:
                self._stop_units([name])
            return len(self.units) * self.workers_per_unit

    def scale(self, n: int, *, _adaptive: bool = False) -> None:
        """Run ``n`` workers: start units, or retire workers (data handed over) and stop their units.

        Calling it yourself stops :meth:`adapt`. Does not wait for new
        workers to register: :meth:`wait_for_workers` does.
        """
        if n < 0:
            raise ValueError(f"scale needs a number of workers >= 0, got {n}")
        if not _adaptive and self._adaptive is not None:
            self._adaptive.stop()
            self._adaptive = None
        with self._scale_lock:
            have = self.planned_workers() // self.workers_per_unit
            wanted = math.ceil(n / self.workers_per_unit)
            if wanted > have:
                self._start_units(wanted - have)
            elif wanted < have:
                self._retire_units(self._units_to_remove(have - wanted))

    def adapt(self, minimum: int = 1, maximum: int | None = None, *, interval: float = DEFAULT_INTERVAL, wait: float = DEFAULT_WAIT) -> Adaptive:
        """Grow while tasks wait, retire workers idle for ``wait`` s, between ``minimum`` and ``maximum`` workers.

        Replaces an earlier ``adapt``; ``scale(n)`` or ``close()`` stops it.
        See :mod:`zdist.deploy.adaptive` for what it looks at.
        """
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, minimum, maximum, interval=interval, wait=wait)
        return self._adaptive

    @property
    def worker_addresses(self) -> list[str]:
        """Addresses of the workers registered with the Center now."""
        return sorted(self.center_info().get("workers", {}))

    def center_info(self, timeout: float = 10.0) -> dict:
        """The Center's ``info()``: workers (with their heartbeat numbers), sessions, dashboard."""

        async def ask() -> Any:
            async with rpc(self.center_address, timeout=timeout, security=self.security) as center:
                return await center.info()

        return run_sync(ask(), timeout + 5)

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Block until the Center lists at least ``n`` workers; TimeoutError (saying how many came) otherwise."""

        async def poll() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            async with rpc(self.center_address, timeout=min(timeout, 10.0), security=self.security) as center:
                while True:
                    have = len(await center.ncores())
                    if have >= n:
                        return
                    if loop.time() > deadline:
                        raise TimeoutError(f"only {have} of {n} workers registered with {self.center_address} within {timeout:g} s")
                    await asyncio.sleep(0.05)

        run_sync(poll(), timeout + 15)

    def retire_workers(self, addresses: list[str], timeout: float = RETIRE_TIMEOUT) -> list[str]:
        """Retire these workers gracefully and stop their units once every worker of a unit goes; the addresses retired.

        A unit with other workers still busy is left alone (its workers are
        not retired): units are started and stopped whole.
        """
        with self._scale_lock:
            workers = self.center_info().get("workers", {})
            by_unit: dict[str, list[str]] = {}
            for address, info in workers.items():
                unit = self._unit_of(address, info)
                if unit is not None:
                    by_unit.setdefault(unit, []).append(address)
            chosen = set(addresses)
            names = [unit for unit, members in by_unit.items() if set(members) <= chosen]
            self._retire_units(names, workers, timeout)
            return [address for name in names for address in by_unit[name]]

    def __repr__(self) -> str:
        names = list(self.units)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        per = f" x {self.workers_per_unit}" if self.workers_per_unit > 1 else ""
        return f"<{type(self).__name__} center={self.center_address or '-'} {self.status} units={len(names)}{per}: [{shown}]>"

    # -------------------------------------------------------------- shared machinery

    def _unit_of(self, address: str, info: dict) -> str | None:
        """The unit running the worker at ``address`` (its name is the unit's, or ``UNIT-i``)."""
        name = str(info.get("name"))
        if name in self.units:
            return name
        base, _, index = name.rpartition("-")
        if index.isdigit() and base in self.units:
            return base
        return address if address in self.units else None

    def _units_to_remove(self, k: int) -> list[str]:
        """``k`` units to give back: units with no registered worker yet first, then those holding the fewest bytes."""
        try:
            workers = self.center_info().get("workers", {})
        except Exception:  # noqa: BLE001 - no Center to ask: any units will do
            return list(self.units)[-k:]
        load: dict[str, tuple] = {name: (0, 0, 0) for name in self.units}
        for address, info in workers.items():
            unit = self._unit_of(address, info)
            if unit in load:
                registered, executing, nbytes = load[unit]
                in_hand = int(info.get("executing") or 0) + int(info.get("queued") or 0)  # running now and queued behind
                load[unit] = (registered + 1, executing + in_hand, nbytes + int(info.get("nbytes") or 0))
        return sorted(load, key=lambda name: load[name])[:k]

    def _retire_units(self, names: list[str], workers: dict | None = None, timeout: float = RETIRE_TIMEOUT) -> None:
        """Retire the registered workers of these units (their data goes to the others), then stop the units."""
        if not names:
            return
        if workers is None:
            try:
                workers = self.center_info().get("workers", {})
            except Exception as exc:  # noqa: BLE001 - no Center: nothing to hand data to anyway
                logger.warning("could not ask the Center which workers to retire (%s); stopping the units", exc)
                workers = {}
        addresses = [address for address, info in workers.items() if self._unit_of(address, info) in names]
        if addresses:
            results = run_sync(retire_workers(self.center_address, addresses, timeout, self.security), timeout + 15)
            for address, result in results.items():
                if isinstance(result, BaseException):
                    logger.warning("worker %s did not retire (%s); its unit is stopped anyway", address, result)
        self._stop_units(names)


def run_sync(coroutine: Any, timeout: float | None = None) -> Any:
    """Run a coroutine to completion from sync code, even from inside a running loop (on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine if timeout is None else asyncio.wait_for(coroutine, timeout))
    thread = LoopThread("zdist-sync")
    try:
        return thread.run(coroutine, timeout)
    finally:
        thread.stop()
