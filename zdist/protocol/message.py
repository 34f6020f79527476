"""The wire format: messages as lists of frames, pure data in and out.

A message is ``[header, *buffer_frames]``. The header is one msgpack map:

request  ``{'op': str, 'id': int | None, 'args': {...}, 'frames': int}``
reply    ``{'id': int | None, 'status': 'ok', 'result': ..., 'frames': int}``
error    ``{'id': int | None, 'status': 'error', 'type': str, 'message': str,
           'traceback': str, 'exception': <pickled exception or None>, 'frames': int}``

``frames`` counts the buffer frames that follow the header. Values that
msgpack cannot carry as they are travel inside the header as msgpack
extension types (see ``EXT_*``): tuples, sets and frozensets stay what they
are (a tuple key never turns into a list), and anything else is pickled
(:mod:`zdist.protocol.serialize`) with its large buffers as frames of their own,
split into frames of at most :data:`FRAME_SIZE` bytes. A request with no ``id``
is one-way: the node answers only if it fails.

>>> frames = encode_request('get_data', 7, {'keys': [('x', 0), 'y']})
>>> request = parse_request(frames)
>>> request.op, request.id, request.args
('get_data', 7, {'keys': [('x', 0), 'y']})
"""
from __future__ import annotations

import traceback as traceback_module
from typing import Any, Container, Sequence

import msgpack
import numpy as np

from .serialize import OUT_OF_BAND_THRESHOLD, Serialized, deserialize, is_quick_to_load, serialize

#: Buffers larger than this are split into frames of this size (and joined
#: into one array on receipt). Splitting at 4 MiB looked faster in a raw
#: benchmark whose receiver reused its memory, but a worker keeps what it
#: receives: split frames then cost a join (a copy, and twice the memory at
#: the peak) on top of the page faults. One zero-copy frame per buffer, with
#: huge pages for the receiver's allocations (see ``zdist.cluster``), measured
#: fastest; so only buffers beyond 1 GiB are split.
FRAME_SIZE = 2**30

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_PICKLED = 4  # [kind, blob, [[first_frame, nframes, nbytes], ...]]
EXT_MEMO = 5  # the n-th pickled value of this message again
EXT_REF = 6  # Ref(key): "the value the worker holds under key"
EXT_BIGINT = 7  # an int beyond 64 bits, as decimal text
EXT_SETMAP = 8  # a SetMap {key: set}: [[keys...], [[members...], ...]]

_BUFFER_OR_CONTAINER = frozenset({list, dict, bytes, bytearray, memoryview})

OK = "ok"
ERROR = "error"


class ProtocolError(ValueError):
    """A message that does not follow the zdist wire format.

    ``request_id`` is the id of the offending request when it could be read.
    """

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(message)
        self.request_id = request_id


class Ref:
    """A reference to the value a worker holds under ``key``.

    Placed anywhere in the arguments of a task, it is replaced by the value
    on the worker that runs the task.

    >>> Ref(('x', 1))
    Ref(('x', 1))
    """

    __slots__ = ("key",)

    def __init__(self, key: Any):
        self.key = key

    def __repr__(self) -> str:
        return f"Ref({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.key == self.key

    def __hash__(self) -> int:
        return hash((Ref, self.key))

    def __reduce__(self):
        return (Ref, (self.key,))


class SetMap(dict):
    """A dict whose values are sets (``who_has``: key → addresses), sent in one piece.

    A plain dict of sets costs one extension (a Python call to pack, another
    to unpack) per set; a SetMap travels as two plain lists, packed and
    unpacked by msgpack's C code, and arrives as a plain dict of sets. A
    value may also be any iterable of members, or a string: one member.

    >>> frames = encode_reply(1, SetMap({('x', 0): {'a:1', 'b:2'}, 'y': set()}))
    >>> reply = parse_reply(frames)
    >>> reply.result == {('x', 0): {'a:1', 'b:2'}, 'y': set()}, type(reply.result).__name__
    (True, 'dict')
    """

    __slots__ = ()


class Request:
    """A decoded request; ``complete`` is False when payloads were left to load (:func:`parse_request`)."""

    __slots__ = ("op", "id", "args", "complete")

    def __init__(self, op: str, id: int | None, args: dict, complete: bool = True):
        self.op = op
        self.id = id
        self.args = args
        self.complete = complete

    def __repr__(self) -> str:
        return f"Request(op={self.op!r}, id={self.id!r}, args={sorted(self.args)!r})"


