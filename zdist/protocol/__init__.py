"""The zdist wire protocol: framing, serialization and validation, no sockets."""
from .message import (
    ERROR,
    FRAME_SIZE,
    OK,
    ProtocolError,
    Ref,
    Reply,
    Request,
    SetMap,
    encode_error,
    encode_reply,
    encode_request,
    error_fields,
    parse_reply,
    parse_request,
)
from .serialize import Serialized, deserialize, serialize

__all__ = [
    "ERROR", "FRAME_SIZE", "OK", "ProtocolError", "Ref", "Reply", "Request", "Serialized", "SetMap",
    "deserialize", "encode_error", "encode_reply", "encode_request", "error_fields",
    "parse_reply", "parse_request", "serialize",
]
