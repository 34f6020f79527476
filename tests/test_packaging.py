"""The package builds as a wheel and an sdist, and the wheel installs its programs."""
from __future__ import annotations

import pathlib
import site
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_and_sdist_build_and_install(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("zdist-*.whl"))
    assert next((tmp_path / "dist").glob("zdist-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ["zdist/py.typed", "zdist/pool.py", "zdist/protocol/message.py", "zdist/dask/__init__.py", "zdist_cli/worker.py"]:
        assert expected in names
    # Every module of every package under zdist/ (setup.cfg lists the packages: a new one must be added there).
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "zdist").rglob("*.py") if (path.parent / "__init__.py").exists())
    assert [m for m in modules if m not in names] == []
    assert "zdist/static/dashboard.js" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for program in ["zdist-center", "zdist-worker", "zdist-keys"]:
        assert program in entry_points
    # Install it (offline: dependencies come from this environment) and run its programs.
    # ``--system-site-packages`` would see the base interpreter's packages, not
    # this (virtual) environment's; a .pth file lends the new venv ours instead.
    # Lines of a .pth file only extend sys.path: our editable install of zdist
    # (a finder registered by a .pth in our site-packages) does not come along.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (pathlib.Path(purelib) / "zdist-test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    for program in ["zdist-center", "zdist-worker", "zdist-keys"]:
        help_text = subprocess.run([str(venv / "bin" / program), "--help"], capture_output=True, text=True, timeout=60)
        assert help_text.returncode == 0 and "usage:" in help_text.stdout, help_text.stderr
