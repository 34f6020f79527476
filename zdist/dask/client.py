"""``zdist.dask.get``: a dask scheduler that runs a graph on the workers of a zdist Center.

The graph is prepared in the calling thread (conversion, culling,
``dask.order``); the computation itself runs on the client loop every
client of this process shares (:func:`zdist.session.client_loop`), so
``get`` works the same from a script, from threads, and inside Jupyter's
running loop, and shares the Center watcher and session of any Pool of
the same Center.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Iterable

import dask

from ..comm import normalize_address
from ..errors import MissingDataError
from ..session import client_loop, close_all_sessions, open_session
from ..output import reemit_warnings
from ..scheduling.controls import CONTROL_NAMES, controls_from
from ..scheduling.gcpause import gc_frozen, gc_paused
from .graph import annotations_of, controls_by_key, convert_recording_literals, flatten_keys, nest_results, to_task_graph
from .plan import make_plan
from .scheduler import Computation, LoadedCore

__all__ = ["get", "close"]


def close() -> None:
    """Close this process's sessions with Centers and stop the client loop; the next ``get`` starts anew.

    >>> close()
    """
    close_all_sessions()


def _parse_center(center: Any, args: tuple) -> tuple[str, tuple]:
    # get('host:port', dsk, keys), get('host', port, dsk, keys), get(cluster, dsk, keys)
    center = getattr(center, "center_address", center)
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        center, args = f"{center}:{args[0]}", args[1:]
    if len(args) != 2:
        raise TypeError("call get(center, dsk, keys) or get(host, port, dsk, keys)")
    return normalize_address(center), args


def _known_controls(annotations: dict) -> dict:
    return {name: value for name, value in annotations.items() if name in CONTROL_NAMES and value is not None}


def _given(retries: Any, priority: Any, resources: Any, workers: Any, allow_other_workers: Any) -> dict:
    given = dict(retries=retries, priority=priority, resources=resources, workers=workers, allow_other_workers=allow_other_workers)
    return {name: value for name, value in given.items() if value is not None}


async def _ask_center(address: str, op: str, keys: Iterable, security: Any) -> dict:
    session = await open_session(address, security, 10.0)
    try:
        return await session.center.request(op, {"keys": list(keys)}, timeout=10.0)
    finally:
        session.release()


async def _compute(address: str, loaded: LoadedCore, security: Any, forward_output: bool, seen: list | None = None) -> dict:
    session = await open_session(address, security, 10.0)
    computation = Computation(loaded, session, forward_output=forward_output)
    if seen is not None:
        seen.append(computation)  # lets the caller's thread read its progress
    return await computation.run()


def _wait_with_progress(future: concurrent.futures.Future, seen: list, total: int, timeout: float | None) -> Any:
    from tqdm.auto import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=total, unit="tasks", dynamic_ncols=True, mininterval=0.2) as bar:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise concurrent.futures.TimeoutError()
            try:
                values = future.result(0.2 if remaining is None else min(0.2, remaining))
            except concurrent.futures.TimeoutError:
                if seen:
                    bar.update(min(total, seen[0].ntasks_done) - bar.n)
                continue
            bar.update(total - bar.n)
            return values


def get(
    center: Any,
    *args: Any,
    max_worker_deaths: int = 3,
    return_values: int = 2**20,
    timeout: float | None = None,
    security: Any = None,
    validate: bool = False,
    progress: bool = False,
    retries: int | None = None,
    priority: int | None = None,
    resources: dict | None = None,
    workers: Any = None,
    allow_other_workers: bool | None = None,
    forward_output: bool = False,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of the dask graph ``dsk`` on the cluster of the Center at ``center``.

    Call it as ``get('host:port', dsk, keys)`` or, as in the 2015 seed,
    ``get('host', port, dsk, keys)``; ``center`` may also be a
    :class:`~zdist.LocalCluster`. ``keys`` is one key or a (nested) list of
    keys, and the result has the same structure (lists become tuples, as
    with dask's own schedulers). ``dsk`` is a dict (tuple tasks or
    ``dask._task_spec`` nodes) or whatever a dask collection hands a
    scheduler, so ``functools.partial(get, address)`` is a dask scheduler::

        x.sum().compute(scheduler=functools.partial(get, address))

    Tasks run where their inputs are; intermediate values are deleted as soon
    as nothing needs them, and nothing of the computation is left on the
    cluster when ``get`` returns or raises. If a worker dies, what it held is
    computed again on the others; a task that was running on
    ``max_worker_deaths`` workers that died raises
    :class:`~zdist.dask.scheduler.TaskKilledWorkersError`. A task that raises
    makes ``get`` raise the same exception, with the remote traceback and the
    task's key in its notes. Values of keys that the graph does not make but
    the cluster holds (placed by ``update_data`` or a Pool) serve as inputs.

    Which workers live is learned from the Center every
    :data:`zdist.session.WATCH_INTERVAL` seconds, by one watcher shared with
    every other client of this process. ``return_values`` the largest result (in bytes) that comes back with the
    acknowledgement instead of a separate ``get_data``, ``timeout`` a limit
    on the whole computation; ``progress=True`` shows a tqdm progress bar
    of tasks done (a widget in Jupyter); ``forward_output=True`` prints here
    what the tasks print and log on their workers, each line prefixed
    ``[worker key]``; ``validate=True`` checks the scheduler's state
    after every step (slow, for tests). Other keyword arguments (dask passes
    some) are ignored.

    Task controls (``retries``, ``priority``, ``resources``, ``workers``,
    ``allow_other_workers``; see :class:`~zdist.Pool`) apply to every task
    of the graph; ``dask.annotate(...)`` with the same names sets them per
    task (as far as dask keeps annotations through its optimisations: with
    dask.array's expressions only a ``compute`` inside the ``annotate``
    block sees them, as with dask.distributed).

    >>> from operator import add
    >>> from zdist import LocalCluster
    >>> with LocalCluster(n_workers=2) as cluster:
    ...     get(cluster, {'a': 1, 'b': (add, 'a', 1)}, 'b')
    2

    ``center`` is an address or any cluster object (:class:`zdist.deploy.Cluster`),
    whose ``security`` is then used unless ``security=`` is given.
    """
    if security is None:  # a cluster object (zdist.deploy.Cluster) brings its keys
        security = getattr(center, "security", None)
    address, (dsk, keys) = _parse_center(center, args)
    defaults = controls_from(**{**_known_controls(dask.get_annotations()), **_given(retries, priority, resources, workers, allow_other_workers)}, normalize=normalize_address)
    annotations = annotations_of(dsk)
    thread = client_loop()
    graph, candidates = convert_recording_literals(dsk)
    if candidates:
        # Literals that name values on the cluster are inputs, as in dask's `cache`.
        held = thread.run(_ask_center(address, "who_has", candidates, security))
        known = {key for key, holders in held.items() if holders}
        if known:
            graph = to_task_graph(dsk, known_keys=known)
    plan = make_plan(graph, flatten_keys(keys))  # not under gc_paused: dask.order's garbage has cycles
    if annotations or defaults is not None:
        plan.controls = controls_by_key(plan.keys, annotations, defaults, normalize_address)
    external: dict = {}
    if plan.external:
        who_has = thread.run(_ask_center(address, "who_has", plan.external, security))
        missing = [key for key in plan.external if not who_has.get(key)]
        if missing:
            raise MissingDataError(missing, "the graph needs them, but neither makes them nor finds them on the cluster")
        nbytes = thread.run(_ask_center(address, "nbytes", plan.external, security))
        external = {key: (set(who_has[key]), nbytes.get(key, 0)) for key in plan.external}
    with contextlib.ExitStack() as stack:
        with gc_paused():  # a TaskState per task, no garbage; here, not on the loop, which keeps the session alive meanwhile
            loaded = LoadedCore(plan, external=external, max_worker_deaths=max_worker_deaths, return_values=return_values, validate=validate, now=time.monotonic())
            stack.enter_context(gc_frozen())  # the graph and the core: out of the collector's runs until the end
        seen: list = []
        future = thread.submit(_compute(address, loaded, security, forward_output, seen))
        try:
            values = _wait_with_progress(future, seen, len(plan), timeout) if progress else future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the computation cleans the cluster up as it stops
            raise TimeoutError(f"zdist.dask.get did not finish within {timeout} s") from None
        except BaseException:
            future.cancel()  # KeyboardInterrupt: stop the computation too
            raise
        finally:
            _reemit(seen)
            if future.done() and not future.cancelled():  # the loop is done with the core (a cancelled one may still be cleaning up)
                loaded.dismantle()
    return nest_results(keys, values)


def _reemit(seen: list) -> None:
    """Raise here the warnings the graph's tasks raised on the workers, as a local scheduler would."""
    registry: dict = {}
    for key, worker, found in (seen[0].warnings if seen else ()):
        reemit_warnings(found, key, worker, registry)
