"""The Center file: where a Center says its address, for workers and clients that start elsewhere.

A batch job cannot know the Center's port before the Center has started, so
``zdist-center --center-file PATH`` writes, once it listens, a small JSON file

    {"address": "tcp://HOST:PORT", "public_key": "<z85 text or null>", "dashboard": "<url or null>"}

on a path every node sees (a shared file system), and ``zdist-worker
--center-file PATH`` and clients (:func:`read_center_file`) read it, waiting
for it to appear. The file is written to a temporary name and renamed, so a
reader never sees half of it; the Center removes it when it stops cleanly.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), 'center.json')
>>> write_center_file(path, '127.0.0.1:8787')
>>> info = read_center_file(path, timeout=1)
>>> info.center_address, info.public_key
('127.0.0.1:8787', None)
>>> remove_center_file(path, '127.0.0.1:8787')
>>> read_center_file(path, timeout=0.1)
Traceback (most recent call last):
...
TimeoutError: no Center file at ... after 0.1 s: ...
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

__all__ = ["CenterFile", "read_center_file", "write_center_file", "remove_center_file"]

#: How often a reader looks for the file while waiting for it.
POLL_INTERVAL = 0.1


@dataclasses.dataclass(frozen=True)
class CenterFile:
    """What a Center file says. Accepted wherever a cluster is: ``Pool(read_center_file(path))``."""

    address: str  # 'tcp://host:port'
    public_key: str | None = None  # the Center's CURVE public key (z85), when it runs with --key
    dashboard: str | None = None

    @property
    def center_address(self) -> str:
        """``'host:port'``, as every zdist client takes it."""
        return self.address[len("tcp://"):] if self.address.startswith("tcp://") else self.address  # ipc:// stays


def write_center_file(path: str, address: str, public_key: str | None = None, dashboard: str | None = None) -> None:
    """Write the Center file at ``path`` atomically (a temporary file in the same directory, then a rename)."""
    path = os.path.abspath(os.path.expanduser(path))
    body = {"address": address if address.startswith(("tcp://", "ipc://")) else f"tcp://{address}", "public_key": public_key, "dashboard": dashboard}
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(body, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # on a shared file system, readers on other hosts see the whole file
    os.replace(temporary, path)


def remove_center_file(path: str, address: str) -> None:
    """Remove the Center file if it still names ``address`` (a newer Center may have written its own)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        if _parse(path).center_address == CenterFile(address).center_address:
            os.remove(path)
    except (OSError, ValueError):
        pass


def read_center_file(path: str | os.PathLike, timeout: float | None = 60.0) -> CenterFile:
    """Read the Center file at ``path``, waiting up to ``timeout`` seconds (None: for ever) for it to appear.

    Raises :class:`TimeoutError` naming the path when it does not appear in
    time, and :class:`ValueError` when the file is not a Center file.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return _parse(path)
        except FileNotFoundError:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"no Center file at {path} after {timeout:g} s: start the Center with `zdist-center --center-file {path}` "
                "on a path this machine sees, or wait longer"
            )
        time.sleep(POLL_INTERVAL if deadline is None else max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))


def _parse(path: str) -> CenterFile:
    with open(path) as f:
        text = f.read()
    try:
        body = json.loads(text)
        address = body["address"]
        if not isinstance(address, str):
            raise TypeError(address)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a zdist Center file (JSON with an 'address'); got {text[:200]!r}") from None
    return CenterFile(address, body.get("public_key"), body.get("dashboard"))
