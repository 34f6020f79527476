"""A node program that lives no longer than the connection that started it: ``python -m zdist.deploy.remote center|worker ARGS``.

:class:`~zdist.deploy.SSHCluster` starts every remote node through this
watchdog. It runs ``python -m zdist.run center|worker ARGS`` as its child
(same output, same exit status) and watches its own standard input, which
is the SSH channel: when that reaches end-of-file (the cluster closed the
channel, or the client process died and took the connection with it) it
stops the child (SIGINT: at once; SIGKILL after :data:`STOP_TIMEOUT`), so no
node outlives its client. The child also gets SIGTERM should the watchdog
itself die (Linux's parent-death signal). SIGTERM and SIGINT to the
watchdog are passed on to the child.

``--remove DIR`` removes that directory (the keys the cluster shipped) once
the child has exited.

>>> command(['worker', '10.0.0.1:8787', '--nworkers', '2'])[1:]
['-m', 'zdist.run', 'worker', '10.0.0.1:8787', '--nworkers', '2']
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys

# This module imports nothing of zdist's: SSHCluster may send its source to a
# host as ``python -c`` (see ``zdist.deploy.ssh.remote_command``).

#: Seconds the child may take to stop once the connection is gone, before SIGKILL.
STOP_TIMEOUT = 20.0


def command(args: list[str]) -> list[str]:
    """The child's command line: this Python, running the node program."""
    return [sys.executable, "-m", "zdist.run", *args]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    remove = None
    if argv[:1] == ["--remove"] and len(argv) > 1:
        remove, argv = argv[1], argv[2:]
    if not argv or argv[0] not in ("center", "worker"):
        print("usage: python -m zdist.deploy.remote [--remove DIR] center|worker ARGS", file=sys.stderr)
        return 2
    # preexec_fn is safe: this process runs no threads.
    child = subprocess.Popen(command(argv), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    selector = selectors.DefaultSelector()
    stdin_open = True
    try:
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    except (ValueError, OSError):  # no stdin at all: nothing to watch; run until the child exits
        stdin_open = False
    try:
        while child.poll() is None:
            if received:
                sig = received.pop(0)
                child.send_signal(signal.SIGINT if sig == signal.SIGHUP else sig)
            if stdin_open and selector.select(0.2):
                if not os.read(sys.stdin.fileno(), 4096):  # EOF: the connection is gone
                    stdin_open = False
                    child.send_signal(signal.SIGINT)
                    try:
                        child.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        child.kill()
            elif not stdin_open:
                try:
                    child.wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        selector.close()
        if remove:
            shutil.rmtree(remove, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
