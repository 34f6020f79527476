"""The wire protocol alone: encode/parse round trips and malformed messages, no sockets."""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
import threading

import msgpack
import numpy as np
import pandas as pd
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdist.protocol import (
    ERROR,
    OK,
    ProtocolError,
    Ref,
    encode_error,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)
from zdist.protocol.message import EXT_PICKLED, EXT_TUPLE
from zdist.rpc import RemoteError, rebuild_exception


# ---------------------------------------------------------------- helpers


def as_bytes(frames):
    """What the receiving side gets: each frame as its own bytes object."""
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def request_round_trip(args, *, op="some_op", id=7, wire=True):
    frames = encode_request(op, id, args)
    if wire:
        frames = as_bytes(frames)
    request = parse_request(frames)
    assert request.op == op
    assert request.id == id
    return request.args


def reply_round_trip(result, *, id=11, wire=True):
    frames = encode_reply(id, result)
    if wire:
        frames = as_bytes(frames)
    reply = parse_reply(frames)
    assert reply.id == id
    assert reply.status == OK
    return reply.result


def both_round_trips(value):
    """The value after a trip as a request argument and as a reply result."""
    return [request_round_trip({"value": value})["value"], reply_round_trip(value)]


def strict_equal(a, b):
    """Equal *and* of exactly the same types all the way down (1 != True != 1.0, tuple != list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if set(a) != set(b):
            return False
        # Keys must also keep their exact types.
        b_keys = {k: k for k in b}
        return all(strict_equal(k, b_keys[k]) and strict_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, (set, frozenset)):
        return a == b and {(type(x), x) for x in a} == {(type(x), x) for x in b}
    return a == b


def header_of(frames):
    return msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=False, ext_hook=lambda code, data: msgpack.ExtType(code, data))


def raw_header(mapping):
    return msgpack.packb(mapping, use_bin_type=True)


# Classes and functions defined in this module: they travel by reference
# (pickle) within a process.


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


class CustomError(Exception):
    pass


class TwoArgError(Exception):
    """Pickles, but does not unpickle (``__init__`` needs two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.b = b


def make_adder(n):
    def adder(x):
        return x + n

    return adder


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key",
    [
        "x",
        ("x", 0, 1),
        ("x", ("y", 2), (("z",), 3)),
        b"bytes-key",
        0,
        -5,
        2**40,
        2**100,
        -(2**100),
        ("tuple", b"with-bytes", 2**70),
        (),
        ((),),
    ],
    ids=repr,
)
def test_key_round_trips_as_dict_key_list_item_and_value(key):
    value = {"keys": [key, "other"], "mapping": {key: key}, "single": key}
    for out in both_round_trips(value):
        assert strict_equal(out, value), (out, value)
        # The key is usable as a dict key after the trip (a list would not be hashable).
        assert out["mapping"][key] == key
        assert hash(out["keys"][0]) == hash(key)


def test_tuple_keys_never_become_lists():
    keys = [("x", 0, 1), ("x", 0, 2), ("y", ("nested", 1))]
    for out in both_round_trips(keys):
        assert out == keys
        assert all(type(k) is tuple for k in out)
        assert type(out[2][1]) is tuple
        assert type(out) is list  # lists stay lists


def test_str_and_bytes_stay_apart():
    value = {"x": 1, b"x": 2, ("x",): 3, (b"x",): 4}
    for out in both_round_trips(value):
        assert strict_equal(out, value)
        assert out["x"] == 1 and out[b"x"] == 2
        assert out[("x",)] == 3 and out[(b"x",)] == 4


def test_int_and_str_keys_stay_apart():
    value = {1: "int", "1": "str", (1,): "tuple-int", ("1",): "tuple-str"}
    for out in both_round_trips(value):
        assert strict_equal(out, value)


