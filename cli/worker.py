"""zdist-worker: start a Worker and register it with a Center."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from zdist.cluster import node_environment
from zdist.worker import Worker

from .common import add_common_arguments, node_kwargs, say, setup_logging


def _with_huge_pages(argv: list[str] | None) -> None:
    """Start again with glibc's huge-page tunable on (see zdist.cluster.node_environment)."""
    env = node_environment()
    if argv is None and env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
        os.execve(sys.executable, [sys.executable, "-m", "zdist_cli.worker", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zdist-worker", description="Start a zdist Worker and register it with the Center.")
    parser.add_argument("center", metavar="CENTER_ADDRESS", help="the Center's HOST:PORT, e.g. 127.0.0.1:8787")
    add_common_arguments(parser)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--ncores", type=int, default=os.cpu_count(), help="threads for user functions (default: this machine's cores)")
    parser.add_argument("--name", default=None, help="a name shown by the Center (default: the worker's address)")
    parser.add_argument("--local-dir", default=None, metavar="DIR", help="directory for the worker's files")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="SECONDS", help="how often to tell the Center this worker lives")
    args = parser.parse_args(argv)
    _with_huge_pages(argv)
    setup_logging(args.log_level)
    try:
        worker = Worker(
            args.center,
            args.host,
            args.port,
            ncores=args.ncores,
            name=args.name,
            local_dir=args.local_dir,
            heartbeat_interval=args.heartbeat_interval,
            **node_kwargs(args),
        )
    except ValueError as exc:
        parser.exit(2, f"zdist-worker: {exc}\n")

    def started(node: Worker) -> None:
        say(f"Start worker at: {node.address}")

        async def announce() -> None:
            waited = False
            while not node.registered.is_set():
                try:
                    await asyncio.wait_for(node.registered.wait(), 2.0)
                except asyncio.TimeoutError:
                    if not waited:
                        say(f"Waiting for center at: {node.center_address}")
                        waited = True
            say(f"Registered with center at: {node.center_address}")

        asyncio.ensure_future(announce())

    try:
        worker.serve_forever(on_started=started)
    except OSError as exc:
        parser.exit(1, f"zdist-worker: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
