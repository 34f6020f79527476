"""zdist-center: start the Center of a zdist cluster (``python -m zdist.run center`` by its own name)."""
from __future__ import annotations

from zdist.run import DEFAULT_DASHBOARD_PORT, center_main

from .common import program

__all__ = ["DEFAULT_DASHBOARD_PORT", "main"]


@program
def main(argv: list[str] | None = None) -> int:
    return center_main(argv, prog="zdist-center")


if __name__ == "__main__":
    raise SystemExit(main())