def test_sets_and_frozensets():
    value = {
        "set": {1, "a", ("t", 1), b"b"},
        "frozenset": frozenset({("x", 1), 2}),
        "empty": set(),
        "nested": [{frozenset({1, 2})}],
    }
    for out in both_round_trips(value):
        assert strict_equal(out, value)
        assert type(out["set"]) is set
        assert type(out["frozenset"]) is frozenset
        assert type(next(iter(out["nested"][0]))) is frozenset


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, 1.5, -0.0, float("inf"), 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**100, "", "ünïcødé", b"", b"\x00\xff"],
    ids=repr,
)
def test_scalars(value):
    for out in both_round_trips(value):
        assert strict_equal(out, value)


def test_nan():
    for out in both_round_trips(float("nan")):
        assert type(out) is float and math.isnan(out)


def test_big_int_keys_in_a_set_and_as_values():
    value = {2**100: {2**100, -(2**99)}, "n": [2**100, 3]}
    for out in both_round_trips(value):
        assert strict_equal(out, value)


# ---------------------------------------------------------------- values


def test_small_numpy_array_stays_in_the_header():
    x = np.arange(10, dtype="int16")
    frames = encode_request("op", 1, {"x": x})
    assert len(frames) == 1
    for out in both_round_trips(x):
        assert isinstance(out, np.ndarray)
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_medium_numpy_array_travels_as_its_own_frame():
    x = np.random.default_rng(0).random(2**17)  # 1 MiB of float64
    frames = encode_request("op", 1, {"x": x})
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == x.nbytes
    assert len(frames[0]) < 1000
    for out in both_round_trips(x):
        assert out.dtype == x.dtype and out.shape == x.shape
        np.testing.assert_array_equal(out, x)


