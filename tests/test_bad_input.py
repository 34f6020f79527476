"""Whatever a peer sends, a node answers with a readable error, keeps serving and loses nothing.

A raw ZeroMQ DEALER (not :func:`zdist.rpc`) sends each bad input to a live
Center and a live Worker, then a good request to the same node on the same
socket, which must succeed.
"""
from __future__ import annotations

import asyncio
import pickle
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

import zdist
from zdist import Center, Worker, rpc
from zdist.comm import endpoint
from zdist.loop import LoopThread
from zdist.protocol import ERROR, OK, ProtocolError, encode_request, parse_reply
from zdist.protocol.message import EXT_PICKLED

from .conftest import HEARTBEAT_INTERVAL, make_cluster, run

KEEP = {"keep-array": np.arange(50_000, dtype="int64"), ("keep", 2): "text", b"keep-bytes": {1, 2, 3}}
SMALL_LIMIT = 1_000_000


# ---------------------------------------------------------------- a raw peer


class RawPeer:
    """A plain DEALER socket; every message sent here expects exactly one reply."""

    _next_id = 1000

    def __init__(self, address: str, timeout_ms: int = 20_000):
        self.address = address
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.connect(endpoint(address))  # tcp://host:port, or a private cluster's ipc:// socket

    def new_id(self) -> int:
        RawPeer._next_id += 1
        return RawPeer._next_id

    def send_raw(self, frames) -> None:
        self.sock.send_multipart(frames, copy=True)

    def receive(self):
        try:
            frames = self.sock.recv_multipart()
        except zmq.Again:
            raise AssertionError(f"{self.address} sent no reply") from None
        return parse_reply(frames)

    def ask_raw(self, frames):
        self.send_raw(frames)
        return self.receive()

    def ask(self, op: str, **args):
        request_id = self.new_id()
        reply = self.ask_raw(encode_request(op, request_id, args))
        assert reply.id == request_id
        return reply

    def call(self, op: str, **args):
        """A request that must succeed; its result."""
        reply = self.ask(op, **args)
        assert reply.status == OK, reply.error
        return reply.result

    def close(self) -> None:
        self.sock.close(linger=0)


def assert_error(reply, *, id=None, type_name=None, contains=()):
    assert reply.status == ERROR, f"expected an error reply, got {reply.result!r}"
    assert reply.id == id
    error = reply.error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if type_name is not None:
        assert error["type"] == type_name, error
    text = error["message"] + error.get("traceback", "")
    for word in contains:
        assert word in text, (word, error)
    return error


def header(mapping) -> bytes:
    return msgpack.packb(mapping, use_bin_type=True)


def garbage_pickle() -> msgpack.ExtType:
    return msgpack.ExtType(EXT_PICKLED, msgpack.packb(["p", b"\x80\x05 this is no pickle", []], use_bin_type=True))


# ---------------------------------------------------------------- live nodes


@pytest.fixture(scope="module")
def live():
    """A subprocess Center and two subprocess Workers; the first worker holds KEEP."""
    with make_cluster(2) as cluster:
        worker = cluster.worker_addresses[0]

        async def seed():
            async with rpc(worker, timeout=20) as w, rpc(cluster.center_address, timeout=20) as center:
                await w.update_data(data=KEEP)
                deadline = time.monotonic() + 20
                while not all((await center.who_has(keys=list(KEEP))).values()):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)

        run(seed())
        yield cluster


@pytest.fixture
def center_peer(live):
    peer = RawPeer(live.center_address)
    yield peer
    # The good request that follows every bad one, on the same socket.
    assert peer.call("ping") == "pong"
    who = peer.call("who_has", keys=list(KEEP))
    assert who == {key: {live.worker_addresses[0]} for key in KEEP}
    assert set(peer.call("ncores")) == set(live.worker_addresses)
    peer.close()


@pytest.fixture
def worker_peer(live):
    peer = RawPeer(live.worker_addresses[0])
    yield peer
    assert peer.call("ping") == "pong"
    assert_holds_everything(peer)
    peer.close()


def assert_holds_everything(peer):
    data = peer.call("get_data", keys=list(KEEP))
    assert set(data) == set(KEEP)
    np.testing.assert_array_equal(data["keep-array"], KEEP["keep-array"])
    assert data[("keep", 2)] == "text"
    assert data[b"keep-bytes"] == {1, 2, 3}


@pytest.fixture(params=["center", "worker"])
def peer(request, live):
    return request.getfixturevalue(f"{request.param}_peer")


# ---------------------------------------------------------------- malformed messages


def test_too_many_frames(peer):
    request_id = peer.new_id()
    frames = encode_request("ping", request_id, {})
    assert_error(peer.ask_raw([*frames, b"unexpected"]), id=request_id, type_name="ProtocolError", contains=["frames"])


