"""Fuzzing: the protocol decoder, and live nodes fed random and mutated messages.

The message generator lives in ``benchmarks/fuzz_nodes.py`` (also a script:
``python benchmarks/fuzz_nodes.py --count 100000``). The default suite sends
a few thousand messages; the full 100,000 run is marked ``slow``. Every bug
the fuzzing found has a regression test at the end of this file.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdist import Center, Worker, rpc
from zdist.protocol import ProtocolError, encode_request, parse_reply, parse_request, serialize
from zdist.protocol.message import EXT_BIGINT, EXT_FROZENSET, EXT_MEMO, EXT_PICKLED, EXT_REF, EXT_SET, EXT_TUPLE

from .conftest import run

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "fuzz_nodes.py")


def _load_fuzz_module():
    if "fuzz_nodes" in sys.modules:
        return sys.modules["fuzz_nodes"]
    spec = importlib.util.spec_from_file_location("fuzz_nodes", os.path.abspath(_PATH))
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_nodes"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_module()

# Valid seed messages, built once; hypothesis drives the mutations.
_FACTORY = fuzz.MessageFactory(random.Random(0))


def assert_decodes_or_protocol_error(frames):
    problem = fuzz.check_decoder(frames)
    assert problem is None, problem


# ---------------------------------------------------------------- the decoder, property-based


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_decoder_on_random_and_mutated_messages(rng):
    """Random bytes, mutated valid messages, random msgpack maps: decoded, or ProtocolError."""
    _FACTORY.rng = rng
    assert_decodes_or_protocol_error(_FACTORY.message())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_decoder_on_random_bytes(frames):
    assert_decodes_or_protocol_error(frames)


_ext_codes = st.sampled_from([EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_PICKLED, EXT_MEMO, EXT_REF, EXT_BIGINT, 0, 8, 99, 127])
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=8),
    st.sampled_from(["ok", "error", "ping", "get_data", "who_has"]),
)


def _ext(children):
    packed_child = children.map(lambda v: msgpack.packb(v, use_bin_type=True))
    return st.builds(msgpack.ExtType, _ext_codes, st.one_of(st.binary(max_size=16), packed_child))


_msgpack_values = st.recursive(
    st.one_of(_scalars, st.builds(msgpack.ExtType, _ext_codes, st.binary(max_size=16))),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 9)), children, max_size=4),
        _ext(children),
    ),
    max_leaves=12,
)
_pickled_payloads = st.tuples(
    st.sampled_from(["p", "c", "f", "b", "a", "m", "?"]),
    st.one_of(st.binary(max_size=32), st.sampled_from([serialize(v).blob for v in [1, (1, 2), np.arange(3), {1}, "s"]])),
    st.lists(st.lists(st.integers(-2, 2**33), min_size=0, max_size=4), max_size=2),
).map(lambda t: msgpack.ExtType(EXT_PICKLED, msgpack.packb(list(t), use_bin_type=True)))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(["op", "id", "args", "frames", "status", "result", "type", "exception"]), st.text(max_size=4)),
        st.one_of(_msgpack_values, _pickled_payloads, st.dictionaries(st.text(max_size=6), st.one_of(_msgpack_values, _pickled_payloads), max_size=3)),
        max_size=6,
    ),
    st.lists(st.binary(max_size=24), max_size=3),
)
def test_decoder_on_random_msgpack_maps_with_random_extension_types(header, buffers):
    assert_decodes_or_protocol_error([msgpack.packb(header, use_bin_type=True), *buffers])


def test_decoder_fuzz_loop():
    """The script's decoder loop, a few thousand messages (no hypothesis shrinking, more volume)."""
    seed = random.randrange(2**32)
    print(f"decoder fuzz seed {seed}")
    result = fuzz.fuzz_decoder(3000, seed, seconds=60)
    assert result["findings"] == {}, (seed, result["findings"])


# ---------------------------------------------------------------- live nodes


def _run_live(count, decoder_count=0, seconds=60.0):
    seed = random.randrange(2**32)
    print(f"fuzz seed {seed}")
    summary = fuzz.run(count, seconds, seed, rss_bound_mb=200.0, decoder_count=decoder_count)
    assert summary["problems"] == [], f"seed {seed}: {summary['problems']}"
    assert summary["live_messages"] >= min(count, 1000)
    return summary


