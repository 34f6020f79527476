"""zdist inside one MPI job, under a real Open MPI (Debian's, with mpi4py built against it by .ci/install-engines).

Loopback only: Open MPI's own traffic is kept on ``lo`` (TCP and self), and the
zdist nodes listen on 127.0.0.1 because every rank runs on this machine.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "mpi_pool.py"
#: Seconds one mpirun may take (start-up of 4 ranks on a busy 2-core machine included).
RUN_TIMEOUT = 180



def test_the_deploying_page_shows_the_example_file():
    page = (ROOT / "docs" / "deploying-mpi.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in page


@pytest.fixture
def mpirun():
    """Run ``mpirun -n N ARGS`` on loopback; afterwards no process of it may be left."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed; run `bash .ci/install-engines` as root in the project's venv first")
    # Not imported here: importing mpi4py.MPI starts MPI in this process (and an orted beside it).
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed; run `bash .ci/install-engines` as root in the project's venv first")
    mark = f"zdist-mpi-test-{uuid.uuid4().hex}"

    def run(n: int, *args: str) -> subprocess.CompletedProcess:
        env = {
            **os.environ, "ZDIST_TEST_MARK": mark,
            "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
        }
        command = ["mpirun", "--oversubscribe", "-n", str(n), *args]
        if os.geteuid() == 0:
            command.insert(1, "--allow-run-as-root")
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)

    yield run
    left = []
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if process.environ().get("ZDIST_TEST_MARK") == mark:
                left.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert not left, f"processes left after mpirun: {[(p.pid, p.info) for p in left]}"


@pytest.mark.engines
def test_docs_example_runs_the_pool_session_on_four_ranks(mpirun):
    out = mpirun(4, sys.executable, str(EXAMPLE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["workers: 2", "total: -285", "A: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"], out.stdout + out.stderr


@pytest.mark.engines
def test_zdist_mpi_runs_an_unchanged_script_and_passes_its_exit_status(mpirun, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(
        "import os, sys\n"
        "from zdist import Pool\n"
        "with Pool(os.environ['ZDIST_CENTER_ADDRESS']) as pool:\n"
        "    print('sum', pool.apply(sum, [[1, 2, 3]]).get(), sys.argv[1:])\n"
        "sys.exit(3)\n"
    )
    zdist_mpi = os.path.join(os.path.dirname(sys.executable), "zdist-mpi")
    out = mpirun(3, zdist_mpi, str(script), "--flag", "x")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "sum 6 ['--flag', 'x']" in out.stdout


@pytest.mark.engines
def test_an_uncaught_exception_ends_every_rank_with_status_1(mpirun, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("from zdist.deploy.mpi import initialize\ninitialize()\nraise RuntimeError('the script failed')\n")
    out = mpirun(3, sys.executable, "-m", "zdist.deploy.mpi", str(script))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "RuntimeError: the script failed" in out.stderr
