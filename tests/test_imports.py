"""What importing a part of zdist loads: a worker must not pay for (or run) the client's code."""
from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str, modules: list[str]) -> dict:
    """In a fresh interpreter, run ``statement``; which of ``modules`` are then in ``sys.modules``."""
    code = f"import sys\n{statement}\nprint(*[m in sys.modules for m in {modules!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(zip(modules, (word == "True" for word in out.stdout.split())))


def test_what_a_worker_runs_for_dask_does_not_import_the_dask_client():
    # A worker unpickling a dask task imports zdist.dask.tasks (and so the zdist.dask package).
    loaded = loaded_after("import zdist.dask.tasks", ["zdist.dask", "zdist.dask.tasks", "zdist.dask.client", "zdist.dask.scheduler"])
    assert loaded == {"zdist.dask": True, "zdist.dask.tasks": True, "zdist.dask.client": False, "zdist.dask.scheduler": False}


def test_the_dask_client_still_loads_on_first_use():
    loaded = loaded_after(
        "from zdist.dask import get, close, TaskKilledWorkersError\n"
        "import zdist.dask, zdist.dask.client\n"
        "assert get is zdist.dask.get is zdist.dask.client.get and callable(close)\n"
        "assert issubclass(TaskKilledWorkersError, Exception) and 'get' in dir(zdist.dask)",
        ["zdist.dask.client", "zdist.dask.scheduler"],
    )
    assert loaded == {"zdist.dask.client": True, "zdist.dask.scheduler": True}


def test_the_library_never_imports_the_command_line_package():
    """zdist_cli (cli/) parses arguments and calls zdist; zdist itself starts nodes with zdist.run."""
    import ast
    import pathlib

    import zdist

    offenders = []
    for path in sorted(pathlib.Path(zdist.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]  # such as ["-m", "zdist_cli.worker"] for a subprocess
            else:
                continue
            offenders += [f"{path.name}:{node.lineno}: {name}" for name in names if name.split(".")[0] == "zdist_cli"]
    assert offenders == []


def test_the_library_entry_points_run():
    for program in ("center", "worker"):
        out = subprocess.run([sys.executable, "-m", "zdist.run", program, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: python -m zdist.run {program}"), out.stderr
        assert "found in sys.modules" not in out.stderr  # runpy's warning when a module would run as a second copy
    out = subprocess.run([sys.executable, "-m", "zdist.run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "center" in out.stderr and "worker" in out.stderr
