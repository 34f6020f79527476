"""zdist-worker: start a Worker and register it with a Center (``python -m zdist.run worker`` by its own name)."""
from __future__ import annotations

from zdist.run import worker_main

from .common import program


@program
def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, prog="zdist-worker")


if __name__ == "__main__":
    raise SystemExit(main())
