"""The node options batch jobs need: --center-file, --death-timeout, --interface (real processes)."""
from __future__ import annotations

import json
import re
import signal
import time

import pytest

from zdist import Pool
from zdist.deploy import read_center_file
from zdist.errors import EXIT_NO_CENTER

from .conftest import center_call, wait_for
from .test_cli import ADDRESS, STOP_TIMEOUT, programs, start_center  # noqa: F401 - programs is a fixture

#: A Center that is gone is noticed after at most this long: the death timeout,
#: plus one heartbeat request's timeout (2 s), plus slack for a busy machine.
DEATH_TIMEOUT = 2.0
EXIT_BOUND = DEATH_TIMEOUT + 20.0


def exit_code(program, timeout: float) -> int:
    try:
        return program.process.wait(timeout)
    except Exception:
        raise AssertionError(f"still running after {timeout} s; stdout {program.lines!r}; stderr {program.stderr_text()!r}") from None


def test_center_file_written_read_and_removed(programs, tmp_path):
    path = tmp_path / "center.json"
    # The worker first: in a batch allocation it may start before its Center.
    worker = programs("zdist-worker", "--center-file", str(path), "--no-nanny")
    center, address = start_center(programs, "--center-file", str(path))
    body = json.loads(path.read_text())
    assert body == {"address": f"tcp://{address}", "public_key": None, "dashboard": None}
    assert [p.name for p in tmp_path.iterdir()] == ["center.json"]  # no temporary file left
    worker.wait_for_line(rf"^Registered with center at: {re.escape(address)}$")
    assert len(center_call(address, "ncores")) == 1

    with Pool(read_center_file(path, timeout=5)) as pool:  # what a client in the job does
        assert pool.gather(pool.map(abs, [-1, -2])) == [1, 2]

    assert worker.stop(signal.SIGINT) == 0
    assert center.stop(signal.SIGINT) == 0
    assert not path.exists()  # a stale file would send the next job's workers to a dead Center


def test_center_file_carries_the_public_key(programs, tmp_path):
    from zdist.security import create_keys, load_public_key

    _, secret = create_keys(str(tmp_path / "keys"))
    path = tmp_path / "center.json"
    center, address = start_center(programs, "--center-file", str(path), "--key", secret)
    info = read_center_file(path, timeout=10)
    assert info.center_address == address
    assert info.public_key.encode() == load_public_key(secret.replace(".key_secret", ".key"))
    assert center.stop(signal.SIGINT) == 0


def test_worker_waits_for_the_center_file_then_gives_up(programs, tmp_path):
    path = tmp_path / "never.json"
    worker = programs("zdist-worker", "--center-file", str(path), "--death-timeout", "1")
    assert exit_code(worker, EXIT_BOUND) == EXIT_NO_CENTER
    assert f"no Center file at {path} after 1 s" in worker.stderr_text()


def test_worker_needs_an_address_or_a_center_file(programs, tmp_path):
    worker = programs("zdist-worker")
    assert exit_code(worker, STOP_TIMEOUT) == 2
    assert "give the Center's address or --center-file PATH" in worker.stderr_text()


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny", "no-nanny"])
def test_death_timeout_worker_exits_when_its_center_is_gone(programs, nanny):
    center, address = start_center(programs)
    worker = programs("zdist-worker", address, "--death-timeout", f"{DEATH_TIMEOUT}s", *([] if nanny else ["--no-nanny"]))
    worker.wait_for_line(rf"^Registered with center at: {re.escape(address)}$")
    center.kill()  # SIGKILL: the Center vanishes as a cancelled job's would
    assert exit_code(worker, EXIT_BOUND) == EXIT_NO_CENTER
    stderr = worker.stderr_text()
    assert "(--death-timeout): worker" in stderr and f"exits (status {EXIT_NO_CENTER})" in stderr
    if nanny:
        assert "not starting it again" in stderr
        assert sum(line.startswith("Start worker at:") for line in worker.lines) == 1  # never restarted


def test_death_timeout_does_not_fire_while_the_center_answers(programs):
    center, address = start_center(programs)
    worker = programs("zdist-worker", address, "--death-timeout", "1", "--no-nanny", "--heartbeat-interval", "0.1")
    worker.wait_for_line(rf"^Registered with center at: {re.escape(address)}$")
    # Three death timeouts go by (each poll is a Center round trip); the worker stays.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, worker.stderr_text()
        assert len(center_call(address, "ncores")) == 1
    assert worker.stop(signal.SIGINT) == 0


def test_interface_option_listens_on_that_interface(programs):
    center = programs("zdist-center", "--port", "0", "--no-dashboard", "--interface", "lo")
    address = center.wait_for_line(rf"^Start center at ({ADDRESS})$").group(1)
    worker = programs("zdist-worker", address, "--interface", "lo", "--nworkers", "2", "--ncores", "2")
    worker.wait_for_line(rf"^Start worker at: {ADDRESS}$")
    workers = wait_for(lambda: len(center_call(address, "ncores")) == 2 and center_call(address, "ncores"), timeout=60)
    assert all(w.startswith("127.0.0.1:") for w in workers)
    assert worker.stop(signal.SIGINT) == 0


def test_interface_that_does_not_exist_names_those_there_are(programs):
    worker = programs("zdist-worker", "127.0.0.1:1", "--interface", "nosuch0")
    assert exit_code(worker, STOP_TIMEOUT) == 2
    stderr = worker.stderr_text()
    assert "no network interface 'nosuch0' on this machine; it has" in stderr and "lo" in stderr
    both = programs("zdist-center", "--host", "127.0.0.1", "--interface", "lo")
    assert exit_code(both, STOP_TIMEOUT) == 2
    assert "give --host or --interface, not both" in both.stderr_text()


def test_center_file_on_a_wildcard_host_names_a_reachable_address():
    from zdist.run import _reachable

    assert _reachable("127.0.0.1:5") == "127.0.0.1:5"
    host, port = _reachable("0.0.0.0:5").rsplit(":", 1)
    assert port == "5" and host != "0.0.0.0"
