"""LocalCluster: a Center and workers on this machine, private to its user, cleaned up on exit.

It is a :class:`~zdist.deploy.Cluster`: ``scale(n)`` starts worker
processes or retires them (their data goes to the others first), and
``adapt(minimum, maximum)`` does so by itself.

>>> with LocalCluster(n_workers=2) as cluster:
...     len(cluster.worker_addresses)
...     cluster.scale(3)
...     cluster.wait_for_workers(3)
...     cluster.scale(1)
...     len(cluster.worker_addresses)
2
1
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from typing import Any

import psutil

from ..center import Center
from ..comm import private_directory, split_address
from ..loop import LoopThread
from ..memory import MemoryThresholds, parse_memory_limit
from ..rpc import rpc
from ..spawn import CENTER_PROGRAM, WORKER_PROGRAM, ClusterStartError, NodeLauncher, children, node_environment, terminate, wait_or_kill
from ..worker import Worker
from .base import Cluster, run_sync

__all__ = ["ClusterStartError", "LocalCluster", "node_environment"]


class LocalCluster(Cluster):
    """A Center and ``n_workers`` workers on this machine.

    With ``processes=True`` (the default) each node is a subprocess
    (``python -m zdist.run center`` / ``worker``, which ``zdist-center`` /
    ``zdist-worker`` also are); with ``processes=False`` they run in this
    process (on a background loop when used with ``with``, on the running
    loop when used with ``async with``). Either way everything stops on
    exit, even after an exception, and at interpreter exit.

    With ``nanny=True`` (the default) each worker subprocess runs under a
    nanny (:mod:`zdist.nanny`) that starts it again when it dies (under a
    new address, with the same name); ``nanny=False`` starts bare workers,
    for tests that kill a worker and need it to stay dead. ``memory_limit``
    (each worker's: ``'400MB'``, bytes, ``'auto'``, ...) and
    ``memory_thresholds`` are passed to every worker (see :mod:`zdist.memory`).

    Private by default: with no ``host``, the nodes listen on Unix sockets
    (``ipc://DIR/N`` addresses) in a new directory only this user may open,
    removed on close; no other local user can reach them.
    ``protocol='tcp'`` (or a ``host``) listens on TCP, 127.0.0.1 by default.
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        processes: bool = True,
        *,
        host: str | None = None,
        protocol: str | None = None,
        heartbeat_timeout: float = 5.0,
        heartbeat_interval: float = 0.5,
        security: Any = None,
        start_timeout: float = 30.0,
        worker_kwargs: dict | None = None,
        dashboard: bool = False,
        nanny: bool = True,
        memory_limit: int | str | None = None,
        memory_thresholds: Any = None,
    ):
        super().__init__(security=security)
        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        # Private by default: the nodes listen on Unix sockets (ZeroMQ ipc://) in
        # a directory only this user may open, so no other local user can reach
        # them (anyone who reaches a worker can run code as its user), and a
        # round trip costs less than over TCP loopback. protocol='tcp' (or a
        # host) listens on TCP instead, for what needs it (namespaces, other hosts).
        if protocol is None:
            protocol = "tcp" if host is not None else "ipc"
        if protocol not in ("ipc", "tcp"):
            raise ValueError(f"protocol is 'ipc' (private to this user, the default) or 'tcp', got {protocol!r}")
        if protocol == "ipc" and host is not None:
            raise ValueError(f"host={host!r} listens on TCP: give protocol='tcp' with it, or leave host out for a private ipc:// cluster")
        self.protocol = protocol
        self._ipc_dir: str | None = None
        if protocol == "ipc":
            self._ipc_dir = private_directory()
            host = "ipc://" + self._ipc_dir
        self.host = host or "127.0.0.1"
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self.start_timeout = start_timeout
        self.worker_kwargs = worker_kwargs or {}
        self.nanny = nanny and processes
        # Each worker's limit, in bytes (checked here, before any process starts).
        self.memory_limit = parse_memory_limit(memory_limit, nworkers=self.n_workers)
        self.memory_thresholds = MemoryThresholds.of(memory_thresholds)
        # The Center's web dashboard, on a free port (off by default: tests start many clusters).
        self.dashboard = dashboard
        self.dashboard_url: str | None = None
        if dashboard:
            from ..dashboard import require_aiohttp

            require_aiohttp()
        self.security = security
        self._owns_security = False
        if security is True:
            from ..security import Security

            self.security = Security.temporary()
            self._owns_security = True
        self._addresses: list[str] = []
        self.center_process: subprocess.Popen | None = None
        # The units of this Cluster: address → its process (a nanny, or a bare worker), or its in-process Worker.
        self.worker_processes: dict[str, subprocess.Popen] = {}
        self.units = self.worker_processes if processes else {}
        self.center: Center | None = None
        self._dashboard_server: Any = None  # the in-process Center's zdist.dashboard.Dashboard
        self.worker_nodes: list[Worker] = []
        self._loop_thread: LoopThread | None = None
        self._launcher = NodeLauncher(start_timeout)
        self.status = "created"

    # -------------------------------------------------------------- sync API

    def start(self) -> "LocalCluster":
        try:
            if self.processes:
                self._start_processes()
            else:
                self._loop_thread = LoopThread("zdist-local-cluster")
                self._loop_thread.run(self._start_in_process(), self.start_timeout)
            self.status = "running"
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def worker_addresses(self) -> list[str]:  # type: ignore[override]
        """The workers this cluster started (in the order they started), less those killed or retired."""
        return self._addresses

    @property
    def log_directory(self) -> str:
        """Where the nodes' stderr logs are (one ``LABEL-N.log`` per node started); removed on close."""
        return self._launcher.log_dir

    def _close(self) -> None:
        """Stop every node this cluster started, and wait for them."""
        if self._loop_thread is not None:
            try:
                self._loop_thread.run(self._stop_in_process(), 10)
            finally:
                self._loop_thread.stop()
                self._loop_thread = None
        # Workers first, so that they can unregister from a Center still there.
        # SIGINT: stop now (SIGTERM would hand their data to each other first).
        for process in self.worker_processes.values():
            terminate(process, signal.SIGINT)
        for process in self.worker_processes.values():
            wait_or_kill(process)
        if self.center_process is not None:
            terminate(self.center_process)
            wait_or_kill(self.center_process)
        if self._owns_security:
            self.security.cleanup()
        self._launcher.close()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            if self.status == "running" and self.processes:
                self.close()
        except Exception:
            pass

    # -------------------------------------------------------------- async API

    async def __aenter__(self) -> "LocalCluster":
        if self.processes:
            await asyncio.get_running_loop().run_in_executor(None, self._start_processes)
        else:
            await self._start_in_process()
        self.status = "running"
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if not self.processes:
            await self._stop_in_process()
        self.close()

    # -------------------------------------------------------------- in-process nodes

    async def _start_in_process(self) -> None:
        self.center = await Center(self.host, 0, heartbeat_timeout=self.heartbeat_timeout, security=self.security).start()
        if self.dashboard:
            from ..dashboard import serve_dashboard

            self._dashboard_server = await serve_dashboard(self.center, port=0)
            self.dashboard_url = self.dashboard_link = self._dashboard_server.url
        self.center_address = self.center.address
        for i in range(self.n_workers):
            await self.start_worker_in_process(name=f"worker-{i}")
        await self._wait_for_workers_async(self.n_workers)

    async def start_worker_in_process(self, **kwargs: Any) -> Worker:
        worker = Worker(
            self.center_address,
            self.host,
            0,
            ncores=self.threads_per_worker,
            heartbeat_interval=self.heartbeat_interval,
            security=self.security,
            memory_limit=self.memory_limit,
            memory_thresholds=self.memory_thresholds,
            **{**self.worker_kwargs, **kwargs},
        )
        await worker.start()
        self.worker_nodes.append(worker)
        self._addresses.append(worker.address)
        self.units[worker.address] = worker
        return worker

    async def _stop_in_process(self) -> None:
        for worker in self.worker_nodes:
            await worker.stop()
        if self._dashboard_server is not None:
            await self._dashboard_server.stop()
            self._dashboard_server = None
        if self.center is not None:
            await self.center.stop()
        self.worker_nodes = []
        self.center = None

    async def _wait_for_workers_async(self, n: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while len(self.center.worker_info) < n:
            if time.monotonic() > deadline:
                raise ClusterStartError(f"only {len(self.center.worker_info)} of {n} workers registered within {self.start_timeout} s")
            await asyncio.sleep(0.01)

    # -------------------------------------------------------------- subprocess nodes

    def _common_args(self) -> list[str]:
        args = []
        if self.security is not None:
            args += ["--key", self.security.key_file, "--authorized-keys", self.security.authorized_keys]
        return args

    def _center_args(self, host: str, port: str) -> list[str]:
        dashboard = ["--dashboard-port", "0"] if self.dashboard else ["--no-dashboard"]
        return [*CENTER_PROGRAM, "--host", host, "--port", port, "--heartbeat-timeout", str(self.heartbeat_timeout), *self._common_args(), *dashboard]

    def _start_processes(self) -> None:
        process, line = self._launcher.spawn("center", self._center_args(self.host, "0"), "Start center at")
        self.center_process = process
        self.center_address = line.split("Start center at", 1)[1].strip()
        self._learn_dashboard_url()
        self.start_workers(self.n_workers)

    def _worker_args(self, name: str | None) -> list[str]:
        args = [
            *WORKER_PROGRAM,
            self.center_address,
            "--host",
            self.host,
            "--ncores",
            str(self.threads_per_worker),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            *self._common_args(),
        ]
        if not self.nanny:
            args.append("--no-nanny")
        if self.memory_limit:
            args += ["--memory-limit", str(self.memory_limit)]
        for field, value in vars(self.memory_thresholds).items():
            args += [f"--memory-{field}", "off" if value is None else str(value)]
        return args + (["--name", name] if name else [])

    def start_workers(self, n: int, args: list[str] | None = None) -> list[str]:
        """Start ``n`` more worker subprocesses at once; wait until they registered."""
        started = [self._launcher.popen(f"worker-{len(self.worker_processes) + i}", args or self._worker_args(None)) for i in range(n)]
        addresses = []
        for label, process, log_path in started:
            line = self._launcher.await_line(label, process, log_path, "Start worker at:")
            address = line.split("Start worker at:", 1)[1].strip()
            self.worker_processes[address] = process
            self._addresses.append(address)
            addresses.append(address)
        self.wait_for_workers(len(self.live_worker_addresses()))
        return addresses

    def start_worker(self, name: str | None = None, resources: dict | None = None) -> str:
        """Start one more worker subprocess; return its address once it registered.

        ``resources`` (``{'GPU': 1}``) is what tasks with resource needs may use there.
        """
        args = self._worker_args(name)
        if resources:
            args += ["--resources", ",".join(f"{k}={v!r}" for k, v in resources.items())]
        return self.start_workers(1, args)[0]

    def kill_center(self, sig: int = signal.SIGKILL) -> None:
        """Kill the Center subprocess, as a crash would."""
        self.center_process.send_signal(sig)
        self.center_process.wait(10)
        if self.center_process.stdout is not None:
            self.center_process.stdout.close()

    def restart_center(self) -> None:
        """Start a new Center at the same address (after :meth:`kill_center`)."""
        if self.center_process is not None and self.center_process.poll() is None:
            self.kill_center()
        host, port = split_address(self.center_address)
        port = str(port)
        deadline = time.monotonic() + self.start_timeout
        while True:  # the old socket may linger in the kernel for a moment
            try:
                process, _ = self._launcher.spawn("center", self._center_args(host, port), "Start center at")
                break
            except ClusterStartError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.center_process = process
        self._learn_dashboard_url()

    def _learn_dashboard_url(self) -> None:
        """Ask the Center subprocess where its dashboard listens (``info()['dashboard']``)."""
        if not self.dashboard:
            return

        async def ask() -> Any:
            async with rpc(self.center_address, timeout=self.start_timeout, security=self.security) as center:
                return await center.info()

        self.dashboard_url = self.dashboard_link = run_sync(ask()).get("dashboard")

    def live_worker_addresses(self) -> list[str]:
        return [a for a, p in self.worker_processes.items() if p.poll() is None]

    def kill_worker(self, address: str, sig: int = signal.SIGKILL) -> None:
        """Kill a worker subprocess (SIGKILL by default), as a crash would.

        Under a nanny (``nanny=True``) the worker's process is killed and its
        nanny starts it again, under a new address; without one, it stays dead.
        """
        process = self.worker_processes[address]
        if self.nanny:
            for child in children(process):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(sig)
        else:
            process.send_signal(sig)
            process.wait(10)
        if address in self._addresses:
            self._addresses.remove(address)

    def wait_for_workers(self, n: int, timeout: float | None = None) -> None:
        """Block until the Center lists at least ``n`` workers."""
        timeout = self.start_timeout if timeout is None else timeout

        async def poll() -> None:
            deadline = time.monotonic() + timeout
            async with rpc(self.center_address, timeout=5, security=self.security) as center:
                while True:
                    workers = await center.ncores()
                    if len(workers) >= n:
                        return
                    if time.monotonic() > deadline:
                        raise ClusterStartError(f"only {len(workers)} of {n} workers registered within {timeout} s")
                    await asyncio.sleep(0.02)

        run_sync(poll())

    # -------------------------------------------------------------- the Cluster interface

    def _start_units(self, n: int) -> None:
        if self.status == "closed":
            raise RuntimeError("this LocalCluster is closed")
        if self._loop_thread is None:
            self.start_workers(n)
            return

        async def more() -> None:
            for _ in range(n):
                await self.start_worker_in_process(name=f"worker-{len(self.worker_nodes)}")

        self._loop_thread.run(more(), self.start_timeout)

    def _stop_units(self, names: list[str]) -> None:
        """Stop these workers (retired ones are exiting by themselves: give them a moment first)."""
        for address in names:
            unit = self.units.pop(address, None)
            if address in self._addresses:
                self._addresses.remove(address)
            if isinstance(unit, Worker):
                self.worker_nodes.remove(unit)
                self._loop_thread.run(unit.stop(), self.start_timeout)
            elif unit is not None:
                try:
                    unit.wait(10)
                except subprocess.TimeoutExpired:
                    terminate(unit, signal.SIGINT)
                wait_or_kill(unit)

    def _unit_alive(self, name: str) -> bool:
        unit = self.units.get(name)
        if isinstance(unit, Worker):
            return unit.status == "running"
        return unit is not None and unit.poll() is None
