"""zdist-center and zdist-worker, started by hand as a user would."""
from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

from zdist import ProtocolError, rpc

from .conftest import center_call, run

START_TIMEOUT = 60.0  # generous: the machine is shared and small
STOP_TIMEOUT = 20.0  # a bound, not a measurement
ADDRESS = r"127\.0\.0\.1:(\d{1,5})"


def program(name: str) -> list[str]:
    """The console script if it is installed, else the same module run by this Python."""
    path = shutil.which(name)
    if path:
        return [path]
    return [sys.executable, "-m", {"zdist-center": "zdist_cli.center", "zdist-worker": "zdist_cli.worker"}[name]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Program:
    """A node program run as a subprocess; its stdout read line by line with deadlines."""

    def __init__(self, args: list[str]):
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """The first line (read so far or from now on) matching ``pattern``."""
        regex = re.compile(pattern)
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[seen:]:
                match = regex.search(line)
                if match:
                    return match
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; stdout: {self.lines!r}; stderr: {self.stderr_text()!r}")
            if self._selector.select(min(remaining, 0.2)):
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    self.process.wait(STOP_TIMEOUT)
                    raise AssertionError(
                        f"exited with {self.process.returncode} before printing {pattern!r}; stdout: {self.lines!r}; stderr: {self.stderr_text()!r}"
                    )
                self._buffer += chunk
                *complete, self._buffer = self._buffer.split(b"\n")
                self.lines.extend(line.decode(errors="replace").rstrip("\r") for line in complete)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:].decode(errors="replace")

    def stop(self, sig: int) -> int:
        """Send ``sig``; return the exit code (fails if the program does not stop in time)."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not stop within {STOP_TIMEOUT} s of signal {sig}; stderr: {self.stderr_text()!r}") from None

    def kill(self) -> None:
        """Make sure the process is gone (by its PID), and release its pipes."""
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(STOP_TIMEOUT)
        finally:
            self._selector.close()
            self.process.stdout.close()
            self.stderr.close()


@pytest.fixture
def programs():
    """Start programs through this; every one is killed by PID at the end, whatever happens."""
    started: list[Program] = []

    def start(name: str, *args: str) -> Program:
        prog = Program([*program(name), *args])
        started.append(prog)
        return prog

    try:
        yield start
    finally:
        for prog in reversed(started):
            prog.kill()


def start_center(start, *args: str) -> tuple[Program, str]:
    center = start("zdist-center", "--port", "0", "--no-dashboard", *args)
    match = center.wait_for_line(rf"^Start center at ({ADDRESS})$")
    assert match.group(2) != "0"
    return center, match.group(1)


def start_worker(start, center_address: str, *args: str, wait_registered: bool = True) -> tuple[Program, str]:
    worker = start("zdist-worker", center_address, *args)
    match = worker.wait_for_line(rf"^Start worker at: ({ADDRESS})$")
    if wait_registered:
        # A 'tcp://host:port' address is printed as 'host:port'.
        printed = center_address.removeprefix("tcp://")
        worker.wait_for_line(rf"^Registered with center at: {re.escape(printed)}$")
    return worker, match.group(1)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["zdist-center", "zdist-worker"])
def test_help(name):
    result = subprocess.run([*program(name), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}")
    for option in ["--host", "--port", "--max-message-size"]:
        assert option in result.stdout
    if name == "zdist-worker":
        for option in ["CENTER_ADDRESS", "--ncores", "--name", "--local-dir"]:
            assert option in result.stdout


def test_center_and_worker_print_their_addresses_and_register(programs):
    center, center_address = start_center(programs, "--heartbeat-timeout", "120")
    worker, worker_address = start_worker(programs, center_address, "--ncores", "3", "--name", "alice")
    assert worker.lines[:2] == [f"Start worker at: {worker_address}", f"Registered with center at: {center_address}"]
    assert worker_address != center_address
    assert center_call(center_address, "ncores") == {worker_address: 3}
    info = center_call(center_address, "workers")[worker_address]
    assert info["name"] == "alice" and info["ncores"] == 3
    assert info["nanny"] == worker.pid  # zdist-worker is the nanny; the worker is its child
    assert info["pid"] != worker.pid and info["restarts"] == 0

    # The worker serves data at the address it printed.
    async def use_worker():
        async with rpc(worker_address, timeout=20) as w:
            await w.update_data(data={"k": 1})
            return await w.get_data(keys=["k"])

    assert run(use_worker()) == {"k": 1}


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc/PID/environ (Linux)")
def test_worker_runs_as_started_without_re_executing_itself(programs, monkeypatch):
    """A program that restarts itself as another surprises profilers, debuggers and supervisors.

    zdist-worker once re-executed itself to add GLIBC_TUNABLES: the environment
    the process started with would then hold it. Tuning is set by whoever spawns.
    """
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("ZDIST_NO_HUGE_PAGES", raising=False)
    _, center_address = start_center(programs)
    nanny, _ = start_worker(programs, center_address, "--ncores", "1")

    def environ(pid: int) -> list[bytes]:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")  # what the process was (last) executed with

    assert not any(entry.startswith(b"GLIBC_TUNABLES=") for entry in environ(nanny.pid))
    # The nanny spawns the worker, so it sets the worker's tuning.
    (worker,) = psutil.Process(nanny.pid).children()
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ(worker.pid)


def test_worker_port_and_defaults(programs):
    _, center_address = start_center(programs)
    port = free_port()
    _, worker_address = start_worker(programs, center_address, "--port", str(port))
    assert worker_address == f"127.0.0.1:{port}"
    _, other_address = start_worker(programs, "tcp://" + center_address, "--port", "0")
    assert other_address != worker_address
    ncores = center_call(center_address, "ncores")
    assert set(ncores) == {worker_address, other_address}
    assert ncores[worker_address] == (os.cpu_count() or 1)  # --ncores defaults to the machine's cores
    workers = center_call(center_address, "workers")
    assert workers[worker_address]["name"] == worker_address  # --name defaults to the address


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_worker_cleanly_and_it_unregisters_first(programs, sig):
    # A long heartbeat timeout: only the worker's goodbye can remove it quickly.
    center, center_address = start_center(programs, "--heartbeat-timeout", "300")
    worker, worker_address = start_worker(programs, center_address, "--ncores", "1")
    keep, keep_address = start_worker(programs, center_address, "--ncores", "1")

    async def store():
        async with rpc(worker_address, timeout=20) as w:
            await w.update_data(data={"on-worker": 1})

    run(store())
    deadline = time.monotonic() + 30
    while not center_call(center_address, "who_has", keys=["on-worker"])["on-worker"]:
        assert time.monotonic() < deadline, "the Center never learned the key"
        time.sleep(0.05)

    assert worker.stop(sig) == 0
    # Right after it exited, the Center has already forgotten it. SIGTERM
    # retired it first: the key it alone held is on the other worker now.
    assert center_call(center_address, "ncores") == {keep_address: 1}
    expected = {keep_address} if sig == signal.SIGTERM else set()
    assert center_call(center_address, "who_has", keys=["on-worker"]) == {"on-worker": expected}
    assert worker_address not in center_call(center_address, "has_what")
    removed = center_call(center_address, "info")["removed"]
    assert any(entry[1] == worker_address and entry[2] == "unregistered" for entry in removed)

    assert keep.stop(sig) == 0
    assert center_call(center_address, "ncores") == {}
    assert center.stop(sig) == 0
    assert "Traceback" not in worker.stderr_text() + center.stderr_text() + keep.stderr_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_center_cleanly(programs, sig):
    center, _ = start_center(programs)
    assert center.stop(sig) == 0
    assert "Traceback" not in center.stderr_text()


def test_worker_started_before_its_center_waits_and_then_registers(programs):
    port = free_port()
    center_address = f"127.0.0.1:{port}"
    worker, worker_address = start_worker(programs, center_address, "--heartbeat-interval", "0.2", wait_registered=False)
    worker.wait_for_line(rf"^Waiting for center at:? {re.escape(center_address)}")
    assert worker.process.poll() is None  # still alive, still trying
    assert not any(line.startswith("Registered") for line in worker.lines)

    center = programs("zdist-center", "--port", str(port), "--no-dashboard")
    center.wait_for_line(rf"^Start center at {re.escape(center_address)}$")
    worker.wait_for_line(rf"^Registered with center at: {re.escape(center_address)}$")

    deadline = time.monotonic() + 30
    while worker_address not in center_call(center_address, "ncores"):
        assert time.monotonic() < deadline, "the Center does not list the worker"
        time.sleep(0.05)
    assert worker.stop(signal.SIGTERM) == 0
    assert center.stop(signal.SIGTERM) == 0


def test_worker_stopped_while_waiting_for_its_center(programs):
    center_address = f"127.0.0.1:{free_port()}"
    worker, _ = start_worker(programs, center_address, wait_registered=False)
    worker.wait_for_line(r"^Waiting for center at")
    assert worker.stop(signal.SIGINT) == 0


def test_center_port_already_in_use(programs):
    _, center_address = start_center(programs)
    port = center_address.rsplit(":", 1)[1]
    second = programs("zdist-center", "--port", port, "--no-dashboard")
    assert second.process.wait(START_TIMEOUT) != 0
    assert port in second.stderr_text()


def test_worker_with_a_bad_center_address(programs):
    worker = programs("zdist-worker", "no-port-here")
    assert worker.process.wait(START_TIMEOUT) == 2
    assert "no-port-here" in worker.stderr_text()


def test_max_message_size_option(programs):
    _, center_address = start_center(programs, "--max-message-size", "1000000")
    _, worker_address = start_worker(programs, center_address, "--max-message-size", "1000000")

    async def main():
        async with rpc(worker_address, timeout=30) as w:
            with pytest.raises(ProtocolError, match="larger than"):
                await w.update_data(data={"big": np.ones(250_000)})
            assert (await w.update_data(data={"small": np.ones(1000)}))[0] == b"OK"
        async with rpc(center_address, timeout=30) as c:
            with pytest.raises(ProtocolError, match="larger than"):
                await c.who_has(keys=["x" * 2_000_000])
            assert await c.ping() == "pong"

    run(main())
