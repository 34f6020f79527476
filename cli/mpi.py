"""zdist-mpi: run a script inside an MPI job with rank 0 as its Center and ranks 2+ as workers (``mpirun -n 4 zdist-mpi script.py``)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from zdist.deploy.mpi import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
