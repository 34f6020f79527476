"""zdist-center: start the Center of a zdist cluster."""
from __future__ import annotations

import argparse

from zdist.center import DEFAULT_HEARTBEAT_TIMEOUT, Center

from .common import add_common_arguments, node_kwargs, say, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zdist-center", description="Start the Center of a zdist cluster.")
    add_common_arguments(parser)
    parser.add_argument("--port", type=int, default=8787, help="port to listen on (default 8787; 0 picks a free one)")
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="SECONDS", help="drop a worker silent for this long")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    center = Center(args.host, args.port, heartbeat_timeout=args.heartbeat_timeout, **node_kwargs(args))
    try:
        center.serve_forever(on_started=lambda node: say(f"Start center at {node.address}"))
    except OSError as exc:
        parser.exit(1, f"zdist-center: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
