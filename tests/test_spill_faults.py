"""Where spill files cannot go: an unwritable --local-dir, a disk that fills up; zdist-worker programs on 127.0.0.1."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import numpy as np
import pytest

from zdist import rpc

from .conftest import center_call, run, wait_for
from .test_status import script
from .test_nanny import STOP_TIMEOUT, nodes  # noqa: F401 - the fixture: a Center and zdist-worker programs

MB = 10**6


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted here (root only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root; tests/test_memory.py injects ENOSPC at the store's write instead")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _read_only_dir(tmp_path) -> str:
    """A directory this process cannot write, even as root: a read-only tmpfs (root) or mode 0500."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        path.chmod(0o500)
    return str(path)


def test_an_unwritable_local_dir_is_refused_at_start_saying_what_to_do(nodes, tmp_path):  # noqa: F811
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    read_only = _read_only_dir(tmp_path)
    try:
        for local_dir, why, nanny in ((str(a_file / "spill"), "Not a directory", ["--no-nanny"]), (read_only, "", [])):
            worker = nodes.worker("--local-dir", local_dir, "--memory-limit", "100MB", *nanny)
            assert worker.wait(STOP_TIMEOUT) == 1
            stderr = worker.stderr.read().decode()
            assert f"--local-dir {local_dir} is not writable ({why}" in stderr, stderr
            assert "give a directory this user can write" in stderr and "Traceback" not in stderr
            assert stderr.count("is not writable") == 1  # said once: the nanny does not start it again
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", read_only], check=False)


def test_a_disk_that_fills_up_while_spilling_loses_nothing_and_says_what_to_do(nodes, small_disk):  # noqa: F811
    # 400 MB limit, target 1% (4 MB in memory): 12 values of 1 MB want 8 MB on a 2 MiB disk.
    worker = nodes.worker("--no-nanny", "--local-dir", small_disk, "--memory-limit", "400MB", "--memory-target", "0.01", "--memory-spill", "off")
    address = nodes.read_line(worker, "Start worker at").split()[-1]
    values = {f"v{i}": np.random.default_rng(i).random(MB // 8) for i in range(12)}

    async def fill():
        async with rpc(address, timeout=30) as w:
            for key, value in values.items():
                await w.update_data(data={key: value})  # each accepted: what cannot go to disk stays in memory
            metrics = await w.metrics()
            got = await w.get_data(keys=list(values))  # a paused worker still serves its data
            return metrics, got

    metrics, got = run(fill())
    assert 0 < metrics["bytes_on_disk"] <= 2 * 2**20 and metrics["status"] == "paused"
    assert small_disk in metrics["spill_error"] and "--local-dir on a larger disk" in metrics["spill_error"]
    assert all(digest(got[key]) == digest(value) for key, value in values.items())
    info = wait_for(lambda: center_call(nodes.center, "workers").get(address, {}).get("spill_error"), timeout=20, message="the Center shows why")
    assert "the disk is full" in info
    status = subprocess.run([script("zdist"), "status", nodes.center], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert f"cannot spill to {small_disk}" in status.stdout, status.stdout + status.stderr

    async def make_room():
        async with rpc(address, timeout=30) as w:
            await w.delete_data(keys=list(values)[:-2])
            for _ in range(200):  # bounded: 20 s; the worker checks its memory every few tenths of a second
                metrics = await w.metrics()
                if metrics["status"] == "running":
                    break
                await asyncio_sleep(0.1)
            _, meta = await w.compute(function=digest, args=(np.ones(10),), key="after", return_value=1000)
            return metrics, meta, await w.get_data(keys=list(values)[-2:])

    metrics, meta, rest = run(make_room())
    assert metrics["status"] == "running" and metrics["spill_error"] == ""
    assert meta["value"] == digest(np.ones(10))
    assert all(digest(rest[key]) == digest(values[key]) for key in rest)
    wait_for(lambda: center_call(nodes.center, "workers")[address].get("spill_error") == "", timeout=20, message="the Center hears it is over")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(STOP_TIMEOUT) == 0
    assert worker.stderr.read().decode().count("cannot spill to") == 1  # logged once
    assert os.listdir(small_disk) == []  # its spill directory removed on exit


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
