"""The one receive-dispatch-reply loop shared by every kind of node.

A :class:`Node` owns a ROUTER socket and a ``handlers`` dict from op name to
a function. Plain functions answer at once on the loop (cheap ops such as
``who_has``); coroutine functions run as their own task, so a slow
``compute`` never holds up a ``get_data``. Whatever a peer sends, the node
answers with an error it can read and goes on serving.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import msgpack
import zmq

from .comm import Stream, is_ipc, make_socket
from .output import LOG_RING_SIZE, install_log_ring, recent_logs
from .protocol import ProtocolError, encode_error, encode_reply, parse_request

logger = logging.getLogger(__name__)

#: Default cap on the bytes of one incoming message (frames together).
DEFAULT_MAX_MESSAGE_SIZE = 2**31


class Node:
    """Base class of the Center and the Worker.

    Subclasses fill ``self.handlers`` in ``__init__`` and may override
    :meth:`on_start` and :meth:`on_stop`.
    """

    #: Ops whose pickled payloads (a task's function and arguments) may take
    #: long to load, for example when unpickling imports a large package: a
    #: request of these ops that carries such a payload is decoded in a
    #: thread of its own and handled once loaded, so that the event loop (and
    #: with it every heartbeat and ``get_data``) never waits for an import.
    deferred_ops: frozenset[str] = frozenset()

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        security: Any = None,
    ):
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.security = security
        self.handlers: dict[str, Callable[..., Any]] = {"ping": self.ping, "identity": self.identity, "get_logs": self.get_logs, "ops_served": self.count_ops}
        self.stream: Stream | None = None
        self._tasks: set[asyncio.Task] = set()
        self.status = "created"
        self.ops_served: dict[str, int] = {}
        # Decodes messages whose payloads may be slow to load (deferred_ops; a worker's
        # replies from peers): one thread, which the executor starts only when first used.
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="zdist-load")
        self._held: dict[bytes, deque] = {}  # per peer being loaded for: its messages since, in arrival order

    # -------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        if is_ipc(self.host):  # ipc://DIR: the socket is DIR/PORT, a file
            return f"{self.host}/{self.port}"
        return f"{self.host}:{self.port}"

    async def start(self) -> "Node":
        """Bind the ROUTER socket (port 0 picks a free port) and start serving."""
        curve = self.security.server_socket_setup if self.security else None
        if self.security is None and not _is_loopback(self.host):
            logger.warning(
                "%s listening on %s without CURVE security: anyone who can reach this port can run code on this machine. "
                "Create keys with `zdist-keys DIR` and start every node with `--key DIR/zdist.key_secret`.",
                type(self).__name__,
                self.host,
            )
        sock = make_socket(zmq.ROUTER, max_message_size=self.max_message_size, curve=curve)
        try:
            if is_ipc(self.host):
                self.port = _bind_ipc(sock, self.host, self.port)
            elif self.port:
                sock.bind(f"tcp://{self.host}:{self.port}")
            else:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"cannot listen on {self.host}:{self.port}: {exc}. Is another node using that port?") from None
        self._done = asyncio.Event()
        self.stream = Stream(sock, self._on_message, max_message_size=self.max_message_size, on_oversize=self._on_oversize)
        self._monitor: Stream | None = None
        if self.security is not None:
            self._monitor = Stream(
                sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH),
                self._on_monitor_event,
            )
        self.status = "running"
        install_log_ring()  # from now on this process keeps its recent log records, for get_logs
        await self.on_start()
        return self

    async def on_start(self) -> None:
        """Hook: runs once the socket is bound."""

    async def on_stop(self) -> None:
        """Hook: runs before the socket closes."""

    async def stop(self) -> None:
        """Stop serving: cancel running handlers and close the socket."""
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        try:
            await self.on_stop()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.loader.shutdown(wait=False, cancel_futures=True)  # a request still loading is dropped, like one still running
            if getattr(self, "_monitor", None) is not None:
                self._monitor.close()
            if self.stream is not None:
                self.stream.close()
            self.status = "closed"
            self._done.set()

    async def finished(self) -> None:
        """Wait until the node has stopped."""
        await self._done.wait()

    async def __aenter__(self) -> "Node":
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def serve_forever(self, *, on_started: Callable[["Node"], None] | None = None) -> None:
        """Run the node in this thread until SIGINT or SIGTERM; then stop cleanly."""

        async def main() -> None:
            await self.start()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.stop()))
            if on_started is not None:
                on_started(self)
            await self.finished()

        asyncio.run(main())

    def _on_monitor_event(self, frames: list) -> None:
        from zmq.utils.monitor import parse_monitor_message

        event = parse_monitor_message([f.bytes for f in frames])
        endpoint = event.get("endpoint", b"")
        logger.warning(
            "%s refused a connection (%s): CURVE handshake failed, the peer has no authorized key",
            self.address,
            endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint,
        )

    # -------------------------------------------------------------- built-in ops

    def ping(self) -> str:
        return "pong"

    def identity(self) -> dict:
        return {"type": type(self).__name__, "address": self.address}

    def get_logs(self, since: int = 0, limit: int = LOG_RING_SIZE) -> dict:
        """This process's recent log records, those after number ``since``: ``{node, seq, records, time}``.

        Each record is ``{seq, time, level, name, message, thread}``; the ring
        holds the last :data:`~zdist.output.LOG_RING_SIZE` of the process
        (nodes that share a process share it). ``zdist logs`` shows them.
        """
        return {"node": self.address, **recent_logs(int(since), int(limit))}

    def count_ops(self) -> dict:
        """How many requests of each op this node has served (``ops_served``), e.g. heartbeats a second."""
        return dict(self.ops_served)

    # -------------------------------------------------------------- dispatch

    def _on_oversize(self, head: list) -> None:
        error = ProtocolError(f"message larger than this node's limit of {self.max_message_size} bytes; dropped")
        self._send(head[:1], encode_error(_peek_request_id(head[1:2]), error, tb=""))

    def _send(self, identity: list, frames: list) -> None:
        if self.stream is not None and self.status in ("running", "closing"):
            try:
                self.stream.send([*identity, *frames])
            except ConnectionError:
                pass

    def _on_message(self, frames: list) -> None:
        # A DEALER peer's message on our ROUTER: [identity, header, *buffers].
        if self._held:
            waiting = self._held.get(_frame_bytes(frames[0]))
            if waiting is not None:  # this peer's earlier request is loading: keep the peer's order
                waiting.append(frames)
                return
        self._handle(frames)

    def _handle(self, frames: list) -> None:
        identity = frames[:1]
        try:
            request = parse_request(frames[1:], self.deferred_ops)
        except ProtocolError as exc:
            self._refuse(identity, exc)
            return
        if not request.complete:
            self._load_then_dispatch(identity, frames[1:])
            return
        self._dispatch(identity, request)

    def _load_then_dispatch(self, identity: list, frames: list) -> None:
        """Decode a request of :attr:`deferred_ops` whole in the loader thread, then handle it here, on the loop.

        The peer's later messages wait for it (:attr:`_held`): a peer's
        requests are handled in the order it sent them, as on the loop.
        """
        peer = _frame_bytes(identity[0])
        self._held[peer] = deque()
        loading = asyncio.get_running_loop().run_in_executor(self.loader, parse_request, frames)
        self._tasks.add(loading)

        def loaded(future: asyncio.Future) -> None:
            self._tasks.discard(future)
            if future.cancelled() or self.status != "running":
                return
            error = future.exception()
            if error is None:
                self._dispatch(identity, future.result())
            elif isinstance(error, ProtocolError):
                self._refuse(identity, error)
            else:  # not the payload's fault (those are ProtocolErrors): say so rather than leave the caller waiting
                self._send(identity, encode_error(_peek_request_id(frames[:1]), error))
            self._release(peer)

        loading.add_done_callback(loaded)

    def _refuse(self, identity: list, error: ProtocolError) -> None:
        logger.info("bad message from a peer: %s", error)
        self._send(identity, encode_error(error.request_id, error, tb=""))

    def _release(self, peer: bytes) -> None:
        """Handle what ``peer`` sent while its request loaded, in order, until one of them loads in turn."""
        waiting = self._held.pop(peer)
        while waiting:
            self._handle(waiting.popleft())
            if peer in self._held:  # that one is loading now: the rest wait behind it
                self._held[peer].extend(waiting)
                return

    def _dispatch(self, identity: list, request: Any) -> None:
        op = request.op
        handler = self.handlers.get(op)
        if handler is None:
            error = ProtocolError(f"unknown operation {op!r}; this {type(self).__name__} knows: {', '.join(sorted(self.handlers))}")
            self._send(identity, encode_error(request.id, error, tb=""))
            return
        self.ops_served[op] = self.ops_served.get(op, 0) + 1
        try:
            result = handler(**request.args)
        except TypeError as exc:
            self._reply_error(identity, request, self._argument_error(handler, request, exc))
            return
        except Exception as exc:
            self._reply_error(identity, request, exc)
            return
        # A handler answers at once, or returns a coroutine (run as its own
        # task) or a future (answered when it resolves: cheaper than a task).
        if asyncio.iscoroutine(result):
            result = asyncio.ensure_future(self._finish(identity, request, result))
            self._tasks.add(result)
            result.add_done_callback(self._tasks.discard)
        elif isinstance(result, asyncio.Future):
            if result.done():  # e.g. a batch that ran on the loop: reply now, not a turn later
                self._future_done(identity, request, result)
            else:
                result.add_done_callback(lambda future: self._future_done(identity, request, future))
        else:
            self._reply(identity, request, result)

    def _future_done(self, identity: list, request: Any, future: asyncio.Future) -> None:
        if future.cancelled():
            self._reply_error(identity, request, ConnectionAbortedError("the operation was cancelled"))
        elif future.exception() is not None:
            self._reply_error(identity, request, future.exception())
        else:
            self._reply(identity, request, future.result())

    async def _finish(self, identity: list, request: Any, coroutine: Any) -> None:
        try:
            result = await coroutine
        except asyncio.CancelledError:
            if self.status == "running":
                self._reply_error(identity, request, ConnectionAbortedError("the operation was cancelled"))
            raise
        except Exception as exc:
            self._reply_error(identity, request, exc)
            return
        self._reply(identity, request, result)

    def _reply(self, identity: list, request: Any, result: Any) -> None:
        if request.id is None:
            return  # one-way message
        try:
            frames = encode_reply(request.id, result)
        except Exception as exc:
            self._reply_error(identity, request, TypeError(f"could not serialize the reply to {request.op!r}: {type(exc).__name__}: {exc}"))
            return
        self._send(identity, frames)

    def _reply_error(self, identity: list, request: Any, exc: BaseException) -> None:
        if request.id is None:
            logger.warning("one-way %r failed: %s: %s", request.op, type(exc).__name__, exc)
        self._send(identity, encode_error(request.id, exc, getattr(exc, "zdist_traceback", None)))

    @staticmethod
    def _argument_error(handler: Callable, request: Any, exc: TypeError) -> BaseException:
        """A TypeError from calling the handler: the peer's arguments, or a bug inside?"""
        try:
            inspect.signature(handler).bind(**request.args)
        except TypeError as bind_error:
            return ProtocolError(f"bad arguments for {request.op!r}: {bind_error}; it takes {inspect.signature(handler)}", request.id)
        return exc



