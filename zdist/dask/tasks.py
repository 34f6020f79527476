"""What a worker runs for ``zdist.dask.get``: dask tasks shipped in batches.

The scheduler sends each dask task as one ``compute_batch`` task
``[cluster_key, run_task_spec, [batch, index, Ref(dep), ...], {}, [dep, ...]]``.
All tasks of a message share one :class:`TaskBatch`: their dask
``GraphNode``s pickled together (a function or constant used by many tasks
is pickled once), and unpickled by the first of them to run, in the worker's
thread pool. Unpickling there rather than on the worker's event loop matters:
the first task of a kind imports its modules (``dask.array`` takes a second
or more), and an event loop busy importing misses its heartbeats.

This module is imported on workers, on their event loop: keep its imports
to what the worker has already (dask's core).

>>> from dask._task_spec import Task, TaskRef
>>> from operator import add
>>> batch = TaskBatch.pack([Task('z', add, TaskRef('x'), 10)], [('x',)])
>>> run_task_spec(batch, 0, 32)
42
"""
from __future__ import annotations

import copyreg
import io
import operator
import pickle
import threading
from typing import Any, Sequence

import cloudpickle
from dask._task_spec import GraphNode, Task, TaskRef, _execute_subgraph
from ..protocol.serialize import loads

__all__ = ["TaskBatch", "run_node", "run_task_spec"]

#: Buffers at least this large travel as frames of their own (zero-copy).
OUT_OF_BAND = 2**16


def _reduce_task(task: Task) -> tuple:
    """What ``Task.__getstate__`` makes, read by one C call instead of a generator over its slots.

    Why: dask's own ``__getstate__`` was a fifth of the client's time on a
    graph of tiny tasks. The pickle is the same (the worker's ``Task.__setstate__``
    reads it), so this changes nothing but the speed.
    """
    return copyreg.__newobj__, (Task,), _task_state(task)


_task_state = operator.attrgetter(*Task.get_all_slots())
_DISPATCH_TABLE = {**copyreg.dispatch_table, Task: _reduce_task}  # exact type only: subclasses keep their own


class TaskBatch:
    """The pickled dask nodes of one message and, for each, the keys of its inputs in ``Ref`` order.

    Not a list or tuple on purpose: the worker replaces ``Ref``s inside
    lists, tuples and dicts of every task's arguments, and must not walk
    through the whole batch once per task.
    """

    __slots__ = ("blob", "buffers", "_tasks", "_lock")

    #: Unpickling a batch only wraps its bytes (the nodes are unpickled in the
    #: thread that runs them): a worker may do it on its event loop
    #: (:func:`zdist.protocol.serialize.is_quick_to_load`).
    zdist_quick_to_load = True

    def __init__(self, blob: bytes, buffers: Sequence[Any] = ()):
        self.blob = blob
        self.buffers = list(buffers)
        self._tasks: tuple | None = None
        self._lock = threading.Lock()

    @classmethod
    def pack(cls, nodes: Sequence[Any], dep_keys: Sequence[tuple]) -> "TaskBatch":
        """Pickle ``nodes`` and their input keys; large buffers (NumPy data) stay out of band."""
        payload = (list(nodes), list(dep_keys))
        buffers: list = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < OUT_OF_BAND:
                return True
            buffers.append(buffer)
            return False

        try:
            out = io.BytesIO()
            pickler = pickle.Pickler(out, protocol=5, buffer_callback=out_of_band)
            pickler.dispatch_table = _DISPATCH_TABLE
            pickler.dump(payload)
            blob = out.getvalue()
        except Exception:
            blob = None
        if blob is None or b"__main__" in blob:
            # Lambdas, closures and __main__ functions need cloudpickle.
            buffers = []
            blob = cloudpickle.dumps(payload, protocol=5, buffer_callback=out_of_band)
        return cls(blob, buffers)

    def tasks(self) -> tuple[list, list]:
        """``(nodes, dep_keys)``, unpickled on first use (by whichever thread gets here first)."""
        tasks = self._tasks
        if tasks is None:
            with self._lock:
                tasks = self._tasks
                if tasks is None:
                    tasks = self._tasks = loads(self.blob, self.buffers)
        return tasks

    def __reduce__(self):
        return (TaskBatch, (self.blob, self.buffers))

    def __len__(self) -> int:
        return len(self.tasks()[0])

    def __repr__(self) -> str:
        return f"<TaskBatch of {len(self.blob)} bytes>"


def run_task_spec(batch: TaskBatch, index: int, *values: Any) -> Any:
    """Run task ``index`` of ``batch``; ``values`` are its inputs' values, in input-key order."""
    nodes, dep_keys = batch.tasks()
    keys = dep_keys[index]
    return run_node(nodes[index], dict(zip(keys, values)) if keys else {})


def run_node(node: Any, values: dict) -> Any:
    """``node(values)``, with fused tasks run without dask's per-call overhead.

    dask runs a fused task (``_execute_subgraph``) through ``execute_graph``,
    which calls ``dask.order`` on the little inner graph at every call: for
    tiny tasks that costs more than the task. Here the inner graph is
    evaluated depth first instead; the values are the same.

    >>> from operator import add
    >>> from dask._task_spec import Task, TaskRef
    >>> fused = Task.fuse(Task('a', add, TaskRef('x'), 1), Task('b', add, TaskRef('a'), 10))
    >>> run_node(fused, {'x': 1}), fused({'x': 1})
    (12, 12)
    >>> from dask._task_spec import DataNode
    >>> inner = {'y': Task('y', add, TaskRef('in'), 1)}
    >>> leaf = Task('y', _execute_subgraph, inner, 'y', ('in',), DataNode(None, 41))
    >>> run_node(leaf, {}), leaf({})
    (42, 42)
    """
    if type(node) is Task and node.func is _execute_subgraph and not node.kwargs and len(node.args) >= 3:
        inner, outkey, inkeys, *inputs = node.args
        if type(inner) is dict and outkey in inner and len(inkeys) == len(inputs):
            # The fused task's own arguments are the values of the inner graph's inputs.
            env = {key: _evaluate(arg, values) for key, arg in zip(inkeys, inputs)}
            return _run_subgraph(inner, outkey, env)
    return node(values)


def _evaluate(arg: Any, values: dict) -> Any:
    # As Task.__call__ evaluates each of its arguments.
    if isinstance(arg, GraphNode):
        return arg({key: values[key] for key in arg.dependencies})
    if isinstance(arg, TaskRef):
        return values[arg.key]
    return arg


def _run_subgraph(inner: dict, outkey: Any, env: dict) -> Any:
    stack = [outkey]
    while stack:
        key = stack[-1]
        if key in env:
            stack.pop()
            continue
        node = inner[key]
        missing = [dep for dep in node.dependencies if dep not in env]
        if missing:
            stack.extend(missing)
            continue
        env[key] = run_node(node, {dep: env[dep] for dep in node.dependencies})
        stack.pop()
    return env[outkey]