def test_numpy_array_bigger_than_frame_size_is_split_and_joined(monkeypatch):
    import importlib

    split = 4 * 2**20  # the default FRAME_SIZE is 1 GiB: test the splitting with a small one
    monkeypatch.setattr(importlib.import_module("zdist.protocol.message"), "FRAME_SIZE", split)
    x = np.arange((split * 2 + 12345) // 8, dtype="int64")  # not a multiple of the frame size
    frames = encode_request("op", 1, {"x": x})
    buffers = frames[1:]
    assert len(buffers) == 3
    assert all(memoryview(f).nbytes <= split for f in buffers)
    assert sum(memoryview(f).nbytes for f in buffers) == x.nbytes
    for out in both_round_trips(x):
        assert out.dtype == x.dtype and out.shape == x.shape
        np.testing.assert_array_equal(out, x)
        assert out.flags.writeable  # joined into a fresh array of our own
        out[0] = -1  # and writing to it works


@pytest.mark.parametrize(
    "x",
    [
        np.arange(60_000, dtype="float32").reshape(200, 300),
        np.asfortranarray(np.arange(60_000, dtype="float64").reshape(300, 200)),
        np.arange(100_000)[::3],  # not contiguous
        np.zeros((0, 5)),
        np.array(3.5),
        np.array([("a", 1), ("b", 2)] * 5000, dtype=[("name", "U1"), ("n", "i8")]),
        np.array(["x", 1, None], dtype=object),
        np.arange(10).astype("datetime64[s]"),
    ],
    ids=["2d", "fortran", "strided", "empty", "0d", "structured", "object", "datetime"],
)
def test_numpy_array_variants(x):
    for out in both_round_trips(x):
        assert out.dtype == x.dtype and out.shape == x.shape
        np.testing.assert_array_equal(out, x)


def test_same_array_twice_travels_once():
    x = np.ones(2**16)
    value = [x, x, {"again": x}]
    frames = encode_request("op", 1, {"v": value})
    assert len(frames) == 2
    out = parse_request(frames).args["v"]
    np.testing.assert_array_equal(out[0], x)
    np.testing.assert_array_equal(out[2]["again"], x)


def test_pandas_dataframe_and_series():
    df = pd.DataFrame(
        {
            "a": np.arange(50_000),
            "b": np.random.default_rng(1).random(50_000),
            "c": ["s"] * 50_000,
        },
        index=pd.RangeIndex(50_000, 100_000),
    )
    value = {"df": df, "s": df["b"], "idx": pd.Index([("x", 1), ("y", 2)])}
    for out in both_round_trips(value):
        pd.testing.assert_frame_equal(out["df"], df)
        pd.testing.assert_series_equal(out["s"], df["b"])
        pd.testing.assert_index_equal(out["idx"], value["idx"])


def test_bytes_like_values():
    big = bytes(range(256)) * 4096  # 1 MiB
    value = {"bytes": big, "bytearray": bytearray(big), "small": b"abc", "memoryview": memoryview(big)}
    frames = encode_request("op", 1, value)
    assert len(frames[0]) < 1000  # large buffers did not go into the header
    assert len(frames) == 4
    for out in both_round_trips(value):
        assert type(out["bytes"]) is bytes and out["bytes"] == big
        assert type(out["bytearray"]) is bytearray and out["bytearray"] == big
        assert out["small"] == b"abc"
        assert bytes(out["memoryview"]) == big


def test_bytes_like_values_inside_tuples_and_lists_keep_their_types():
    big = b"z" * 2**20
    value = {"args": (bytearray(b"small"), [memoryview(b"tiny")], (big, 1)), "list": [bytearray(3)]}
    frames = encode_request("compute", 1, value)
    assert len(frames[0]) < 1000
    for out in both_round_trips(value):
        args = out["args"]
        assert type(args) is tuple
        assert type(args[0]) is bytearray and args[0] == bytearray(b"small")
        assert bytes(args[1][0]) == b"tiny"
        assert type(args[2]) is tuple and args[2][0] == big and args[2][1] == 1
        assert type(out["list"][0]) is bytearray and out["list"][0] == bytearray(3)


def test_small_bytes_keys_stay_in_the_header():
    value = {"keys": [b"k1", (b"k2", 1)], "mapping": {b"k3": b"v"}}
    frames = encode_request("op", 1, value)
    assert len(frames) == 1
    for out in both_round_trips(value):
        assert strict_equal(out, value)


def test_lambdas_and_closures():
    square = lambda x: x * x  # noqa: E731
    add5 = make_adder(5)
    base = 100

    def uses_global_and_closure(y):
        return math.sqrt(y) + base

    value = {"square": square, "add5": add5, "f": uses_global_and_closure, "in_list": [lambda: "hi"]}
    for out in both_round_trips(value):
        assert out["square"](7) == 49
        assert out["add5"](1) == 6
        assert out["f"](16) == 104.0
        assert out["in_list"][0]() == "hi"


def test_objects_of_classes_defined_here():
    value = {"p": Point(1, ("a", 2)), "ps": [Point(i, i) for i in range(3)], "exc": CustomError("boom")}
    for out in both_round_trips(value):
        assert out["p"] == value["p"]
        assert type(out["p"].y) is tuple
        assert out["ps"] == value["ps"]
        assert type(out["exc"]) is CustomError and str(out["exc"]) == "boom"


def test_ref_round_trip():
    value = {"args": (Ref("x"), 1, [Ref(("y", 0, 1))]), "key": Ref(b"k")}
    for out in both_round_trips(value):
        assert out == value
        assert type(out["args"][0]) is Ref
        assert type(out["args"][2][0].key) is tuple
        assert out["key"].key == b"k"


def test_one_way_request_has_no_id():
    request = parse_request(encode_request("heartbeat", None, {"address": "127.0.0.1:1"}))
    assert request.id is None
    assert request.args == {"address": "127.0.0.1:1"}


def test_zmq_frames_are_accepted():
    x = np.arange(100_000)
    frames = [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in encode_request("op", 3, {"x": x, "k": ("a", 1)})]
    request = parse_request(frames)
    np.testing.assert_array_equal(request.args["x"], x)
    assert request.args["k"] == ("a", 1)


# ---------------------------------------------------------------- hypothesis

keys = st.recursive(
    st.one_of(st.text(max_size=10), st.integers(), st.binary(max_size=10)),
    lambda children: st.lists(children, max_size=4).map(tuple),
    max_leaves=20,
)
structures = st.recursive(
    keys,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.sets(keys, max_size=4),
        st.frozensets(keys, max_size=4),
        st.lists(children, max_size=4).map(tuple),
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures)
def test_property_round_trip_of_nested_keys(value):
    message = {"v": value, "in_list": [value, value], "as_key": {k: k for k in _hashables(value)}}
    for out in both_round_trips(message):
        assert strict_equal(out, message), (out, message)


def _hashables(value):
    """The keys (hashable parts) found inside ``value``."""
    found = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.extend(item)
            stack.extend(item.values())
        elif isinstance(item, (list, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, tuple) and not _is_hashable(item):
            stack.extend(item)  # a tuple holding lists or dicts
        else:
            found.append(item)  # str, int, bytes or a (nested) tuple of them
    return found


def _is_hashable(value):
    try:
        hash(value)
    except TypeError:
        return False
    return True


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, keys, max_size=6))
def test_property_dict_of_keys_as_data(mapping):
    for out in both_round_trips(mapping):
        assert strict_equal(out, mapping)


