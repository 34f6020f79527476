"""SSHCluster: a Center and workers on other machines, started over SSH (with asyncssh).

``SSHCluster(['node0', 'node1', 'node2'])`` starts the Center on the first
host and a ``zdist-worker`` (``--nworkers nworkers_per_host`` worker
processes under one nanny) on each of the others; a host may be listed
twice to get two such units, and a single host runs both. Every remote
program runs under :mod:`zdist.deploy.remote`, a watchdog that stops it
when its SSH channel closes: on :meth:`~Cluster.close`, and when this
process dies (its connections go with it). Their output is kept:
:meth:`SSHCluster.logs`.

Why asyncssh: it is maintained, pure Python on the ``cryptography``
package (no system ``ssh`` to drive through pipes), and asyncio-native, so
every connection, channel and output stream lives on one event loop, as
zdist's own sockets do; one connection per host carries every channel.

CURVE is on by default when any host is not this machine's loopback: a key
pair is made for the cluster, each remote program gets it in a directory of
its own (mode 0700, written over SSH, removed when it exits), and
:attr:`~Cluster.security` holds it for clients (``Pool(cluster)`` uses it).

``connect_options`` go to ``asyncssh.connect`` (``username``,
``client_keys``, ``known_hosts``, ``port``, ...): one dict for every host,
or a list with one per host. ``center_options`` and ``worker_options`` are
the programs' command-line options by their Python names
(``{'ncores': 2, 'memory_limit': '4GB', 'interface': 'ib0'}``; ``True``
for a flag). ``remote_python`` is the remote interpreter, with zdist
installed (a path into a venv, or a command such as ``conda run -n env python``).

>>> options_to_args({'ncores': 2, 'memory_limit': '4GB', 'no_nanny': True, 'name': None})
['--ncores', '2', '--memory-limit', '4GB', '--no-nanny']
>>> remote_command('python3', 'worker', ['10.0.0.1:8787'], keys_dir='/tmp/k')
'env PYTHONUNBUFFERED=1 python3 -m zdist.deploy.remote --remove /tmp/k worker 10.0.0.1:8787'
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import shlex
import socket
import time
from typing import Any

from ..loop import LoopThread
from .base import Cluster

logger = logging.getLogger(__name__)

#: Lines of output kept per remote program.
LOG_LINES = 5000
#: Seconds a remote program may take to stop once its channel is closed, before the channel is cut.
STOP_TIMEOUT = 30.0
#: A worker whose Center is gone for this long exits by itself (``--death-timeout``), unless told otherwise.
DEATH_TIMEOUT = "60s"


def options_to_args(options: dict) -> list[str]:
    """``{'memory_limit': '4GB', 'no_nanny': True}`` → ``['--memory-limit', '4GB', '--no-nanny']`` (None and False left out)."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def remote_command(python: str, program: str, args: list[str], keys_dir: str | None = None, inline: bool = False) -> str:
    """The shell command that runs ``program`` (center or worker) under the watchdog on a remote host.

    ``inline=True`` sends the watchdog's own source (``python -c``): it
    imports only the standard library then, not the zdist package, which
    saves each remote program a few seconds of CPU on a busy host.
    """
    words = ["env", "PYTHONUNBUFFERED=1", *shlex.split(python), *(["-c", _watchdog_source()] if inline else ["-m", "zdist.deploy.remote"])]
    if keys_dir:
        words += ["--remove", keys_dir]
    return shlex.join([*words, program, *args])


