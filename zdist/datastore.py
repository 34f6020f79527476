"""A worker's data under a memory limit: spill to disk, and pause when memory runs out.

:class:`SpillStore` is the worker's ``data`` mapping when it has a memory
limit: a :class:`zict.Buffer` that keeps recently used values in memory (up
to the ``target`` fraction of the limit, by their ``sizeof``) and moves the
least recently used ones to :class:`DiskStore`. zict is what dask.distributed
uses for the same job; its Buffer/LRU layering is thread-safe (tasks read
``data`` from the thread pool) and keeps a value in memory when writing it
to disk fails. The slow side is ours rather than a ``zict.Func`` over a
``zict.File``, because the worker needs two things Func hides: the file's
size, and the raw bytes, so that a value a peer asks for is sent from disk
**without being unpickled** (:meth:`SpillStore.serialized`).

On disk a value keeps its zero-copy form: a small header, the pickle-5
blob, then each out-of-band buffer (a NumPy array's memory) at a 64-byte
aligned offset. It is read back with one ``readinto`` into one buffer, and
arrays are built on that buffer without another copy.

:class:`WorkerMemory` watches the process's memory (the thresholds of
:mod:`zdist.memory`): it spills by process memory, pauses the worker (no
new tasks; ``get_data`` and deletions are still served) and resumes it.
When the disk is full (ENOSPC), the value stays in memory, the worker logs
it once and pauses until its data fits in memory again.

>>> import numpy as np, tempfile
>>> store = SpillStore(tempfile.mkdtemp(), target=1000)
>>> store['small'] = 1
>>> store['big'] = np.arange(1000)      # 8000 bytes: over the target, so it goes to disk
>>> store.bytes_in_memory, store.bytes_on_disk > 8000, sorted(store.spilled)
(28, True, ['big'])
>>> int(store['big'].sum()), store.disk.loads   # read back (unpickled once)
(499500, 1)
>>> store.close()
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import msgpack
import psutil
import zict

from .memory import MemoryThresholds
from .protocol import Serialized, deserialize, serialize

logger = logging.getLogger(__name__)

#: Out-of-band buffers start at offsets that are multiples of this in a spill file.
ALIGNMENT = 64
#: How often a worker with a memory limit looks at its process's memory.
MONITOR_INTERVAL = 0.05
_HEADER = struct.Struct("<Q")


def sizeof(value: Any) -> int:
    from .worker import sizeof as _sizeof  # the worker's measure (dask's sizeof)

    return _sizeof(value)


def to_frames(serialized: Serialized) -> tuple[list, int]:
    """A value's spill file as a list of frames (written with ``writelines``), and its size.

    Layout: 8 bytes of header length, a msgpack header ``{kind, blob: [offset,
    n], buffers: [[offset, n], ...]}`` padded to a room fixed in advance
    (offsets depend on the header's size), the blob, then each buffer at an
    offset aligned to :data:`ALIGNMENT`.
    """
    buffers = []
    for buffer in serialized.buffers:
        view = memoryview(buffer)
        buffers.append(view if view.ndim == 1 and view.format == "B" else view.cast("B"))
    blob = serialized.blob
    widest = [2**62, 2**62]  # msgpack's widest integers: the real header is never longer
    room = _HEADER.size + len(msgpack.packb({"kind": serialized.kind, "blob": widest, "buffers": [widest] * len(buffers)}))
    layout = []
    offset = room + len(blob)
    for view in buffers:
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        layout.append([offset, view.nbytes])
        offset += view.nbytes
    packed = msgpack.packb({"kind": serialized.kind, "blob": [room, len(blob)], "buffers": layout})
    frames: list = [_HEADER.pack(len(packed)), packed, bytes(room - _HEADER.size - len(packed)), blob]
    position = room + len(blob)
    for (start, nbytes), view in zip(layout, buffers):
        if start > position:
            frames.append(bytes(start - position))
        frames.append(view)
        position = start + nbytes
    return frames, position


def from_frames(buffer: bytearray | memoryview) -> Serialized:
    """The :class:`Serialized` form of a spill file's bytes: nothing is unpickled, nothing copied."""
    view = memoryview(buffer)
    (length,) = _HEADER.unpack_from(view)
    header = msgpack.unpackb(view[_HEADER.size : _HEADER.size + length])
    start, nbytes = header["blob"]
    return Serialized(header["kind"], view[start : start + nbytes], [view[offset : offset + n] for offset, n in header["buffers"]])


class DiskStore(MutableMapping):
    """Values as spill files in ``directory`` (a :class:`zict.File`), keyed by any hashable key."""

    def __init__(self, directory: str):
        self.directory = directory
        self.file = zict.File(directory)
        self.names: dict[Any, str] = {}
        self.sizes: dict[Any, int] = {}
        self.loads = 0  # values unpickled from disk (a peer's get_data does not count)
        self.bytes_written = 0
        self.bytes_read = 0

    @staticmethod
    def _name(key: Any) -> str:
        try:
            raw = pickle.dumps(key, protocol=4)
        except Exception:  # noqa: BLE001 - any key the worker accepted has a repr
            raw = repr(key).encode()
        return hashlib.sha1(raw).hexdigest()

    def _write(self, name: str, frames: list) -> None:
        """Write one file (the place a test injects a full disk)."""
        self.file[name] = frames

    def __setitem__(self, key: Any, value: Any) -> None:
        frames, nbytes = to_frames(serialize(value))
        name = self._name(key)
        try:
            self._write(name, frames)
        except BaseException:
            self._remove_partial(name)
            raise
        self.names[key] = name
        self.sizes[key] = nbytes
        self.bytes_written += nbytes

    def _remove_partial(self, name: str) -> None:
        """zict.File leaves a half-written file behind when a write fails: remove it."""
        known = set(self.file.filenames.values())
        prefix = name + "#"
        for entry in os.listdir(self.directory):
            if entry.startswith(prefix) and entry not in known:
                try:
                    os.remove(os.path.join(self.directory, entry))
                except OSError:
                    pass

    def read(self, key: Any) -> Serialized:
        """The value's :class:`Serialized` form, read from disk without unpickling it."""
        buffer = self.file[self.names[key]]
        self.bytes_read += len(buffer)
        return from_frames(buffer)

    def __getitem__(self, key: Any) -> Any:
        if key not in self.names:
            raise KeyError(key)
        serialized = self.read(key)
        self.loads += 1
        return deserialize(serialized.kind, serialized.blob, serialized.buffers)

    def __delitem__(self, key: Any) -> None:
        name = self.names.pop(key)
        self.sizes.pop(key, None)
        del self.file[name]

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Iterator:
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)