def test_live_center_and_worker_survive_fuzzing():
    """A few thousand random and mutated messages at a running Center and Worker (subprocesses)."""
    _run_live(3000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_live_nodes_survive_100k_fuzzed_messages():
    summary = _run_live(100_000, decoder_count=100_000, seconds=1200)
    assert summary["live_messages"] == 100_000
    assert summary["decoder_messages"] == 100_000


# ---------------------------------------------------------------- regressions: bugs fuzzing found


def _pickled_ext(value):
    s = serialize(value)
    return msgpack.ExtType(EXT_PICKLED, msgpack.packb([s.kind, s.blob, []], use_bin_type=True))


@pytest.mark.parametrize("field", ["frames", "status"])
@pytest.mark.parametrize("parser", [parse_request, parse_reply])
def test_numpy_array_in_a_header_field_is_a_protocol_error(field, parser):
    """``frames``/``status`` compared with ``!=``/``==``: a NumPy array's answer is no bool (ValueError before)."""
    header = {"op": "ping", "id": 3, "args": {}, "status": "ok", "frames": 0}
    header[field] = _pickled_ext(np.arange(3))
    frames = [msgpack.packb(header, use_bin_type=True)]
    if field == "frames" or parser is parse_reply:
        with pytest.raises(ProtocolError):
            parser(frames)
    else:
        parser(frames)  # a request has no status field to trip on


@pytest.mark.parametrize("bad_id", [2**64, -(2**63) - 1, 10**30])
def test_request_id_beyond_64_bits_is_a_protocol_error(bad_id):
    """It used to be accepted, and then the error reply could not encode it (OverflowError, no reply at all)."""
    header = msgpack.packb({"op": "ping", "id": msgpack.ExtType(EXT_BIGINT, str(bad_id).encode()), "args": {}, "frames": 0}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="64-bit") as info:
        parse_request([header])
    assert info.value.request_id is None
    for good_id in (2**64 - 1, -(2**63)):
        assert parse_request(encode_request("ping", good_id, {})).id == good_id


def test_node_answers_a_request_with_a_huge_id():
    async def main():
        async with Center() as center:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect("tcp://" + center.address)
            try:
                header = {"op": "ping", "id": msgpack.ExtType(EXT_BIGINT, str(2**70).encode()), "args": {}, "frames": 0}
                sock.send_multipart([msgpack.packb(header, use_bin_type=True)])
                sock.send_multipart(encode_request("ping", 5, {}))
                replies = []
                deadline = time.monotonic() + 10
                while len(replies) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    while sock.poll(0):
                        replies.append(parse_reply(sock.recv_multipart()))
                return replies
            finally:
                sock.close(linger=0)

    replies = run(main(), timeout=30)
    assert [(r.id, r.status) for r in replies] == [(None, "error"), (5, "ok")]
    assert "64-bit" in replies[0].error["message"]


def test_a_peer_that_never_reads_its_replies_does_not_stall_the_node():
    """Replies to one peer that reads nothing queued in the node's outbox ahead of everyone's:
    the node stopped answering every other peer and its memory grew by a reply per request."""

    async def main():
        async with Center() as center:
            async with Worker(center.address, ncores=1) as worker:
                worker.update_data(data={"v": b"x" * 10_000})
                hog = zmq.Context.instance().socket(zmq.DEALER)
                hog.setsockopt(zmq.LINGER, 0)
                hog.setsockopt(zmq.RCVHWM, 1)
                hog.setsockopt(zmq.RCVBUF, 4096)
                hog.setsockopt(zmq.SNDHWM, 100_000)
                hog.connect("tcp://" + worker.address)
                try:
                    frames = encode_request("get_data", 1, {"keys": ["v"]})
                    for i in range(30_000):  # 300 MB of replies it will never read
                        hog.send_multipart(frames)
                        if i % 1000 == 0:
                            await asyncio.sleep(0.005)
                    deadline = time.monotonic() + 30
                    while worker.ops_served.get("get_data", 0) < 30_000 and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    async with rpc(worker.address, timeout=10) as other:
                        answer = await other.ping()
                        data = await other.get_data(keys=["v"])
                    return answer, data, len(worker.stream._outbox), worker.stream.dropped
                finally:
                    hog.close(linger=0)

    answer, data, outbox, dropped = run(main(), timeout=90)
    assert answer == "pong" and data == {"v": b"x" * 10_000}
    assert outbox == 0
    assert dropped > 0
