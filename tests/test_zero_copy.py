"""Arrays travel without copies: never pickled into a blob, rebuilt on the received frame."""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import pickle
import time

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import zmq

from zdist import Center, Worker, rpc
from zdist.protocol import FRAME_SIZE, encode_reply, encode_request, parse_reply, serialize

from .conftest import HEARTBEAT_INTERVAL, make_cluster, run

# The modules, not the function and class of the same names that zdist exports.
serialize_module = importlib.import_module("zdist.protocol.serialize")
node_module = importlib.import_module("zdist.node")
rpc_module = importlib.import_module("zdist.rpc")

MEDIUM = 2**17  # float64 elements: 1 MiB, between 64 KiB and FRAME_SIZE
assert 64 * 2**10 < MEDIUM * 8 < FRAME_SIZE
SPLIT = 4 * 2**20  # a frame size small enough to test splitting with (the default is 1 GiB)
BIG = (2 * SPLIT + 4096 + 8) // 8  # spans three frames of SPLIT bytes, the last one partial
message_module = importlib.import_module("zdist.protocol.message")


def identity(x):
    return x


def frame_behind(value):
    """The ``zmq.Frame`` whose memory ``value`` uses, found through ``.base`` and ``.obj``; else None."""
    obj = value
    for _ in range(32):
        if isinstance(obj, zmq.Frame):
            return obj
        if isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, pickle.PickleBuffer):
            obj = memoryview(obj).obj
        else:
            obj = getattr(obj, "base", None)
        if obj is None:
            return None
    return None


def assert_backed_by_a_frame(array: np.ndarray) -> None:
    frame = frame_behind(array)
    assert frame is not None, f"array not backed by a received zmq.Frame (base chain: {base_chain(array)})"
    frame_bytes = np.frombuffer(frame.buffer, dtype=np.uint8)
    assert frame_bytes.nbytes == array.nbytes
    assert np.shares_memory(array, frame_bytes)
    assert array.__array_interface__["data"][0] == frame_bytes.__array_interface__["data"][0]


def base_chain(value) -> list[str]:
    chain, obj = [], value
    for _ in range(10):
        chain.append(type(obj).__name__)
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            break
    return chain


def shares_memory_with(buffer, array: np.ndarray) -> bool:
    return np.shares_memory(np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8), array)


@pytest.fixture(scope="module")
def shared():
    with make_cluster(2) as c:
        yield c


@contextlib.asynccontextmanager
async def local_nodes(n=2):
    center = await Center("127.0.0.1", 0).start()
    workers = []
    try:
        for i in range(n):
            workers.append(await Worker(center.address, "127.0.0.1", 0, ncores=1, name=f"w{i}", heartbeat_interval=HEARTBEAT_INTERVAL).start())
        deadline = time.monotonic() + 30
        while len(center.worker_info) < n:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        yield center, workers
    finally:
        for worker in workers:
            await worker.stop()
        await center.stop()


# ---------------------------------------------------------------- on the way in


def test_array_from_get_data_is_backed_by_the_received_frame(shared):
    x = np.random.default_rng(0).random(MEDIUM)

    async def main():
        async with rpc(shared.worker_addresses[0], timeout=30) as w:
            await w.update_data(data={"zc-x": x, "zc-other": np.arange(MEDIUM, dtype="int32")})
            got = await w.get_data(keys=["zc-x", "zc-other"])
            return got

    got = run(main())
    np.testing.assert_array_equal(got["zc-x"], x)
    assert got["zc-x"].dtype == x.dtype and got["zc-x"].shape == x.shape
    assert_backed_by_a_frame(got["zc-x"])
    assert_backed_by_a_frame(got["zc-other"])
    # Two values of one reply sit in two different frames.
    assert frame_behind(got["zc-x"]) is not frame_behind(got["zc-other"])


def test_worker_keeps_received_arrays_on_their_frames():
    """update_data and a peer-to-peer fetch store the array on the frame it arrived in."""
    x = np.arange(MEDIUM, dtype="float64")

    async def main():
        async with local_nodes(2) as (center, (alice, bob)):
            async with rpc(alice.address, timeout=30) as a, rpc(bob.address, timeout=30) as b:
                await a.update_data(data={"x": x})
                assert_backed_by_a_frame(alice.data["x"])
                np.testing.assert_array_equal(alice.data["x"], x)
                assert alice.nbytes["x"] == x.nbytes

                deadline = time.monotonic() + 30
                while not center.keys.who_has.get("x"):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                status, meta = await b.compute(function=identity, keys=["x"], key="y")
                assert status == b"OK" and meta["nbytes"] == x.nbytes
                # bob fetched x from alice: that copy too lives on its frame.
                assert_backed_by_a_frame(bob.data["x"])
                assert bob.data["y"] is bob.data["x"]
                assert frame_behind(bob.data["x"]) is not frame_behind(alice.data["x"])

    run(main())


def test_pandas_columns_arrive_without_a_copy():
    df = pd.DataFrame({"a": np.arange(MEDIUM, dtype="float64"), "b": np.arange(MEDIUM, dtype="int64")})
    frames = [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in encode_reply(1, df)]
    assert len(frames) >= 2
    got = parse_reply(frames).result
    pd.testing.assert_frame_equal(got, df)
    for column in ("a", "b"):
        values = got[column].to_numpy()
        assert any(np.shares_memory(values, np.frombuffer(f.buffer, dtype=np.uint8)) for f in frames[1:]), column


# ---------------------------------------------------------------- on the way out


