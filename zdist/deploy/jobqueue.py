"""Workers as batch jobs: :class:`SLURMCluster`, :class:`PBSCluster`, :class:`LSFCluster`.

The cluster object starts a Center here (``zdist-center --center-file`` on
a shared path) and submits jobs that each run ``zdist-worker --center-file
PATH --death-timeout ...``: a job finds its Center through the file, and a
job whose Center is gone exits after ``death_timeout`` instead of burning
its allocation. Each job is one unit of :class:`~zdist.deploy.Cluster`:
``scale(n)`` submits or cancels jobs (workers retire first: their data goes
to the others), ``adapt(minimum, maximum)`` does it by itself.

:meth:`JobQueueCluster.job_script` shows what would be submitted, before
anything is:

>>> cluster = SLURMCluster(cores=2, memory='4GB', walltime='01:00:00', queue='short', account='proj7',
...                        job_extra_directives=['--constraint=haswell'], prologue=['module load python'],
...                        shared_directory='/shared/zdist-demo', worker_command=['zdist-worker'], config_file=None)
>>> print(cluster.job_script(), end='')
#!/usr/bin/env bash
#SBATCH --job-name=zdist-worker
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=3814M
#SBATCH --time=01:00:00
#SBATCH --partition=short
#SBATCH --account=proj7
#SBATCH --output=/shared/zdist-demo/logs/zdist-worker-%j.out
#SBATCH --constraint=haswell
module load python
exec zdist-worker --center-file /shared/zdist-demo/center.json --death-timeout 60 --name "zdist-worker-${SLURM_JOB_ID}" --ncores 2 --memory-limit 4000000000

Options not given come from the per-site config file (``jobqueue.toml``,
see :func:`load_config`), then from the defaults above. Off loopback
(``interface`` given) the cluster turns CURVE on: a key pair
made for it is kept in ``shared_directory/keys`` (readable by you alone)
and each job passes ``--key`` to its worker.

Why no job-submission library: psij-python renders its own script (its
launcher wrappers, output sent to /dev/null, no prologue lines) and pins
``packaging<=25`` and ``psutil<=7.0``, which would downgrade both here;
Parsl's providers come with Parsl entire (dill, tblib, typeguard,
setproctitle, requests, ...) and its block model. What zdist needs of a
scheduler is three commands (submit, cancel, list) and a header of
directives, small enough to keep here.
"""
from __future__ import annotations

import atexit
import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
import weakref
from typing import Any, Iterable

from ..centerfile import read_center_file
from ..memory import parse_memory_limit
from ..retirement import parse_duration
from .base import Cluster

__all__ = ["JobQueueCluster", "LSFCluster", "PBSCluster", "SLURMCluster", "load_config"]

#: Where the per-site config is looked for unless ZDIST_JOBQUEUE_CONFIG names a file.
DEFAULT_CONFIG = "~/.config/zdist/jobqueue.toml"
#: Seconds the Center may take to write its Center file.
CENTER_START_TIMEOUT = 30.0
#: Seconds a job's status is reused before the scheduler is asked again.
STATUS_CACHE = 1.0
#: Options a config file section may set.
OPTIONS = (
    "cores", "memory", "processes", "queue", "account", "walltime", "job_name", "job_extra_directives", "prologue",
    "worker_command", "worker_extra_args", "death_timeout", "interface", "host", "shared_directory", "log_directory",
)


def load_config(section: str, path: str | None = None) -> dict:
    """The options of ``[section]`` (``slurm``, ``pbs``, ``lsf``) in the per-site TOML file; ``{}`` if there is none.

    The file is ``path``, else ``$ZDIST_JOBQUEUE_CONFIG``, else
    ``~/.config/zdist/jobqueue.toml``:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'jobqueue.toml')
    >>> _ = open(path, 'w').write('[slurm]\\nqueue = "normal"\\ncores = 8\\nprologue = ["module load python"]\\n')
    >>> load_config('slurm', path)
    {'queue': 'normal', 'cores': 8, 'prologue': ['module load python']}
    """
    path = os.path.expanduser(path or os.environ.get("ZDIST_JOBQUEUE_CONFIG") or DEFAULT_CONFIG)
    if not os.path.exists(path):
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        try:
            options = tomllib.load(f).get(section, {})
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc}); fix it or point ZDIST_JOBQUEUE_CONFIG elsewhere") from None
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{path} [{section}]: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    return options


