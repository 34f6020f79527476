"""Talking to a node: ``await rpc('127.0.0.1:8788').get_data(keys=['x'])``.

One DEALER socket per node address, shared by every coroutine that talks to
it; each request carries an id and its reply resolves the matching future.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import Executor
from typing import Any, Callable

import zmq

from .comm import Stream, endpoint, make_socket, normalize_address
from .protocol import OK, ProtocolError, Reply, Serialized, deserialize, encode_request, parse_reply, serialize

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class RemoteError(Exception):
    """An exception raised on a remote node that could not be rebuilt here.

    ``remote_type`` names the original exception class and
    ``remote_traceback`` holds the traceback as text.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class RPCTimeoutError(TimeoutError):
    """A node did not answer in time."""


class CommClosedError(ConnectionError):
    """The connection was closed while a request was waiting for its reply."""


class _RemoteTraceback(Exception):
    """Shown as the ``__cause__`` of a re-raised remote exception."""

    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.args[0]


def rebuild_exception(error: dict, address: str = "") -> BaseException:
    """The exception an error reply describes, with the remote traceback attached.

    The original exception type comes back where it can be unpickled;
    otherwise a :class:`RemoteError` carries its type name and message.
    """
    tb = error.get("traceback") or ""
    exc = error.get("exception")
    if not isinstance(exc, BaseException):
        where = f" on {address}" if address else ""
        exc = RemoteError(f"{error.get('type', 'Error')}{where}: {error.get('message', '')}", error.get("type", ""), tb)
    exc.remote_traceback = tb
    if tb:
        # Once, as text from the node (with its source lines). A pickled
        # exception can also bring its frames spliced in (tblib's pickling
        # support, which importing dask.multiprocessing installs): drop them,
        # or every frame would show twice, as the cause and again below it.
        exc.__traceback__ = None
        exc.__cause__ = _RemoteTraceback(tb)
    return exc


def wrap_values(mapping: Any) -> Any:
    """Serialize the values of a ``data`` mapping up front, so each travels as its own frames."""
    if isinstance(mapping, dict):
        return {key: value if isinstance(value, Serialized) else serialize(value) for key, value in mapping.items()}
    return mapping


class Connection:
    """A DEALER socket to one node, multiplexing concurrent requests by id.

    Must be created and used from one running event loop.
    """

    _ids = itertools.count(1)

    def __init__(
        self, address: str, *, timeout: float | None = DEFAULT_TIMEOUT, security: Any = None, max_message_size: int | None = None, loader: Executor | None = None,
    ):
        self.address = normalize_address(address)
        self.timeout = timeout
        # Given a loader (a node's), a reply whose payloads may be slow to load
        # is decoded there, not on the loop (see Node.deferred_ops).
        self.loader = loader
        curve = (lambda s: security.client_socket_setup(s, self.address)) if security else None
        sock = make_socket(zmq.DEALER, curve=curve, max_message_size=max_message_size)
        sock.connect(endpoint(self.address))
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future] = {}
        self.stream = Stream(sock, self._on_message)
        self.closed = False

    def _on_message(self, frames: list) -> None:
        try:
            reply = parse_reply(frames, careful=self.loader is not None)
        except ProtocolError as exc:
            self._unreadable(exc)
            return
        if not reply.complete:
            self.loop.run_in_executor(self.loader, parse_reply, frames).add_done_callback(self._loaded)
            return
        self._settle(reply)

    def _loaded(self, loading: asyncio.Future) -> None:
        if loading.cancelled():  # the node stopped: its connections are closing too
            return
        error = loading.exception()
        if isinstance(error, ProtocolError):
            self._unreadable(error)
        elif error is not None:
            logger.error("decoding a reply from %s failed: %r", self.address, error)
        else:
            self._settle(loading.result())

    def _unreadable(self, exc: ProtocolError) -> None:
        future = self.pending.pop(exc.request_id, None) if exc.request_id is not None else None
        if future is not None and not future.done():
            future.set_exception(exc)
        else:
            logger.warning("unreadable reply from %s: %s", self.address, exc)

    def _settle(self, reply: Reply) -> None:
        if reply.id is None:
            if reply.status != OK:
                logger.warning("%s reported an error: %s: %s", self.address, reply.error.get("type"), reply.error.get("message"))
            return
        future = self.pending.pop(reply.id, None)
        if future is None or future.done():
            return  # timed out or cancelled earlier
        if reply.status == OK:
            future.set_result(reply.result)
        else:
            future.set_exception(rebuild_exception(reply.error, self.address))

    def send(self, op: str, **args: Any) -> None:
        """Send a one-way message: no reply is expected (errors are only logged)."""
        self.stream.send(encode_request(op, None, args))

    def request(self, op: str, args: dict, timeout: float | None = -1) -> asyncio.Future:
        """Send a request; return a future of its result."""
        if self.closed:
            raise CommClosedError(f"connection to {self.address} is closed")
        if "data" in args:
            args = dict(args, data=wrap_values(args["data"]))
        request_id = next(self._ids)
        frames = encode_request(op, request_id, args)
        future = self.loop.create_future()
        self.pending[request_id] = future
        self.stream.send(frames)
        if timeout == -1:
            timeout = self.timeout
        if timeout is not None:
            handle = self.loop.call_later(timeout, self._expire, request_id, op, timeout)
            future.add_done_callback(lambda _: handle.cancel())
        return future

    def _expire(self, request_id: int, op: str, timeout: float) -> None:
        future = self.pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(
                RPCTimeoutError(
                    f"{self.address} did not answer {op!r} within {timeout} s; is the node running and reachable"
                    " (and, where the cluster uses CURVE security, is your key authorized)?"
                )
            )

    def fail_pending(self, exc: BaseException) -> None:
        """Fail every waiting request with ``exc`` (e.g. the node is known dead)."""
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fail_pending(CommClosedError(f"connection to {self.address} was closed"))
        self.stream.close()


