"""Arguments and set-up that every zdist program shares."""
from __future__ import annotations

import argparse
import logging
import sys


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--max-message-size", type=int, default=None, metavar="BYTES", help="largest message a peer may send (default: 2 GiB)")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file (from zdist-keys) to turn on CURVE authentication and encryption")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of public keys allowed to connect (default: the key file's directory)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="how much to log on stderr (default: warning)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def node_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    if args.max_message_size:
        kwargs["max_message_size"] = args.max_message_size
    if args.key:
        from zdist.security import Security

        kwargs["security"] = Security(key=args.key, authorized_keys=args.authorized_keys)
    return kwargs


def say(line: str) -> None:
    print(line, flush=True)
