"""What a client does to every worker at once: run a function, upload code, read their logs.

:class:`WorkerOps` gives :class:`~zdist.Pool` (and through it the
:class:`~zdist.Executor`) ``run``, ``upload_file`` and ``get_worker_logs``.

Uploads are kept by the client's session (:class:`zdist.session.Session`),
never by the Center, which by design holds no user data: the session sends
them to every worker it sees join later, before that worker hears of any
task, and they end with the client.

>>> import os
>>> from zdist import Pool
>>> with Pool(processes=2) as pool:
...     pids = pool.run(os.getpid)
...     len(set(pids.values())) == len(pool.available_cores)
True
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Iterable

from .comm import normalize_address


class WorkerOps:
    """Methods of a Pool that act on every worker (needs ``_loop``, ``_shell``, ``timeout``)."""

    # Provided by the Pool, as are _check_running() and sync_center().
    _loop: Any
    _shell: Any
    timeout: float
    center_address: str

    def run(self, function: Callable, *args: Any, workers: Iterable[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run ``function(*args, **kwargs)`` once on every worker (or on ``workers``): ``{worker_address: result}``.

        For set-up and inspection, beside the tasks rather than among them:
        a plain function runs in a thread of its own on each worker (so it
        answers even while the worker is busy), an ``async def`` one on the
        worker's event loop. A function that takes a ``zdist_worker``
        argument gets the :class:`~zdist.Worker` object. If it raises on some
        worker, that exception is raised here, noting the worker.
        """
        self._check_running()
        addresses = self._worker_list(workers)
        request = {"function": function, "args": list(args), "kwargs": kwargs}
        results = self._loop.run(self._ask_all(addresses, "run", request, None), None)
        out = {}
        for address, result in zip(addresses, results):
            if isinstance(result, BaseException):
                raise _noted(result, f"run({getattr(function, '__name__', function)})", address)
            out[address] = result
        return out

    def upload_file(self, path: str | os.PathLike) -> dict[str, list[str]]:
        """Make a ``.py`` file, or a ``.zip``/``.egg``/``.pyz``/pure-Python wheel, importable on every worker.

        Its modules are imported on each worker at once (reloaded, with
        their submodules, if they were imported already: upload a fixed
        file again to take the fix), and workers that join later get it
        too, from this client, before their first task. Answers the module
        names each worker loaded: ``{worker_address: [names]}``.
        """
        self._check_running()
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        name = os.path.basename(path)
        replies = self._loop.run(self._push_upload(name, data), self.timeout + 1)
        out = {}
        for address, reply in replies.items():
            if isinstance(reply, BaseException):
                raise _noted(reply, f"upload_file({name!r})", address)
            out[address] = reply["modules"]
        return out

    async def _push_upload(self, name: str, data: bytes) -> dict:
        session = self._shell.session
        await session.look(self.timeout)
        numbers = [number for number, _ in session.uploads.values()]
        session.uploads.pop(name, None)  # a new version: sent again to every worker
        session.uploads[name] = (max(numbers, default=0) + 1, data)
        requests = session.push_uploads(session.info.get("workers", {}))
        if not requests:
            return {}
        results = await asyncio.wait_for(asyncio.gather(*requests.values(), return_exceptions=True), self.timeout)
        return dict(zip(requests, results))

    def get_worker_logs(self, since: int = 0, limit: int = 1000, workers: Iterable[str] | None = None) -> dict[str, list[dict]]:
        """Each worker's recent log records: ``{worker_address: [{seq, time, level, name, message, thread}, ...]}``.

        Every node keeps its last :data:`zdist.output.LOG_RING_SIZE` records;
        ``since`` leaves out those numbered up to it. ``zdist logs CENTER``
        shows the same from the command line.
        """
        self._check_running()
        addresses = self._worker_list(workers)
        results = self._loop.run(self._ask_all(addresses, "get_logs", {"since": since, "limit": limit}, self.timeout), self.timeout + 1)
        return {address: ([] if isinstance(result, BaseException) else result["records"]) for address, result in zip(addresses, results)}

    # -------------------------------------------------------------- helpers

    def _worker_list(self, workers: Iterable[str] | None) -> list[str]:
        known = list(self.sync_center())
        if workers is None:
            return known
        chosen = [normalize_address(w) for w in workers]
        unknown = [w for w in chosen if w not in known]
        if unknown:
            raise ValueError(f"no such workers at the Center {self.center_address}: {', '.join(unknown)}")
        return chosen

    async def _ask_all(self, addresses: list[str], op: str, args: dict, timeout: float | None) -> list:
        connections = self._shell.session.connections
        return await asyncio.gather(*(connections.get(a).request(op, args, timeout=timeout) for a in addresses), return_exceptions=True)


def _noted(error: BaseException, what: str, worker: str) -> BaseException:
    if hasattr(error, "add_note"):
        error.add_note(f"(in {what} on worker {worker})")
    return error


async def collect_logs(center: str, wanted: Iterable[str] = (), since: dict | None = None, timeout: float = 5.0, security: Any = None) -> list[tuple[str, str, Any]]:
    """The recent log records of a cluster's nodes: ``[(label, address, get_logs answer or exception)]``.

    The Center and every worker, or only the workers named in ``wanted``
    (addresses or names, as ``zdist status`` shows them). ``since`` maps an
    address to the last record number already seen (for ``--follow``).
    What ``zdist logs`` prints.
    """
    from .rpc import ConnectionPool

    since = since or {}
    pool = ConnectionPool(timeout=timeout, security=security)
    try:
        center = normalize_address(center)
        workers = await pool.get(center).request("workers", {}, timeout=timeout)
        if security is not None:
            security.learn(workers)
        wanted = list(wanted)
        nodes: list[tuple[str, str]] = [] if wanted else [("center", center)]
        unknown = []
        for name in wanted:
            matches = [(str(info.get("name", a)), a) for a, info in workers.items() if name in (a, str(info.get("name")))]
            if matches:
                nodes.extend(matches)
            else:
                unknown.append(name)
        if unknown:
            raise LookupError(f"no worker named {', '.join(unknown)} at {center}; `zdist status {center}` lists them")
        if not wanted:
            nodes += sorted((str(info.get("name", a)), a) for a, info in workers.items())
        requests = [pool.get(a).request("get_logs", {"since": since.get(a, 0)}, timeout=timeout) for _, a in nodes]
        results = await asyncio.gather(*requests, return_exceptions=True)
        return [(label, address, result) for (label, address), result in zip(nodes, results)]
    finally:
        pool.close()
