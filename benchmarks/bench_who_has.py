"""``who_has`` at scale, in one process: the Center's table, the reply's encoding, the client's decode.

    python benchmarks/bench_who_has.py [--workers 1000] [--keys 1000000] [--query 1000] [--repeat 200] [--profile]

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
in-process row of docs/scale.md's "Before and after"; ``fleet.py`` measures
the same query over the wire.
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
    args = parser.parse_args(argv)

    from zdist.protocol import encode_reply, parse_reply

    start = time.perf_counter()
    center, names = build(args.workers, args.keys)
    print(f"{args.keys} keys among {args.workers} workers built in {time.perf_counter() - start:.1f} s")
    handler = center.handlers["who_has"]
    rng = random.Random(1)
    queries = [rng.sample(names, args.query) for _ in range(args.repeat)]
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

    op, encode, decode = [], [], []
    for query in queries:
        t0 = time.perf_counter()
        result = handler(keys=query)
        t1 = time.perf_counter()
        frames = encode_reply(1, result)
        t2 = time.perf_counter()
        parse_reply(frames)
        t3 = time.perf_counter()
        op.append(t1 - t0)
        encode.append(t2 - t0)
        decode.append(t3 - t2)
    print(f"who_has of {args.query} keys, {args.repeat} queries:")
    print(f"  op         {_quantiles(op)}")
    print(f"  op+encode  {_quantiles(encode)}")
    print(f"  decode     {_quantiles(decode)}")
    print(f"  reply      {len(frames[0])} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
