"""Fuzz the wire-protocol decoder and live nodes with random and mutated messages.

    python benchmarks/fuzz_nodes.py [--count 100000] [--seconds 600] [--seed N] [--decoder-count 100000]

Starts a ``LocalCluster`` (a ``zdist-center`` and two ``zdist-worker``
subprocesses), stores some values on the first worker, then sends
``--count`` random and mutated multipart messages from raw ZeroMQ DEALER
sockets, half at the Center and half at that worker: random bytes, valid
messages with bits flipped, bytes overwritten, inserted or cut, frames
dropped, duplicated, swapped or added, and random msgpack maps with random
extension types (tuples, sets, pickles, references, big integers and codes
the protocol does not know). After every batch a ``ping`` must come back
(a node that stops answering is a hang); every reply must be a well-formed
reply. Afterwards both nodes must still answer ``ping``, ``who_has``,
``get_data`` of the values stored before and ``compute``, still hold all
their data, and their memory (RSS) must not have grown by more than
``--rss-bound-mb``. The decoder alone (``parse_request``/``parse_reply``)
is fuzzed in this process first: it must decode or raise ``ProtocolError``.

Prints a summary and exits 1 if anything was found. ``tests/test_fuzz.py``
runs the same code (a few thousand messages by default, the full count as
a ``slow`` test).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import math
import operator
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np
import psutil
import zmq

from zdist.protocol import ProtocolError, Ref, encode_error, encode_reply, encode_request, parse_reply, parse_request
from zdist.protocol.message import (
    EXT_BIGINT,
    EXT_FROZENSET,
    EXT_MEMO,
    EXT_PICKLED,
    EXT_REF,
    EXT_SET,
    EXT_TUPLE,
)
from zdist.protocol.serialize import serialize

if __name__ != "__main__":
    # Loaded by the tests under its own name: ship this module's functions by value.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

CENTER_OPS = [
    "register", "unregister", "heartbeat", "add_keys", "remove_keys", "who_has", "has_what", "nbytes",
    "ncores", "workers", "info", "set_replicas", "ping", "identity",
]
WORKER_OPS = [
    "get_data", "update_data", "delete_data", "compute", "compute_batch", "keys", "metrics",
    "get_task_log", "fetch_keys", "ping", "identity",
]
ARG_NAMES = [
    "keys", "key", "address", "ncores", "name", "data", "function", "args", "kwargs", "tasks", "workers",
    "report", "return_value", "return_values", "since", "pid", "nbytes", "memory", "x",
]
INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xC8,
                     0xC9, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD8, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]
INTERESTING_INTS = [0, 1, -1, 2, 7, 255, 256, -129, 2**31 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**64), 10**40]

# Harmless callables a fuzzed compute may get to run.
FUNCTIONS: list[Callable] = [len, sum, str, operator.add, max, (lambda *args, **kwargs: None), (lambda x=0: x)]
PICKLED_VALUES: list[Any] = [
    np.arange(6), np.ones((2, 3)), np.array(["a", "b"]), np.float64(1.5), (1, "a"), {1, 2}, frozenset({"x"}),
    ValueError("fuzz"), KeyError(("k", 1)), b"xy", bytearray(b"ab"), 10**30, 1.5, None, {"a": [1, 2]}, complex(1, 2),
    Ref("fz-0"), range(5), slice(1, 5), [np.arange(3), np.arange(3)],
]


def _fake_addresses() -> list[str]:
    # Never a real node: addresses in 127.254/16 where nothing listens.
    return [f"127.254.{i}.{i + 1}:{1000 + i}" for i in range(8)] + ["", ":", "x", "127.0.0.1", "127.0.0.1:", "tcp://127.254.9.9:9"]


FAKE_ADDRESSES = _fake_addresses()


def fuzz_key(rng: random.Random) -> Any:
    """A key from a small pool, so that fuzzed update_data calls overwrite rather than pile up."""
    n = rng.randrange(64)
    return rng.choice([f"fz-{n}", ("fz", n), ("fz", n, n % 3), b"fz-%d" % n, 10_000 + n])


class MessageFactory:
    """Random and mutated multipart messages, from one ``random.Random``.

    ``rng`` may be a hypothesis-controlled ``Random`` (``st.randoms()``),
    which makes hypothesis shrink what this builds.
    """

    def __init__(self, rng: random.Random, ops: list[str] | None = None):
        self.rng = rng
        self.ops = ops or sorted(set(CENTER_OPS + WORKER_OPS))
        self.seeds = self._seed_messages()

    # -------------------------------------------------------------- valid messages

    def _seed_messages(self) -> list[list[bytes]]:
        rng = self.rng
        k = lambda: fuzz_key(rng)  # noqa: E731
        addr = lambda: rng.choice(FAKE_ADDRESSES[:8])  # noqa: E731
        f = lambda: rng.choice(FUNCTIONS)  # noqa: E731
        big = np.arange(2_500, dtype="int64")  # 20 kB: travels as a frame of its own
        requests = [
            ("ping", {}),
            ("identity", {}),
            ("who_has", {"keys": [k(), k(), ("x", (1, 2))]}),
            ("who_has", {}),
            ("has_what", {"workers": [addr()]}),
            ("nbytes", {"keys": [k()]}),
            ("ncores", {}),
            ("workers", {}),
            ("info", {}),
            ("register", {"address": addr(), "ncores": 1, "name": "fuzz", "keys": {k(): 8, k(): 0}}),
            ("heartbeat", {"address": addr(), "executing": 0, "memory": 1}),
            ("add_keys", {"address": addr(), "keys": {k(): 8}}),
            ("add_keys", {"address": addr(), "keys": [k(), k()]}),
            ("remove_keys", {"address": addr(), "keys": [k()]}),
            ("unregister", {"address": addr()}),
            ("set_replicas", {"keys": {k(): 2}}),
            ("get_data", {"keys": [k(), k()]}),
            ("update_data", {"data": {k(): 1, k(): (1, "a"), k(): {2, 3}}}),
            ("update_data", {"data": {k(): big}}),
            ("update_data", {"data": {k(): b"z" * 20_000, k(): bytearray(b"ab"), k(): memoryview(b"cd")}}),
            ("update_data", {"data": {k(): [np.arange(3), Ref(k())]}, "report": False}),
            ("delete_data", {"keys": [k(), k()]}),
            ("compute", {"function": f(), "args": (1, 2), "key": k()}),
            ("compute", {"function": f(), "keys": [k()], "key": k(), "return_value": 100}),
            ("compute", {"function": operator.add, "args": (np.arange(3),), "kwargs": {}, "key": k()}),
            ("compute_batch", {"tasks": [[k(), f(), (1,), {}, []], [k(), operator.add, (Ref(k()), 1), {}, [k()]]], "return_values": 64}),
            ("keys", {}),
            ("metrics", {}),
            ("get_task_log", {"since": 0.0}),
            ("fetch_keys", {"keys": [k()]}),
            ("no_such_op", {"a": 1}),
        ]
        seeds = []
        for op, args in requests:
            for request_id in (rng.choice(INTERESTING_INTS[:12]), None):
                seeds.append(_as_bytes(encode_request(op, request_id, args)))
        seeds.append(_as_bytes(encode_reply(3, {"a": (1, 2), "b": big})))
        seeds.append(_as_bytes(encode_reply(None, [1, {2}])))
        seeds.append(_as_bytes(encode_error(4, KeyError(("x", 1)))))
        return seeds

    # -------------------------------------------------------------- random values

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(14 if depth < 3 else 9)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice(INTERESTING_INTS + [rng.randrange(-1000, 1000)])
        if kind == 3:
            return rng.choice([0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308, rng.random()])
        if kind == 4:
            return rng.choice(self.ops + ARG_NAMES + ["", "ok", "error", "\x00", "é" * 3, "fz-1"] + FAKE_ADDRESSES)
        if kind == 5:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
        if kind == 6:
            return fuzz_key(rng)
        if kind == 7:
            return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))
        if kind == 8:
            return self.ext(depth)
        if kind in (9, 10):
            return [self.value(depth + 1) for _ in range(rng.randrange(5))]
        if kind in (11, 12):
            out = {}
            for _ in range(rng.randrange(5)):
                key = self.hashable_value(depth + 1) if rng.random() < 0.2 else rng.choice(ARG_NAMES)
                out[key] = self.value(depth + 1)
            return out
        return rng.choice(PICKLED_VALUES)

    def hashable_value(self, depth: int = 0) -> Any:
        key = self.value(depth)
        try:
            hash(key)
        except TypeError:
            key = repr(key)
        return key

    def ext(self, depth: int = 0) -> msgpack.ExtType:
        rng = self.rng
        code = rng.choice([EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_PICKLED, EXT_PICKLED, EXT_MEMO, EXT_REF, EXT_BIGINT,
                           0, 8, 9, 42, 127, -1])
        if code == -1:  # msgpack's own timestamp extension
            return msgpack.Timestamp(rng.randrange(2**34), rng.randrange(10**9))
        r = rng.random()
        if r < 0.2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(10)))
        elif code == EXT_PICKLED:
            data = self.pickled_payload()
        elif code == EXT_BIGINT:
            data = rng.choice([b"1" * rng.randrange(1, 30), b"-" + b"9" * 25, b"1" * 5000, b"x", b"", b"1e5", b"0x10", " 12 ".encode()])
        elif code == EXT_MEMO:
            data = _pack(rng.choice([0, 1, -1, 100, "a", None]))
        else:
            data = _pack(self.value(depth + 1))
        return msgpack.ExtType(code, data)

    def pickled_payload(self) -> bytes:
        rng = self.rng
        kind = rng.choice(["p", "c", "f", "b", "a", "m", "p", "p", "z", "", 7])
        r = rng.random()
        if r < 0.5:
            source = rng.choice(PICKLED_VALUES + FUNCTIONS)
            serialized = serialize(source)
            blob = serialized.blob
            if serialized.kind in ("b", "a", "m"):
                blob = b""
            if rng.random() < 0.3:
                blob = self.mutate_bytes(blob)
        elif r < 0.7:
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            blob = b"\x80\x05" + bytes(rng.randrange(256) for _ in range(rng.randrange(20))) + b"."
        layout: Any
        nlayout = rng.choice([0, 0, 0, 1, 1, 2])
        layout = [[rng.choice([0, 1, 2, -1, 5]), rng.choice([1, 1, 2, 0, -1]), rng.choice([0, 1, 3, 8, 48, 2**40, -5])] for _ in range(nlayout)]
        if rng.random() < 0.1:
            layout = self.value(2)
        parts = [kind, blob, layout]
        if rng.random() < 0.1:
            parts = parts[: rng.randrange(3)] + ([self.value(2)] if rng.random() < 0.5 else [])
        return _pack(parts)

    # -------------------------------------------------------------- messages

    def random_header(self) -> list[bytes]:
        rng = self.rng
        header: dict[Any, Any] = {}
        for name in ("op", "id", "args", "frames", "status", "result", "type", "message", "traceback", "exception"):
            if rng.random() < 0.35:
                continue
            if name == "op":
                header[name] = rng.choice(self.ops) if rng.random() < 0.7 else self.value(1)
            elif name == "id":
                header[name] = rng.choice(INTERESTING_INTS + [None]) if rng.random() < 0.8 else self.value(1)
            elif name == "args":
                header[name] = {rng.choice(ARG_NAMES): self.value(1) for _ in range(rng.randrange(4))} if rng.random() < 0.8 else self.value(1)
            elif name == "frames":
                header[name] = rng.choice([0, 0, 0, 1, 2, -1, 2**40]) if rng.random() < 0.9 else self.value(2)
            elif name == "status":
                header[name] = rng.choice(["ok", "error"]) if rng.random() < 0.8 else self.value(2)
            else:
                header[name] = self.value(1)
        if rng.random() < 0.1:
            header[self.hashable_value(2) if rng.random() < 0.5 else "extra"] = self.value(1)
        try:
            packed = _pack(header)
        except (TypeError, ValueError, OverflowError):
            packed = _pack({str(k): str(v) for k, v in header.items()})
        nframes = header.get("frames") if type(header.get("frames")) is int else 0
        nframes = nframes if 0 <= nframes <= 3 else rng.randrange(3)
        return [packed] + [bytes(rng.randrange(256) for _ in range(rng.randrange(48))) for _ in range(nframes)]

    def random_frames(self) -> list[bytes]:
        rng = self.rng
        return [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(rng.randrange(1, 4))]

    def mutate_bytes(self, data: bytes) -> bytes:
        """``data`` with a few random edits, none inside a NumPy dtype's pickled state (see _numpy_dtype_regions)."""
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
            op = rng.randrange(8)
            n = len(b)
            protected = _numpy_dtype_regions(b) if b"numpy" in b else []

            def free(start: int, stop: int) -> bool:
                return not any(start < r_stop and r_start < stop for r_start, r_stop in protected)

            if op == 0 and n:  # flip bits
                for _ in range(rng.randrange(1, 5)):
                    pos = rng.randrange(n)
                    if free(pos, pos + 1):
                        b[pos] ^= 1 << rng.randrange(8)
            elif op in (1, 6) and n:  # an interesting byte, a random byte
                pos = rng.randrange(n)
                if free(pos, pos + 1):
                    b[pos] = rng.choice(INTERESTING_BYTES) if op == 1 else rng.randrange(256)
            elif op == 2:  # truncate (a cut dtype state never reaches its BUILD: harmless)
                del b[rng.randrange(n + 1):]
            elif op == 3:  # insert
                pos = rng.randrange(n + 1)
                if free(pos, pos) or not protected:
                    b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            elif op == 4 and n:  # delete a range
                pos = rng.randrange(n)
                stop = pos + rng.randrange(1, 9)
                if free(pos, stop):
                    del b[pos:stop]
            elif op == 5 and n:  # duplicate a range
                pos = rng.randrange(n)
                stop = pos + rng.randrange(1, 17)
                if free(pos, stop):
                    b[pos:pos] = b[pos:stop]
            elif op == 7:  # append
                b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        return bytes(b)

    def mutate_tree(self, obj: Any, depth: int = 0) -> Any:
        """Change one place of a decoded msgpack tree (ext payloads included)."""
        rng = self.rng
        if isinstance(obj, dict) and obj:
            key = rng.choice(list(obj))
            r = rng.random()
            out = dict(obj)
            if r < 0.15:
                del out[key]
            elif r < 0.25:
                out[rng.choice(ARG_NAMES + ["op", "id", "frames", "status"])] = self.value(1)
            elif r < 0.6:
                out[key] = self.mutate_tree(obj[key], depth + 1)
            else:
                out[key] = self.value(1)
            return out
        if isinstance(obj, list) and obj and rng.random() < 0.8:
            i = rng.randrange(len(obj))
            out = list(obj)
            r = rng.random()
            if r < 0.2:
                del out[i]
            elif r < 0.3:
                out.insert(i, self.value(2))
            else:
                out[i] = self.mutate_tree(obj[i], depth + 1)
            return out
        if isinstance(obj, msgpack.ExtType) and depth < 6:
            r = rng.random()
            if r < 0.2:
                return msgpack.ExtType(rng.choice([1, 2, 3, 4, 5, 6, 7, 0, 99]), obj.data)
            if r < 0.4:
                return msgpack.ExtType(obj.code, self.mutate_bytes(obj.data))
            try:
                inner = msgpack.unpackb(obj.data, raw=False, strict_map_key=False)
            except Exception:
                return msgpack.ExtType(obj.code, self.mutate_bytes(obj.data))
            with contextlib.suppress(Exception):
                return msgpack.ExtType(obj.code, _pack(self.mutate_tree(inner, depth + 1)))
            return obj
        if isinstance(obj, (bytes, str)) and obj and rng.random() < 0.5:
            data = self.mutate_bytes(obj if isinstance(obj, bytes) else obj.encode())
            return data if isinstance(obj, bytes) else data.decode(errors="replace")
        return self.value(2)

    def mutate(self, frames: list[bytes]) -> list[bytes]:
        rng = self.rng
        frames = list(frames)
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            r = rng.random()
            if r < 0.35:  # bytes of one frame, the header most often
                i = 0 if rng.random() < 0.7 or len(frames) == 1 else rng.randrange(len(frames))
                frames[i] = self.mutate_bytes(frames[i])
            elif r < 0.6:  # structure of the header
                try:
                    tree = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
                    frames[0] = _pack(self.mutate_tree(tree))
                except Exception:
                    frames[0] = self.mutate_bytes(frames[0])
            elif r < 0.68 and len(frames) > 1:  # drop a frame
                del frames[rng.randrange(len(frames))]
            elif r < 0.76:  # duplicate a frame
                i = rng.randrange(len(frames))
                frames.insert(rng.randrange(len(frames) + 1), frames[i])
            elif r < 0.84 and len(frames) > 1:  # swap two frames
                i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
                frames[i], frames[j] = frames[j], frames[i]
            elif r < 0.92:  # a frame more: random, empty, or another message's header
                extra = rng.choice([b"", bytes(rng.randrange(256) for _ in range(rng.randrange(30))), rng.choice(self.seeds)[0]])
                frames.insert(rng.randrange(len(frames) + 1), extra)
            else:  # another message's frames after this header (splice)
                frames = frames[:1] + rng.choice(self.seeds)[1:]
        return frames or [b""]

    def message(self) -> list[bytes]:
        r = self.rng.random()
        if r < 0.08:
            return self.random_frames()
        if r < 0.35:
            return self.random_header()
        if r < 0.38:
            return list(self.rng.choice(self.seeds))  # unchanged: valid requests the node must serve
        return self.mutate(self.rng.choice(self.seeds))