class SpillStore(zict.Buffer):
    """The worker's data: up to ``target`` bytes in memory, the least recently used rest on disk.

    ``target=None`` spills nothing by the data's size (only when asked:
    :meth:`spill_one`). A failed write to disk (ENOSPC, EIO) keeps the value
    in memory: ``on_disk_error`` is called and :attr:`disk_full` is set.
    """

    def __init__(self, directory: str, target: float | None, on_disk_error: Callable[[OSError], None] | None = None):
        self.disk = DiskStore(directory)
        super().__init__({}, self.disk, float("inf") if target is None else target, weight=lambda key, value: sizeof(value))
        self.on_disk_error = on_disk_error
        self.disk_full = False
        self.spill_count = 0
        self.fast_to_slow_callbacks.append(self._spilled)

    def _spilled(self, key: Any, value: Any) -> None:
        self.spill_count += 1
        self.disk_full = False

    def _disk_error(self, exc: OSError) -> None:
        self.disk_full = True
        if self.on_disk_error is not None:
            self.on_disk_error(exc)

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            super().__setitem__(key, value)
        except OSError as exc:  # the value stays in memory
            self._disk_error(exc)

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except OSError as exc:  # read back, then spilling another value to make room failed
            if key in self.fast:
                self._disk_error(exc)
                return self.fast.d[key]
            raise

    def spill_one(self) -> bool:
        """Move the least recently used value in memory to disk; False if none could be."""
        try:
            key, _, _ = self.fast.evict()
        except KeyError:
            return False
        except OSError as exc:
            self._disk_error(exc)
            return False
        return key is not None

    @property
    def spilled(self) -> list:
        """Keys whose value is on disk now."""
        return list(self.disk.names)

    @property
    def bytes_in_memory(self) -> int:
        return int(self.fast.total_weight)

    @property
    def bytes_on_disk(self) -> int:
        return sum(self.disk.sizes.values())

    def serialized(self, key: Any) -> Any:
        """What ``get_data`` sends: the value, or, if it is on disk, its bytes as they are there."""
        with self.lock:
            if key in self.fast:
                return self.fast[key]
            if key in self.disk:
                return self.disk.read(key)
        raise KeyError(key)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.disk.directory, ignore_errors=True)