def walltime_seconds(walltime: str | float) -> int:
    """``'01:30:00'``, ``'30:00'``, ``'90m'`` or seconds, as seconds.

    >>> walltime_seconds('01:30:00'), walltime_seconds('45:00'), walltime_seconds('2h')
    (5400, 2700, 7200)
    """
    if isinstance(walltime, str) and ":" in walltime:
        parts = [int(p) for p in walltime.split(":")]
        if len(parts) > 3:
            raise ValueError(f"walltime {walltime!r}: give HH:MM:SS, MM:SS, or a duration such as 90m")
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + part
        return seconds
    return int(parse_duration(walltime))


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JobQueueCluster(Cluster):
    """Workers as batch jobs of one scheduler (see the module's docstring); subclasses say which.

    ``cores`` and ``memory`` are one job's (``memory``: ``'4GB'``, bytes);
    ``processes`` worker processes share them (``--nworkers``). ``queue``,
    ``account``, ``walltime`` (``'01:00:00'``, ``'90m'``), ``job_name``,
    ``job_extra_directives`` (lines after the directive prefix) and
    ``prologue`` (shell lines before the worker starts) shape the script;
    ``worker_command`` is how a job starts a worker (default: this
    Python's ``zdist-worker``), ``worker_extra_args`` more of its options.
    ``shared_directory`` must be seen by the jobs too (default
    ``~/.zdist/jobqueue/NAME``, removed on close). ``interface``
    is the network card the Center and every worker listen on (default
    127.0.0.1: jobs on this machine only); ``host`` moves the Center alone. ``n_workers`` jobs' worth are submitted at start.
    """

    scheduler = ""  # the config file's section
    directive = ""  # "#SBATCH"
    job_id_variable = ""  # "SLURM_JOB_ID"
    submit_command: list[str] = []
    cancel_command: list[str] = []

    def __init__(
        self,
        n_workers: int = 0,
        *,
        cores: int | None = None,
        memory: str | int | None = None,
        processes: int | None = None,
        queue: str | None = None,
        account: str | None = None,
        walltime: str | None = None,
        job_name: str | None = None,
        job_extra_directives: Iterable[str] | None = None,
        prologue: Iterable[str] | None = None,
        worker_command: list[str] | str | None = None,
        worker_extra_args: Iterable[str] | None = None,
        death_timeout: float | str | None = None,
        host: str | None = None,
        interface: str | None = None,
        shared_directory: str | None = None,
        log_directory: str | None = None,
        security: Any = None,
        dashboard: bool = False,
        config_file: str | None = "",
    ):
        given = {k: v for k, v in locals().items() if k in OPTIONS and v is not None}
        site = {} if config_file is None else load_config(self.scheduler, config_file or None)
        o = {**site, **given}
        self.cores = int(o.get("cores", 1))
        self.memory = parse_memory_limit(o["memory"], total=1 << 62) if o.get("memory") is not None else None
        self.processes = int(o.get("processes", 1))
        self.workers_per_unit = self.processes
        self.queue, self.account = o.get("queue"), o.get("account")
        self.walltime = walltime_seconds(o["walltime"]) if o.get("walltime") is not None else None
        self.job_name = str(o.get("job_name", "zdist-worker"))
        self.job_extra_directives = list(o.get("job_extra_directives", []))
        self.prologue = list(o.get("prologue", []))
        command = o.get("worker_command") or default_worker_command()
        self.worker_command = shlex.split(command) if isinstance(command, str) else list(command)
        self.worker_extra_args = list(o.get("worker_extra_args", []))
        self.death_timeout = parse_duration(o.get("death_timeout", 60))
        self.host, self.interface = o.get("host"), o.get("interface")
        self.name = f"zdist-{self.scheduler}-{uuid.uuid4().hex[:8]}"
        self._owns_directory = o.get("shared_directory") is None
        self.shared_directory = os.path.abspath(os.path.expanduser(o.get("shared_directory") or os.path.join("~", ".zdist", "jobqueue", self.name)))
        self.log_directory = os.path.abspath(os.path.expanduser(o.get("log_directory") or os.path.join(self.shared_directory, "logs")))
        self.center_file = os.path.join(self.shared_directory, "center.json")
        self.dashboard = dashboard
        off_loopback = self.interface is not None or (self.host is not None and not self.host.startswith("127."))
        if off_loopback and self.interface is None:
            # A worker must listen on an address its peers reach; the Center's host is not the workers'.
            raise ValueError(
                f"host={self.host!r} puts the Center off loopback, but the workers need an address on their own nodes too: "
                "give interface= (the network card on every node, e.g. 'ib0' or 'eth0'; the Center listens on it as well)"
            )
        if security is None:
            security = off_loopback
        super().__init__(security=None)
        self._want_security = security
        self._key_file: str | None = None
        self._center: subprocess.Popen | None = None
        self._status_cache: tuple[float, dict[str, str]] = (0.0, {})
        self._initial_workers = n_workers

    # -------------------------------------------------------------- the script

    def directives(self) -> list[str]:
        """The scheduler's header lines (without the prefix); subclasses fill it."""
        raise NotImplementedError

    def worker_arguments(self) -> list[str]:
        args = ["--center-file", self.center_file, "--death-timeout", f"{self.death_timeout:g}", "--name", f'"{self.job_name}-${{{self.job_id_variable}}}"']
        args += ["--ncores", str(self.cores)]
        if self.processes > 1:
            args += ["--nworkers", str(self.processes)]
        if self.memory is not None:
            args += ["--memory-limit", str(self.memory)]
        if self.interface is not None:  # each worker listens on that card of its own node
            args += ["--interface", self.interface]
        if self._key_file is not None or self._want_security is True:
            args += ["--key", self._key_file or os.path.join(self.shared_directory, "keys", "zdist.key_secret")]
        return args + self.worker_extra_args

    def job_script(self) -> str:
        """The script each job runs, exactly as it will be submitted."""
        lines = ["#!/usr/bin/env bash"]
        lines += [f"{self.directive} {d}" for d in self.directives() + self.job_extra_directives]
        lines += self.prologue
        lines.append("exec " + " ".join([*(shlex.quote(c) for c in self.worker_command), *(a if a.startswith('"') else shlex.quote(a) for a in self.worker_arguments())]))
        return "\n".join(lines) + "\n"

    def _memory_mib(self) -> int:
        assert self.memory is not None
        return self.memory // 2**20

    # -------------------------------------------------------------- the scheduler's commands

    def parse_job_id(self, output: str) -> str:
        raise NotImplementedError

    def job_states(self) -> dict[str, str]:
        """{job id: state} of this user's jobs the scheduler still lists (pending, running, ending)."""
        raise NotImplementedError

    def _command(self, command: list[str], stdin: str | None = None) -> str:
        try:
            out = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise RuntimeError(f"{command[0]} is not installed here: run this where {type(self).__name__}'s scheduler commands work (a login node)") from None
        if out.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed with status {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    # -------------------------------------------------------------- Cluster

    def start(self) -> "JobQueueCluster":
        if self.status != "created":
            return self
        try:
            self._start_center()
        except BaseException:
            self._close()
            raise
        super().start()
        _open_clusters.add(self)
        if self._initial_workers:
            self.scale(self._initial_workers)
        return self

    def _start_center(self) -> None:
        os.makedirs(self.log_directory, exist_ok=True)
        os.makedirs(self.shared_directory, exist_ok=True)
        command = [sys.executable, "-m", "zdist.run", "center", "--port", "0", "--center-file", self.center_file]
        if self.host is not None or self.interface is None:
            command += ["--host", self.host or "127.0.0.1"]
        else:
            command += ["--interface", self.interface]
        command += ["--dashboard-port", "0"] if self.dashboard else ["--no-dashboard"]
        if self._want_security is True:
            from ..security import Security, create_keys

            keys = os.path.join(self.shared_directory, "keys")
            os.makedirs(keys, mode=0o700, exist_ok=True)
            _, self._key_file = create_keys(keys)
            self.security = Security(key=self._key_file)
            command += ["--key", self._key_file]
        elif self._want_security:  # a Security the caller made: its files must be on the shared path
            self.security = self._want_security
            self._key_file = self.security.key_file
            command += ["--key", self._key_file, "--authorized-keys", self.security.authorized_keys]
        log = open(os.path.join(self.log_directory, "center.log"), "ab")
        self._center = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + CENTER_START_TIMEOUT
        while not os.path.exists(self.center_file):
            if self._center.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.log_directory, "center.log"), errors="replace") as f:
                    raise RuntimeError(f"the Center did not start (status {self._center.poll()}); its log:\n{f.read()[-2000:]}")
            time.sleep(0.05)
        info = read_center_file(self.center_file, timeout=5)
        self.center_address = info.center_address
        self.dashboard_link = info.dashboard

    def _start_units(self, n: int) -> None:
        script = self.job_script()
        for _ in range(n):
            job_id = self.parse_job_id(self._command(self.submit_command, stdin=script))
            self.units[f"{self.job_name}-{job_id}"] = job_id
        self._status_cache = (0.0, {})

    def _stop_units(self, names: list[str]) -> None:
        ids = [self.units.pop(name) for name in names if name in self.units]
        if ids:
            try:
                self._command(self.cancel_command + ids)
            except RuntimeError as exc:  # a job that ended meanwhile is no error
                if any(state for job, state in self.job_states().items() if job in ids):
                    raise RuntimeError(f"could not cancel jobs {', '.join(ids)}: {exc}") from None
        self._status_cache = (0.0, {})

    def _unit_alive(self, name: str) -> bool:
        when, states = self._status_cache
        if time.monotonic() - when > STATUS_CACHE:
            states = self.job_states()
            self._status_cache = (time.monotonic(), states)
        return self.units.get(name) in states

    def jobs(self) -> dict[str, str]:
        """{unit name: job id} of the jobs submitted and not yet gone."""
        self.planned_workers()  # drops the jobs the scheduler no longer lists
        return dict(self.units)

    def _close(self) -> None:
        _open_clusters.discard(self)
        try:
            if self.units:
                self._stop_units(list(self.units))
        finally:
            if self._center is not None and self._center.poll() is None:
                self._center.send_signal(signal.SIGTERM)
                try:
                    self._center.wait(10)
                except subprocess.TimeoutExpired:
                    self._center.kill()
                    self._center.wait(5)
            if self._owns_directory:
                shutil.rmtree(self.shared_directory, ignore_errors=True)
            elif self._key_file is not None and self._want_security is True:
                shutil.rmtree(os.path.dirname(self._key_file), ignore_errors=True)