def _bind_ipc(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind ``sock`` to the Unix socket ``DIR/PORT`` of ``host`` (``ipc://DIR``); port 0 picks a name not taken.

    The directory decides who may connect: a user who cannot open it cannot
    reach the socket (LocalCluster makes it mode 0700). libzmq removes the
    file when the socket closes.
    """
    directory = host[len("ipc://"):]
    if not os.path.isdir(directory):
        raise zmq.ZMQError(zmq.ENOENT, f"no directory {directory} to put the node's socket in")
    if port:
        sock.bind(f"{host}/{port}")
        return port
    for _ in range(100):
        port = random.randrange(10_000, 1_000_000_000)
        if not os.path.exists(os.path.join(directory, str(port))):  # binding would take over another node's socket
            sock.bind(f"{host}/{port}")
            return port
    raise zmq.ZMQError(zmq.EADDRINUSE, f"no free socket name in {directory}")


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    if is_ipc(host):  # a Unix socket: this machine only, and only who may open its directory
        return True
    if host in ("localhost", "::1"):
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _frame_bytes(frame: Any) -> bytes:
    """A frame's bytes (a ``zmq.Frame`` received without copying, or bytes already)."""
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def _peek_request_id(header_frames: list) -> int | None:
    """The id in a request header, read without deserializing any value in it.

    Lets the error reply to an oversized message reach the request waiting for it.
    """
    if not header_frames:
        return None
    frame = header_frames[0]
    try:
        header = msgpack.unpackb(getattr(frame, "buffer", frame), raw=False, strict_map_key=False)
    except Exception:
        return None
    request_id = header.get("id") if isinstance(header, dict) else None
    if type(request_id) is int and -(2**63) <= request_id < 2**64:
        return request_id
    return None