class Reply:
    """A decoded reply: ``status`` is ``'ok'`` (see ``result``) or ``'error'``."""

    __slots__ = ("id", "status", "result", "error", "complete")

    def __init__(self, id: int | None, status: str, result: Any = None, error: dict | None = None, complete: bool = True):
        self.id = id
        self.status = status
        self.result = result
        self.error = error
        self.complete = complete  # False: payloads were left to load (parse_reply with careful=True)

    def __repr__(self) -> str:
        return f"Reply(id={self.id!r}, status={self.status!r})"


# ---------------------------------------------------------------- encoding


class _Encoder:
    """Packs one message; collects the buffer frames its values need."""

    __slots__ = ("frames", "memo", "nserialized", "keep")

    def __init__(self):
        self.frames: list = []
        self.memo: dict[int, msgpack.ExtType] = {}  # id of a value serialized already -> its back-reference
        self.nserialized = 0
        self.keep: list = []  # temporaries whose ids are in ``memo``

    def pack(self, obj: Any) -> bytes:
        return msgpack.packb(obj, default=self.default, use_bin_type=True, strict_types=True)

    def buffers_out_of_band(self, obj: Any) -> Any:
        """``obj`` with bytearray, memoryview and large bytes values made :class:`Serialized`.

        msgpack packs every bytes-like value into the header itself, without
        calling ``default``: a large one would be copied there, and a
        bytearray or memoryview would come back as bytes. Tuples reach this
        through ``default``; dict keys are left alone (they are hashable).
        """
        cls = type(obj)
        if cls is list:
            if _BUFFER_OR_CONTAINER.isdisjoint(map(type, obj)):
                return obj
            out = None
            for index, item in enumerate(obj):
                if type(item) not in _BUFFER_OR_CONTAINER:
                    continue  # a leaf that stays as it is: no call for it (a batch has thousands)
                new = self.buffers_out_of_band(item)
                if new is not item:
                    if out is None:
                        out = list(obj)  # copied only when something changes
                    out[index] = new
            return obj if out is None else out
        if cls is dict:
            if _BUFFER_OR_CONTAINER.isdisjoint(map(type, obj.values())):
                return obj
            changed = {}
            for key, value in obj.items():
                if type(value) not in _BUFFER_OR_CONTAINER:
                    continue
                new = self.buffers_out_of_band(value)
                if new is not value:
                    changed[key] = new
            return {**obj, **changed} if changed else obj
        if cls is bytearray or cls is memoryview or (cls is bytes and len(obj) >= OUT_OF_BAND_THRESHOLD):
            serialized = serialize(obj)
            self.keep.append(serialized)
            return serialized
        return obj

    def default(self, obj: Any) -> msgpack.ExtType:
        cls = type(obj)
        if cls is tuple:
            items = list(obj)
            if not _BUFFER_OR_CONTAINER.isdisjoint(map(type, items)):
                items = self.buffers_out_of_band(items)
            return msgpack.ExtType(EXT_TUPLE, self.pack(items))
        if cls is Ref:
            return msgpack.ExtType(EXT_REF, self.pack(obj.key))
        if cls is set:
            return msgpack.ExtType(EXT_SET, self.pack(list(obj)))
        if cls is SetMap:
            members = [[m] if type(m) is str else list(m) for m in obj.values()]  # a str value: a one-member set
            return msgpack.ExtType(EXT_SETMAP, self.pack([list(obj), members]))
        if cls is frozenset:
            return msgpack.ExtType(EXT_FROZENSET, self.pack(list(obj)))
        if cls is int:
            return msgpack.ExtType(EXT_BIGINT, str(obj).encode())
        reference = self.memo.get(id(obj))
        if reference is not None:  # the same function or batch again: made once, not once per task
            return reference
        serialized = obj if cls is Serialized else serialize(obj)
        layout = []
        for buffer in serialized.buffers:
            view = memoryview(buffer)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            nbytes = view.nbytes
            first = len(self.frames)
            if nbytes > FRAME_SIZE:
                for start in range(0, nbytes, FRAME_SIZE):
                    self.frames.append(view[start : start + FRAME_SIZE])
            else:
                self.frames.append(view)
            layout.append([first, len(self.frames) - first, nbytes])
        self.memo[id(obj)] = msgpack.ExtType(EXT_MEMO, self.pack(self.nserialized))
        self.nserialized += 1
        return msgpack.ExtType(EXT_PICKLED, msgpack.packb([serialized.kind, serialized.blob, layout], use_bin_type=True))


