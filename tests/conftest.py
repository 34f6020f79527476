"""Fixtures that start real clusters on 127.0.0.1 and always clean them up."""
from __future__ import annotations

import asyncio
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable

import psutil
import pytest

from zdist import LocalCluster, rpc

# Short heartbeats so that tests that kill workers see them dropped quickly.
HEARTBEAT_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.25


def read_lines_until(process: subprocess.Popen, marker: str, timeout: float = 30.0, starts: bool = False, describe: Callable[[], str] = lambda: "") -> list[str]:
    """Lines ``process`` printed (its stdout pipe), up to the first that contains (``starts``: starts with) ``marker``.

    Reads the pipe's bytes itself: lines that arrive in one chunk would otherwise
    wait in a text wrapper's buffer, where ``select`` cannot see them. Fails
    after ``timeout`` seconds or when the output ends, saying what it got and
    ``describe()`` (for example the process's logs).
    """
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            lines = buffer.decode(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if line.startswith(marker) if starts else marker in line:
                    return lines[: i + 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if selector.select(min(remaining, 0.1)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buffer += chunk
            elif process.poll() is not None and not selector.select(0):
                break
    raise AssertionError(f"no {marker!r} within {timeout} s (exit {process.poll()}); got {lines!r}\n{describe()}")


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str | Callable[[], str] = "") -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` s (``message`` may be a function, asked then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout} s: {said or condition}")
        time.sleep(interval)


def run(coroutine: Any, timeout: float = 60.0) -> Any:
    """Run a coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def center_call(address: str, op: str, **args: Any) -> Any:
    """Call one op of the node at ``address`` (the Center, usually) and return its answer."""

    async def call() -> Any:
        async with rpc(address, timeout=20) as node:
            return await getattr(node, op)(**args)

    return run(call())


def make_cluster(n_workers: int = 2, **kwargs: Any) -> LocalCluster:
    kwargs.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT)
    kwargs.setdefault("heartbeat_interval", HEARTBEAT_INTERVAL)
    # Bare workers unless a test asks for nannies: many tests kill a worker
    # (cluster.kill_worker) and count on it staying dead. tests/test_nanny.py
    # and tests/test_memory.py ask for nanny=True.
    kwargs.setdefault("nanny", False)
    return LocalCluster(n_workers=n_workers, **kwargs)


@pytest.fixture
def cluster():
    """Two ``zdist-worker`` subprocesses (1 core each) and a ``zdist-center`` subprocess."""
    with make_cluster(2) as c:
        yield c


@pytest.fixture
def cluster3():
    """Three subprocess workers."""
    with make_cluster(3) as c:
        yield c


@pytest.fixture
def inproc_cluster():
    """A Center and two workers running in this process, on a background loop."""
    with make_cluster(2, processes=False) as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def own_temp_directory():
    """Every file the suite's nodes write to the temp directory lands in one directory, removed at the end.

    Workers that a test kills with SIGKILL cannot remove their
    ``zdist-worker-PID-*`` directories; this keeps them out of the machine's
    /tmp. The directory is searchable by all (0711, not listable): munged
    refuses a socket under a directory other users cannot traverse.
    """
    directory = tempfile.mkdtemp(prefix="zdist-tests-")
    os.chmod(directory, 0o711)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = directory
    tempfile.tempdir = directory
    try:
        yield directory
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Every test must stop every process it started."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    leftover = []
    while time.monotonic() < deadline:
        leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not leftover:
            return
        time.sleep(0.05)
    for p in leftover:
        p.kill()
    pytest.fail(f"test left processes behind: {[(p.pid, p.cmdline()) for p in leftover]}")
