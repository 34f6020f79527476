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
import functools
import logging
import os
import signal
import sys
from typing import Any, Callable

from . import __version__
from .center import DEFAULT_HEARTBEAT_RATE, DEFAULT_HEARTBEAT_TIMEOUT, Center
from .centerfile import read_center_file, remove_center_file, write_center_file
from .comm import normalize_address
from .errors import EXIT_NO_CENTER
from .memory import MemoryThresholds, parse_fraction, parse_memory_limit, parse_ncores
from .nanny import MAX_RESTARTS, RESTART_WINDOW
from .spawn import PARENT_ENV, parent_gone
from .retirement import parse_duration
from .scheduling.controls import parse_resources
from .worker import Worker

#: The Center's port unless told otherwise.
DEFAULT_CENTER_PORT = 8787
#: Where a Center started from the command line serves its web dashboard unless told otherwise.
DEFAULT_DASHBOARD_PORT = 8790


def say(line: str) -> None:
    """Print one line at once (LocalCluster and scripts read these from a pipe)."""
    print(line, flush=True)


def program(main: Callable[..., int]) -> Callable[..., int]:
    """A program's ``main`` that ends quietly when its reader goes away (``zdist-status CENTER | head -3``).

    Without this, a write to a closed pipe ends in a ``BrokenPipeError``
    traceback, and Python's flush at exit prints another. The output then
    goes to /dev/null, so that nothing else is written, and the program
    exits 0: it was the reader's choice to stop reading, not a failure.
    """

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:  # also after --help or --version (SystemExit): a broken pipe surfaces here, not at exit
                sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 0

    return run


# ------------------------------------------------------------------ arguments


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every node takes: where to listen, message size, keys, logging."""
    parser.add_argument(
        "--host", default=None, help="address to listen on (default: 127.0.0.1, this machine only); ipc://DIR listens on a Unix socket in DIR, reachable only by who may open DIR"
    )
    parser.add_argument("--interface", default=None, metavar="NAME", help="listen on this network interface's IPv4 address (eth0, ib0, lo, ...) instead of --host")
    parser.add_argument("--max-message-size", type=int, default=None, metavar="BYTES", help="largest message a peer may send (default: 2 GiB)")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file (from zdist-keys) to turn on CURVE authentication and encryption")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of public keys allowed to connect (default: the key file's directory)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="how much to log on stderr (default: warning)")
    parser.add_argument("--version", action="version", version=f"%(prog)s (zdist) {__version__}")


def node_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of a :class:`~zdist.node.Node` that :func:`add_node_arguments` parsed."""
    options: dict[str, Any] = {}
    if args.max_message_size:
        options["max_message_size"] = args.max_message_size
    if args.key:
        from .security import Security

        options["security"] = Security(key=args.key, authorized_keys=args.authorized_keys)
    return options


def interface_address(name: str) -> str:
    """The IPv4 address of the network interface ``name``; a ValueError naming those there are otherwise.

    >>> interface_address('lo')
    '127.0.0.1'
    """
    import socket

    import psutil

    interfaces = psutil.net_if_addrs()
    if name not in interfaces:
        raise ValueError(f"no network interface {name!r} on this machine; it has {', '.join(sorted(interfaces))}")
    for address in interfaces[name]:
        if address.family == socket.AF_INET:
            return address.address
    with_ipv4 = sorted(n for n, addresses in interfaces.items() if any(a.family == socket.AF_INET for a in addresses))
    raise ValueError(f"network interface {name!r} has no IPv4 address; these have one: {', '.join(with_ipv4)}")


def resolve_host(args: argparse.Namespace) -> str:
    """``--host`` or ``--interface`` (not both) as the address to listen on; a ValueError that says why."""
    if args.interface is not None:
        if args.host is not None:
            raise ValueError(f"give --host or --interface, not both (--host {args.host} --interface {args.interface})")
        return interface_address(args.interface)
    return args.host or "127.0.0.1"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def center_parser(prog: str = "python -m zdist.run center") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start the Center of a zdist cluster.")
    add_node_arguments(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_CENTER_PORT, help=f"port to listen on (default {DEFAULT_CENTER_PORT}; 0 picks a free one)")
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="SECONDS", help="drop a worker silent for this long (longer in a large cluster: see --heartbeat-rate)"
    )
    parser.add_argument(
        "--heartbeat-rate",
        type=float,
        default=DEFAULT_HEARTBEAT_RATE,
        metavar="PER_SECOND",
        help=f"heartbeats a second the Center asks for at most: workers beat every N/rate s (default {DEFAULT_HEARTBEAT_RATE:.0f})",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        metavar="PORT",
        help=f"HTTP port of the web dashboard (default {DEFAULT_DASHBOARD_PORT}; 0 picks a free one; a busy port falls back to a free one)",
    )
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    parser.add_argument(
        "--center-file", default=None, metavar="PATH",
        help="once listening, write the address (and public key) here as JSON, for workers and clients started with --center-file (a batch job's way to find its Center)",
    )
    return parser


