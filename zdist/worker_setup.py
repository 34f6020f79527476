"""Code and set-up on a worker: files uploaded by clients, functions run once, preloaded modules.

The ops a :class:`~zdist.worker.Worker` serves for this (``upload_file``,
``run``) and what ``zdist-worker --preload`` does at start. The Worker
registers :func:`handlers`; clients reach them through ``Pool.upload_file``
and ``Pool.run`` (:mod:`zdist.cluster_ops`).

An uploaded ``.py`` file is written to the worker's own directory, which
goes first on ``sys.path``; a ``.zip``, ``.egg``, ``.pyz`` or pure-Python
wheel goes on ``sys.path`` itself (zipimport). Either way its modules are
imported at once (so a broken upload fails where the user sees it), and a
module already imported is reloaded, with its submodules: uploading a
fixed file again takes effect without restarting the worker.

A preload is a module name or a ``.py`` file; if it defines
``zdist_setup(worker)`` that runs once the worker has started (awaited if
it is a coroutine function), and ``zdist_teardown(worker)`` when it stops.

>>> import asyncio, os, tempfile
>>> from zdist import LocalCluster
>>> async def demo():
...     async with LocalCluster(n_workers=1, processes=False) as cluster:
...         worker = cluster.worker_nodes[0]
...         worker.handlers['upload_file'](filename='zdist_doc_upload.py', data=b'ANSWER = 42\\n')
...         import zdist_doc_upload
...         return zdist_doc_upload.ANSWER
>>> asyncio.run(demo())
42
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import sys
import threading
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: What ``upload_file`` takes: a module, or an archive that zipimport reads.
UPLOAD_SUFFIXES = (".py", ".zip", ".egg", ".pyz", ".whl")


def handlers(worker: Any) -> dict[str, Callable]:
    """The ops of this module, bound to ``worker``."""

    def upload_file(filename: str, data: bytes) -> dict:
        """Store ``data`` as ``filename`` here, make it importable and import (or reload) its modules.

        On the event loop, not in a thread: a worker that joined late gets its
        uploads on the same connection just before its first tasks, and this
        way they are in place before those tasks are even read.
        """
        return {"modules": install_upload(_upload_dir(worker), filename, data)}

    async def run(function: Callable, args: Any = (), kwargs: dict | None = None) -> Any:
        """``function(*args, **kwargs)`` here, once; ``zdist_worker=`` is this worker if the function takes it."""
        return await run_function(worker, function, args, kwargs)

    return {"upload_file": upload_file, "run": run}


def _upload_dir(worker: Any) -> str:
    base = worker.work_dir or os.path.join(os.getcwd(), "zdist-worker")
    directory = os.path.join(base, "uploads")
    os.makedirs(directory, exist_ok=True)
    return directory


_uploads_lock = threading.Lock()


def install_upload(directory: str, filename: str, data: Any) -> list[str]:
    """Write an uploaded file into ``directory``, put it on ``sys.path``, import or reload its modules; their names."""
    if not isinstance(filename, str) or os.path.basename(filename) != filename or filename.startswith("."):
        raise ValueError(f"upload_file takes a plain file name (no directory), got {filename!r}")
    name, suffix = os.path.splitext(filename)
    if suffix not in UPLOAD_SUFFIXES:
        raise ValueError(f"upload_file takes {', '.join(UPLOAD_SUFFIXES)} files; {filename!r} is none of them")
    with _uploads_lock:  # two uploads at once must not interleave their sys.path edits
        if suffix == ".py":
            path = os.path.join(directory, filename)
            _write(path, data)
            if directory not in sys.path:
                sys.path.insert(0, directory)
            names = [name]
        else:
            # A new file name for each upload of the same archive: zipimport caches
            # an archive's directory by path, and a reload must see the new one.
            versions = os.path.join(directory, "archives")
            os.makedirs(versions, exist_ok=True)
            count = len(os.listdir(versions))
            path = os.path.join(versions, f"{count}-{filename}")
            _write(path, data)
            suffix_tail = f"-{filename}"
            sys.path[:] = [p for p in sys.path if not (os.path.dirname(p) == versions and p.endswith(suffix_tail))]
            sys.path.insert(0, path)
            names = [info.name for info in pkgutil.iter_modules([path])]
        importlib.invalidate_caches()
        for module in names:
            _import_or_reload(module)
    logger.info("uploaded %s: modules %s", filename, ", ".join(names) or "(none)")
    return names


def _write(path: str, data: Any) -> None:
    with open(path, "wb") as f:
        f.write(bytes(data))


def _import_or_reload(name: str) -> None:
    """Import ``name``; if it was imported already, reload it and its submodules (parents first)."""
    if name not in sys.modules:
        importlib.import_module(name)
        return
    loaded = sorted((m for m in list(sys.modules) if m == name or m.startswith(name + ".")), key=lambda m: m.count("."))
    # Parents first (a package's new __path__ points its submodules at the new
    # file), then the packages again, deepest first: an __init__ that takes
    # names from its submodules (from .inner import X) sees their new values.
    for module in loaded:
        if sys.modules.get(module) is not None:
            importlib.reload(sys.modules[module])
    for module in reversed(loaded):
        if hasattr(sys.modules.get(module), "__path__"):
            importlib.reload(sys.modules[module])


async def run_function(worker: Any, function: Callable, args: Any = (), kwargs: dict | None = None) -> Any:
    """Run ``function`` once on ``worker``: awaited on its loop if a coroutine function, else in a thread of its own.

    Not in the worker's task threads: ``run`` answers even while they are all busy.
    """
    if not callable(function):
        raise TypeError(f"run needs a callable, got {type(function).__name__}")
    kwargs = dict(kwargs or {})
    if _takes(function, "zdist_worker"):
        kwargs["zdist_worker"] = worker
    if inspect.iscoroutinefunction(function):
        return await function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)


def _takes(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------ preload


def load_preload(spec: str) -> Any:
    """The module a ``--preload`` names: a ``.py`` file (its directory goes on ``sys.path``) or a module name."""
    if spec.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--preload {spec}: no such file")
        name = os.path.splitext(os.path.basename(path))[0]
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


async def preload(worker: Any, specs: list[str]) -> list:
    """Load every preload and run its ``zdist_setup(worker)``; the modules, for :func:`teardown`."""
    modules = []
    for spec in specs:
        try:
            module = load_preload(spec)
            setup = getattr(module, "zdist_setup", None)
            if setup is not None:
                result = setup(worker)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            raise RuntimeError(f"preload {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        logger.info("preloaded %s", spec)
        modules.append(module)
    return modules


async def teardown(worker: Any, modules: list) -> None:
    """Run each preload's ``zdist_teardown(worker)``, last loaded first; log failures, stop anyway."""
    for module in reversed(modules):
        function = getattr(module, "zdist_teardown", None)
        if function is None:
            continue
        try:
            result = function(worker)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - the worker is stopping anyway
            logger.exception("zdist_teardown of %s failed", getattr(module, "__name__", module))