def _default(obj: Any) -> Any:
    """What plain msgpack cannot pack, the way zdist would send it."""
    if type(obj) is int:
        return msgpack.ExtType(EXT_BIGINT, str(obj).encode())
    if isinstance(obj, (set, frozenset)):
        return msgpack.ExtType(EXT_SET if isinstance(obj, set) else EXT_FROZENSET, _pack(list(obj)))
    serialized = serialize(obj)
    if serialized.buffers:
        return msgpack.ExtType(EXT_PICKLED, _pack(["p", b"", [[0, 1, 8]]]))
    return msgpack.ExtType(EXT_PICKLED, _pack([serialized.kind, serialized.blob, []]))


def _numpy_dtype_regions(data: bytearray) -> list[tuple[int, int]]:
    """(start, stop) of every pickled NumPy object, through its dtype's BUILD.

    A pickle builds a NumPy dtype as ``numpy.dtype(...)`` and then
    ``__setstate__``, and NumPy (2.4.6) does not check that state:
    ``np.dtype('m8').__setstate__((3, '<', None, None, None, -1, -1, 0))`` is a
    segmentation fault. Fuzzing found it (one flipped bit turns 'i8' into
    'm8'); zdist cannot guard against it short of not unpickling, which is why
    pickled payloads are trusted input and CURVE keeps strangers out. The
    fuzzer leaves these bytes alone and mutates the rest.
    """
    regions = []
    at = data.find(b"numpy")
    while at >= 0:
        end = data.find(b"t\x94b", at)
        if end < 0:
            end = data.find(b"tb", at)
        stop = len(data) if end < 0 else end + 3
        regions.append((max(0, at - 2), stop))
        at = data.find(b"numpy", at + 1)
    return regions


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def _as_bytes(frames: list) -> list[bytes]:
    return [f if isinstance(f, bytes) else bytes(memoryview(f).cast("B")) for f in frames]


