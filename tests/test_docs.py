"""Every Python example in README.md and docs/ runs and prints what it says."""
from __future__ import annotations

import doctest
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document_examples_run(path):
    result = doctest.testfile(str(path), module_relative=False, optionflags=FLAGS, verbose=False, raise_on_error=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {path.name} failed (see output above)"


def test_demo_runs(capsys):
    from zdist import demo

    demo.main()
    out = capsys.readouterr().out
    assert "-285" in out and "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out


def every_module() -> list[str]:
    """Every module of the zdist package, found by walking it: a new module is tested without being listed.

    A package that fails to import is listed too (``onerror``), so that its
    test fails on the import instead of its modules going missing silently.
    """
    import pkgutil

    import zdist

    unimportable: list[str] = []
    found = [info.name for info in pkgutil.walk_packages(zdist.__path__, "zdist.", onerror=unimportable.append)]
    return sorted({"zdist", *found, *unimportable})


MODULES = every_module()


def test_every_module_is_found():
    for expected in ["zdist.center", "zdist.protocol.message", "zdist.dask.tasks", "zdist.run"]:
        assert expected in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=FLAGS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module} failed (see output above)"


def test_docs_build_without_warnings(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()
