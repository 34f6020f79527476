"""Starting node processes: their environment, waiting for their first line, stopping them.

Shared by what spawns nodes (``LocalCluster``, the nanny): it imports no node
code. A node prints one line when it listens (``Start worker at: ADDRESS``);
:class:`NodeLauncher` starts a program, waits for that line, and on failure
raises :class:`ClusterStartError` with the tail of the node's log.

>>> import sys
>>> launcher = NodeLauncher(start_timeout=10)
>>> process, line = launcher.spawn("echo", ["-c", "print('Start echo at: here')"], "Start echo at")
>>> line
'Start echo at: here'
>>> wait_or_kill(process)
>>> launcher.close()
"""
from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import psutil

#: The programs that start nodes (zdist/run.py, which zdist-center and
#: zdist-worker also are, under their own names): LocalCluster runs both, a
#: nanny the worker's.
CENTER_PROGRAM = ["-m", "zdist.run", "center"]
WORKER_PROGRAM = ["-m", "zdist.run", "worker"]

#: Set in the environment of a node a cluster spawns: its spawner's PID.
#: A node whose parent is no longer that process exits (see :func:`parent_gone`).
PARENT_ENV = "ZDIST_EXIT_WITH_PARENT"


def parent_gone() -> bool:
    """Was this process started to exit with its parent (:data:`PARENT_ENV`), and has that parent died?

    A parent killed without cleaning up (SIGKILL, SIGTERM with no handler)
    leaves its children to init; ``os.getppid()`` then names another process.
    """
    pid = os.environ.get(PARENT_ENV)
    return bool(pid) and os.getppid() != int(pid)


def death_signal_setter() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process dies (Linux; None elsewhere).

    ctypes is loaded here, in the parent: a child between fork and exec
    should import nothing. Use it only from a process that runs no threads.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:  # pragma: no cover - runs in the child, between fork and exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_death_signal


class ClusterStartError(RuntimeError):
    """A node of a cluster did not come up (its log's tail is in the message)."""


def node_environment() -> dict:
    """The environment a node process runs with: set where the process is spawned.

    glibc's ``hugetlb`` tunable makes malloc ask for transparent huge pages,
    so the buffers libzmq allocates for a received 100 MB array fault in
    512x fewer pages: measured here, worker-to-worker bandwidth rose about
    1.7x. (Ignored by a glibc older than 2.35.) glibc reads it only when a
    process starts, so it goes into the environment of the process spawned,
    never into a running one: ``LocalCluster`` and the nanny give it to the
    nodes they start; a worker started by hand with ``--no-nanny`` gets it
    from whoever starts it (see "A cluster by hand" in the README).
    ``ZDIST_NO_HUGE_PAGES`` in the environment leaves it out.

    >>> 'hugetlb' in node_environment().get('GLIBC_TUNABLES', 'hugetlb')
    True
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "ZDIST_NO_HUGE_PAGES" not in env and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        tunables = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{tunables}:glibc.malloc.hugetlb=1" if tunables else "glibc.malloc.hugetlb=1"
    return env


class NodeLauncher:
    """Starts node programs (``python ARGS``) with their stderr in a log file, and waits for their first line.

    Each node runs in a session of its own (a Ctrl-C in the terminal reaches
    the client, which then stops the nodes) and with :data:`PARENT_ENV` set
    to this process, so it exits if this process dies unclean.
    """

    def __init__(self, start_timeout: float):
        self.start_timeout = start_timeout
        self.log_dir = tempfile.mkdtemp(prefix="zdist-cluster-")

    def popen(self, label: str, args: list[str]) -> tuple[str, subprocess.Popen, str]:
        """Start ``python ARGS``; answer ``(label, process, log_path)`` for :meth:`await_line`."""
        log_path = os.path.join(self.log_dir, f"{label}-{time.monotonic_ns()}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**node_environment(), PARENT_ENV: str(os.getpid())},
                start_new_session=True,
            )
        return label, process, log_path

    def await_line(self, label: str, process: subprocess.Popen, log_path: str, marker: str) -> str:
        """The first line the process prints with ``marker`` in it; stop it and raise, with its log, if none comes."""
        try:
            return read_line_with(process, marker, self.start_timeout)
        except ClusterStartError as exc:
            terminate(process)
            wait_or_kill(process)
            with open(log_path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            raise ClusterStartError(f"{label}: {exc}\n--- its log ---\n{tail}") from None

    def spawn(self, label: str, args: list[str], marker: str) -> tuple[subprocess.Popen, str]:
        """:meth:`popen`, then :meth:`await_line`: answer the process and its line."""
        label, process, log_path = self.popen(label, args)
        return process, self.await_line(label, process, log_path, marker)

    def close(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)


def read_line_with(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """The first line of ``process``'s stdout that holds ``marker``; :class:`ClusterStartError` if it exits or times out first."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterStartError(f"did not print {marker!r} within {timeout} s")
            if selector.select(min(remaining, 0.1)):
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    raise ClusterStartError(f"exited with code {process.wait()} before printing {marker!r}")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if marker in line:
                        return line
            elif process.poll() is not None:
                raise ClusterStartError(f"exited with code {process.returncode} before printing {marker!r}")
    finally:
        selector.close()


def terminate(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``process`` unless it has exited."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def children(process: subprocess.Popen) -> list:
    """The processes a node process started (a nanny's workers)."""
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []


def wait_or_kill(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Wait ``timeout`` s for ``process`` to exit, then kill it and what it started; close its stdout."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        started = children(process)  # a nanny's worker would outlive it
        process.kill()
        process.wait()
        for child in started:
            with contextlib.suppress(psutil.Error):
                child.kill()
    if process.stdout is not None:
        process.stdout.close()