def worker_parser(prog: str = "python -m zdist.run worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start a zdist Worker and register it with the Center.")
    parser.add_argument("center", metavar="CENTER_ADDRESS", nargs="?", default=None, help="the Center's HOST:PORT, e.g. 127.0.0.1:8787 (or give --center-file)")
    parser.add_argument(
        "--center-file", default=None, metavar="PATH",
        help="read the Center's address from this file (written by zdist-center --center-file), waiting for it to appear (up to --death-timeout, or 60 s)",
    )
    parser.add_argument(
        "--death-timeout", type=_checked(parse_duration), default=None, metavar="DURATION",
        help=f"exit (status {EXIT_NO_CENTER}, not restarted by the nanny) when no Center answered for this long: 60s, 5m (default: keep trying)",
    )
    add_node_arguments(parser)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument(
        "--ncores", type=_checked(parse_ncores), default=None, help="threads for user functions (default: this machine's cores; split among --nworkers)"
    )
    parser.add_argument("--name", default=None, help="a name shown by the Center (default: the worker's address; NAME-0, NAME-1, ... with --nworkers)")
    parser.add_argument("--local-dir", default=None, metavar="DIR", help="where the worker makes its own directory for spilled data (default: the system's temp dir)")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="SECONDS", help="how often to tell the Center this worker lives")
    parser.add_argument("--nworkers", type=_checked(parse_ncores), default=1, metavar="N", help="start N worker processes, each under the nanny (default 1)")
    parser.add_argument("--no-nanny", action="store_true", help="run the worker in this process, with no nanny to start it again if it dies")
    parser.add_argument("--max-restarts", type=int, default=MAX_RESTARTS, metavar="N", help=f"the nanny gives up on a worker that died N times within {RESTART_WINDOW:g} s (default {MAX_RESTARTS})")
    parser.add_argument(
        "--memory-limit",
        default=None,
        metavar="LIMIT",
        help="memory of all the workers together, split among --nworkers: 4GB, 4GiB, bytes, a fraction of this machine such as 0.5, or auto (default: no limit)",
    )
    defaults = MemoryThresholds()
    for name, what in (("target", "spill the least recently used values to disk (by the data's size)"), ("spill", "spill by the process's memory"), ("pause", "start no new tasks"), ("terminate", "the nanny restarts the worker")):
        parser.add_argument(
            f"--memory-{name}", type=_checked(parse_fraction), default=getattr(defaults, name), metavar="FRACTION",
            help=f"fraction of --memory-limit at which to {what} (default {getattr(defaults, name)}; off to turn it off)",
        )
    parser.add_argument("--lifetime", type=_checked(parse_duration), default=None, metavar="DURATION", help="retire after this long (90s, 15m, 2h): hand the data over, then exit")
    parser.add_argument("--lifetime-stagger", type=_checked(parse_duration), default=None, metavar="DURATION", help="retire up to this much earlier or later, so that workers started together do not leave together")
    parser.add_argument(
        "--resources", type=_checked(parse_resources), default=None, metavar="NAME=AMOUNT,...",
        help="what tasks with resource needs may use on each worker process, e.g. GPU=2,MEM=64e9 (tasks ask with resources={'GPU': 1})",
    )
    parser.add_argument(
        "--preload", action="append", default=[], metavar="MODULE_OR_FILE",
        help="import this module (or .py file) at start and run its zdist_setup(worker), if it has one; repeatable",
    )
    # Set by the nanny for the worker it starts.
    parser.add_argument("--restarts", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--replaces", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nanny-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _checked(parse: Any) -> Any:
    """An argparse ``type`` from a parser that raises ValueError: argparse then prints its message."""

    def check(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = parse.__name__
    return check


# ------------------------------------------------------------------ serving


def run_center(
    host: str = "127.0.0.1",
    port: int = DEFAULT_CENTER_PORT,
    *,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    dashboard_port: int | None = None,
    prog: str = "zdist-center",
    center_file: str | None = None,
    **options: Any,
) -> None:
    """Serve a Center (and its dashboard, unless ``dashboard_port`` is None) until SIGINT or SIGTERM.

    With ``center_file`` the Center writes its address there once it listens
    (:mod:`zdist.centerfile`) and removes it when it stops. Without aiohttp
    the dashboard is left out, said in one line on stderr.
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
    asyncio.run(_serve_center(center, dashboard_port, center_file))


async def _serve_center(center: Center, dashboard_port: int | None, center_file: str | None = None) -> None:
    await center.start()
    dashboard = None
    try:
        if dashboard_port is not None:
            from .dashboard import serve_dashboard

            dashboard = await serve_dashboard(center, port=dashboard_port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(center.stop()))
        _stop_when_orphaned(center.stop)
        if center_file is not None:  # before the line: whoever waits for it finds the file too
            write_center_file(
                center_file, _reachable(center.address), center.security.public_key_text if center.security else None, dashboard.url if dashboard else None
            )
        say(f"Start center at {center.address}")  # after the dashboard: info() then names it
        if dashboard is not None:
            say(f"Dashboard at {dashboard.url}")
        await center.finished()
    finally:
        if center_file is not None:
            remove_center_file(center_file, _reachable(center.address))
        if dashboard is not None:
            await dashboard.stop()
        await center.stop()


def _stop_when_orphaned(stop: Callable[[], Any], interval: float = 1.0) -> None:
    """Stop this node if the process that started it to exit with it (see :func:`~zdist.spawn.parent_gone`) dies.

    LocalCluster's nodes would otherwise run on for good after a script that
    started them is killed before it could stop them.
    """
    loop = asyncio.get_running_loop()

    def look() -> None:
        if parent_gone():
            logging.getLogger("zdist.run").warning("the process that started this node died; stopping")
            asyncio.ensure_future(stop())
        else:
            loop.call_later(interval, look)

    if os.environ.get(PARENT_ENV):
        loop.call_later(interval, look)


def _reachable(address: str) -> str:
    """``address`` with a wildcard host (0.0.0.0) replaced by this machine's first non-loopback IPv4 address."""
    if address.startswith("ipc://"):
        return address
    host, port = address.rsplit(":", 1)
    if host not in ("0.0.0.0", "*", ""):
        return address
    import socket

    import psutil

    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for item in addresses:
            if item.family == socket.AF_INET and not item.address.startswith("127."):
                return f"{item.address}:{port}"
    return f"127.0.0.1:{port}"


def run_worker(center: str, host: str = "127.0.0.1", port: int = 0, **options: Any) -> int:
    """Serve a Worker of the Center at ``center`` until SIGINT or SIGTERM (it unregisters first).

    SIGTERM retires the worker first: it hands the keys no other worker
    holds to the others (:mod:`zdist.retirement`); a second SIGTERM, or
    SIGINT, stops it at once.

    ``options`` are :class:`~zdist.Worker`'s (``ncores``, ``name``, ``local_dir``,
    ``heartbeat_interval``, ``death_timeout``, ``security``, ...). Returns the
    exit status: 0, or :data:`~zdist.errors.EXIT_NO_CENTER` after a
    ``death_timeout`` with no Center. Raises :class:`ValueError` for a bad
    address and :class:`OSError` when the port cannot be had.
    """
    worker = Worker(center, host, port, **options)

    def started(node: Worker) -> None:
        say(f"Start worker at: {node.address}")
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(node.stop() if node.retiring else node.close_gracefully())
        )
        _stop_when_orphaned(node.stop)

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
    return worker.exit_code


# ------------------------------------------------------------------ command lines


def center_main(argv: list[str] | None = None, prog: str = "python -m zdist.run center") -> int:
    parser = center_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        args.host = resolve_host(args)
    except ValueError as exc:
        parser.exit(2, f"{prog}: {exc}\n")
    try:
        run_center(
            args.host,
            args.port,
            heartbeat_timeout=args.heartbeat_timeout,
            heartbeat_rate=args.heartbeat_rate,
            dashboard_port=None if args.no_dashboard else args.dashboard_port,
            prog=prog,
            center_file=args.center_file,
            **node_options(args),
        )
    except OSError as exc:
        parser.exit(1, f"{prog}: {exc}\n")
    return 0


def worker_main(argv: list[str] | None = None, prog: str = "python -m zdist.run worker") -> int:
    parser = worker_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if (args.center is None) == (args.center_file is None):
        parser.exit(2, f"{prog}: give the Center's address or --center-file PATH (one of the two)\n")
    try:
        args.host = resolve_host(args)
        if args.center_file is not None:
            args.center = read_center_file(args.center_file, args.death_timeout or 60.0).center_address
        normalize_address(args.center)
        memory_limit = _memory_limit(args.memory_limit, args.nworkers)
    except TimeoutError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NO_CENTER
    except ValueError as exc:
        parser.exit(2, f"{prog}: {exc}\n")
    if not args.no_nanny:
        return _run_nannies(args, memory_limit, parser, prog)
    if args.nworkers > 1:
        parser.exit(2, f"{prog}: --nworkers {args.nworkers} needs the nanny to run the workers: leave out --no-nanny\n")
    thresholds = MemoryThresholds(args.memory_target, args.memory_spill, args.memory_pause, args.memory_terminate)
    options = dict(
        ncores=args.ncores,
        name=args.name,
        local_dir=args.local_dir,
        heartbeat_interval=args.heartbeat_interval,
        memory_limit=memory_limit,
        memory_thresholds=thresholds,
        restarts=args.restarts,
        replaces=args.replaces,
        nanny=args.nanny_pid,
        lifetime=args.lifetime,
        lifetime_stagger=args.lifetime_stagger or 0.0,
        resources=args.resources,
        death_timeout=args.death_timeout,
        preload=args.preload,
        **node_options(args),
    )
    try:
        return run_worker(args.center, args.host, args.port, **options)
    except ValueError as exc:
        parser.exit(2, f"{prog}: {exc}\n")
    except OSError as exc:
        parser.exit(1, f"{prog}: {exc}\n")


def _memory_limit(value: str | None, nworkers: int) -> int | None:
    """Each worker's share of ``--memory-limit`` (``auto``: the machine's memory over ``nworkers``)."""
    if value is not None and value.strip().lower() == "auto":
        return parse_memory_limit(value, nworkers=nworkers)
    limit = parse_memory_limit(value)
    return None if limit is None else limit // nworkers


def _run_nannies(args: argparse.Namespace, memory_limit: int | None, parser: argparse.ArgumentParser, prog: str) -> int:
    """This process is the nanny of ``--nworkers`` workers (zdist.nanny)."""
    from .nanny import Nanny, WorkerSpec

    n = args.nworkers
    if n > 1 and args.port:
        parser.exit(2, f"{prog}: --port {args.port} with --nworkers {n}: each worker needs a port of its own; leave --port out\n")
    ncores = args.ncores or os.cpu_count() or 1
    if ncores < n:
        parser.exit(2, f"{prog}: --ncores {ncores} cannot be split among --nworkers {n}: each worker needs at least one core\n")
    nannies = []
    for i in range(n):
        share = ncores // n + (1 if i < ncores % n else 0)
        name = args.name if n == 1 or args.name is None else f"{args.name}-{i}"
        nannies.append(
            Nanny(
                WorkerSpec(_worker_argv(args, share if args.ncores or n > 1 else None, memory_limit), name, memory_limit, args.memory_terminate, args.local_dir),
                max_restarts=args.max_restarts,
            )
        )
    from .nanny import supervise

    return supervise(nannies)


def _worker_argv(args: argparse.Namespace, ncores: int | None, memory_limit: int | None) -> list[str]:
    """The options of one worker a nanny starts: this command line's, with its share of cores and memory."""
    argv = [args.center, "--host", args.host, "--port", str(args.port), "--heartbeat-interval", str(args.heartbeat_interval), "--log-level", args.log_level]
    if ncores:
        argv += ["--ncores", str(ncores)]
    if memory_limit:
        argv += ["--memory-limit", str(memory_limit)]
    for name in ("target", "spill", "pause", "terminate"):
        value = getattr(args, f"memory_{name}")
        argv += [f"--memory-{name}", "off" if value is None else str(value)]
    if args.resources:
        argv += ["--resources", ",".join(f"{name}={amount!r}" for name, amount in args.resources.items())]
    for option, value in (("--lifetime", args.lifetime), ("--lifetime-stagger", args.lifetime_stagger), ("--death-timeout", args.death_timeout), ("--local-dir", args.local_dir), ("--max-message-size", args.max_message_size), ("--key", args.key), ("--authorized-keys", args.authorized_keys)):
        if value is not None:
            argv += [option, str(value)]
    for spec in args.preload:
        argv += ["--preload", spec]
    return argv


@program
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    programs = {"center": center_main, "worker": worker_main}
    if argv[:1] == ["--version"]:
        say(f"zdist {__version__}")
        return 0
    if not argv or argv[0] not in programs:
        print("usage: python -m zdist.run {center,worker} [OPTIONS]   ('python -m zdist.run center --help' tells more)", file=sys.stderr)
        return 2
    return programs[argv[0]](argv[1:], prog=f"python -m zdist.run {argv[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
