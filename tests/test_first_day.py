"""First-day papercuts, each found by trying zdist as a new user would: one test for each."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

import zdist
from zdist import Pool

from .conftest import make_cluster

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Every program, as (name, how to run it): the console scripts' modules, run by this Python.
PROGRAMS = {
    "zdist": [sys.executable, "-m", "zdist_cli.main"],
    "zdist-center": [sys.executable, "-m", "zdist_cli.center"],
    "zdist-worker": [sys.executable, "-m", "zdist_cli.worker"],
    "zdist-status": [sys.executable, "-m", "zdist_cli.status"],
    "zdist-keys": [sys.executable, "-m", "zdist_cli.keys"],
    "zdist retire": [sys.executable, "-m", "zdist_cli.main", "retire"],
    "python -m zdist.run": [sys.executable, "-m", "zdist.run"],
}


def run_with_closed_stdout(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a program whose reader has already gone (as ``| head -0`` would): its exit code and stderr."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    process.stdout.close()  # before the program writes anything: its first write finds the pipe broken
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err.decode(errors="replace")


def test_security_expands_the_home_directory(tmp_path, monkeypatch):
    from zdist.security import Security, create_keys

    monkeypatch.setenv("HOME", str(tmp_path))
    create_keys(str(tmp_path / ".zdist"))
    security = Security(key="~/.zdist/zdist.key_secret")  # as docs/index.md writes it
    assert security.key_file == str(tmp_path / ".zdist" / "zdist.key_secret")
    assert security.authorized_keys == str(tmp_path / ".zdist")
    assert Security(key="~/.zdist/zdist.key_secret", authorized_keys="~/.zdist").authorized_keys == str(tmp_path / ".zdist")


def test_docs_name_the_dask_extra_for_dask_dataframe():
    text = (ROOT / "docs" / "dask.md").read_text()
    assert "dask.dataframe needs" in text and "pip install '.[dask]'" in text
    extras = importlib.metadata.metadata("zdist").get_all("Requires-Dist")
    assert any("dataframe" in r and 'extra == "dask"' in r for r in extras), extras


def test_version_everywhere():
    assert zdist.__version__ == importlib.metadata.version("zdist")
    for name, args in PROGRAMS.items():
        out = subprocess.run([*args, "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (name, out.stderr)
        assert out.stdout.strip().endswith(zdist.__version__), (name, out.stdout)


def test_programs_end_quietly_when_the_reader_goes_away(cluster):
    """``zdist-status CENTER | head -3``: no BrokenPipeError traceback, from any program."""
    cases = [
        [*PROGRAMS["zdist-status"], cluster.center_address],
        [*PROGRAMS["zdist-status"], cluster.center_address, "--json"],
        [*PROGRAMS["zdist"], "status", cluster.center_address],
        *([*args, "--version"] for args in PROGRAMS.values()),
        *([*args, "--help"] for args in PROGRAMS.values() if args[-1] != "zdist.run"),
    ]
    for args in cases:
        code, err = run_with_closed_stdout(args)
        assert "Traceback" not in err and "BrokenPipe" not in err, (args, err)
        assert code == 0, (args, code, err)


def test_a_remote_traceback_shows_its_frames_once():
    import traceback

    import dask.multiprocessing  # noqa: F401 - installs tblib's traceback pickling, which spliced the frames in a second time

    def outer(x):
        return inner(x)

    def inner(x):
        raise ValueError(f"boom {x}")

    with Pool(processes=1) as pool:
        with pytest.raises(ValueError) as info:
            pool.apply(outer, (1,)).get()
    text = "".join(traceback.format_exception(info.value))
    assert text.count("in inner") == 1, text
    assert text.count("in outer") == 1, text
    assert text.count("while computing key") == 1, text  # the note, once too
    assert "Remote traceback" in text


def test_the_demo_says_what_get2_is(capsys):
    pytest.importorskip("dask.array")
    from zdist import demo

    demo.main()
    out = capsys.readouterr().out
    assert "get2 = partial(get," in out and "a dask scheduler" in out
    assert out.index("get2 = partial") < out.index("scheduler=get2")


def test_the_readme_transcript_shows_what_the_center_prints():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## A cluster by hand", 1)[1].split("```", 2)[1]
    shown = [line for line in block.splitlines() if line and not line.startswith("$") and not line.startswith("bash")]
    center_lines = shown[: shown.index(next(line for line in shown if line.startswith("Start worker")))]
    process = subprocess.Popen([*PROGRAMS["zdist-center"], "--port", "0", "--dashboard-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        printed = [process.stdout.readline().strip() for _ in center_lines]
    finally:
        process.terminate()
        process.wait(20)
        process.stdout.close()
    pattern = lambda line: re.sub(r"\d+", "N", line)  # noqa: E731 - ports differ
    assert [pattern(line) for line in printed] == [pattern(line) for line in center_lines]
    assert any(line.startswith("Dashboard at") for line in center_lines)


def test_status_against_a_curve_cluster_without_a_key_suggests_the_key():
    with make_cluster(1, security=True) as cluster:
        out = subprocess.run([*PROGRAMS["zdist-status"], cluster.center_address, "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "--key" in out.stderr and "CURVE" in out.stderr, out.stderr


def test_no_test_matches_the_empty_string():
    """A ``match`` of the empty string matches every message: such a pytest.raises can never fail."""
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""match=(r?""|r?'')[,)]""", line):
                offenders.append(f"{path.name}:{number}")
    assert not offenders