def work_directory(parent: str | None) -> str:
    """A fresh directory for one worker's files, ``zdist-worker-PID-*`` in ``parent`` (default: temp).

    The PID in its name lets a nanny remove it after the worker was killed.
    Raises :class:`OSError` saying so when ``parent`` is not writable.
    """
    parent = parent or tempfile.gettempdir()
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"zdist-worker-{os.getpid()}-", dir=parent)
    except OSError as exc:
        raise OSError(
            f"--local-dir {parent} is not writable ({exc.strerror or exc}): give a directory this user can write, "
            "or leave --local-dir out to use the system's temp directory"
        ) from None


class WorkerMemory:
    """A worker's memory limit in action: its data mapping, spilling by RSS, pause and resume.

    ``on_change()`` is called when the worker pauses or resumes (the worker
    then tells the Center at once).
    """

    def __init__(self, limit: int | None, thresholds: MemoryThresholds, directory: str, on_change: Callable[[], None] | None = None):
        self.limit = limit
        self.thresholds = thresholds
        self.directory = directory
        self.on_change = on_change
        self.paused = False
        self.running = asyncio.Event()
        self.running.set()
        self._said_disk_full = False
        # Why spilling fails now (a full disk), for the Center and `zdist status`; "" when it works.
        self.spill_error = ""
        self.store: SpillStore | None = None
        if limit and (thresholds.target or thresholds.spill):
            target = thresholds.target * limit if thresholds.target else None
            self.store = SpillStore(os.path.join(directory, "spill"), target, self._disk_error)
        self.data: MutableMapping = self.store if self.store is not None else {}
        self._process = psutil.Process()

    def _disk_error(self, exc: OSError) -> None:
        if not self._said_disk_full:
            why = "the disk is full" if exc.errno == errno.ENOSPC else f"writing failed ({exc})"
            self.spill_error = (
                f"cannot spill to {self.directory}: {why}; values stay in memory and the worker pauses until they fit. "
                "Free space there, delete values, or start the worker with --local-dir on a larger disk"
            )
            logger.warning("%s", self.spill_error)
            self._said_disk_full = True
        self.check()

    def rss(self) -> int:
        try:
            return self._process.memory_info().rss
        except psutil.Error:
            return 0

    def metrics(self) -> dict:
        store = self.store
        return {
            "status": "paused" if self.paused else "running",
            "bytes_in_memory": store.bytes_in_memory if store is not None else None,
            "bytes_on_disk": store.bytes_on_disk if store is not None else 0,
            "spilled": store.spill_count if store is not None else 0,
            "unspilled": store.disk.loads if store is not None else 0,
            "spill_error": self.spill_error,
        }

    def check(self, rss: int | None = None) -> None:
        """Pause or resume by the process's memory (and a full disk)."""
        if not self.limit:
            return
        rss = self.rss() if rss is None else rss
        pause = bool(self.thresholds.pause and rss > self.thresholds.pause * self.limit)
        store = self.store
        if store is not None and store.disk_full:
            target = (self.thresholds.target or self.thresholds.spill or 1.0) * self.limit
            if store.bytes_in_memory <= target:
                store.disk_full = False  # it fits again: spilling may be tried anew
                self._said_disk_full = False
                self.spill_error = ""
            else:
                pause = True
        if pause != self.paused:
            self.paused = pause
            if pause:
                self.running.clear()
                logger.warning("pausing: memory %.0f MiB of a %.0f MiB limit%s; no new tasks until it drops",
                               rss / 2**20, self.limit / 2**20, " (and the disk is full)" if store is not None and store.disk_full else "")
            else:
                self.running.set()
                logger.warning("resuming: memory %.0f MiB of a %.0f MiB limit", rss / 2**20, self.limit / 2**20)
            if self.on_change is not None:
                self.on_change()

    async def monitor(self) -> None:
        """Every :data:`MONITOR_INTERVAL` s: spill by process memory, then pause or resume."""
        if not self.limit:
            return
        spill, target = self.thresholds.spill, self.thresholds.target or self.thresholds.spill
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            rss = self.rss()
            if spill and self.store is not None and rss > spill * self.limit:
                for _ in range(len(self.store.fast)):  # bounded: at most everything in memory
                    if not self.store.spill_one():
                        break
                    await asyncio.sleep(0)  # serve requests between values
                    rss = self.rss()
                    if rss <= target * self.limit:
                        break
            self.check(rss)

    async def wait_running(self) -> None:
        await self.running.wait()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)
