"""zdist: one command with subcommands (``zdist status``, ``zdist center``, ...).

Each subcommand is the same program as its ``zdist-NAME`` script and takes
the same arguments: ``zdist status 127.0.0.1:8787 --json`` is
``zdist-status 127.0.0.1:8787 --json``.
"""
from __future__ import annotations

import importlib
import sys

from .common import program

#: subcommand → (module in zdist_cli, one line of help)
SUBCOMMANDS = {
    "status": ("status", "show the workers of a running cluster and its totals (table or --json)"),
    "center": ("center", "start the Center of a cluster"),
    "worker": ("worker", "start a Worker and register it with a Center"),
    "keys": ("keys", "make CURVE keys for a secure cluster"),
    "retire": ("retire", "retire workers: each hands the data only it holds to the others, then exits"),
    "ssh": ("ssh", "start a cluster over SSH: the Center on the first host, workers on the others"),
    "logs": ("logs", "show the recent log records of the Center and workers (--follow for new ones)"),
}


def usage() -> str:
    lines = ["usage: zdist COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "'zdist COMMAND --help' tells more about each; 'zdist --version' prints zdist's version."]
    return "\n".join(lines)


@program
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from zdist import __version__

        print(f"zdist {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"zdist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"zdist_cli.{SUBCOMMANDS[name][0]}")
    if name in ("retire", "logs"):
        return module.main(rest, prog=f"zdist {name}")
    if name == "status":
        parser = module.build_parser(prog="zdist status")
        return module.run(parser.parse_args(rest), prog="zdist status")
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