def _fixmap(items: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from already-packed values (maps are just their pairs)."""
    parts = [bytes([0x80 | len(items)])]
    for name, packed in items:
        parts.append(_packed_name(name))
        parts.append(packed)
    return b"".join(parts)


_PACKED_NAMES: dict[str, bytes] = {}


def _packed_name(name: str) -> bytes:
    packed = _PACKED_NAMES.get(name)
    if packed is None:
        packed = _PACKED_NAMES[name] = msgpack.packb(name)
    return packed


def _pack_plain(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# The fixed parts of every request and reply header, packed once: a header is
# built per message, and eight small packb calls cost more than the rest.
_REQUEST_OP = b"\x84" + msgpack.packb("op")
_KEY_ID = msgpack.packb("id")
_KEY_ARGS = msgpack.packb("args")
_KEY_FRAMES = msgpack.packb("frames")
_REPLY_ID = b"\x84" + msgpack.packb("id")
_STATUS_OK_RESULT = msgpack.packb("status") + msgpack.packb(OK) + msgpack.packb("result")


def encode_request(op: str, id: int | None, args: dict) -> list:
    """Frames of a request: ``[header, *buffers]``."""
    encoder = _Encoder()
    packed_args = encoder.pack(encoder.buffers_out_of_band(args))
    header = b"".join(
        (_REQUEST_OP, _packed_name(op) if type(op) is str else _pack_plain(op), _KEY_ID, _pack_plain(id),
         _KEY_ARGS, packed_args, _KEY_FRAMES, _pack_plain(len(encoder.frames)))
    )
    return [header, *encoder.frames]


def encode_reply(id: int | None, result: Any) -> list:
    """Frames of a successful reply. Raises if ``result`` cannot be serialized."""
    encoder = _Encoder()
    packed = encoder.pack(encoder.buffers_out_of_band(result))
    header = b"".join((_REPLY_ID, _pack_plain(id), _STATUS_OK_RESULT, packed, _KEY_FRAMES, _pack_plain(len(encoder.frames))))
    return [header, *encoder.frames]


def error_fields(exc: BaseException, tb: str | None = None) -> dict:
    """What an error reply says about ``exc``: type, message, traceback, pickle."""
    if tb is None:
        tb = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled: Any = serialize(exc)
        # Make sure it can come back: some exceptions pickle but do not unpickle.
        deserialize(pickled.kind, pickled.blob, pickled.buffers)
    except Exception:
        pickled = None
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ itself fails
        message = f"<str() of this {type(exc).__name__} failed>"
    return {
        "type": type(exc).__name__,
        "message": message,
        "traceback": tb,
        "exception": pickled,
    }


def encode_error(id: int | None, exc: BaseException, tb: str | None = None) -> list:
    """Frames of an error reply carrying ``exc`` and its (remote) traceback."""
    fields = error_fields(exc, tb)
    encoder = _Encoder()
    try:
        packed = [(name, encoder.pack(value)) for name, value in fields.items()]
    except Exception:  # an exception whose message itself cannot be packed
        encoder = _Encoder()
        fields = {"type": fields["type"], "message": repr(exc), "traceback": str(tb), "exception": None}
        packed = [(name, encoder.pack(value)) for name, value in fields.items()]
    header = _fixmap(
        [("id", _pack_plain(id)), ("status", _pack_plain(ERROR)), *packed, ("frames", _pack_plain(len(encoder.frames)))]
    )
    return [header, *encoder.frames]


# ---------------------------------------------------------------- decoding


def _frame_buffer(frame: Any) -> Any:
    buffer = getattr(frame, "buffer", None)
    return frame if buffer is None else buffer


class _Decoder:
    """Decodes one message's header; with ``careful``, loads only payloads that are quick to load.

    A careful decoder leaves ``None`` in place of any other pickled payload
    and sets ``deferred``: the caller decodes the message again, off its
    event loop, to have them (:func:`parse_request`).
    """

    __slots__ = ("frames", "pickled", "errors", "careful", "deferred")

    def __init__(self, frames: Sequence[Any], careful: bool = False):
        self.frames = frames
        self.pickled: list = []
        self.errors: list[str] = []
        self.careful = careful
        self.deferred = False

    def unpack(self, data: Any) -> Any:
        return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=False, use_list=True)

    def buffer(self, first: int, count: int, nbytes: int) -> Any:
        if first < 0 or count < 1 or first + count > len(self.frames):
            raise ProtocolError(f"payload refers to frames {first}..{first + count - 1} but the message has {len(self.frames)}")
        if count == 1:
            return _frame_buffer(self.frames[first])
        # A value split into frames: join them into one writable buffer.
        out = np.empty(nbytes, dtype=np.uint8)
        offset = 0
        for frame in self.frames[first : first + count]:
            view = memoryview(_frame_buffer(frame)).cast("B")
            end = offset + view.nbytes
            if end > nbytes:
                raise ProtocolError("payload frames are larger than their declared size")
            out[offset:end] = np.frombuffer(view, dtype=np.uint8)
            offset = end
        if offset != nbytes:
            raise ProtocolError("payload frames are smaller than their declared size")
        return memoryview(out)

    def ext_hook(self, code: int, data: bytes) -> Any:
        try:
            if code == EXT_TUPLE:
                return tuple(self.unpack(data))
            if code == EXT_PICKLED:
                kind, blob, layout = msgpack.unpackb(data, raw=False, use_list=True)
                buffers = [self.buffer(*entry) for entry in layout]
                if self.careful and not is_quick_to_load(kind, blob):
                    self.deferred = True
                    value = None
                else:
                    value = deserialize(kind, blob, buffers)
                self.pickled.append(value)
                return value
            if code == EXT_MEMO:
                return self.pickled[self.unpack(data)]
            if code == EXT_REF:
                return Ref(self.unpack(data))
            if code == EXT_SET:
                return set(self.unpack(data))
            if code == EXT_FROZENSET:
                return frozenset(self.unpack(data))
            if code == EXT_SETMAP:
                keys, members = self.unpack(data)
                if type(keys) is not list or type(members) is not list or len(keys) != len(members) or not all(type(m) is list for m in members):
                    raise ProtocolError("a set map must be two lists of equal length, the second of lists")
                return dict(zip(keys, map(set, members)))
            if code == EXT_BIGINT:
                return int(data.decode())
            raise ProtocolError(f"unknown msgpack extension type {code}")
        except Exception as exc:  # noqa: BLE001 - reported with the request id below
            reason = str(exc) if isinstance(exc, ProtocolError) else f"payload failed to deserialize: {type(exc).__name__}: {exc}"
            self.errors.append(reason)
            return None


def _decode_header(frames: Sequence[Any], careful: bool = False) -> tuple[dict, _Decoder]:
    if len(frames) == 0:
        raise ProtocolError("empty message: expected a msgpack header frame")
    decoder = _Decoder(frames[1:], careful)
    try:
        header = decoder.unpack(_frame_buffer(frames[0]))
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    request_id = header.get("id")
    if request_id is not None and (type(request_id) is not int or not -(2**63) <= request_id < 2**64):
        # Beyond 64 bits an id could not even be echoed back in the error reply.
        raise ProtocolError(f"request id must be a 64-bit integer or nil, got {type(request_id).__name__}")
    nframes = header.get("frames", 0)
    if type(nframes) is not int or nframes != len(frames) - 1:  # not ``!=`` alone: a NumPy array's is no bool
        shown = nframes if type(nframes) is int else type(nframes).__name__
        raise ProtocolError(f"header announces {shown!r} buffer frames but {len(frames) - 1} arrived", request_id)
    if decoder.errors:
        raise ProtocolError("; ".join(decoder.errors), request_id)
    return header, decoder


def parse_request(frames: Sequence[Any], defer: Container[str] = ()) -> Request:
    """Validate and decode a request; raise :class:`ProtocolError` saying what is wrong.

    ``frames`` are bytes, memoryviews or ``zmq.Frame`` objects (routing
    identities already removed).

    For an op in ``defer``, a pickled payload that may be slow to load (see
    :func:`~zdist.protocol.serialize.is_quick_to_load`) is not loaded: the
    request comes back with ``complete`` False and ``None`` in its place,
    and the caller parses ``frames`` again where a wait does no harm (a
    worker: off its event loop). Other ops are always decoded whole.
    """
    header, decoder = _decode_header(frames, careful=bool(defer))
    if decoder.deferred and not (type(header.get("op")) is str and header["op"] in defer):
        header, _ = _decode_header(frames)  # an op answered on the loop anyway: decode it whole, as always
    request_id = header.get("id")
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError(f"header field 'op' must be a string, got {type(op).__name__}", request_id)
    args = header.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ProtocolError("header field 'args' must be a map from argument names to values", request_id)
    return Request(op, request_id, args, complete=not (decoder.deferred and op in defer))


def parse_reply(frames: Sequence[Any], careful: bool = False) -> Reply:
    """Decode a reply (ok or error); raise :class:`ProtocolError` if malformed.

    With ``careful``, a pickled payload that may be slow to load is not
    loaded (as :func:`parse_request` does for its ``defer`` ops): the reply
    comes back with ``complete`` False, and the caller parses ``frames``
    again off its event loop.
    """
    header, decoder = _decode_header(frames, careful)
    status = header.get("status")
    if type(status) is str and status == OK:  # a pickled NumPy array's ``==`` is no bool
        return Reply(header.get("id"), OK, result=header.get("result"), complete=not decoder.deferred)
    if type(status) is str and status == ERROR:
        return Reply(header.get("id"), ERROR, error=header, complete=not decoder.deferred)
    shown = status if type(status) in (str, bytes, int, float, type(None)) else type(status).__name__
    raise ProtocolError(f"reply status must be 'ok' or 'error', got {shown!r}", header.get("id"))
