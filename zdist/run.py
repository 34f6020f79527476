"""A Center or a Worker as a program: ``python -m zdist.run center|worker [OPTIONS]``.

The library's own way to start a node process. :class:`~zdist.LocalCluster`
spawns its nodes with it, and the ``zdist-center`` / ``zdist-worker``
programs (the ``zdist_cli`` package) are these same parsers and functions
under their own names, so the two can never take different options.

- :func:`run_center` / :func:`run_worker` serve one node in this thread until
  SIGINT or SIGTERM, printing ``Start center at HOST:PORT`` (and
  ``Dashboard at URL``) or ``Start worker at: HOST:PORT`` then
  ``Registered with center at: ADDRESS``: the lines LocalCluster and scripts
  wait for.
- :func:`center_main` / :func:`worker_main` parse a command line and call them.

>>> parser = worker_parser(prog='zdist-worker')
>>> args = parser.parse_args(['127.0.0.1:8787', '--ncores', '2'])
>>> args.center, args.ncores, args.port
('127.0.0.1:8787', 2, 0)
>>> center_parser().parse_args([]).port
8787

Nothing in the ``zdist`` package imports this module, so ``python -m
zdist.run`` runs it once, as ``__main__``, never beside a second copy.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from .center import DEFAULT_HEARTBEAT_TIMEOUT, Center
from .worker import Worker

#: The Center's port unless told otherwise.
DEFAULT_CENTER_PORT = 8787
#: Where a Center started from the command line serves its web dashboard unless told otherwise.
DEFAULT_DASHBOARD_PORT = 8790


def say(line: str) -> None:
    """Print one line at once (LocalCluster and scripts read these from a pipe)."""
    print(line, flush=True)


# ------------------------------------------------------------------ arguments


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every node takes: where to listen, message size, keys, logging."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--max-message-size", type=int, default=None, metavar="BYTES", help="largest message a peer may send (default: 2 GiB)")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file (from zdist-keys) to turn on CURVE authentication and encryption")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of public keys allowed to connect (default: the key file's directory)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="how much to log on stderr (default: warning)")


def node_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of a :class:`~zdist.node.Node` that :func:`add_node_arguments` parsed."""
    options: dict[str, Any] = {}
    if args.max_message_size:
        options["max_message_size"] = args.max_message_size
    if args.key:
        from .security import Security

        options["security"] = Security(key=args.key, authorized_keys=args.authorized_keys)
    return options


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def center_parser(prog: str = "python -m zdist.run center") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start the Center of a zdist cluster.")
    add_node_arguments(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_CENTER_PORT, help=f"port to listen on (default {DEFAULT_CENTER_PORT}; 0 picks a free one)")
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="SECONDS", help="drop a worker silent for this long")
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        metavar="PORT",
        help=f"HTTP port of the web dashboard (default {DEFAULT_DASHBOARD_PORT}; 0 picks a free one; a busy port falls back to a free one)",
    )
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    return parser


def worker_parser(prog: str = "python -m zdist.run worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start a zdist Worker and register it with the Center.")
    parser.add_argument("center", metavar="CENTER_ADDRESS", help="the Center's HOST:PORT, e.g. 127.0.0.1:8787")
    add_node_arguments(parser)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--ncores", type=int, default=os.cpu_count(), help="threads for user functions (default: this machine's cores)")
    parser.add_argument("--name", default=None, help="a name shown by the Center (default: the worker's address)")
    parser.add_argument("--local-dir", default=None, metavar="DIR", help="directory for the worker's files")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="SECONDS", help="how often to tell the Center this worker lives")
    return parser


# ------------------------------------------------------------------ serving


def run_center(
    host: str = "127.0.0.1",
    port: int = DEFAULT_CENTER_PORT,
    *,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    dashboard_port: int | None = None,
    prog: str = "zdist-center",
    **options: Any,
) -> None:
    """Serve a Center (and its dashboard, unless ``dashboard_port`` is None) until SIGINT or SIGTERM.

    Without aiohttp the dashboard is left out, said in one line on stderr.
    Raises :class:`OSError` when the port cannot be had.
    """
    if dashboard_port is not None:
        from .dashboard import require_aiohttp

        try:
            require_aiohttp()
        except ImportError as exc:
            print(f"{prog}: no dashboard: {exc}", file=sys.stderr, flush=True)
            dashboard_port = None
    center = Center(host, port, heartbeat_timeout=heartbeat_timeout, **options)
    asyncio.run(_serve_center(center, dashboard_port))


async def _serve_center(center: Center, dashboard_port: int | None) -> None:
    await center.start()
    dashboard = None
    try:
        if dashboard_port is not None:
            from .dashboard import serve_dashboard

            dashboard = await serve_dashboard(center, port=dashboard_port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(center.stop()))
        say(f"Start center at {center.address}")  # after the dashboard: info() then names it
        if dashboard is not None:
            say(f"Dashboard at {dashboard.url}")
        await center.finished()
    finally:
        if dashboard is not None:
            await dashboard.stop()
        await center.stop()


def run_worker(center: str, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
    """Serve a Worker of the Center at ``center`` until SIGINT or SIGTERM (it unregisters first).

    ``options`` are :class:`~zdist.Worker`'s (``ncores``, ``name``, ``local_dir``,
    ``heartbeat_interval``, ``security``, ...). Raises :class:`ValueError` for a
    bad address and :class:`OSError` when the port cannot be had.
    """
    worker = Worker(center, host, port, **options)

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

    worker.serve_forever(on_started=started)


# ------------------------------------------------------------------ command lines


def center_main(argv: list[str] | None = None, prog: str = "python -m zdist.run center") -> int:
    parser = center_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        run_center(
            args.host,
            args.port,
            heartbeat_timeout=args.heartbeat_timeout,
            dashboard_port=None if args.no_dashboard else args.dashboard_port,
            prog=prog,
            **node_options(args),
        )
    except OSError as exc:
        parser.exit(1, f"{prog}: {exc}\n")
    return 0


def worker_main(argv: list[str] | None = None, prog: str = "python -m zdist.run worker") -> int:
    parser = worker_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    options = dict(ncores=args.ncores, name=args.name, local_dir=args.local_dir, heartbeat_interval=args.heartbeat_interval, **node_options(args))
    try:
        run_worker(args.center, args.host, args.port, **options)
    except ValueError as exc:
        parser.exit(2, f"{prog}: {exc}\n")
    except OSError as exc:
        parser.exit(1, f"{prog}: {exc}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    programs = {"center": center_main, "worker": worker_main}
    if not argv or argv[0] not in programs:
        print("usage: python -m zdist.run {center,worker} [OPTIONS]   ('python -m zdist.run center --help' tells more)", file=sys.stderr)
        return 2
    return programs[argv[0]](argv[1:], prog=f"python -m zdist.run {argv[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
