"""zdist ssh HOST...: a cluster over SSH from a terminal (zdist.deploy.SSHCluster), until Ctrl-C.

The Center runs on the first host, ``--nworkers`` workers on each of the
others; Ctrl-C or SIGTERM stops every remote program (so does this
program's death: the remote watchdogs see their channels close).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .common import add_version, program, say


def build_parser(prog: str = "zdist ssh") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start a zdist cluster over SSH: the Center on the first host, workers on the others.")
    parser.add_argument("hosts", metavar="HOST", nargs="+", help="the first runs the Center; each other runs a zdist-worker (list a host twice for two)")
    add_version(parser)
    parser.add_argument("--nworkers", type=int, default=1, metavar="N", help="worker processes per host (default 1)")
    parser.add_argument("--ncores", type=int, default=None, metavar="N", help="threads of each host's workers together (default: the host's cores)")
    parser.add_argument("--remote-python", default="python3", metavar="PYTHON", help="the Python with zdist on the hosts, e.g. /opt/venv/bin/python (default python3)")
    parser.add_argument("--user", default=None, help="SSH user name (default: yours, or the SSH config's)")
    parser.add_argument("--port", type=int, default=None, help="SSH port (default 22)")
    parser.add_argument("--identity", "-i", action="append", default=None, metavar="FILE", help="SSH private key file (default: ~/.ssh's and the agent's)")
    parser.add_argument("--known-hosts", default=None, metavar="FILE", help="known hosts file (default ~/.ssh/known_hosts)")
    parser.add_argument("--no-security", action="store_true", help="no CURVE keys, even off loopback (anyone who reaches the ports can run code)")
    parser.add_argument("--center-file", default=None, metavar="PATH", help="write the Center's address and public key here (zdist.deploy.read_center_file)")
    parser.add_argument("--worker-option", action="append", default=[], metavar="NAME=VALUE", help="a zdist-worker option for every host, e.g. memory_limit=4GB (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=120.0, metavar="SECONDS", help="how long the workers may take to register (default 120)")
    return parser


@program
def main(argv: list[str] | None = None, prog: str = "zdist ssh") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from zdist.centerfile import remove_center_file, write_center_file
    from zdist.deploy import SSHCluster

    connect = {k: v for k, v in {"username": args.user, "port": args.port, "client_keys": args.identity}.items() if v is not None}
    if args.known_hosts is not None:
        connect["known_hosts"] = args.known_hosts
    worker_options: dict = {"ncores": args.ncores}
    for item in args.worker_option:
        name, sep, value = item.partition("=")
        if not sep:
            parser.exit(2, f"{prog}: --worker-option takes NAME=VALUE, got {item!r}\n")
        worker_options[name.strip().replace("-", "_")] = value
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        cluster = SSHCluster(
            args.hosts, connect_options=connect, worker_options=worker_options, remote_python=args.remote_python,
            nworkers_per_host=args.nworkers, security=False if args.no_security else None, start_timeout=args.start_timeout,
        )
    except (OSError, RuntimeError, ValueError, ImportError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        say(f"Start center at {cluster.center_address}")
        say(f"Workers: {len(cluster.worker_addresses)} on {len(set(cluster.worker_hosts))} hosts")
        if cluster.dashboard_link:
            say(f"Dashboard at {cluster.dashboard_link}")
        if cluster.security is not None:
            say(f"Key: {cluster.security.key_file} (clients: Pool('{cluster.center_address}', security=zdist.Security(key=...)); removed when this stops)")
        if args.center_file:
            write_center_file(args.center_file, cluster.center_address, cluster.security.public_key_text if cluster.security else None, cluster.dashboard_link)
        while not stop.wait(1.0):
            if cluster.center is None or not cluster.center.alive:
                print(f"{prog}: the Center on {cluster.hosts[0]} exited; its output:\n{cluster.logs().get('center', '')[-3000:]}", file=sys.stderr, flush=True)
                return 1
        say("Stopping")
        return 0
    finally:
        if args.center_file:
            remove_center_file(args.center_file, cluster.center_address)
        cluster.close()


if __name__ == "__main__":
    raise SystemExit(main())