class ConnectionPool:
    """One shared :class:`Connection` per address, created on first use."""

    def __init__(self, *, timeout: float | None = DEFAULT_TIMEOUT, security: Any = None, loader: Executor | None = None):
        self.timeout = timeout
        self.security = security
        self.loader = loader
        self.connections: dict[str, Connection] = {}

    def get(self, address: str) -> Connection:
        address = normalize_address(address)
        connection = self.connections.get(address)
        if connection is None or connection.closed:
            connection = self.connections[address] = Connection(address, timeout=self.timeout, security=self.security, loader=self.loader)
        return connection

    def rpc(self, address: str) -> "rpc":
        return rpc(address, connection=self.get(address))

    def remove(self, address: str, exc: BaseException | None = None) -> None:
        connection = self.connections.pop(normalize_address(address), None)
        if connection is not None:
            if exc is not None:
                connection.fail_pending(exc)
            connection.close()

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()


class ThreadSockets:
    """Blocking requests from any thread but a loop's: one DEALER per (thread, address).

    A synchronous client runs its event loop on a thread of its own; handing
    a request to that thread and the reply back costs two thread wake-ups
    (and the GIL handed over twice), a third of a small request's round trip
    on a VM. A thread that is going to block for the answer anyway can send
    and receive on a socket of its own instead.
    """

    def __init__(self, security: Any = None):
        self.security = security
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: set = set()
        self._busy: set = set()
        self.closed = False

    def request(self, address: str, op: str, args: dict, give_up: Callable[[], bool], poll_interval: float = 0.1) -> Reply | None:
        """Send a request and wait for its reply.

        Returns ``None`` without a reply once ``give_up()`` (asked every
        ``poll_interval`` seconds) is true, or when the message cannot be
        queued; a reply that comes later is dropped.
        """
        sock = self._acquire(address)
        request_id = next(Connection._ids)
        try:
            try:
                sock.send_multipart(encode_request(op, request_id, args), zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            timeout_ms = int(poll_interval * 1000)
            while True:
                if sock.poll(timeout_ms):
                    frames = sock.recv_multipart(copy=False)
                    try:
                        reply = parse_reply(frames)
                    except ProtocolError as exc:
                        if exc.request_id == request_id:
                            raise
                        continue
                    if reply.id == request_id:
                        return reply
                    continue  # the reply to a request given up earlier
                if give_up():
                    return None
        finally:
            self._release(sock)

    def _acquire(self, address: str) -> zmq.Socket:
        sockets = getattr(self._local, "sockets", None)
        if sockets is None:
            sockets = self._local.sockets = {}
        with self._lock:
            if self.closed:
                raise CommClosedError("these sockets are closed")
            sock = sockets.get(address)
            if sock is None or sock.closed:
                security = self.security
                curve = (lambda s: security.client_socket_setup(s, address)) if security else None
                sock = sockets[address] = make_socket(zmq.DEALER, curve=curve)
                sock.connect(endpoint(address))
                self._sockets.add(sock)
            self._busy.add(sock)
        return sock

    def _release(self, sock: zmq.Socket) -> None:
        with self._lock:
            self._busy.discard(sock)
            if self.closed:
                self._sockets.discard(sock)
                sock.close(linger=0)

    def forget(self, address: str) -> None:
        """Drop this thread's socket to ``address`` (a node that died)."""
        sockets = getattr(self._local, "sockets", None) or {}
        sock = sockets.pop(address, None)
        if sock is not None:
            with self._lock:
                if sock not in self._busy:
                    self._sockets.discard(sock)
                    sock.close(linger=0)

    def close(self) -> None:
        """Close every socket; one in use is closed by its thread when its request ends."""
        with self._lock:
            self.closed = True
            for sock in list(self._sockets - self._busy):
                sock.close(linger=0)
                self._sockets.discard(sock)


class rpc:  # noqa: N801 - named like the seed documents' rpc(...)
    """A proxy to a node: every attribute is a remote op.

    >>> import asyncio, zdist
    >>> async def demo():
    ...     async with zdist.LocalCluster(n_workers=1, processes=False) as cluster:
    ...         async with rpc(cluster.worker_addresses[0], timeout=5) as alice:
    ...             await alice.update_data(data={'x': 1})
    ...             return await alice.get_data(keys=['x'])
    >>> asyncio.run(demo())
    {'x': 1}
    """

    def __init__(self, address: str, timeout: float | None = DEFAULT_TIMEOUT, *, security: Any = None, connection: Connection | None = None):
        self.address = normalize_address(address)
        self.timeout = timeout
        self.security = security
        self._connection = connection
        self._owns_connection = connection is None

    @property
    def connection(self) -> Connection:
        if self._connection is None or self._connection.closed and self._owns_connection:
            self._connection = Connection(self.address, timeout=self.timeout, security=self.security)
        return self._connection

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)

        async def call(_timeout: float | None = -1, **args: Any) -> Any:
            timeout = self.timeout if _timeout == -1 else _timeout
            return await self.connection.request(op, args, timeout)

        call.__name__ = op
        return call

    def close(self) -> None:
        if self._owns_connection and self._connection is not None:
            self._connection.close()
            self._connection = None

    async def __aenter__(self) -> "rpc":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"rpc({self.address!r})"


def unwrap_value(value: Any) -> Any:
    """A value that may still be :class:`Serialized` (sent locally), as a plain value."""
    if isinstance(value, Serialized):
        return deserialize(value.kind, value.blob, value.buffers)
    return value
