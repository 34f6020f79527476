"""zdist-center: start the Center of a zdist cluster."""
from __future__ import annotations

import argparse
import sys

from zdist.center import DEFAULT_HEARTBEAT_TIMEOUT, Center

from .common import add_common_arguments, node_kwargs, say, setup_logging


#: Where ``zdist-center`` serves its web dashboard unless told otherwise.
DEFAULT_DASHBOARD_PORT = 8790


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zdist-center", description="Start the Center of a zdist cluster.")
    add_common_arguments(parser)
    parser.add_argument("--port", type=int, default=8787, help="port to listen on (default 8787; 0 picks a free one)")
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="SECONDS", help="drop a worker silent for this long")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, metavar="PORT", help=f"HTTP port of the web dashboard (default {DEFAULT_DASHBOARD_PORT}; 0 picks a free one; a busy port falls back to a free one)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    dashboard_port = None if args.no_dashboard else args.dashboard_port
    try:
        center = Center(args.host, args.port, heartbeat_timeout=args.heartbeat_timeout, dashboard_port=dashboard_port, **node_kwargs(args))
    except ImportError as exc:  # aiohttp missing: run without the dashboard
        print(f"zdist-center: no dashboard: {exc}", file=sys.stderr, flush=True)
        center = Center(args.host, args.port, heartbeat_timeout=args.heartbeat_timeout, **node_kwargs(args))

    def started(node: Center) -> None:
        say(f"Start center at {node.address}")
        if node.dashboard is not None:
            say(f"Dashboard at {node.dashboard.url}")

    try:
        center.serve_forever(on_started=started)
    except OSError as exc:
        parser.exit(1, f"zdist-center: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
