"""zdist-worker: start a Worker and register it with a Center (``python -m zdist.run worker`` by its own name)."""
from __future__ import annotations

import os
import sys

from zdist.cluster import node_environment
from zdist.run import worker_main


def _with_huge_pages(argv: list[str] | None) -> None:
    """Start again with glibc's huge-page tunable on (see zdist.cluster.node_environment)."""
    env = node_environment()
    if argv is None and env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
        os.execve(sys.executable, [sys.executable, "-m", "zdist_cli.worker", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    _with_huge_pages(argv)
    return worker_main(argv, prog="zdist-worker")


if __name__ == "__main__":
    raise SystemExit(main())
