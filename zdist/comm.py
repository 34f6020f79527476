"""A ZeroMQ socket driven by the asyncio loop: drained on readiness, sends queued.

Awaiting a ``zmq.asyncio`` future per message costs more than the message
itself at zdist's message rates, so a :class:`Stream` watches the socket's
file descriptor with ``loop.add_reader`` and, when it fires, receives every
message waiting (``recv(NOBLOCK)`` until ``EAGAIN``), handing each to a
callback. ZeroMQ's descriptor is edge-triggered: after every send we look at
``zmq.EVENTS`` again, or messages that arrived meanwhile would sit unseen.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import deque
from typing import Any, Callable

import zmq

from .protocol import FRAME_SIZE

logger = logging.getLogger(__name__)

# Plain ints: zmq's flags are enums, and enum arithmetic runs in Python.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_RCVMORE = int(zmq.RCVMORE)

#: How many messages one wake-up handles before yielding to other callbacks.
DRAIN_BATCH = 256

#: Slack above a node's message limit for libzmq's per-frame cap: a frame a
#: little too big still reaches the Stream, which answers it with an error.
ROUTER_FRAME_SLACK = 2**20

_context: zmq.Context | None = None


def context() -> zmq.Context:
    """The process's shared ZeroMQ context."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.Context()
    return _context


def make_socket(kind: int, *, max_message_size: int | None = None, hwm: int = 10_000, curve: Any = None) -> zmq.Socket:
    """A socket with the options every zdist socket needs."""
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # never hang the process at exit on unsent messages
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if max_message_size:
        if kind == zmq.ROUTER:
            # libzmq drops a peer whose single frame exceeds MAXMSGSIZE without
            # a word (the sender would wait for its timeout). A node's Stream
            # checks the size of whole messages itself and answers with an
            # error, so let a frame somewhat over the limit through to it;
            # libzmq still cuts off anything larger.
            max_message_size = min(max_message_size, FRAME_SIZE) + ROUTER_FRAME_SLACK
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # replying to a vanished peer raises
    if curve is not None:
        curve(sock)
    return sock


#: The scheme of a node's address on this machine only: a Unix socket in a directory.
IPC = "ipc://"


def is_ipc(address: str) -> bool:
    """Whether ``address`` (or a node's host) is a ZeroMQ ``ipc://`` endpoint: a Unix socket, this machine only."""
    return address.startswith(IPC)


def normalize_address(address: str) -> str:
    """``'tcp://host:port'`` or ``'host:port'`` → ``'host:port'``; ``'ipc:///DIR/N'`` stays as it is.

    An ``ipc://`` address is a Unix socket file: only who may open its
    directory can connect (:class:`~zdist.LocalCluster` makes one that only
    its user can, mode 0700).

    >>> normalize_address('tcp://127.0.0.1:8787')
    '127.0.0.1:8787'
    >>> normalize_address('ipc:///tmp/zdist-x1y2/5123')
    'ipc:///tmp/zdist-x1y2/5123'
    """
    if not isinstance(address, str):
        raise TypeError(f"an address is a 'host:port' string, got {address!r}")
    if address.startswith(IPC):
        path = address[len(IPC):]
        if not path.startswith("/") or path.endswith("/") or "\0" in path:
            raise ValueError(f"an ipc address names a socket file by its absolute path, like 'ipc:///tmp/zdist-x1y2/5123', got {address!r}")
        return address
    if address.startswith("tcp://"):
        address = address[len("tcp://") :]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"an address looks like '127.0.0.1:8787', got {address!r}")
    return f"{host}:{port}"


def endpoint(address: str) -> str:
    """The ZeroMQ endpoint to connect to a node at ``address``: ``tcp://host:port`` or the ``ipc://`` address itself."""
    address = normalize_address(address)
    return address if address.startswith(IPC) else "tcp://" + address


tcp = endpoint  # its older name


#: A Unix socket's path must fit in 107 bytes (sun_path).
_MAX_SOCKET_PATH = 100