# ---------------------------------------------------------------- error replies


def raised(exc):
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_error_reply_carries_type_message_traceback_and_exception():
    exc = raised(CustomError("it broke: ('x', 1)"))
    reply = parse_reply(as_bytes(encode_error(42, exc)))
    assert reply.id == 42
    assert reply.status == ERROR
    error = reply.error
    assert error["type"] == "CustomError"
    assert error["message"] == "it broke: ('x', 1)"
    assert "Traceback" in error["traceback"] and "raise exc" in error["traceback"]
    assert type(error["exception"]) is CustomError
    rebuilt = rebuild_exception(error, "127.0.0.1:1")
    assert type(rebuilt) is CustomError
    assert str(rebuilt) == "it broke: ('x', 1)"
    assert "raise exc" in str(rebuilt.__cause__)


def test_error_reply_with_a_remote_traceback_text():
    reply = parse_reply(encode_error(1, ZeroDivisionError("division by zero"), tb="Traceback: line 3 of elsewhere\n"))
    assert reply.error["traceback"] == "Traceback: line 3 of elsewhere\n"
    rebuilt = rebuild_exception(reply.error)
    assert isinstance(rebuilt, ZeroDivisionError)
    assert "line 3 of elsewhere" in str(rebuilt.__cause__)


def test_error_reply_of_builtin_key_error_with_tuple_key():
    reply = parse_reply(encode_error(2, raised(KeyError(("x", 1)))))
    rebuilt = rebuild_exception(reply.error)
    assert type(rebuilt) is KeyError
    assert rebuilt.args == (("x", 1),)


@pytest.mark.parametrize("kind", ["unpicklable-attribute", "does-not-unpickle"])
def test_unpicklable_exception_still_gives_a_readable_error(kind):
    if kind == "unpicklable-attribute":
        exc = CustomError("holding a lock")
        exc.lock = threading.Lock()
        exc = raised(exc)
        message = "holding a lock"
        type_name = "CustomError"
    else:
        exc = raised(TwoArgError("first", "second"))
        message = "first and second"
        type_name = "TwoArgError"
    reply = parse_reply(as_bytes(encode_error(3, exc)))
    assert reply.status == ERROR and reply.id == 3
    assert reply.error["type"] == type_name
    assert reply.error["message"] == message
    assert "Traceback" in reply.error["traceback"]
    if kind == "does-not-unpickle" and reply.error["exception"] is not None:
        # Once distributed is imported, tblib's pickling support rebuilds
        # exceptions without calling __init__: then it comes back as itself.
        assert type(reply.error["exception"]) is TwoArgError and message in str(reply.error["exception"])
        return
    assert reply.error["exception"] is None
    rebuilt = rebuild_exception(reply.error, "127.0.0.1:9")
    assert isinstance(rebuilt, RemoteError)
    assert type_name in str(rebuilt) and message in str(rebuilt)
    assert rebuilt.remote_type == type_name


