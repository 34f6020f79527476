"""``who_has`` at scale, in one process: the Center's table, the reply's encoding, the client's decode.

    python benchmarks/bench_who_has.py [--workers 1000] [--keys 1000000] [--query 1000] [--repeat 200] [--profile] [--wire]

Builds a :class:`zdist.Center` object (not started: no sockets), registers
``--workers`` addresses, reports ``--keys`` keys among them with
``add_keys`` (names as ``benchmarks/fleet.py`` makes them, one holder each,
plus a share held twice), then times, over ``--repeat`` random queries of
``--query`` keys each:

* ``op``: the ``who_has`` handler the wire calls (the Center's side, the
  reply not yet encoded);
* ``op+encode``: the handler and ``encode_reply`` of its answer, which is
  what the Center spends per request before the socket;
* ``decode``: the client's ``parse_reply`` of those frames;

and prints the median and p99 of each in ms. ``--profile`` runs pyinstrument
over the repeats instead (``pip install pyinstrument``). This is the
in-process row of docs/scale.md's "Before and after".

``--wire`` instead starts a real Center (``python -m zdist.run center``, its
own process), registers the addresses and reports the keys over rpc (no
worker behind them: nothing heartbeats, so the Center is told a long
heartbeat timeout), and times ``who_has`` from this process as a client
does, round trip included. ``fleet.py`` measures the same query with 1,000
real workers heartbeating, which is slower to set up and noisier.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time


def build(workers: int, keys: int, twice: float = 0.05):
    from zdist import Center

    center = Center()
    addresses = [f"127.0.0.1:{40000 + i}" for i in range(workers)]
    for address in addresses:
        center.register(address=address, ncores=1, name=f"h0-{address}")
    per_worker = keys // workers
    names = []
    for i, address in enumerate(addresses):
        port = address.rsplit(":", 1)[1]
        batch = {f"h0-{port}-{n}": n for n in range(per_worker)}
        center.add_keys(address, batch)
        names.extend(batch)
    # A share of keys held by a second worker too (replicas, copies after a transfer).
    rng = random.Random(0)
    for key in rng.sample(names, int(len(names) * twice)):
        center.add_keys(rng.choice(addresses), {key: 8})
    return center, names


def wire(args: argparse.Namespace) -> None:
    """``--wire``: the query over a socket, against a Center in its own process."""
    import asyncio
    import subprocess
    import sys

    from zdist import rpc

    center = subprocess.Popen([sys.executable, "-m", "zdist.run", "center", "--port", "0", "--no-dashboard", "--heartbeat-timeout", "86400"], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while "Start center at" not in line:
            line = center.stdout.readline()
            if not line:
                raise RuntimeError(f"the Center exited (status {center.wait()}) before it listened")
        address = line.split("Start center at", 1)[1].strip()

        async def main() -> None:
            async with rpc(address, timeout=60) as c:
                per_worker = args.keys // args.workers
                names = []
                start = time.perf_counter()
                for i in range(args.workers):
                    worker = f"127.0.0.1:{40000 + i}"
                    await c.register(address=worker, ncores=1)
                    batch = {f"h0-{40000 + i}-{n}": n for n in range(per_worker)}
                    await c.add_keys(address=worker, keys=batch)
                    names.extend(batch)
                print(f"{len(names)} keys among {args.workers} registered addresses reported in {time.perf_counter() - start:.1f} s")
                rng = random.Random(1)
                times = []
                for _ in range(args.repeat):
                    query = rng.sample(names, args.query)
                    t0 = time.perf_counter()
                    where = await c.who_has(keys=query)
                    times.append(time.perf_counter() - t0)
                    assert len(where) == len(query) and all(where.values())
                print(f"who_has of {args.query} keys over the wire, {args.repeat} queries: {_quantiles(times)}")

        asyncio.run(main())
    finally:
        center.terminate()
        center.wait(10)


def _quantiles(samples: list[float]) -> str:
    samples = sorted(samples)
    return f"median {statistics.median(samples) * 1e3:.3f} ms, p99 {samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3:.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--query", type=int, default=1000, help="keys a who_has asks for")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="profile the repeats with pyinstrument")
    parser.add_argument("--wire", action="store_true", help="time the query over a socket, against a Center in its own process")
    args = parser.parse_args(argv)
    if args.wire:
        wire(args)
        return 0

    from zdist.protocol import encode_reply, parse_reply

    start = time.perf_counter()
    center, names = build(args.workers, args.keys)
    print(f"{args.keys} keys among {args.workers} workers built in {time.perf_counter() - start:.1f} s")
    handler = center.handlers["who_has"]
    rng = random.Random(1)
    # Each query's keys as new strings, as a request decoded off the wire brings them
    # (the table's own key objects would spare the lookups a string comparison).
    queries = [[key.encode().decode() for key in rng.sample(names, args.query)] for _ in range(args.repeat)]
    # Each query's answer checked once against the Python-level who_has.
    frames = encode_reply(1, handler(keys=queries[0]))
    assert parse_reply(frames).result == center.who_has(keys=queries[0])

    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001)
        profiler.start()
        for query in queries:
            parse_reply(encode_reply(1, handler(keys=query)))
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False))
        return 0

    # Wall-clock time, and this thread's CPU time: on a shared machine the
    # wall clock counts the turns other processes take; the CPU time does not.
    wall: dict[str, list] = {"op": [], "op+encode": [], "decode": []}
    cpu: dict[str, list] = {"op": [], "op+encode": [], "decode": []}
    clock, cpu_clock = time.perf_counter, time.thread_time
    for query in queries:
        t0, c0 = clock(), cpu_clock()
        result = handler(keys=query)
        t1, c1 = clock(), cpu_clock()
        frames = encode_reply(1, result)
        t2, c2 = clock(), cpu_clock()
        parse_reply(frames)
        t3, c3 = clock(), cpu_clock()
        for times, a, b, c, d in ((wall, t0, t1, t2, t3), (cpu, c0, c1, c2, c3)):
            times["op"].append(b - a)
            times["op+encode"].append(c - a)
            times["decode"].append(d - c)
    print(f"who_has of {args.query} keys, {args.repeat} queries (wall clock; CPU time):")
    for name in wall:
        print(f"  {name:10s} {_quantiles(wall[name])}; CPU median {statistics.median(cpu[name]) * 1e3:.3f} ms")
    print(f"  reply      {len(frames[0])} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
