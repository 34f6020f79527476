"""The nanny: a small process that runs worker processes and starts them again when they die.

``zdist-worker CENTER`` runs its worker under a nanny unless given
``--no-nanny``; ``--nworkers N`` runs N workers under one nanny process,
each supervised on its own. For each worker the nanny

- starts ``python -m zdist.run worker ... --no-nanny`` (a plain subprocess:
  no process here re-executes itself), and forwards its output lines;
- starts it again, with the same name and settings, when it dies without
  being asked to (SIGKILL, a segfault, the OOM killer, ``os._exit`` in a
  task): the new worker registers with ``restarts=N`` (which
  ``Center.workers()`` and ``zdist status`` show) and tells the Center to
  drop its dead predecessor at once;
- kills it and starts it again when its memory passes the ``terminate``
  threshold of its memory limit (see :mod:`zdist.memory`);
- gives up on a worker that died ``max_restarts`` times within
  ``restart_window`` seconds (a crash loop), saying so;
- on SIGTERM or SIGINT, passes the signal on (SIGTERM: the worker hands its
  data to other workers first; SIGINT: it stops at once), waits for the
  worker to exit (``stop_timeout``, then SIGKILL), and exits.

A worker that exits by itself with status 0 (it was retired, or its
``--lifetime`` ended) is not started again, nor one that found no Center
for its ``--death-timeout`` (status :data:`~zdist.errors.EXIT_NO_CENTER`:
the nanny exits with that status too, so a batch job ends). A worker that fails before it
ever started (a bad option) is not either: the nanny exits with its status.

The nanny imports no node code and opens no socket; it tells the Center
nothing itself (the worker it starts does, when it registers).

>>> spec = WorkerSpec(['127.0.0.1:8787', '--ncores', '2'], name='w-0')
>>> nanny = Nanny(spec)
>>> args = nanny.command(restarts=1, replaces='127.0.0.1:4000', name='127.0.0.1:4000')
>>> args[args.index('--ncores'):-1]
['--ncores', '2', '--no-nanny', '--name', 'w-0', '--restarts', '1', '--replaces', '127.0.0.1:4000', '--nanny-pid']
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import psutil

from .errors import EXIT_NO_CENTER
from .spawn import PARENT_ENV, WORKER_PROGRAM, death_signal_setter, node_environment, parent_gone

logger = logging.getLogger(__name__)

#: A worker that dies this many times within ``RESTART_WINDOW`` seconds is not started again.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: How long a worker asked to stop may take (it may be handing its data over) before SIGKILL.
STOP_TIMEOUT = 60.0
#: How often the nanny looks at its workers (exit, memory).
POLL_INTERVAL = 0.05
#: The marker line a worker prints once it listens (as LocalCluster and scripts read it).
STARTED_MARKER = "Start worker at:"


@dataclasses.dataclass
class WorkerSpec:
    """How to start one worker: its program arguments (without nanny options), and its limits."""

    argv: list[str]
    name: str | None = None
    memory_limit: int | None = None
    terminate_fraction: float | None = 0.95
    local_dir: str | None = None


class Nanny:
    """Supervises one worker process (see the module's docstring); driven by :func:`supervise`."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        max_restarts: int = MAX_RESTARTS,
        restart_window: float = RESTART_WINDOW,
        stop_timeout: float = STOP_TIMEOUT,
        env: dict | None = None,
        out: Callable[[str], None] | None = None,
    ):
        self.spec = spec
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.stop_timeout = stop_timeout
        self.env = env
        self.out = out or _say
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.deaths: list[float] = []
        self.address: str | None = None  # of the worker now running (from its first line)
        self.first_address: str | None = None
        self.started_ok = False
        self.stopping_since: float | None = None
        self.exit_code: int | None = None  # set once this nanny is done
        self._buffer = b""

    @property
    def done(self) -> bool:
        return self.exit_code is not None

    def command(self, restarts: int = 0, replaces: str | None = None, name: str | None = None) -> list[str]:
        args = [sys.executable, *WORKER_PROGRAM, *self.spec.argv, "--no-nanny"]
        name = self.spec.name or name
        if name:
            args += ["--name", name]
        if restarts:
            args += ["--restarts", str(restarts)]
        if replaces:
            args += ["--replaces", replaces]
        return args + ["--nanny-pid", str(os.getpid())]

    def start(self) -> None:
        """Start the worker process (again)."""
        args = self.command(self.restarts, self.address, self.first_address)
        self.address = None
        self._buffer = b""
        # preexec_fn is safe here: the nanny runs no threads.
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_worker_env(self.env), preexec_fn=death_signal_setter())  # noqa: PLW1509

    def on_output(self) -> None:
        """Forward what the worker printed; learn its address from its first line."""
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith(STARTED_MARKER):
                self.address = line[len(STARTED_MARKER):].strip()
                self.first_address = self.first_address or self.address
                self.started_ok = True
            self.out(line)

    def check(self, now: float) -> None:
        """Act on the worker's state: exited, over its memory, slow to stop."""
        process = self.process
        if process is None or self.done:
            return
        code = process.poll()
        if code is None:
            if self.stopping_since is not None:
                if now - self.stopping_since > self.stop_timeout:
                    logger.warning("worker %s did not stop within %.0f s; killing it", self.label, self.stop_timeout)
                    _kill(process)
            elif self._over_memory():
                _kill(process)
            return
        self._reap()
        if self.stopping_since is not None or code == 0:
            self.exit_code = 0 if code == 0 or self.stopping_since is not None else code
            return
        if code == EXIT_NO_CENTER:
            # Its Center is gone (--death-timeout): a new worker would find none either.
            print(f"zdist nanny: worker {self.label} found no Center for its --death-timeout; not starting it again", file=sys.stderr, flush=True)
            self.exit_code = code
            return
        if not self.started_ok:
            # It never started: a bad option or address. Starting it again would fail again.
            self.exit_code = code if code > 0 else 1
            return
        why = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ else f"exit status {code}"
        self.deaths = [t for t in self.deaths if now - t < self.restart_window] + [now]
        if len(self.deaths) > self.max_restarts:
            print(
                f"zdist nanny: worker {self.label} died {len(self.deaths)} times within {self.restart_window:g} s "
                f"(last: {why}); not starting it again. Its log above says why it died.",
                file=sys.stderr,
                flush=True,
            )
            self.exit_code = 1
            return
        self.restarts += 1
        print(f"zdist nanny: worker {self.label} died ({why}); starting it again (restart {self.restarts})", file=sys.stderr, flush=True)
        self.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the worker to stop (SIGTERM: hand its data over first; SIGINT: at once)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass
        elif self.process is None:
            self.exit_code = 0

    def kill(self) -> None:
        """SIGKILL the worker now (the nanny is going away)."""
        if self.process is not None and self.process.poll() is None:
            _kill(self.process)
            self.process.wait()
        if self.process is not None:
            self._reap()

    @property
    def label(self) -> str:
        return self.spec.name or self.first_address or "(starting)"

    def _over_memory(self) -> bool:
        limit, fraction = self.spec.memory_limit, self.spec.terminate_fraction
        if not limit or not fraction or not self.started_ok:
            return False
        try:
            rss = psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return False
        if rss <= fraction * limit:
            return False
        print(
            f"zdist nanny: worker {self.label} uses {rss / 2**20:.0f} MiB, over {fraction:.0%} of its memory limit "
            f"({limit / 2**20:.0f} MiB); killing it to start it again",
            file=sys.stderr,
            flush=True,
        )
        return True

    def _reap(self) -> None:
        """The worker exited: read what it printed last, close its pipe, remove its directory."""
        process = self.process
        if process.stdout is not None and not process.stdout.closed:
            try:
                os.set_blocking(process.stdout.fileno(), False)
                while True:
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    self._buffer += chunk
            except (BlockingIOError, OSError):
                pass
            if self._buffer:
                self._buffer += b"\n"
                self.on_output_lines()
            process.stdout.close()
        # A worker killed outright leaves its directory behind (see zdist.datastore.work_directory).
        parent = self.spec.local_dir or tempfile.gettempdir()
        for path in glob.glob(os.path.join(glob.escape(parent), f"zdist-worker-{process.pid}-*")):
            shutil.rmtree(path, ignore_errors=True)

    def on_output_lines(self) -> None:
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            if raw:
                self.out(raw.decode(errors="replace").rstrip("\r"))