def test_too_few_frames(peer):
    request_id = peer.new_id()
    frames = encode_request("ping", request_id, {"x": np.ones(2**15)})
    assert len(frames) == 2
    assert_error(peer.ask_raw(frames[:1]), id=request_id, type_name="ProtocolError", contains=["frames"])


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"GET / HTTP/1.1\r\n\r\n", b"\x81\xa2op"], ids=repr)
def test_header_not_msgpack(peer, data):
    assert_error(peer.ask_raw([data]), id=None, type_name="ProtocolError", contains=["msgpack"])


@pytest.mark.parametrize("value", [[1, 2, 3], "ping", 42, None], ids=repr)
def test_header_not_a_map(peer, value):
    assert_error(peer.ask_raw([header(value)]), id=None, type_name="ProtocolError", contains=["map"])


def test_id_not_an_int(peer):
    reply = peer.ask_raw([header({"op": "ping", "id": "seven", "args": {}, "frames": 0})])
    assert_error(reply, id=None, type_name="ProtocolError", contains=["id"])


def test_op_missing_or_not_a_string(peer):
    for bad in [{}, {"op": 5}, {"op": b"ping"}]:
        request_id = peer.new_id()
        reply = peer.ask_raw([header({"id": request_id, "args": {}, "frames": 0, **bad})])
        assert_error(reply, id=request_id, type_name="ProtocolError", contains=["op"])


