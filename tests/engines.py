"""Real engines for the ``engines`` tests: a single-node SLURM (with munge) and Open MPI.

``.ci/install-engines`` installs Debian's packages (as root); this module
*runs* them, for one test session, without systemd and without touching the
system's own configuration: a temporary directory gets a munge key, a
``slurm.conf`` for this host (its real CPU count and memory, free ports),
and the state and log directories; munged, slurmctld and slurmd start from
there in the foreground, as children of the test process, and
:meth:`Slurm.stop` ends exactly those (and the job steps their slurmd
started), by PID. Commands (sbatch, squeue, scancel) find this SLURM
through ``SLURM_CONF``, which :meth:`Slurm.env` sets.

Where the engines are missing, the fixtures skip and say how to get them.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil
import pytest

#: Seconds the daemons may take to come up (slurmd registering with slurmctld, the node idle).
START_TIMEOUT = 60.0
INSTALL_HINT = "run `bash .ci/install-engines` as root (Debian's packages) in the project's venv first"


def missing_programs(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def skip_unless_root_with(*programs: str) -> None:
    """Skip the test, saying why, when not root or a program is not installed."""
    if os.geteuid() != 0:
        pytest.skip(f"the engine tests start daemons as root; this is uid {os.geteuid()} (CI runs `.ci/run` as root)")
    missing = missing_programs(*programs)
    if missing:
        how = INSTALL_HINT if shutil.which("apt-get") else "this machine has no apt-get to install them with"
        pytest.skip(f"not installed: {', '.join(missing)}; {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """A single-node SLURM (munged, slurmctld, slurmd) in a temporary directory; see the module's docstring."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="zdist-slurm-")
        self.conf = os.path.join(self.directory, "slurm.conf")
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        # slurmd drains a node that claims more memory than it has: leave a margin.
        self.memory_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
        self.processes: dict[str, subprocess.Popen] = {}

    def env(self) -> dict:
        """This process's environment with ``SLURM_CONF`` pointing at this SLURM (for sbatch, squeue, scancel)."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def start(self) -> "Slurm":
        try:
            self._write_files()
            self._run("munged", ["munged", "-F", f"--key-file={self.path('munge', 'munge.key')}", f"--socket={self.path('run', 'munge.sock')}",
                                 f"--pid-file={self.path('run', 'munged.pid')}", f"--log-file={self.path('log', 'munged.log')}",
                                 f"--seed-file={self.path('munge', 'munged.seed')}"])
            self._wait(lambda: os.path.exists(self.path("run", "munge.sock")), "munged to make its socket")
            self._run("slurmctld", ["slurmctld", "-D", "-f", self.conf])
            self._run("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node])
            self._wait(self._node_idle, f"node {self.node} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        # munged checks permissions: the key owner-only, every directory on the socket's path executable by all.
        os.chmod(self.directory, 0o755)
        for name, mode in (("munge", 0o700), ("run", 0o755), ("log", 0o755), ("state", 0o700), ("spool", 0o755)):
            os.makedirs(self.path(name), mode=mode)
            os.chmod(self.path(name), mode)
        with open(self.path("munge", "munge.key"), "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(self.path("munge", "munge.key"), 0o600)
        ctld_port, slurmd_port = free_port(), free_port()
        with open(self.conf, "w") as f:
            f.write(
                f"""# A one-node SLURM for zdist's engine tests (tests/engines.py)
ClusterName=zdist
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.path('run', 'munge.sock')}
StateSaveLocation={self.path('state')}
SlurmdSpoolDir={self.path('spool')}
SlurmctldPidFile={self.path('run', 'slurmctld.pid')}
SlurmdPidFile={self.path('run', 'slurmd.pid')}
SlurmctldLogFile={self.path('log', 'slurmctld.log')}
SlurmdLogFile={self.path('log', 'slurmd.log')}
# No cgroups in a container: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Finished jobs leave squeue quickly; a cancelled job's processes get 5 s after SIGTERM.
MinJobAge=5
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
            )

    def _run(self, name: str, command: list[str]) -> None:
        log = open(self.path("log", f"{name}.out"), "wb")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        log.close()

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode} while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {START_TIMEOUT:g} s for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for name in sorted(os.listdir(self.path("log"))) if os.path.isdir(self.path("log")) else []:
            with open(self.path("log", name), errors="replace") as f:
                parts.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(parts)

    def jobs(self) -> list[str]:
        """Job ids in this SLURM's queue (pending, running or completing)."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True, timeout=30)
        return out.stdout.split()

    def _our_job_steps(self) -> list[psutil.Process]:
        """slurmstepd processes of this SLURM: they leave slurmd's tree, but keep its SLURM_CONF."""
        found = []
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] and process.info["name"].startswith("slurmstepd") and process.environ().get("SLURM_CONF") == self.conf:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        """Cancel every job, then end slurmd, its job steps, slurmctld and munged, by PID; remove the directory."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env(), capture_output=True, timeout=30)
            deadline = time.monotonic() + 20
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        steps = self._our_job_steps()
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None:
                continue
            if name == "slurmd":
                steps += [child for child in _children(process.pid) if child not in steps]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        for step in steps:  # job steps (and what they ran) that outlived the cancel
            try:
                for child in step.children(recursive=True):
                    child.kill()
                step.kill()
            except psutil.NoSuchProcess:
                pass
        self.processes.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM for the session (skips, saying why, where it cannot run)."""
    skip_unless_root_with("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
    cluster = Slurm().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def documented_code(page: str, marker: str = "run by tests/") -> str:
    """The ```python block right after the HTML comment holding ``marker`` in ``page`` (a docs/ file), to run in a test."""
    lines = open(page).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<!--") and marker in line)
    assert lines[start + 1] == "```python", f"{page}: the comment must be followed by a ```python block"
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2:end]) + "\n"
