"""Batch-scheduler clusters: job scripts for SLURM, PBS and LSF; a real single-node SLURM for SLURMCluster.

The ``engines`` tests run against SLURM started by tests/engines.py (Debian's
slurmctld/slurmd/munge, installed by .ci/install-engines). PBS and LSF are not
installed here: only their job scripts are checked.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest

from zdist import Pool
from zdist.deploy.jobqueue import LSFCluster, PBSCluster, SLURMCluster, load_config

from .conftest import wait_for
from .engines import documented_code, slurm  # noqa: F401 - slurm is a fixture

NO_SITE_CONFIG = {"config_file": None}


# ------------------------------------------------------------------ job scripts (no scheduler needed)


def test_slurm_script_has_every_option(tmp_path):
    cluster = SLURMCluster(
        cores=3, memory="2GiB", processes=3, walltime="90m", queue="gpu", account="a1", job_name="zj",
        job_extra_directives=["--gres=gpu:1", "--exclusive"], prologue=["module load cuda", "source ~/venv/bin/activate"],
        death_timeout="2m", interface="ib0", shared_directory=str(tmp_path), worker_extra_args=["--lifetime", "1h"], **NO_SITE_CONFIG,
    )
    script = cluster.job_script()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ["--job-name=zj", "--cpus-per-task=3", "--mem=2048M", "--time=01:30:00", "--partition=gpu", "--account=a1", "--gres=gpu:1", "--exclusive"]:
        assert f"#SBATCH {directive}" in lines
    assert lines.index("module load cuda") < lines.index("source ~/venv/bin/activate") < len(lines) - 1
    command = lines[-1]
    assert command.startswith("exec ")
    for part in [f"--center-file {tmp_path}/center.json", "--death-timeout 120", '--name "zj-${SLURM_JOB_ID}"', "--nworkers 3",
                 "--interface ib0", f"--key {tmp_path}/keys/zdist.key_secret", "--lifetime 1h", f"--memory-limit {2 * 2**30}"]:
        assert part in command
    assert cluster.workers_per_unit == 3
    assert not (tmp_path / "center.json").exists()  # nothing started or submitted


def test_pbs_and_lsf_scripts(tmp_path):
    pbs = PBSCluster(cores=2, walltime="00:10:00", shared_directory=str(tmp_path), **NO_SITE_CONFIG).job_script()
    assert "#PBS -l select=1:ncpus=2" in pbs and "#PBS -l walltime=00:10:00" in pbs and '"zdist-worker-${PBS_JOBID}"' in pbs
    lsf = LSFCluster(cores=2, walltime="90m", job_extra_directives=['-R "select[mem>4000]"'], shared_directory=str(tmp_path), **NO_SITE_CONFIG).job_script()
    assert "#BSUB -n 2" in lsf and "#BSUB -W 01:30" in lsf and '#BSUB -R "select[mem>4000]"' in lsf and '"zdist-worker-${LSB_JOBID}"' in lsf
    assert PBSCluster(**NO_SITE_CONFIG).parse_job_id("1234.pbs-server\n") == "1234.pbs-server"
    assert LSFCluster(**NO_SITE_CONFIG).parse_job_id("Job <77> is submitted to queue <normal>.\n") == "77"
    assert SLURMCluster(**NO_SITE_CONFIG).parse_job_id("4242;cluster\n") == "4242"


def test_site_config_file_gives_defaults_the_caller_overrides(tmp_path, monkeypatch):
    config = tmp_path / "jobqueue.toml"
    config.write_text('[slurm]\nqueue = "site-queue"\naccount = "site"\ncores = 4\nprologue = ["module load python"]\n[pbs]\nqueue = "pbs-q"\n')
    monkeypatch.setenv("ZDIST_JOBQUEUE_CONFIG", str(config))
    script = SLURMCluster(account="mine", shared_directory=str(tmp_path)).job_script()
    assert "#SBATCH --partition=site-queue" in script and "#SBATCH --account=mine" in script and "--cpus-per-task=4" in script
    assert "module load python" in script
    assert "#PBS -q pbs-q" in PBSCluster(shared_directory=str(tmp_path)).job_script()
    assert "site-queue" not in SLURMCluster(shared_directory=str(tmp_path), config_file=None).job_script()
    config.write_text("[slurm]\nqueu = 'typo'\n")
    with pytest.raises(ValueError, match="unknown option.*queu.*known: cores"):
        load_config("slurm")


def test_workers_off_loopback_need_an_interface(tmp_path):
    with pytest.raises(ValueError, match="give interface="):
        SLURMCluster(host="10.1.2.3", shared_directory=str(tmp_path), **NO_SITE_CONFIG)
    script = SLURMCluster(host="10.1.2.3", interface="eth0", shared_directory=str(tmp_path), **NO_SITE_CONFIG).job_script()
    assert "--interface eth0" in script and "--key" in script  # CURVE by default off loopback


def test_bad_walltime_says_what_it_takes():
    with pytest.raises(ValueError, match="HH:MM:SS"):
        SLURMCluster(walltime="1:2:3:4", **NO_SITE_CONFIG)


def test_missing_scheduler_command_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with SLURMCluster(shared_directory=str(tmp_path / "shared"), **NO_SITE_CONFIG) as cluster:
        with pytest.raises(RuntimeError, match="sbatch is not installed here"):
            cluster.scale(1)


# ------------------------------------------------------------------ a real SLURM


@pytest.fixture
def slurm_env(slurm, monkeypatch):  # noqa: F811 - the fixture imported above
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    return slurm


def job_states(slurm) -> dict:
    out = subprocess.run(["squeue", "-h", "-o", "%i %t"], env=slurm.env(), capture_output=True, text=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.mark.engines
def test_slurm_scale_runs_the_pool_session_then_cancels(slurm_env, tmp_path):
    with SLURMCluster(cores=1, memory="500MB", walltime="00:10:00", death_timeout=30, shared_directory=str(tmp_path), **NO_SITE_CONFIG) as cluster:
        cluster.scale(2)
        jobs = set(cluster.jobs().values())
        assert len(jobs) == 2
        wait_for(lambda: [job_states(slurm_env).get(j) for j in jobs] == ["R", "R"], timeout=60, interval=0.5, message="both jobs running")
        cluster.wait_for_workers(2, timeout=60)
        names = {w["name"] for w in cluster.center_info()["workers"].values()}
        assert names == set(cluster.jobs())
        assert "units=2" in repr(cluster)
        with Pool(cluster) as pool:  # the seed's Pool session
            A = pool.map(lambda x: x**2, range(10))
            B = pool.map(lambda x: -x, A)
            total = pool.apply(sum, [B])
            assert total.get() == -285
            assert pool.gather(A) == [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
        cluster.scale(0)
        assert cluster.jobs() == {}
        wait_for(lambda: not jobs & set(job_states(slurm_env)), timeout=60, interval=0.5, message="cancelled jobs leave squeue")
        wait_for(lambda: not cluster.center_info()["workers"], timeout=30, interval=0.2, message="workers gone from the Center")
    assert not tmp_path.joinpath("center.json").exists()


@pytest.mark.engines
def test_slurm_job_exits_when_its_center_vanishes(slurm_env, tmp_path):
    death_timeout = 5
    cluster = SLURMCluster(cores=1, death_timeout=death_timeout, shared_directory=str(tmp_path), security=True, **NO_SITE_CONFIG)
    try:
        cluster.start()
        assert cluster.security is not None  # keys for the job on the shared path, CURVE on
        cluster.scale(1)
        (job,) = cluster.jobs().values()
        cluster.wait_for_workers(1, timeout=60)
        cluster._center.send_signal(signal.SIGKILL)  # the Center vanishes; nobody cancels the job
        cluster._center.wait(10)
        gone = time.monotonic()
        wait_for(lambda: job not in job_states(slurm_env), timeout=death_timeout + 45, interval=0.5, message="job exits through --death-timeout")
        took = time.monotonic() - gone
        assert took >= death_timeout - 1, f"the job left after {took:.1f} s, before its death timeout"
        log = (tmp_path / "logs" / f"zdist-worker-{job}.out").read_text()
        assert "(--death-timeout)" in log, log
    finally:
        cluster.units.clear()  # the job is gone: nothing to cancel
        cluster.close()


@pytest.mark.engines
def test_slurm_adapt_submits_jobs_while_tasks_wait_and_cancels_idle_ones(slurm_env, tmp_path):
    with SLURMCluster(cores=1, death_timeout=30, shared_directory=str(tmp_path), **NO_SITE_CONFIG) as cluster:
        adaptive = cluster.adapt(minimum=1, maximum=2, interval=0.5, wait=2.0)
        wait_for(lambda: len(cluster.jobs()) == 1, timeout=30, interval=0.5, message="adapt submits the minimum: one job")
        cluster.wait_for_workers(1, timeout=60)
        with Pool(cluster) as pool:
            done = pool.map(time.sleep, [0.5] * 40)  # a backlog: adapt asks for a second job
            wait_for(lambda: len(cluster.jobs()) == 2, timeout=60, interval=0.5, message="adapt submits a second job")
            pool.gather(done)
        wait_for(lambda: len(cluster.jobs()) == 1, timeout=60, interval=0.5, message="adapt cancels the idle job")
        assert [what for _, what, _ in adaptive.log][:2] == ["up", "up"] and adaptive.log[-1][1] == "down"


@pytest.mark.engines
def test_the_deploying_page_example_runs_on_slurm(slurm_env, capsys):
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "deploying-jobqueue.md"
    before = set(os.listdir(os.path.expanduser("~/.zdist/jobqueue"))) if os.path.isdir(os.path.expanduser("~/.zdist/jobqueue")) else set()
    exec(compile(documented_code(str(page)), str(page), "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n"
    assert set(os.listdir(os.path.expanduser("~/.zdist/jobqueue"))) == before  # its shared directory is removed on close
    wait_for(lambda: not job_states(slurm_env), timeout=60, interval=0.5, message="its jobs leave squeue")