def test_error_reply_with_an_unpackable_message():
    class WeirdError(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    reply = parse_reply(encode_error(4, raised(WeirdError())))
    assert reply.status == ERROR
    assert reply.error["type"] == "WeirdError"
    assert isinstance(reply.error["message"], str)
    assert "WeirdError" in reply.error["traceback"]


def test_error_without_id():
    reply = parse_reply(encode_error(None, ProtocolError("bad header")))
    assert reply.id is None
    assert reply.error["type"] == "ProtocolError"
    assert "bad header" in reply.error["message"]


# ---------------------------------------------------------------- ProtocolError


def good_header(**changes):
    header = {"op": "get_data", "id": 5, "args": {"keys": ["x"]}, "frames": 0}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not _DROP}


_DROP = object()


def expect_protocol_error(frames, *, match, request_id=None, parser=parse_request):
    with pytest.raises(ProtocolError, match=match) as info:
        parser(frames)
    assert info.value.request_id == request_id
    return info.value


def test_empty_message():
    expect_protocol_error([], match="empty")
    expect_protocol_error([], match="empty", parser=parse_reply)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x81\xa2op", b"\x01\x02", b"not msgpack at all, just text"], ids=repr)
def test_header_not_msgpack(data):
    expect_protocol_error([data], match="msgpack")


@pytest.mark.parametrize("value", [[1, 2], "op", 5, None, b"x"], ids=repr)
def test_header_not_a_map(value):
    expect_protocol_error([raw_header(value)], match="map")


def test_op_missing():
    expect_protocol_error([raw_header(good_header(op=_DROP))], match="op", request_id=5)


@pytest.mark.parametrize("op", [5, None, b"get_data", ["get_data"]], ids=repr)
def test_op_not_a_string(op):
    expect_protocol_error([raw_header(good_header(op=op))], match="op", request_id=5)


@pytest.mark.parametrize("args", [[1, 2], "keys", 5, {1: "x"}], ids=repr)
def test_args_not_a_map_of_names(args):
    expect_protocol_error([raw_header(good_header(args=args))], match="args", request_id=5)


@pytest.mark.parametrize("bad_id", ["5", 1.5, [5], True, b"\x05"], ids=repr)
def test_id_not_an_int(bad_id):
    expect_protocol_error([raw_header(good_header(id=bad_id))], match="id", request_id=None)


def test_too_many_frames():
    frames = encode_request("get_data", 9, {"keys": ["x"]})
    expect_protocol_error([*frames, b"extra"], match="frames", request_id=9)


def test_too_few_frames():
    frames = encode_request("update_data", 10, {"data": {"x": np.ones(2**16)}})
    assert len(frames) == 2
    expect_protocol_error(frames[:1], match="frames", request_id=10)


def test_frames_field_not_an_int():
    expect_protocol_error([raw_header(good_header(frames="zero"))], match="frames", request_id=5)


def test_wrong_frame_count_in_reply():
    frames = encode_reply(12, np.ones(2**16))
    expect_protocol_error(frames[:1], match="frames", request_id=12, parser=parse_reply)
    expect_protocol_error([*frames, b"x"], match="frames", request_id=12, parser=parse_reply)


def test_payload_refers_to_frames_that_are_not_there():
    blob = msgpack.packb(["p", pickle.dumps(1), [[3, 1, 8]]], use_bin_type=True)
    header = raw_header(good_header(args={"x": msgpack.ExtType(EXT_PICKLED, blob)}, frames=1))
    expect_protocol_error([header, b"12345678"], match="frames", request_id=5)


