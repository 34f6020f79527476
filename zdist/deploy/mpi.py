"""zdist inside one MPI job: rank 0 the Center, rank 1 your script, every other rank a worker.

Two ways, as with dask-mpi. In the script, before anything else::

    from zdist import Pool
    from zdist.deploy.mpi import initialize

    cluster = initialize()          # ranks 0 and 2+ serve here and exit when rank 1 ends
    with Pool(cluster) as pool:     # only rank 1 gets here
        print(pool.gather(pool.map(abs, [-1, -2])))

then ``mpirun -n 4 python script.py``. Or leave the script as it is and
start it with ``mpirun -n 4 zdist-mpi script.py ARGS`` (or ``python -m
zdist.deploy.mpi script.py ARGS``): rank 1 runs it as ``__main__`` with the
Center's address in ``ZDIST_CENTER_ADDRESS`` (``initialize()`` in such a
script returns the running one). When the script ends, every rank stops
its node and the job ends, with the script's exit status.

Where nodes listen: on 127.0.0.1 when every rank runs on one machine; across
machines on ``interface`` (``'ib0'``, ``'eth0'``) or else this machine's
first non-loopback IPv4 address, with CURVE turned on: rank 0 makes a key
pair for the job and hands it to the other ranks over MPI, each keeping it
in an owner-only temporary directory removed at the end.

Needs mpi4py (``pip install 'zdist[mpi]'``; best built against the site's
MPI). The module imports without it:

>>> import zdist.deploy.mpi as zmpi
>>> zmpi.parse_arguments(['--nthreads', '2', 'script.py', '--size', '3']).script_args
['--size', '3']
"""
from __future__ import annotations

import argparse
import atexit
import os
import runpy
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

from ..center import Center
from ..loop import LoopThread
from ..security import Security, create_keys
from ..worker import Worker

__all__ = ["MPICluster", "initialize", "main", "parse_arguments", "shutdown"]

#: The tag of the message rank 1 sends every other rank when the script has ended (its exit status).
TAG_STOP = 7_301
#: The tag of every rank's answer once its node has stopped.
TAG_STOPPED = 7_302
#: Seconds a node may take to start (the Center to listen, a worker to register).
START_TIMEOUT = 60.0
#: How often a serving rank looks for rank 1's stop message (a blocking receive would spin a core in most MPIs).
POLL_INTERVAL = 0.05


@dataclass
class MPICluster:
    """What rank 1 gets from :func:`initialize`: taken wherever a Center address is (``Pool(cluster)``)."""

    center_address: str
    security: Security | None
    n_workers: int

    def __repr__(self) -> str:
        secure = " CURVE" if self.security else ""
        return f"<MPICluster center={self.center_address}{secure} workers={self.n_workers}>"


_cluster: MPICluster | None = None
_comm: Any = None
_keys_dir: str | None = None
_stopped = False
_exit_status = 0


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - the engine tests install it
        raise ImportError(
            f"zdist.deploy.mpi needs mpi4py ({exc}): `pip install 'zdist[mpi]'`, best built against your MPI: "
            "`MPICC=$(which mpicc) pip install --no-binary mpi4py mpi4py`"
        ) from None
    return MPI


def initialize(
    *,
    interface: str | None = None,
    nthreads: int = 1,
    local_directory: str | None = None,
    security: Security | bool | None = None,
    heartbeat_interval: float = 0.5,
    worker_options: dict | None = None,
    exit: bool = True,
    comm: Any = None,
) -> MPICluster:
    """Make this MPI job a zdist cluster; only rank 1 returns (see the module's docstring).

    ``nthreads``: each worker's threads for user functions. ``security``:
    a :class:`~zdist.Security` for every rank, ``True`` for a key pair made
    for the job, ``False`` for none; by default on only when the ranks span
    machines. With ``exit=False`` ranks 0 and 2+ return ``None`` when rank 1
    ends instead of exiting (for callers that must run code after).
    Collective: every rank of ``comm`` (default ``COMM_WORLD``) must call it.
    """
    global _cluster, _comm
    if _cluster is not None:  # called again, or in a script that zdist-mpi runs
        return _cluster
    MPI = _mpi()
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        raise ValueError(f"zdist in MPI needs at least 3 ranks (a Center, your script, one worker); this job has {size}: run `mpirun -n 3` or more")
    hosts = comm.allgather(MPI.Get_processor_name())
    spans_hosts = len(set(hosts)) > 1
    host = _listen_host(interface, spans_hosts)
    security = _shared_security(comm, security, spans_hosts)
    options = dict(worker_options or {})
    thread = LoopThread(f"zdist-mpi-{rank}")
    node: Center | Worker | None = None
    error = ""
    try:
        if rank == 0:
            node = Center(host, 0, security=security)
            thread.run(node.start(), START_TIMEOUT)
    except Exception as exc:  # told to every rank, so that none waits for ever
        error = f"rank 0 could not start the Center: {exc!r}"
    address, error = comm.bcast((node.address if node is not None else "", error), root=0)
    if not error and rank >= 2:
        try:
            node = Worker(
                address, host, 0, ncores=nthreads, name=f"mpi-rank-{rank}", local_dir=local_directory,
                heartbeat_interval=heartbeat_interval, security=security, **options,
            )
            thread.run(node.start(), START_TIMEOUT)
            thread.run(_wait_registered(node), START_TIMEOUT)
        except Exception as exc:
            error = f"rank {rank} could not start a worker of {address}: {exc!r}"
    errors = [e for e in comm.allgather(error) if e]  # also the barrier: every worker registered
    if errors:
        _stop_node(thread, node)
        raise RuntimeError("zdist could not start in this MPI job: " + "; ".join(errors))
    _comm = comm
    if rank != 1:
        status = _serve_until_told(comm, thread, node)
        if exit:
            sys.exit(status)
        return None  # type: ignore[return-value]
    thread.stop()
    _cluster = MPICluster(address, security, size - 2)
    os.environ["ZDIST_CENTER_ADDRESS"] = address
    atexit.register(shutdown)
    _watch_uncaught_exceptions()
    return _cluster


