"""zdist-center: start the Center of a zdist cluster."""
from __future__ import annotations

import argparse
import asyncio
import signal
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
    if dashboard_port is not None:
        from zdist.dashboard import require_aiohttp

        try:
            require_aiohttp()
        except ImportError as exc:  # aiohttp missing: run without the dashboard
            print(f"zdist-center: no dashboard: {exc}", file=sys.stderr, flush=True)
            dashboard_port = None
    center = Center(args.host, args.port, heartbeat_timeout=args.heartbeat_timeout, **node_kwargs(args))
    try:
        asyncio.run(serve(center, dashboard_port))
    except OSError as exc:
        parser.exit(1, f"zdist-center: {exc}\n")
    return 0


async def serve(center: Center, dashboard_port: int | None) -> None:
    """Run ``center`` and its dashboard until SIGINT or SIGTERM; then stop both cleanly."""
    await center.start()
    dashboard = None
    try:
        if dashboard_port is not None:
            from zdist.dashboard import serve_dashboard

            dashboard = await serve_dashboard(center, port=dashboard_port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(center.stop()))
        say(f"Start center at {center.address}")
        if dashboard is not None:
            say(f"Dashboard at {dashboard.url}")
        await center.finished()
    finally:
        if dashboard is not None:
            await dashboard.stop()
        await center.stop()


if __name__ == "__main__":
    raise SystemExit(main())