def supervise(nannies: Sequence[Nanny], install_signals: bool = True) -> int:
    """Start and supervise every nanny's worker until all are done; the exit status.

    SIGTERM and SIGINT are passed on to the workers (a second SIGINT kills
    them). Returns 0 when every worker stopped as asked, else the first
    non-zero status.
    """
    received: list[int] = []
    if install_signals:
        previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    selector = selectors.DefaultSelector()
    registered: dict[Nanny, object] = {}
    try:
        for nanny in nannies:
            nanny.start()
        while not all(nanny.done for nanny in nannies):
            for nanny in nannies:  # (re)register the pipe of the process now running
                pipe = nanny.process.stdout if nanny.process is not None and not nanny.done else None
                if registered.get(nanny) is not pipe:
                    if nanny in registered and registered[nanny] is not None:
                        try:
                            selector.unregister(registered[nanny])
                        except (KeyError, ValueError):
                            pass
                    if pipe is not None and not pipe.closed:
                        selector.register(pipe, selectors.EVENT_READ, nanny)
                    registered[nanny] = pipe
            for key, _ in selector.select(POLL_INTERVAL):
                key.data.on_output()
            if not received and parent_gone() and not any(nanny.stopping_since is not None for nanny in nannies):
                logger.warning("the process that started this nanny died; stopping its workers")
                received.append(signal.SIGTERM)
            while received:
                sig = received.pop(0)
                already = any(nanny.stopping_since is not None for nanny in nannies)
                for nanny in nannies:
                    if sig == signal.SIGINT and already:
                        nanny.kill()
                        nanny.exit_code = nanny.exit_code if nanny.exit_code is not None else 0
                    else:
                        nanny.stop(sig)
            now = time.monotonic()
            for nanny in nannies:
                nanny.check(now)
    finally:
        for nanny in nannies:
            nanny.kill()
        selector.close()
        if install_signals:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    codes = [nanny.exit_code or 0 for nanny in nannies]
    return next((code for code in codes if code), 0)


def _say(line: str) -> None:
    print(line, flush=True)


def _worker_env(env: dict | None) -> dict:
    """The worker's environment: a node's (huge pages: see ``zdist.spawn.node_environment``), and glibc gives freed memory back to the kernel promptly.

    Without MALLOC_TRIM_THRESHOLD_, glibc raises its mmap threshold after the
    first large free, so later chunks (values read back from disk, spilled)
    come from the heap and their memory stays in the process: RSS grows past
    the terminate threshold while the data itself fits (measured with
    benchmarks/bench_memory.py --four-x: 4 restarts in one run without it).
    dask.distributed's nanny sets the same value. One set by the user stays.
    """
    env = node_environment() if env is None else dict(env)
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    env.pop(PARENT_ENV, None)  # the worker's parent is this nanny, which it dies with (PR_SET_PDEATHSIG)
    return env


def _kill(process: subprocess.Popen) -> None:
    try:
        process.kill()
    except ProcessLookupError:
        pass
