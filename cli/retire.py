"""zdist retire CENTER WORKER...: workers hand their data to the others, then exit.

Each WORKER is an address or a name as ``zdist status`` shows it. A worker
asked to retire copies every key no other worker holds to the others, then
unregisters and exits (its nanny too, if it has one); this prints what moved.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .common import add_version, program, say

#: Seconds a retirement may take (moving data) before this program gives up waiting.
DEFAULT_TIMEOUT = 300.0


async def retire(center_address: str, wanted: list[str], timeout: float, security: Any = None) -> dict:
    from zdist.retirement import retire_workers

    return await retire_workers(center_address, wanted, timeout, security)


def build_parser(prog: str = "zdist retire") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Retire workers: each hands the keys only it holds to the others, then exits.")
    parser.add_argument("center", metavar="CENTER_ADDRESS", help="the Center's HOST:PORT")
    parser.add_argument("workers", metavar="WORKER", nargs="+", help="worker addresses or names")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"give up waiting after this long (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file, for a cluster that uses CURVE")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of the public keys to trust")
    add_version(parser)
    return parser


@program
def main(argv: list[str] | None = None, prog: str = "zdist retire") -> int:
    args = build_parser(prog).parse_args(argv)
    security = None
    if args.key:
        from zdist.security import Security

        security = Security(key=args.key, authorized_keys=args.authorized_keys)
    try:
        results = asyncio.run(retire(args.center, args.workers, args.timeout, security))
    except (LookupError, OSError, ValueError, TimeoutError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for address, result in results.items():
        if isinstance(result, BaseException):
            failed += 1
            print(f"{prog}: {address} did not retire: {type(result).__name__}: {result}", file=sys.stderr)
            continue
        moved = ", ".join(f"{n} to {to}" for to, n in result["to"].items()) or "nothing to move"
        left = f"; {len(result['left'])} keys could not be handed over" if result["left"] else ""
        say(f"Retired {address}: {moved}{left}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
