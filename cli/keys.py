"""zdist-keys: write a CURVE key pair for a zdist cluster."""
from __future__ import annotations

import argparse
import os

from zdist.security import create_keys

from .common import add_version, program, say


@program
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zdist-keys",
        description="Write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, owner-only). "
        "Give every node and client --key DIR/NAME.key_secret; DIR then holds the authorized public keys.",
    )
    parser.add_argument("directory", metavar="DIR")
    add_version(parser)
    parser.add_argument("--name", default="zdist", help="file name of the pair (default: zdist)")
    args = parser.parse_args(argv)
    secret = os.path.join(args.directory, f"{args.name}.key_secret")
    if os.path.exists(secret):
        parser.exit(1, f"zdist-keys: {secret} exists already; choose another --name or directory\n")
    public, secret = create_keys(args.directory, args.name)
    say(f"Public key: {public}")
    say(f"Secret key: {secret}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