def test_unknown_ext_type():
    header = raw_header(good_header(args={"keys": [msgpack.ExtType(42, b"??")]}))
    error = expect_protocol_error([header], match="extension type 42", request_id=5)
    assert "42" in str(error)


def test_payload_that_fails_to_unpickle_carries_the_request_id():
    blob = msgpack.packb(["p", b"garbage, not a pickle", []], use_bin_type=True)
    header = raw_header(good_header(id=77, args={"data": {"x": msgpack.ExtType(EXT_PICKLED, blob)}}))
    error = expect_protocol_error([header], match="deserialize", request_id=77)
    assert "UnpicklingError" in str(error) or "pickle" in str(error).lower()


def test_payload_of_a_class_that_does_not_exist():
    blob = pickle.dumps(Point(1, 2), protocol=5).replace(b"Point", b"Pqint")
    packed = msgpack.packb(["p", blob, []], use_bin_type=True)
    header = raw_header(good_header(id=78, args={"x": msgpack.ExtType(EXT_PICKLED, packed)}))
    expect_protocol_error([header], match="Pqint", request_id=78)


def test_payload_with_an_unknown_serialization_kind():
    packed = msgpack.packb(["?", b"", []], use_bin_type=True)
    header = raw_header(good_header(id=79, args={"x": msgpack.ExtType(EXT_PICKLED, packed)}))
    expect_protocol_error([header], match="kind", request_id=79)


def test_malformed_pickled_ext():
    header = raw_header(good_header(id=80, args={"x": msgpack.ExtType(EXT_PICKLED, b"\xc1")}))
    expect_protocol_error([header], match="deserialize", request_id=80)


def test_malformed_tuple_ext():
    header = raw_header(good_header(id=81, args={"keys": [msgpack.ExtType(EXT_TUPLE, b"\xc1")]}))
    # A match that can fail: the error says the payload (the tuple key) did not deserialize, and why.
    expect_protocol_error([header], match="failed to deserialize: FormatError", request_id=81)


def test_reply_with_bad_status():
    header = raw_header({"id": 3, "status": "maybe", "frames": 0})
    expect_protocol_error([header], match="status", request_id=3, parser=parse_reply)
    header = raw_header({"id": 3, "frames": 0})
    expect_protocol_error([header], match="status", request_id=3, parser=parse_reply)


def test_protocol_error_is_a_value_error_and_pickles():
    error = ProtocolError("bad", 4)
    assert isinstance(error, ValueError)
    reply = parse_reply(encode_error(4, error))
    assert type(reply.error["exception"]) is ProtocolError
    assert "bad" in str(reply.error["exception"])


_IMPORT_RACE = r"""
import pickle, sys, threading, time
import numpy as np
from zdist.protocol.serialize import loads
# What a client sends for dask's _concatenate2 (protocol 5: a STACK_GLOBAL).
blob = b"\x80\x05\x8c\x0fdask.array.core\x94\x8c\x0d_concatenate2\x94\x93\x94."
importer = threading.Thread(target=__import__, args=("dask.array",))
importer.start()
deadline = time.monotonic() + 30
while not hasattr(sys.modules.get("dask.array.core"), "_concatenate2") and time.monotonic() < deadline:
    time.sleep(0.0001)
concatenate = (loads if sys.argv[1] == "zdist" else pickle.loads)(blob)
try:
    print(concatenate([np.ones(2), np.ones(2)], axes=[0]).sum())
except TypeError as e:
    print(e)
importer.join(30)
"""


def test_unpickling_waits_for_a_package_another_thread_is_importing():
    """A worker unpickles in several threads. While one is inside ``import dask.array``
    (which registers NumPy with dask's dispatch tables after dask.array.core is loaded),
    a task unpickled by another used to call into dask.array.core too early and fail
    with "No dispatch for <class 'numpy.ndarray'>". zdist's ``loads`` waits for the
    package to finish importing. A fresh interpreter each time: the race is on first import."""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", _IMPORT_RACE, "zdist"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "4.0", out.stdout + out.stderr
