"""What every zdist program shares (the node programs' options live in ``zdist.run``)."""
from __future__ import annotations


def say(line: str) -> None:
    print(line, flush=True)
