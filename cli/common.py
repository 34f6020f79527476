"""What every zdist program shares (the node programs' options live in ``zdist.run``)."""
from __future__ import annotations

import argparse

import zdist
from zdist.run import program  # one guard for every program: zdist-NAME and python -m zdist.run

__all__ = ["add_version", "program", "say"]


def say(line: str) -> None:
    print(line, flush=True)


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program's name and zdist's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (zdist) {zdist.__version__}")
