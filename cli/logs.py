"""zdist logs CENTER [WORKER...]: the recent log records of a cluster's nodes (``--follow`` for new ones).

Every node keeps its last 1000 log records (at the level it was started
with, ``--log-level``); this prints them, each line prefixed with the node::

    $ zdist logs 127.0.0.1:8787
    [center] 10:02:03.114 INFO zdist.center: registered worker 127.0.0.1:40213 (...)
    [127.0.0.1:40213] 10:02:09.870 WARNING zdist.worker: task 'f-1' failed on 127.0.0.1:40213: ...

With WORKER names or addresses, only those workers. Exits 1, saying why,
when the Center does not answer within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .common import add_version, program, say

#: Seconds between two looks with --follow.
FOLLOW_INTERVAL = 1.0


def build_parser(prog: str = "zdist logs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Show the recent log records of a cluster's Center and workers.")
    parser.add_argument("center", metavar="CENTER_ADDRESS", help="the Center's HOST:PORT")
    parser.add_argument("workers", metavar="WORKER", nargs="*", help="only these workers (addresses or names); default: the Center and every worker")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new records until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="how long to wait for each node (default 5)")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file, for a cluster that uses CURVE")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of the public keys to trust")
    add_version(parser)
    return parser


@program  # `zdist logs CENTER | head`: quiet when the reader goes away
def main(argv: list[str] | None = None, prog: str = "zdist logs") -> int:
    from zdist.cluster_ops import collect_logs
    from zdist.output import format_record

    args = build_parser(prog).parse_args(argv)
    security = None
    if args.key:
        from zdist.security import Security

        security = Security(key=args.key, authorized_keys=args.authorized_keys)
    seen: dict = {}
    try:
        while True:
            try:
                nodes = asyncio.run(collect_logs(args.center, args.workers, seen, args.timeout, security))
            except (LookupError, OSError, ValueError, TimeoutError) as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return 1
            for label, address, result in nodes:
                if isinstance(result, BaseException):
                    print(f"{prog}: no logs from {label} ({address}): {type(result).__name__}: {result}", file=sys.stderr)
                    continue
                for record in result["records"]:
                    say(format_record(record, label))
                seen[address] = result["seq"]
            if not args.follow:
                return 0
            time.sleep(FOLLOW_INTERVAL)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