def shutdown(status: int | None = None) -> None:
    """Rank 1: stop every worker, then the Center, and wait until they have (runs at exit by itself)."""
    global _stopped
    if _stopped or _comm is None or _comm.Get_rank() != 1:
        return
    _stopped = True
    status = _exit_status if status is None else status
    size = _comm.Get_size()
    # Workers first: they unregister from a Center that is still there.
    for group in (range(2, size), [0]):
        for rank in group:
            _comm.send(status, dest=rank, tag=TAG_STOP)
        for rank in group:
            _comm.recv(source=rank, tag=TAG_STOPPED)
    if _cluster is not None and _cluster.security is not None:
        _cluster.security.cleanup()


async def _wait_registered(worker: Worker) -> None:
    await worker.registered.wait()


def _serve_until_told(comm: Any, thread: LoopThread, node: Any) -> int:
    """Ranks 0 and 2+: serve until rank 1 says the script ended (or the node stops by itself); the status to exit with."""
    request = comm.irecv(source=1, tag=TAG_STOP)
    status = 0
    while True:  # bounded by the job: mpirun ends every rank when one fails
        done, message = request.test()
        if done:
            status = int(message or 0)
            break
        if node is not None and node.status == "closed":  # e.g. a worker whose Center is gone (death_timeout)
            status = int(getattr(node, "exit_code", 0) or 0)
            message = request.wait()  # rank 1 still says when it ends; answer it
            break
        time.sleep(POLL_INTERVAL)
    _stop_node(thread, node)
    comm.send(None, dest=1, tag=TAG_STOPPED)
    global _keys_dir
    if _keys_dir:
        shutil.rmtree(_keys_dir, ignore_errors=True)
        _keys_dir = None
    return status


def _stop_node(thread: LoopThread, node: Any) -> None:
    try:
        if node is not None:
            thread.run(node.stop(), 15)
    except Exception:  # noqa: BLE001 - stopping anyway
        pass
    finally:
        thread.stop()


def _listen_host(interface: str | None, spans_hosts: bool) -> str:
    """Where this rank's node listens: the interface's address, loopback on one machine, else a routable address."""
    from ..run import _reachable, interface_address

    if interface is not None:
        return interface_address(interface)
    if not spans_hosts:
        return "127.0.0.1"
    return _reachable("0.0.0.0:0").rsplit(":", 1)[0]


def _shared_security(comm: Any, security: Security | bool | None, spans_hosts: bool) -> Security | None:
    """Rank 0 makes one key pair and hands it to every rank over MPI; each keeps it in its own owner-only directory."""
    global _keys_dir
    if isinstance(security, Security):
        return security
    if security is False or (security is None and not spans_hosts):
        return None
    files = None
    if comm.Get_rank() == 0:
        made = tempfile.mkdtemp(prefix="zdist-mpi-keys-")
        public, secret = create_keys(made)
        files = {os.path.basename(p): open(p).read() for p in (public, secret)}
        shutil.rmtree(made, ignore_errors=True)
    files = comm.bcast(files, root=0)
    _keys_dir = tempfile.mkdtemp(prefix="zdist-mpi-keys-")
    old_umask = os.umask(0o077)
    try:
        for name, text in files.items():
            with open(os.path.join(_keys_dir, name), "w") as f:
                f.write(text)
    finally:
        os.umask(old_umask)
    result = Security(key=os.path.join(_keys_dir, "zdist.key_secret"))
    result.directory = _keys_dir
    return result


def _watch_uncaught_exceptions() -> None:
    """An uncaught exception in the script makes every rank exit with status 1, like the script."""
    previous = sys.excepthook

    def hook(*args: Any) -> None:
        global _exit_status
        _exit_status = 1
        previous(*args)

    sys.excepthook = hook


# ------------------------------------------------------------------ zdist-mpi


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="zdist-mpi",
        description="Run SCRIPT on rank 1 of this MPI job, with rank 0 as its zdist Center and the other ranks as workers: mpirun -n 4 zdist-mpi script.py",
    )
    parser.add_argument("--interface", default=None, metavar="NAME", help="network interface the nodes listen on (default: 127.0.0.1 on one machine)")
    parser.add_argument("--nthreads", type=int, default=1, metavar="N", help="threads for user functions in each worker (default 1)")
    parser.add_argument("--local-directory", default=None, metavar="DIR", help="where workers spill data (default: the system's temp dir)")
    parser.add_argument("--no-security", action="store_true", help="no CURVE even when the ranks span machines")
    parser.add_argument("script", help="the Python script rank 1 runs as __main__")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``zdist-mpi SCRIPT ARGS``: the exit status of SCRIPT, on every rank."""
    args = parse_arguments(argv)
    initialize(interface=args.interface, nthreads=args.nthreads, local_directory=args.local_directory, security=False if args.no_security else None)
    sys.argv = [args.script, *args.script_args]
    status = 0
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the script's error, shown as Python would
        traceback.print_exc()
        status = 1
    shutdown(status)
    return status


if __name__ == "__main__":
    # Through the module's importable copy: the script's own `from zdist.deploy.mpi import initialize`
    # must find the state this run set up, not that of a second module object.
    from zdist.deploy import mpi

    raise SystemExit(mpi.main())