# ---------------------------------------------------------------- the decoder alone


class DecoderHang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise DecoderHang if the block runs longer than ``seconds`` (main thread only)."""
    if threading_is_main():
        def on_alarm(signum, frame):
            raise DecoderHang(f"took more than {seconds} s")

        # Keep any alarm already set (pytest-timeout uses one): restore it afterwards.
        old = signal.signal(signal.SIGALRM, on_alarm)
        started = time.monotonic()
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if old_delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 0.001), old_interval)
    else:
        yield


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def check_decoder(frames: list) -> str | None:
    """None if both decoders decode ``frames`` or raise ProtocolError; else what went wrong."""
    for parse in (parse_request, parse_reply):
        try:
            with time_limit(30.0):  # generous: a loaded 2-core machine is no hang
                parse(frames)
        except ProtocolError:
            pass
        except DecoderHang as exc:
            return f"{parse.__name__} hung ({exc}) on {frames!r:.300}"
        except BaseException as exc:  # noqa: BLE001 - exactly what we look for
            return f"{parse.__name__} raised {type(exc).__name__}: {exc} on {frames!r:.300}"
    return None


def fuzz_decoder(count: int, seed: int, seconds: float = 300.0) -> dict:
    rng = random.Random(seed)
    factory = MessageFactory(rng)
    findings: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    done = 0
    for done in range(1, count + 1):
        frames = factory.message()
        problem = check_decoder(frames)
        if problem is not None:
            findings.setdefault(problem.split(" on ", 1)[0], problem)
        if time.monotonic() > deadline:
            break
    return {"messages": done, "findings": findings}


# ---------------------------------------------------------------- live nodes


@dataclass
class LiveReport:
    sent: dict = field(default_factory=lambda: {"center": 0, "worker": 0})
    replies: dict = field(default_factory=lambda: {"ok": 0, "error": 0})
    findings: list = field(default_factory=list)
    rss_before: dict = field(default_factory=dict)
    rss_after: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())


class RawPeer:
    """A raw DEALER socket; :meth:`sync` sends a ping and reads replies until its answer."""

    def __init__(self, address: str):
        self.address = address
        self.sentinel = 2**40
        self.open()

    def open(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        from zdist.comm import endpoint

        self.sock.connect(endpoint(self.address))  # tcp://host:port, or a private cluster's ipc:// socket

    def reopen(self) -> None:
        self.sock.close(linger=0)
        self.open()

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, copy=True)

    def sync(self, report: LiveReport, timeout: float) -> bool:
        """Ping; read every reply until the ping's. False if it did not come in ``timeout`` s."""
        self.sentinel += 1
        self.sock.send_multipart(encode_request("ping", self.sentinel, {}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                return False
            frames = self.sock.recv_multipart()
            try:
                reply = parse_reply(frames)
            except ProtocolError as exc:
                report.findings.append(f"{self.address} sent a malformed reply: {exc}: {frames!r:.300}")
                continue
            except Exception as exc:  # noqa: BLE001
                report.findings.append(f"parse_reply raised {type(exc).__name__} on a reply from {self.address}: {exc}")
                continue
            report.replies[reply.status] = report.replies.get(reply.status, 0) + 1
            if reply.id == self.sentinel:
                if reply.status != "ok" or reply.result != "pong":
                    report.findings.append(f"{self.address} answered ping with {reply.status} {reply.result!r}")
                return True

    def close(self) -> None:
        self.sock.close(linger=0)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def fuzz_live(
    targets: dict[str, tuple[str, int]],
    count: int,
    *,
    seed: int,
    seconds: float = 600.0,
    batch: int = 200,
    warmup: int = 500,
    hang_timeout: float = 60.0,
    alive: Callable[[], list[str]] | None = None,
) -> LiveReport:
    """Send ``count`` messages, spread over ``targets`` ({name: (address, pid)}).

    After every ``batch`` messages to a node its ping must come back within
    ``hang_timeout`` s. RSS is measured after the first ``warmup`` messages
    (imports and caches filled) and at the end.
    """
    report = LiveReport(sent={name: 0 for name in targets})
    factories = {
        name: MessageFactory(random.Random(f"{seed}-{name}"), CENTER_OPS if name == "center" else WORKER_OPS)
        for name in targets
    }
    peers = {name: RawPeer(address) for name, (address, _) in targets.items()}
    names = list(targets)
    start = time.monotonic()
    deadline = start + seconds
    try:
        sent = 0
        measured = False
        while sent < count and time.monotonic() < deadline and not report.findings:
            for name in names:
                n = min(batch, count - sent)
                if n <= 0:
                    break
                peer, factory = peers[name], factories[name]
                for _ in range(n):
                    peer.send(factory.message())
                sent += n
                report.sent[name] += n
                if not peer.sync(report, hang_timeout):
                    report.findings.append(f"{name} ({targets[name][0]}) did not answer a ping within {hang_timeout} s after {report.sent[name]} fuzzed messages")
                    break
                if alive is not None:
                    dead = alive()
                    if dead:
                        report.findings.append(f"process(es) died: {dead}")
                        break
                if factory.rng.random() < 0.05:
                    peer.reopen()  # a peer that vanishes with replies on their way
            if not measured and sent >= warmup:
                report.rss_before = {name: rss(pid) for name, (_, pid) in targets.items()}
                measured = True
        if not measured:
            report.rss_before = {name: rss(pid) for name, (_, pid) in targets.items()}
        report.rss_after = {name: rss(pid) for name, (_, pid) in targets.items()}
    finally:
        for peer in peers.values():
            peer.close()
        report.seconds = time.monotonic() - start
    return report


# ---------------------------------------------------------------- checks after fuzzing


def precious_values() -> dict:
    tag = uuid.uuid4().hex[:12]
    return {
        f"precious-{tag}-int": 41,
        (f"precious-{tag}", 1): "a tuple key's value",
        f"precious-{tag}-array": np.arange(100_000, dtype="int64"),
        f"precious-{tag}-bytes".encode(): b"\x00\x01" * 1000,
        f"precious-{tag}-set": {1, (2, 3)},
    }


async def _store(worker: str, values: dict) -> None:
    from zdist import rpc

    async with rpc(worker, timeout=30) as w:
        await w.update_data(data=values)


def store(worker: str, center: str, values: dict, timeout: float = 30.0) -> None:
    """Put ``values`` on ``worker`` and wait until the Center knows them."""
    asyncio.run(_store(worker, values))
    deadline = time.monotonic() + timeout
    while True:
        table = _ask(center, "who_has", keys=list(values))
        if all(worker in holders for holders in table.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the Center never learned the stored keys: {table}")
        time.sleep(0.05)


async def _ask_async(address: str, op: str, **args: Any) -> Any:
    from zdist import rpc

    async with rpc(address, timeout=30) as node:
        return await getattr(node, op)(**args)


def _ask(address: str, op: str, **args: Any) -> Any:
    return asyncio.run(_ask_async(address, op, **args))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def check_nodes(center: str, workers: list[str], fuzzed_worker: str, values: dict, heartbeat_timeout: float) -> list[str]:
    """What is wrong with the cluster after fuzzing (an empty list: nothing)."""
    problems = []
    # Fuzzed 'register' calls may have listed fake workers; the Center must drop them.
    deadline = time.monotonic() + heartbeat_timeout + 20
    while True:
        listed = set(_ask(center, "ncores"))
        if listed == set(workers):
            break
        if time.monotonic() > deadline:
            problems.append(f"the Center lists {sorted(listed)}, expected exactly {sorted(workers)}")
            break
        time.sleep(0.1)
    for address in [center, *workers]:
        answer = _ask(address, "ping")
        if answer != "pong":
            problems.append(f"{address} answered ping with {answer!r}")
    table = _ask(center, "who_has", keys=list(values))
    for key in values:
        if table.get(key) != {fuzzed_worker}:
            problems.append(f"the Center says {key!r} is on {table.get(key)}, expected {{{fuzzed_worker!r}}}")
    got = _ask(fuzzed_worker, "get_data", keys=list(values))
    for key, value in values.items():
        if key not in got or not _equal(got[key], value):
            problems.append(f"get_data({key!r}) gave {got.get(key)!r:.100}, expected {value!r:.100}")
    int_key = next(k for k in values if isinstance(k, str) and k.endswith("-int"))
    array_key = next(k for k in values if isinstance(k, str) and k.endswith("-array"))
    result_key = f"fuzz-check-{uuid.uuid4().hex[:8]}"

    async def compute_on_the_other_worker() -> Any:
        from zdist import rpc

        other = next(w for w in workers if w != fuzzed_worker) if len(workers) > 1 else fuzzed_worker
        async with rpc(other, timeout=30) as w:
            # Its inputs come peer to peer from the fuzzed worker.
            await w.compute(function=lambda x, a: x + int(a.sum()), keys=[int_key, array_key], key=result_key)
            value = (await w.get_data(keys=[result_key]))[result_key]
            await w.delete_data(keys=[result_key])
            return value

    expected = 41 + int(values[array_key].sum())
    value = asyncio.run(compute_on_the_other_worker())
    if value != expected:
        problems.append(f"compute gave {value!r}, expected {expected}")
    return problems


def _node_log_problems(log_dir: str) -> list[str]:
    """Errors the nodes swallowed: a handler bug logged instead of crashing."""
    markers = ("error while handling a message", "Task exception was never retrieved", "Exception in callback", "socket error:", "unexpected error")
    found = []
    for path in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
        with open(path, errors="replace") as f:
            text = f.read()
        for marker in markers:
            at = text.find(marker)
            if at >= 0:
                found.append(f"{os.path.basename(path)}: {text[max(0, at - 200): at + 1500]}")
                break
    return found


def _log_tails(log_dir: str, nbytes: int = 6000) -> str:
    out = []
    for path in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - nbytes))
            out.append(f"--- {os.path.basename(path)} ---\n" + f.read().decode(errors="replace"))
    return "\n".join(out)


def run(count: int, seconds: float, seed: int, rss_bound_mb: float = 200.0, decoder_count: int = 0, verbose: bool = True) -> dict:
    """Fuzz the decoder, then a live cluster; return a summary (``problems`` empty when all is well)."""
    from zdist import LocalCluster, Pool

    say = print if verbose else (lambda *a, **k: None)
    summary: dict[str, Any] = {"seed": seed, "problems": []}
    if decoder_count:
        decoded = fuzz_decoder(decoder_count, seed, seconds=seconds)
        summary["decoder_messages"] = decoded["messages"]
        summary["problems"] += [f"decoder: {p}" for p in decoded["findings"].values()]
        say(f"decoder: {decoded['messages']} messages, {len(decoded['findings'])} problems")
    heartbeat_timeout = 2.0
    with LocalCluster(n_workers=2, heartbeat_timeout=heartbeat_timeout, heartbeat_interval=0.25) as cluster:
        fuzzed, other = cluster.worker_addresses
        values = precious_values()
        store(fuzzed, cluster.center_address, values)
        targets = {
            "center": (cluster.center_address, cluster.center_process.pid),
            "worker": (fuzzed, cluster.worker_processes[fuzzed].pid),
        }

        def alive() -> list[str]:
            return [name for name, process in [("center", cluster.center_process), ("worker", cluster.worker_processes[fuzzed])] if process.poll() is not None]

        report = fuzz_live(targets, count, seed=seed, seconds=seconds, alive=alive)
        summary.update(
            live_messages=report.total, sent=report.sent, replies=report.replies, seconds=round(report.seconds, 1),
            rss_before_mb={k: round(v / 2**20, 1) for k, v in report.rss_before.items()},
            rss_after_mb={k: round(v / 2**20, 1) for k, v in report.rss_after.items()},
        )
        summary["problems"] += report.findings
        for name in targets:
            grown = (report.rss_after.get(name, 0) - report.rss_before.get(name, 0)) / 2**20
            if grown > rss_bound_mb:
                summary["problems"].append(f"{name} RSS grew by {grown:.0f} MB (bound {rss_bound_mb:.0f} MB)")
        say(f"live: {report.total} messages {report.sent} in {report.seconds:.1f} s, replies {report.replies}, "
            f"RSS MB before {summary['rss_before_mb']} after {summary['rss_after_mb']}")
        if not alive():
            summary["problems"] += check_nodes(cluster.center_address, [fuzzed, other], fuzzed, values, heartbeat_timeout)
            with Pool(cluster.center_address) as pool:
                result = pool.gather(pool.map(operator.neg, range(50)), timeout=60)
                if result != [-i for i in range(50)]:
                    summary["problems"].append(f"Pool.map after fuzzing gave {result!r:.200}")
        summary["problems"] += [f"swallowed error in a node log: {p}" for p in _node_log_problems(cluster.log_directory)]
        dead = alive()
        if dead:
            codes = {"center": cluster.center_process.poll(), "worker": cluster.worker_processes[fuzzed].poll()}
            summary["problems"].append(f"died: {dead}, exit codes {codes}")
        if summary["problems"]:
            summary["logs"] = _log_tails(cluster.log_directory)
            say(summary["logs"])
    say(f"fuzz: {summary.get('decoder_messages', 0)} decoder + {summary['live_messages']} live messages, "
        f"{len(summary['problems'])} problems")
    for problem in summary["problems"]:
        say("PROBLEM:", problem)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages at the live nodes (default 100000)")
    parser.add_argument("--decoder-count", type=int, default=100_000, help="messages at the decoder alone (default 100000)")
    parser.add_argument("--seconds", type=float, default=900.0, help="stop sending after this long (default 900)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--rss-bound-mb", type=float, default=200.0)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzz seed: {seed}")
    summary = run(args.count, args.seconds, seed, args.rss_bound_mb, args.decoder_count)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