def test_args_not_a_map(peer):
    request_id = peer.new_id()
    reply = peer.ask_raw([header({"op": "ping", "id": request_id, "args": [1, 2], "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["args"])


def test_unknown_op(peer):
    reply = peer.ask("launch_missiles", target="moon")
    assert_error(reply, id=reply.id, type_name="ProtocolError", contains=["launch_missiles", "ping"])


def test_unknown_extension_type(peer):
    request_id = peer.new_id()
    reply = peer.ask_raw([header({"op": "ping", "id": request_id, "args": {"x": msgpack.ExtType(99, b"?")}, "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["99"])


def test_payload_that_fails_to_unpickle(peer):
    request_id = peer.new_id()
    reply = peer.ask_raw([header({"op": "get_data", "id": request_id, "args": {"keys": [garbage_pickle()]}, "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["deserialize"])


def test_task_payload_that_fails_to_unpickle(worker_peer):
    """A worker loads a task's payloads off its event loop (Node.deferred_ops): a bad one still gets a ProtocolError."""
    request_id = worker_peer.new_id()
    tasks = [["never-made", garbage_pickle(), [], {}, []]]
    reply = worker_peer.ask_raw([header({"op": "compute_batch", "id": request_id, "args": {"tasks": tasks}, "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["deserialize"])
    blob = pickle.dumps(object()).replace(b"builtins", b"nowhere_")
    ext = msgpack.ExtType(EXT_PICKLED, msgpack.packb(["p", blob, []], use_bin_type=True))
    request_id = worker_peer.new_id()
    reply = worker_peer.ask_raw([header({"op": "compute", "id": request_id, "args": {"function": ext}, "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["nowhere_"])


def test_payload_of_a_class_the_node_does_not_have(peer):
    request_id = peer.new_id()
    blob = pickle.dumps(object()).replace(b"builtins", b"nowhere_")
    ext = msgpack.ExtType(EXT_PICKLED, msgpack.packb(["p", blob, []], use_bin_type=True))
    reply = peer.ask_raw([header({"op": "ping", "id": request_id, "args": {"x": ext}, "frames": 0})])
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["nowhere_"])


def test_payload_frames_out_of_range(peer):
    request_id = peer.new_id()
    ext = msgpack.ExtType(EXT_PICKLED, msgpack.packb(["b", b"", [[5, 1, 10]]], use_bin_type=True))
    reply = peer.ask_raw([header({"op": "ping", "id": request_id, "args": {"x": ext}, "frames": 1}), b"0123456789"])
    assert_error(reply, id=request_id, type_name="ProtocolError")


def test_many_bad_messages_in_a_row(peer):
    bad = [[b"\xc1"], [header([1])], [header({"op": 1})], [b""]]
    for _ in range(25):
        for frames in bad:
            peer.send_raw(frames)
    for _ in range(25 * len(bad)):
        assert peer.receive().status == ERROR


# ---------------------------------------------------------------- bad arguments


def test_center_missing_argument(center_peer):
    reply = center_peer.ask("register", address="127.0.0.1:1")
    assert_error(reply, id=reply.id, type_name="ProtocolError", contains=["register", "ncores"])
    reply = center_peer.ask("who_has", keyz=["x"])
    assert_error(reply, id=reply.id, type_name="ProtocolError", contains=["keyz"])


def test_center_wrongly_typed_arguments(center_peer):
    reply = center_peer.ask("register", address="127.0.0.1:1", ncores="x")
    assert_error(reply, id=reply.id, contains=["ncores"])
    reply = center_peer.ask("register", address=12345, ncores=1)
    assert_error(reply, id=reply.id, contains=["address"])
    reply = center_peer.ask("register", address="not an address", ncores=1)
    assert_error(reply, id=reply.id, contains=["address"])
    reply = center_peer.ask("who_has", keys=5)
    assert_error(reply, id=reply.id, type_name="TypeError")
    reply = center_peer.ask("add_keys", address="127.0.0.1:1", keys={"x": 1})
    assert_error(reply, id=reply.id, contains=["not registered"])
    # None of it left a trace in the tables.
    assert "127.0.0.1:1" not in center_peer.call("ncores")
    assert center_peer.call("who_has", keys=["x"]) == {"x": set()}


def test_worker_missing_argument(worker_peer):
    reply = worker_peer.ask("get_data")
    assert_error(reply, id=reply.id, type_name="ProtocolError", contains=["get_data", "keys"])
    reply = worker_peer.ask("compute", keys=["keep-array"])
    assert_error(reply, id=reply.id, type_name="ProtocolError", contains=["function"])


def test_worker_wrongly_typed_arguments(worker_peer):
    reply = worker_peer.ask("get_data", keys=5)
    assert_error(reply, id=reply.id, type_name="TypeError")
    reply = worker_peer.ask("update_data", data=5)
    assert_error(reply, id=reply.id, type_name="TypeError", contains=["dict"])
    reply = worker_peer.ask("compute", function="not a function", keys=["keep-array"], key="never")
    assert_error(reply, id=reply.id, type_name="TypeError", contains=["callable"])
    reply = worker_peer.ask("compute", function=len, keys=5, key="never")
    assert_error(reply, id=reply.id, type_name="TypeError")
    reply = worker_peer.ask("compute_batch", tasks="nope")
    assert_error(reply, id=reply.id, type_name="TypeError")
    reply = worker_peer.ask("delete_data", keys=5)
    assert_error(reply, id=reply.id, type_name="TypeError")
    assert "never" not in worker_peer.call("keys")


def test_worker_missing_key(worker_peer):
    reply = worker_peer.ask("get_data", keys=["keep-array", ("not", "here")])
    error = assert_error(reply, id=reply.id, type_name="MissingDataError", contains=["('not', 'here')"])
    assert isinstance(error["exception"], zdist.MissingDataError)
    assert error["exception"].keys == [("not", "here")]


def raises_value_error(x):
    raise ValueError(f"cannot handle {len(x)} items")


def test_worker_function_that_raises(worker_peer):
    reply = worker_peer.ask("compute", function=raises_value_error, keys=["keep-array"], key="fails")
    error = assert_error(reply, id=reply.id, type_name="ValueError", contains=["cannot handle 50000 items", "raises_value_error"])
    assert "Traceback" in error["traceback"]
    assert isinstance(error["exception"], ValueError)
    assert "fails" not in worker_peer.call("keys")


def test_worker_result_that_cannot_be_pickled(worker_peer, live):
    status, meta = worker_peer.call("compute", function=lambda: threading.Lock(), key="a-lock")
    assert status == b"OK" and meta["key"] == "a-lock"
    reply = worker_peer.ask("get_data", keys=["a-lock"])
    error = assert_error(reply, id=reply.id, contains=["'a-lock'"])
    assert "lock" in error["message"].lower()
    # Asked for together with good keys, still a readable error...
    reply = worker_peer.ask("get_data", keys=["keep-array", "a-lock"])
    assert_error(reply, id=reply.id, contains=["'a-lock'"])
    # ...and the good keys alone still come.
    assert_holds_everything(worker_peer)

    # A peer that needs the lock gets the same readable error, through rpc.
    async def from_other_worker():
        async with rpc(live.worker_addresses[1], timeout=30) as other:
            with pytest.raises(Exception) as info:
                await other.compute(function=lambda lock: 1, keys=["a-lock"], key="needs-lock")
            assert "a-lock" in str(info.value) or "a-lock" in str(info.value.__cause__)
            assert await other.ping() == "pong"

    run(from_other_worker())
    assert worker_peer.call("delete_data", keys=["a-lock"]) == "OK"


def test_other_clients_keep_being_served(live):
    noisy = RawPeer(live.worker_addresses[0])
    quiet = RawPeer(live.worker_addresses[0])
    try:
        for _ in range(50):
            noisy.send_raw([b"\xc1\xc1"])
        for _ in range(10):
            assert quiet.call("ping") == "pong"
        assert_holds_everything(quiet)
        for _ in range(50):
            assert noisy.receive().status == ERROR
    finally:
        noisy.close()
        quiet.close()


# ---------------------------------------------------------------- messages over the size limit


@pytest.fixture(scope="module")
def small_nodes():
    """A Center and a Worker in this process that refuse messages above SMALL_LIMIT bytes."""
    thread = LoopThread("test-small-nodes")
    nodes = []

    async def start():
        center = await Center("127.0.0.1", 0, max_message_size=SMALL_LIMIT).start()
        nodes.append(center)
        worker = await Worker(center.address, "127.0.0.1", 0, ncores=1, heartbeat_interval=HEARTBEAT_INTERVAL, max_message_size=SMALL_LIMIT).start()
        nodes.append(worker)
        await asyncio.wait_for(worker.registered.wait(), 20)
        worker.update_data(data=KEEP)
        return center.address, worker.address

    async def stop():
        for node in reversed(nodes):
            await node.stop()

    try:
        yield thread.run(start(), 30)
    finally:
        try:
            thread.run(stop(), 30)
        finally:
            thread.stop()


@pytest.fixture(params=["center", "worker"])
def small_peer(request, small_nodes):
    center, worker = small_nodes
    peer = RawPeer(center if request.param == "center" else worker)
    yield peer
    assert peer.call("ping") == "pong"
    if request.param == "worker":
        assert_holds_everything(peer)
    else:
        assert set(peer.call("ncores")) == {worker}
    peer.close()


def test_message_over_the_limit_in_many_frames(small_peer):
    request_id = small_peer.new_id()
    frames = encode_request("update_data", request_id, {"data": {"a": np.ones(SMALL_LIMIT // 8 // 2 + 1000), "b": np.ones(SMALL_LIMIT // 8 // 2 + 1000)}})
    assert len(frames) == 3
    reply = small_peer.ask_raw(frames)
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["larger than", str(SMALL_LIMIT)])


def test_message_over_the_limit_in_one_buffer_frame(small_peer):
    request_id = small_peer.new_id()
    frames = encode_request("update_data", request_id, {"data": {"big": np.ones(2 * SMALL_LIMIT // 8)}})
    assert len(frames) == 2
    reply = small_peer.ask_raw(frames)
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["larger than"])


def test_message_over_the_limit_in_its_header(small_peer):
    request_id = small_peer.new_id()
    frames = encode_request("ping", request_id, {"padding": "x" * (2 * SMALL_LIMIT)})
    assert len(frames) == 1
    reply = small_peer.ask_raw(frames)
    assert_error(reply, id=request_id, type_name="ProtocolError", contains=["larger than"])


def test_message_far_over_the_limit_does_not_hurt_the_node(small_peer):
    # libzmq may simply drop such a peer's connection; the node must live on
    # and the same socket (reconnected) must be served again.
    small_peer.send_raw([header({"op": "ping", "id": None, "args": {}, "frames": 1}), bytes(64 * 2**20)])
    small_peer.sock.setsockopt(zmq.RCVTIMEO, 1000)
    deadline = time.monotonic() + 30
    answered = False
    while not answered:
        assert time.monotonic() < deadline, "the node stopped answering"
        request_id = small_peer.new_id()
        small_peer.send_raw(encode_request("ping", request_id, {}))
        try:
            for _ in range(100):  # skip an error reply about the huge message, if one came
                reply = parse_reply(small_peer.sock.recv_multipart())
                if reply.id == request_id:
                    assert reply.status == OK and reply.result == "pong"
                    answered = True
                    break
                assert reply.id is None and reply.status == ERROR
        except zmq.Again:
            pass  # the message may have been lost with the dropped connection; ask again
    # Let any late replies to earlier pings arrive, then drop them.
    time.sleep(1.0)
    while True:
        try:
            small_peer.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
    small_peer.sock.setsockopt(zmq.RCVTIMEO, 20_000)


def test_message_over_the_limit_through_rpc(small_nodes):
    _, worker = small_nodes

    async def main():
        async with rpc(worker, timeout=30) as w:
            with pytest.raises(ProtocolError, match="larger than"):
                await w.update_data(data={"too-big": np.ones(2 * SMALL_LIMIT // 8)})
            data = await w.get_data(keys=["keep-array"])
            np.testing.assert_array_equal(data["keep-array"], KEEP["keep-array"])
            with pytest.raises(zdist.MissingDataError):
                await w.get_data(keys=["too-big"])
            status, _ = await w.update_data(data={"fits": np.ones(1000)})
            assert status == b"OK"

    run(main())