def test_serialize_builds_no_blob_of_the_array_size():
    x = np.random.default_rng(1).random(MEDIUM)
    s = serialize(x)
    assert len(s.blob) < 1000 < x.nbytes
    assert len(s.buffers) == 1
    assert memoryview(s.buffers[0]).nbytes == x.nbytes
    assert shares_memory_with(s.buffers[0], x)  # the array's own memory, not a copy


def test_serialize_dataframe_builds_no_big_blob():
    df = pd.DataFrame({"a": np.arange(MEDIUM, dtype="float64"), "b": np.ones(MEDIUM)})
    s = serialize(df)
    total = sum(memoryview(b).nbytes for b in s.buffers)
    assert total >= 2 * MEDIUM * 8
    assert len(s.blob) < 10_000


@pytest.mark.parametrize("encode", ["request", "reply"])
def test_encoded_message_points_at_the_array(encode):
    x = np.random.default_rng(2).random(MEDIUM)
    frames = encode_request("update_data", 1, {"data": {"x": x}}) if encode == "request" else encode_reply(1, {"x": x})
    assert len(frames) == 2
    assert len(frames[0]) < 1000 < x.nbytes  # the header is small
    assert memoryview(frames[1]).nbytes == x.nbytes
    assert shares_memory_with(frames[1], x)  # the frame is the array's memory itself


def test_big_array_is_split_into_views_of_itself(monkeypatch):
    monkeypatch.setattr(message_module, "FRAME_SIZE", SPLIT)
    x = np.arange(BIG, dtype="float64")
    frames = encode_request("update_data", 1, {"data": {"x": x}})
    buffers = frames[1:]
    assert len(buffers) == 3
    assert all(memoryview(b).nbytes <= SPLIT for b in buffers)
    assert sum(memoryview(b).nbytes for b in buffers) == x.nbytes
    assert all(shares_memory_with(b, x) for b in buffers)
    assert len(frames[0]) < 1000


def test_no_big_pickle_or_header_during_a_round_trip(monkeypatch):
    """Spy on every pickle and every message a node and a client build."""
    x = np.random.default_rng(3).random(MEDIUM)
    blobs: list[int] = []
    headers: list[int] = []

    real_dumps, real_cloud_dumps = pickle.dumps, cloudpickle.dumps

    def spy_dumps(*args, **kwargs):
        blob = real_dumps(*args, **kwargs)
        blobs.append(len(blob))
        return blob

    def spy_cloud_dumps(*args, **kwargs):
        blob = real_cloud_dumps(*args, **kwargs)
        blobs.append(len(blob))
        return blob

    def spying(encode):
        def wrapper(*args, **kwargs):
            frames = encode(*args, **kwargs)
            headers.append(len(frames[0]))
            return frames

        return wrapper

    monkeypatch.setattr(serialize_module.pickle, "dumps", spy_dumps)
    monkeypatch.setattr(serialize_module.cloudpickle, "dumps", spy_cloud_dumps)
    monkeypatch.setattr(node_module, "encode_reply", spying(node_module.encode_reply))
    monkeypatch.setattr(rpc_module, "encode_request", spying(rpc_module.encode_request))

    async def main():
        async with local_nodes(2) as (center, (alice, bob)):
            async with rpc(alice.address, timeout=30) as a, rpc(bob.address, timeout=30) as b:
                await a.update_data(data={"x": x})
                deadline = time.monotonic() + 30
                while not center.keys.who_has.get("x"):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                await b.compute(function=identity, keys=["x"], key="y")  # bob fetches x from alice
                got = (await b.get_data(keys=["y"]))["y"]
                np.testing.assert_array_equal(got, x)

    run(main())
    assert blobs, "the spy saw no pickling at all"
    assert headers, "the spy saw no messages"
    assert max(blobs) < x.nbytes / 10, f"a pickle blob of {max(blobs)} bytes was built for a {x.nbytes}-byte array"
    assert max(headers) < x.nbytes / 10, f"a header of {max(headers)} bytes was built for a {x.nbytes}-byte array"


# ---------------------------------------------------------------- big arrays


def test_big_array_arrives_as_one_zero_copy_frame(shared):
    """Below FRAME_SIZE (1 GiB) even a big array is one frame, received without a copy."""
    x = np.random.default_rng(4).random(BIG)
    assert SPLIT < x.nbytes < FRAME_SIZE

    async def main():
        async with rpc(shared.worker_addresses[1], timeout=60) as w:
            await w.update_data(data={"zc-big": x})
            first = (await w.get_data(keys=["zc-big"]))["zc-big"]
            first[:10] = -1.0  # ours to write: it does not touch the worker's copy
            second = (await w.get_data(keys=["zc-big"]))["zc-big"]
            await w.delete_data(keys=["zc-big"])
            return first, second

    first, second = run(main())
    assert first.shape == x.shape and first.dtype == x.dtype
    assert frame_behind(first) is not None  # built on the received frame
    assert (first[:10] == -1.0).all()
    np.testing.assert_array_equal(first[10:], x[10:])
    np.testing.assert_array_equal(second, x)
    assert not np.shares_memory(first, second)


def test_split_array_is_joined_into_one_writable_array(monkeypatch):
    monkeypatch.setattr(message_module, "FRAME_SIZE", SPLIT)
    x = np.random.default_rng(5).random(BIG)
    frames = encode_reply(1, {"x": x})
    assert len(frames) == 4
    out = parse_reply([bytes(f) if not isinstance(f, bytes) else f for f in frames]).result["x"]
    assert out.flags.writeable and frame_behind(out) is None
    np.testing.assert_array_equal(out, x)