def _watchdog_source() -> str:
    import inspect

    from . import remote

    return inspect.getsource(remote)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def bind_address(host: str) -> str:
    """The address a node on ``host`` listens on: ``host`` itself if it is an IP address, else what it resolves to here."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError:
            return host


class Remote:
    """One remote program: its SSH process, its output (last :data:`LOG_LINES` lines), the lines it waits for."""

    def __init__(self, name: str, host: str, process: Any):
        self.name = name
        self.host = host
        self.process = process
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self.readers = [asyncio.ensure_future(self._read(process.stdout, "")), asyncio.ensure_future(self._read(process.stderr, "[stderr] "))]

    async def _read(self, stream: Any, prefix: str) -> None:
        try:
            async for line in stream:
                line = line.rstrip("\r\n")
                if line:
                    self.lines.append(prefix + line)
                for marker, future in list(self._waiters):
                    if marker in line and not future.done():
                        future.set_result(line)
        except Exception as exc:  # noqa: BLE001 - the channel went away: say so in the log
            self.lines.append(f"[zdist] output stream ended: {exc}")
        finally:
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(RuntimeError("exited before printing it"))

    async def line_with(self, marker: str, timeout: float) -> str:
        for line in self.lines:
            if marker in line:
                return line
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((marker, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            why = "did not print it" if isinstance(exc, asyncio.TimeoutError) else "exited first"
            tail = "\n".join(list(self.lines)[-40:])
            raise RuntimeError(f"{self.name} on {self.host} {why} ({marker!r} within {timeout:g} s; exit status {self.exit_status}); its output:\n{tail}") from None

    @property
    def exit_status(self) -> int | None:
        return self.process.exit_status

    @property
    def alive(self) -> bool:
        return self.process.exit_status is None and self.process.exit_signal is None and not self.process.is_closing()

    async def stop(self, wait_first: float = 0.0) -> None:
        """Wait up to ``wait_first`` s for it to exit by itself; else close its stdin (the watchdog stops it); then cut the channel."""
        if not (wait_first > 0 and await self._closed_within(wait_first)):
            if not self.process.is_closing():
                try:
                    self.process.stdin.write_eof()
                except Exception:  # noqa: BLE001 - the channel is closing already
                    pass
            if not await self._closed_within(STOP_TIMEOUT):
                logger.warning("%s on %s did not stop within %g s of its channel's end; cutting the channel", self.name, self.host, STOP_TIMEOUT)
                self.process.close()
                await self._closed_within(5.0)
        await asyncio.gather(*self.readers, return_exceptions=True)

    async def _closed_within(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.process.wait_closed(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class SSHCluster(Cluster):
    """A Center on ``hosts[0]``, a unit of ``nworkers_per_host`` workers on each of ``hosts[1:]`` (see the module's docstring)."""

    def __init__(
        self,
        hosts: list[str],
        *,
        connect_options: dict | list[dict] | None = None,
        worker_options: dict | None = None,
        center_options: dict | None = None,
        remote_python: str = "python3",
        nworkers_per_host: int = 1,
        security: Any = None,
        start_timeout: float = 60.0,
    ):
        try:
            import asyncssh  # noqa: F401
        except ImportError:
            raise ImportError("SSHCluster needs asyncssh: pip install 'zdist[ssh]'") from None
        if not hosts:
            raise ValueError("SSHCluster needs at least one host: the first runs the Center, the others workers")
        super().__init__()
        self.hosts = list(hosts)
        self.worker_hosts = self.hosts[1:] or self.hosts[:1]
        if isinstance(connect_options, list):
            if len(connect_options) != len(self.hosts):
                raise ValueError(f"connect_options has {len(connect_options)} entries for {len(self.hosts)} hosts: give one dict, or one per host")
            self._connect_options = dict(zip(self.hosts, connect_options))  # a host listed twice: its last entry counts (one connection per host)
        else:
            self._connect_options = {host: dict(connect_options or {}) for host in self.hosts}
        self.worker_options = {"death_timeout": DEATH_TIMEOUT, **(worker_options or {})}
        self.center_options = {"port": 0, "dashboard_port": 0, **(center_options or {})}
        self.remote_python = remote_python
        self.workers_per_unit = nworkers_per_host
        self.start_timeout = start_timeout
        self._owns_security = security is True or (security is None and not all(is_loopback(h) for h in self.hosts))
        if self._owns_security:
            from ..security import Security

            security = Security.temporary()
        self.security = security or None
        self.center: Remote | None = None
        self._connections: dict[str, Any] = {}
        self._counter = collections.Counter()
        self._loop = LoopThread("zdist-ssh")
        try:
            self._loop.run(self._start(), start_timeout * 2 + 30)
            self._wait_started(len(self.worker_hosts) * nworkers_per_host)
            self.status = "running"
        except BaseException:
            self.close()
            raise

    def _wait_started(self, n: int) -> None:
        """Until ``n`` workers registered; a unit that exits first, or the time running out, raises with the programs' output."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            have = len(self.center_info().get("workers", {}))
            if have >= n:
                return
            dead = [name for name in self.units if not self._unit_alive(name)]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"only {have} of {n} workers registered within {self.start_timeout:g} s"
                tails = "\n".join(f"--- {name} ---\n" + "\n".join(text.splitlines()[-20:]) for name, text in self.logs().items())
                raise RuntimeError(f"SSHCluster did not start: {why}; the remote programs' output (cluster.logs()):\n{tails}")
            time.sleep(0.2)

    # -------------------------------------------------------------- on the loop

    async def _connect(self, host: str) -> Any:
        import asyncssh

        if host not in self._connections:
            try:
                self._connections[host] = await asyncio.wait_for(asyncssh.connect(host, **self._connect_options[host]), self.start_timeout)
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                raise ConnectionError(f"cannot connect to {host} over SSH: {type(exc).__name__}: {exc}") from None
        return self._connections[host]

    async def _ship_keys(self, connection: Any) -> str | None:
        """A fresh 0700 directory on the host holding the cluster's key files (one round trip); None without security.

        The secret key goes through the channel's stdin, never on a command line.
        """
        if self.security is None:
            return None
        script = ["umask 077", 'd=$(mktemp -d /tmp/zdist-keys-XXXXXXXX)', 'cat > "$d/zdist.key_secret"']
        for name in sorted(os.listdir(self.security.authorized_keys)):
            if name.endswith(".key"):
                with open(os.path.join(self.security.authorized_keys, name)) as f:
                    script.append(f'printf %s {shlex.quote(f.read())} > "$d/"{shlex.quote(name)}')
        script.append('echo "$d"')
        with open(self.security.key_file) as f:
            secret = f.read()
        made = await connection.run(" && ".join(script), input=secret, check=True)
        return made.stdout.strip()

    async def _launch(self, name: str, host: str, program: str, args: list[str]) -> Remote:
        connection = await self._connect(host)
        keys = await self._ship_keys(connection)
        if keys:
            args = [*args, "--key", f"{keys}/zdist.key_secret", "--authorized-keys", keys]
        process = await connection.create_process(remote_command(self.remote_python, program, args, keys, inline=True))
        return Remote(name, host, process)

    async def _start(self) -> None:
        await asyncio.gather(*(self._connect(host) for host in dict.fromkeys(self.hosts)))
        host = self.hosts[0]
        options = dict(self.center_options)
        if "interface" not in options:
            options.setdefault("host", bind_address(host))
        self.center = await self._launch("center", host, "center", options_to_args(options))
        line = await self.center.line_with("Start center at", self.start_timeout)
        self.center_address = line.split("Start center at", 1)[1].strip()
        await self._start_worker_units(len(self.worker_hosts), hosts=self.worker_hosts)

    async def _start_worker_units(self, n: int, hosts: list[str] | None = None) -> None:
        if hosts is None:  # the worker hosts with the fewest units first
            load = collections.Counter({host: 0 for host in self.worker_hosts})
            load.update(unit.host for unit in self.units.values())
            hosts = []
            for _ in range(n):
                host = min(load, key=lambda h: (load[h], self.worker_hosts.index(h)))
                load[host] += 1
                hosts.append(host)
        launches = []
        for host in hosts:
            name = f"{host}-{self._counter[host]}"
            self._counter[host] += 1
            options = {"nworkers": self.workers_per_unit, "name": name, **self.worker_options}
            if "interface" not in options:
                options.setdefault("host", bind_address(host))
            launches.append(self._launch(name, host, "worker", [self.center_address, *options_to_args(options)]))
        for unit in await asyncio.gather(*launches):
            self.units[unit.name] = unit

    async def _stop(self, names: list[str], wait_first: float) -> None:
        units = [self.units.pop(name) for name in names if name in self.units]
        await asyncio.gather(*(unit.stop(wait_first) for unit in units))

    async def _shutdown(self) -> None:
        await self._stop(list(self.units), 0.0)  # workers first: they stop at once, their Center still there
        if self.center is not None:
            await self.center.stop()
        for connection in self._connections.values():
            connection.close()
        await asyncio.gather(*(c.wait_closed() for c in self._connections.values()), return_exceptions=True)
        self._connections.clear()

    # -------------------------------------------------------------- the Cluster hooks

    def _start_units(self, n: int) -> None:
        if self.status == "closed":
            raise RuntimeError("this SSHCluster is closed")
        self._loop.run(self._start_worker_units(n), self.start_timeout * 2)

    def _stop_units(self, names: list[str]) -> None:
        # Retired workers exit by themselves: give them a moment before closing their channels.
        self._loop.run(self._stop(names, wait_first=10.0), STOP_TIMEOUT + 30)

    def _unit_alive(self, name: str) -> bool:
        unit = self.units.get(name)
        return unit is not None and unit.alive

    def _close(self) -> None:
        if not self._loop.loop.is_closed():
            try:
                self._loop.run(self._shutdown(), STOP_TIMEOUT * 2 + 30)
            except Exception as exc:  # noqa: BLE001 - closing anyway; the watchdogs stop what is left
                logger.warning("SSHCluster: shutting down did not finish cleanly: %s", exc)
            self._loop.stop()
        if self._owns_security and self.security is not None:
            self.security.cleanup()

    # -------------------------------------------------------------- for people

    @property
    def dashboard_link(self) -> str | None:  # type: ignore[override]
        for line in self.center.lines if self.center is not None else ():
            if line.startswith("Dashboard at "):
                return line[len("Dashboard at "):].strip()
        return None

    @dashboard_link.setter
    def dashboard_link(self, value: str | None) -> None:
        pass  # read from the Center's output

    def logs(self) -> dict[str, str]:
        """Output of every remote program running, by name (``'center'``, then each unit ``HOST-i``), stdout and ``[stderr]`` lines."""
        remotes = ([self.center] if self.center is not None else []) + list(self.units.values())
        return {remote.name: "\n".join(remote.lines) for remote in remotes}