def default_worker_command() -> list[str]:
    """This Python's ``zdist-worker`` (its venv's), or ``python -m zdist.run worker`` where there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "zdist-worker")
    return [beside] if os.path.exists(beside) else [sys.executable, "-m", "zdist.run", "worker"]


class SLURMCluster(JobQueueCluster):
    """Workers as SLURM jobs (``sbatch``, ``scancel``, ``squeue``); tested against a real single-node SLURM."""

    scheduler, directive, job_id_variable = "slurm", "#SBATCH", "SLURM_JOB_ID"
    submit_command = ["sbatch", "--parsable"]
    cancel_command = ["scancel"]

    def directives(self) -> list[str]:
        lines = [f"--job-name={self.job_name}", "--ntasks=1", f"--cpus-per-task={self.cores}"]
        if self.memory is not None:
            lines.append(f"--mem={self._memory_mib()}M")
        if self.walltime is not None:
            lines.append(f"--time={hms(self.walltime)}")
        if self.queue:
            lines.append(f"--partition={self.queue}")
        if self.account:
            lines.append(f"--account={self.account}")
        return lines + [f"--output={self.log_directory}/{self.job_name}-%j.out"]

    def parse_job_id(self, output: str) -> str:
        return output.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"

    def job_states(self) -> dict[str, str]:
        out = self._command(["squeue", "--noheader", "--user", getpass.getuser(), "--format", "%i %t"])
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


class PBSCluster(JobQueueCluster):
    """Workers as PBS Pro / OpenPBS jobs (``qsub``, ``qdel``, ``qstat``). Not exercised against a live PBS here.

    >>> print(PBSCluster(cores=4, memory='8GB', walltime='02:00:00', queue='workq', account='proj7', shared_directory='/shared/z',
    ...                  worker_command=['zdist-worker'], config_file=None).job_script(), end='')
    #!/usr/bin/env bash
    #PBS -N zdist-worker
    #PBS -l select=1:ncpus=4:mem=7629MB
    #PBS -l walltime=02:00:00
    #PBS -q workq
    #PBS -A proj7
    #PBS -j oe
    #PBS -o /shared/z/logs/
    exec zdist-worker --center-file /shared/z/center.json --death-timeout 60 --name "zdist-worker-${PBS_JOBID}" --ncores 4 --memory-limit 8000000000
    """

    scheduler, directive, job_id_variable = "pbs", "#PBS", "PBS_JOBID"
    submit_command = ["qsub"]
    cancel_command = ["qdel"]

    def directives(self) -> list[str]:
        select = f"select=1:ncpus={self.cores}" + (f":mem={self._memory_mib()}MB" if self.memory is not None else "")
        lines = [f"-N {self.job_name}", f"-l {select}"]
        if self.walltime is not None:
            lines.append(f"-l walltime={hms(self.walltime)}")
        if self.queue:
            lines.append(f"-q {self.queue}")
        if self.account:
            lines.append(f"-A {self.account}")
        return lines + ["-j oe", f"-o {self.log_directory}/"]

    def parse_job_id(self, output: str) -> str:
        return output.strip().splitlines()[-1].strip()  # "1234.server"

    def job_states(self) -> dict[str, str]:
        out = self._command(["qstat", "-u", getpass.getuser()])
        states = {}
        for line in out.splitlines():  # Job ID  Username Queue Jobname SessID NDS TSK Memory Time S Time
            fields = line.split()
            if len(fields) >= 10 and fields[0][0].isdigit():
                states[fields[0]] = fields[-2]
        # qstat -u shortens ids ("1234.serv"): match ours by their number.
        by_number = {job.split(".")[0]: state for job, state in states.items()}
        return {job: by_number[job.split(".")[0]] for job in self.units.values() if job.split(".")[0] in by_number}


class LSFCluster(JobQueueCluster):
    """Workers as LSF jobs (``bsub``, ``bkill``, ``bjobs``). Not exercised against a live LSF here.

    >>> print(LSFCluster(cores=4, memory='8GB', walltime='02:00:00', queue='normal', account='proj7', shared_directory='/shared/z',
    ...                  worker_command=['zdist-worker'], config_file=None).job_script(), end='')
    #!/usr/bin/env bash
    #BSUB -J zdist-worker
    #BSUB -n 4
    #BSUB -R "span[hosts=1]"
    #BSUB -M 7629MB
    #BSUB -R "rusage[mem=7629MB]"
    #BSUB -W 02:00
    #BSUB -q normal
    #BSUB -P proj7
    #BSUB -o /shared/z/logs/zdist-worker-%J.out
    exec zdist-worker --center-file /shared/z/center.json --death-timeout 60 --name "zdist-worker-${LSB_JOBID}" --ncores 4 --memory-limit 8000000000
    """

    scheduler, directive, job_id_variable = "lsf", "#BSUB", "LSB_JOBID"
    submit_command = ["bsub"]
    cancel_command = ["bkill"]

    def directives(self) -> list[str]:
        lines = [f"-J {self.job_name}", f"-n {self.cores}", '-R "span[hosts=1]"']
        if self.memory is not None:
            lines += [f"-M {self._memory_mib()}MB", f'-R "rusage[mem={self._memory_mib()}MB]"']
        if self.walltime is not None:  # LSF takes hours:minutes
            lines.append(f"-W {self.walltime // 3600:02d}:{(self.walltime % 3600 + 59) // 60:02d}")
        if self.queue:
            lines.append(f"-q {self.queue}")
        if self.account:
            lines.append(f"-P {self.account}")
        return lines + [f"-o {self.log_directory}/{self.job_name}-%J.out"]

    def parse_job_id(self, output: str) -> str:
        match = re.search(r"Job <(\d+)>", output)  # "Job <1234> is submitted to queue <normal>."
        if match is None:
            raise RuntimeError(f"bsub did not say which job it submitted: {output.strip()!r}")
        return match.group(1)

    def job_states(self) -> dict[str, str]:
        out = self._command(["bjobs", "-noheader", "-o", "jobid stat", "-u", getpass.getuser()])
        return {fields[0]: fields[1] for fields in (line.split() for line in out.splitlines()) if len(fields) == 2 and fields[1] not in ("DONE", "EXIT")}


#: Clusters still open, closed at interpreter exit so that no job outlives the script that submitted it.
_open_clusters: "weakref.WeakSet[JobQueueCluster]" = weakref.WeakSet()


@atexit.register
def _close_open_clusters() -> None:
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - at exit, close what can be closed
            pass