def private_directory() -> str:
    """A new directory only this user may open (mode 0700), for the ipc:// sockets of a local cluster.

    Under the temp dir (``TMPDIR``), or /tmp when that path would be too
    long for a Unix socket. Whoever made it removes it (LocalCluster, on close).

    >>> import os, stat
    >>> d = private_directory()
    >>> oct(stat.S_IMODE(os.stat(d).st_mode))
    '0o700'
    >>> os.rmdir(d)
    """
    directory = tempfile.mkdtemp(prefix="zdist-")  # mkdtemp makes it 0700, whatever the umask
    if len(directory) + 11 > _MAX_SOCKET_PATH:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="zdist-", dir="/tmp")
    return directory


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` that a node given them listens at ``address`` again (the host of ``ipc://DIR/N`` is ``ipc://DIR``).

    >>> split_address('127.0.0.1:8787'), split_address('ipc:///tmp/zdist-x1y2/5123')
    (('127.0.0.1', 8787), ('ipc:///tmp/zdist-x1y2', 5123))
    """
    address = normalize_address(address)
    if address.startswith(IPC):
        directory, _, name = address.rpartition("/")
        if not name.isdigit():
            raise ValueError(f"{address!r} was not made by a zdist node (its socket's name is not a number)")
        return directory, int(name)
    host, _, port = address.rpartition(":")
    return host, int(port)


class Stream:
    """Receive and send multipart messages on ``sock`` from the running loop.

    ``on_message(frames)`` is called for every message received, with the
    frames as ``zmq.Frame`` objects (zero-copy). ``max_message_size`` caps
    the total bytes of one multipart message; larger ones go to
    ``on_oversize(frames_head)`` and are dropped.
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list], None],
        *,
        max_message_size: int | None = None,
        on_oversize: Callable[[list], None] | None = None,
    ):
        self.sock = sock
        self.on_message = on_message
        self.max_message_size = max_message_size
        self.on_oversize = on_oversize
        self.loop = asyncio.get_running_loop()
        self._outbox: deque = deque()
        self._check_scheduled = False
        self._closed = False
        self._fd = sock.FD
        # A ROUTER's send fails with EAGAIN only when that one peer's queue is
        # full (it does not read its replies): queueing behind it would stall
        # the replies to every other peer and grow without bound, so drop.
        self._router = sock.type == zmq.ROUTER
        self.dropped = 0
        self._draining = False
        self.loop.add_reader(self._fd, self._on_ready)
        self._schedule_check()

    def send(self, frames: list) -> None:
        """Queue ``frames`` for sending; never blocks, never raises for a full queue."""
        if self._closed:
            raise ConnectionError("this socket is closed")
        if self._outbox:
            self._outbox.append(frames)
        else:
            self._send_now(frames)
        if not self._draining:  # _on_ready looks at the socket's events again anyway
            self._schedule_check()

    def _send_now(self, frames: list) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            if self._router:
                self.dropped += 1
                if self.dropped % 10_000 == 1:
                    logger.warning("dropped a reply to a peer that does not read its replies (%d dropped so far)", self.dropped)
                return True
            self._outbox.append(frames)
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # ROUTER reply to a peer that left
                logger.debug("dropped a message to a peer that has gone")
                return True
            raise

    def _schedule_check(self) -> None:
        if not self._check_scheduled and not self._closed:
            self._check_scheduled = True
            self.loop.call_soon(self._on_ready)

    def _flush(self) -> None:
        while self._outbox:
            frames = self._outbox.popleft()
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._outbox.appendleft(frames)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    logger.warning("dropped an outgoing message: %s", exc)

    def _on_ready(self) -> None:
        self._check_scheduled = False
        if self._closed:
            return
        sock = self.sock
        handled = 0
        self._draining = True
        try:
            while True:
                events = sock.getsockopt(_EVENTS)
                if events & _POLLOUT and self._outbox:
                    self._flush()
                if not events & _POLLIN:
                    return
                if handled >= DRAIN_BATCH:
                    self._draining = False
                    self._schedule_check()  # let other callbacks run, then continue
                    return
                frames = self._recv_message()
                handled += 1
                if frames is not None:
                    try:
                        self.on_message(frames)
                    except Exception:  # a bug in a handler must not stop the socket
                        logger.exception("error while handling a message")
                if self._closed:
                    return
        except zmq.ZMQError as exc:
            if not self._closed:
                logger.warning("socket error: %s", exc)
        finally:
            self._draining = False

    def _recv_message(self) -> list | None:
        sock = self.sock
        frames = [sock.recv(zmq.NOBLOCK, copy=False)]
        limit = self.max_message_size
        total = len(frames[0])
        while sock.getsockopt(_RCVMORE):
            frame = sock.recv(copy=False)  # the rest of a multipart message is already here
            total += len(frame)
            if limit is not None and total > limit:
                # Drain and drop the rest of this message, keeping its head
                # (identity and header, even when the header is what is too big).
                head = [*frames, frame][:2]
                while sock.getsockopt(_RCVMORE):
                    sock.recv(copy=False)
                if self.on_oversize is not None:
                    self.on_oversize(head)
                return None
            frames.append(frame)
        return frames

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self._fd)
        except Exception:  # loop already closed
            pass
        self._outbox.clear()
        self.sock.close(linger=0)
