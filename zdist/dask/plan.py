"""A dask graph turned into what the scheduler works on: tasks numbered in priority order.

Pure data, no sockets. Task ``i`` is the ``i``-th key in ``dask.order``'s
order, so a heap of task numbers is a priority queue; dependencies and
dependents are tuples and lists of numbers, which keeps the per-task
bookkeeping of the scheduler to list indexing.

>>> from operator import add
>>> from zdist.dask.graph import to_task_graph
>>> plan = make_plan(to_task_graph({'a': 1, 'b': (add, 'a', 1), 'c': (add, 'b', 'a')}), ['c'])
>>> plan.keys, [sorted(d) for d in plan.deps], plan.dependents  # deps: in no set order
(['a', 'b', 'c'], [[], [0], [0, 1]], [[1, 2], [2], []])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

from .graph import cull, priorities


@dataclass
class Plan:
    """The tasks of one ``get``: ``keys[i]``, ``nodes[i]``, ``deps[i]`` (numbers), ``ext_deps[i]`` (keys outside the graph)."""

    keys: list
    nodes: list
    deps: list
    ext_deps: list
    dependents: list
    #: task number of each requested key that the graph makes
    output_ids: dict = field(default_factory=dict)
    #: requested keys that the graph does not make (values already on the cluster)
    external_outputs: list = field(default_factory=list)
    #: every key outside the graph that some task needs
    external: set = field(default_factory=set)
    #: task controls (retries, priority, ...) of the keys that have any: ``{key: Controls}``
    controls: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def make_plan(graph: dict, outputs: Iterable[Hashable]) -> Plan:
    """Cull ``graph`` to what ``outputs`` need and number its tasks in priority order (:func:`~zdist.dask.graph.priorities`).

    >>> from operator import add
    >>> from zdist.dask.graph import to_task_graph
    >>> plan = make_plan(to_task_graph({'y': (add, 'x', 1)}, known_keys=['x']), ['y', 'x'])
    >>> plan.ext_deps, plan.external_outputs, plan.external
    ([('x',)], ['x'], {'x'})
    """
    outputs = list(dict.fromkeys(outputs))
    graph = cull(graph, outputs)
    order = priorities(graph, outputs)
    keys = sorted(graph, key=order.__getitem__)
    index = {key: i for i, key in enumerate(keys)}
    nodes = [graph[key] for key in keys]
    deps: list = []
    ext_deps: list = []
    dependents: list = [[] for _ in keys]
    external: set = set()
    no_ext: tuple = ()
    for i, node in enumerate(nodes):
        ids = []
        ext: Any = no_ext
        for dep in node.dependencies:
            j = index.get(dep)
            if j is None:
                ext = (*ext, dep)
                external.add(dep)
            else:
                ids.append(j)
                dependents[j].append(i)
        deps.append(tuple(ids))
        ext_deps.append(ext)
    output_ids = {key: index[key] for key in outputs if key in index}
    external_outputs = [key for key in outputs if key not in index]
    return Plan(keys, nodes, deps, ext_deps, dependents, output_ids, external_outputs, external | set(external_outputs))
