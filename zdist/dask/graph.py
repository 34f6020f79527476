"""Graph logic of ``zdist.dask.get`` as pure functions: no sockets, no loop.

What a scheduler needs to know about a dask graph, built on dask's own
helpers (``convert_legacy_graph``, ``GraphNode.dependencies``,
``reverse_dict``, ``dask.order``): which tasks are ready, where a task should
run, which intermediates may be deleted, and what to compute again after a
worker took some results with it.

>>> from operator import add
>>> graph = to_task_graph({'x': 1, 'y': (add, 'x', 10), 'z': (add, 'y', 'x')})
>>> deps = dependencies_of(graph)
>>> sorted(deps['z'])
['x', 'y']
>>> ready_keys(deps, available={'x'}, pending=['y', 'z'])
['y']
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Collection, Hashable, Iterable

from dask._task_spec import GraphNode, convert_legacy_graph
from dask.core import flatten
from dask.core import reverse_dict
from dask.local import nested_get
from dask.order import order

from ..scheduling.controls import CONTROL_NAMES, controls_from

__all__ = [
    "cull",
    "depth_first",
    "dependencies_of",
    "dependents_of",
    "external_keys",
    "flatten_keys",
    "is_legacy",
    "convert_recording_literals",
    "nest_results",
    "priorities",
    "ready_keys",
    "to_task_graph",
]



def _materialize(dsk: Any) -> Mapping:
    # dask hands a scheduler an expression (``x.compute(scheduler=get)``), not a
    # dict; dask.local.get_async does exactly this.
    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    return dsk


def is_legacy(dsk: Mapping) -> bool:
    """True when some value of ``dsk`` is not a task-spec ``GraphNode`` (a tuple task or raw data).

    >>> from dask._task_spec import DataNode
    >>> is_legacy({'a': 1}), is_legacy({'a': DataNode('a', 1)})
    (True, False)
    """
    return not all(isinstance(value, GraphNode) for value in dsk.values())


class _RecordingKeys:
    """The keys of a legacy graph, as a container that records the other literals it is asked about."""

    __slots__ = ("keys", "asked")

    def __init__(self, keys: Collection):
        self.keys = keys
        self.asked: set = set()

    def __contains__(self, item: Any) -> bool:
        if item in self.keys:
            return True
        self.asked.add(item)
        return False


def convert_recording_literals(dsk: Any) -> tuple[dict, set]:
    """:func:`to_task_graph` of ``dsk``, and the literals that would be keys if something held them.

    In ``{'y': (inc, 'x')}`` the string ``'x'`` is a key only if it names a
    value; when ``'x'`` is not in the graph it may still name a value held on
    the cluster (placed there by ``update_data`` or a Pool). A scheduler asks
    the Center about these candidates and, if it holds some, converts again
    with them as ``known_keys``. Task-spec graphs name their inputs
    explicitly and have no candidates.

    >>> from operator import add
    >>> graph, candidates = convert_recording_literals({'y': (add, 'x', 1), 'z': (add, 'y', 'w')})
    >>> sorted(map(str, candidates)), sorted(graph['z'].dependencies)
    (['1', 'w', 'x'], ['y'])
    """
    dsk = _materialize(dsk)
    if not is_legacy(dsk):
        return convert_legacy_graph(dsk), set()
    recorder = _RecordingKeys(set(dsk))
    return convert_legacy_graph(dsk, all_keys=recorder), recorder.asked


def to_task_graph(dsk: Any, known_keys: Iterable[Hashable] = ()) -> dict:
    """Whatever dask hands a scheduler, as ``{key: GraphNode}``.

    ``dsk`` is a dict (legacy tuple tasks, raw values or task-spec nodes) or a
    dask expression. ``known_keys`` are keys that are not in the graph but
    whose values exist elsewhere (on the cluster): a legacy task that mentions
    one depends on it rather than taking the literal.

    >>> from operator import add
    >>> graph = to_task_graph({'y': (add, 'x', 1)}, known_keys=['x'])
    >>> sorted(graph['y'].dependencies)
    ['x']
    >>> to_task_graph({'a': 1})['a']
    DataNode(1)
    """
    dsk = _materialize(dsk)
    known = set(known_keys)
    if known:
        return convert_legacy_graph(dsk, all_keys=set(dsk) | known)
    return convert_legacy_graph(dsk)


def flatten_keys(keys: Any) -> list:
    """The keys of a (nested) list of keys, flat; a single key is a list of one.

    >>> flatten_keys([['a', ('x', 0)], 'b'])
    ['a', ('x', 0), 'b']
    >>> flatten_keys(('x', 1))
    [('x', 1)]
    """
    if isinstance(keys, list):
        return list(flatten(keys))
    return [keys]


def nest_results(keys: Any, results: Mapping) -> Any:
    """Results in the structure of ``keys``, as dask's own schedulers return them (lists become tuples).

    >>> nest_results([['a', 'b'], 'a'], {'a': 1, 'b': 2})
    ((1, 2), 1)
    """
    return nested_get(keys, results)


def cull(graph: dict, keys: Iterable[Hashable]) -> dict:
    """Only the tasks that ``keys`` need.

    >>> from operator import add
    >>> graph = to_task_graph({'a': 1, 'b': (add, 'a', 1), 'c': (add, 'a', 2)})
    >>> sorted(cull(graph, ['b']))
    ['a', 'b']
    """
    keys = list(keys)
    if len(keys) == len(graph) and all(key in graph for key in keys):
        return graph
    # dask's own cull takes "as many keys as tasks" to mean "all of them",
    # which is wrong when some requested keys are not in the graph.
    culled: dict = {}
    stack = [key for key in keys if key in graph]
    while stack:
        key = stack.pop()
        if key in culled:
            continue
        culled[key] = node = graph[key]
        stack.extend(dep for dep in node.dependencies if dep in graph and dep not in culled)
    return culled


def dependencies_of(graph: Mapping) -> dict:
    """``{key: frozenset of keys it needs}``; a needed key may lie outside the graph.

    >>> from operator import add
    >>> dependencies_of(to_task_graph({'a': 1, 'b': (add, 'a', 1)}))['b']
    frozenset({'a'})
    """
    return {key: node.dependencies for key, node in graph.items()}


def external_keys(dependencies: Mapping) -> set:
    """Keys that tasks need but the graph does not make (values held elsewhere).

    >>> sorted(external_keys({'b': {'a'}, 'c': {'b', 'x'}}))
    ['a', 'x']
    """
    needed: set = set()
    for deps in dependencies.values():
        needed.update(deps)
    return needed.difference(dependencies)


def dependents_of(dependencies: Mapping) -> dict:
    """``{key: set of keys that need it}``, for every key named in ``dependencies``.

    >>> dependents_of({'a': set(), 'b': {'a'}, 'c': {'a', 'b'}})['a'] == {'b', 'c'}
    True
    """
    return reverse_dict(dependencies)


#: Graphs of more tasks than this are ordered depth first, not by ``dask.order``:
#: measured on a tree reduction, ``dask.order`` took 12 µs a task at 11,431 tasks,
#: 41 µs at 1.14 million, and at 11.4 million had taken 22 GB of memory (about
#: 2 KB a task) before it was stopped; :func:`depth_first` is linear in time and
#: keeps one dict entry a task.
DASK_ORDER_LIMIT = 1_000_000


def priorities(graph: Mapping, outputs: Iterable[Hashable] | None = None) -> dict:
    """Lower runs first, keeping memory low: ``dask.order``'s, or :func:`depth_first`'s above :data:`DASK_ORDER_LIMIT` tasks.

    >>> from operator import add
    >>> priorities(to_task_graph({'a': 1, 'b': (add, 'a', 1)}))
    {'a': 0, 'b': 1}
    """
    if outputs is not None and len(graph) > DASK_ORDER_LIMIT:
        return depth_first(graph, outputs)
    return order(graph)


def depth_first(graph: Mapping, outputs: Iterable[Hashable]) -> dict:
    """Priorities by a depth-first walk from each output in turn: a task comes right after its last input.

    Each subtree is finished before the next is started, so the values held
    at once stay few (for a reduction, one branch's worth); every task of
    ``graph`` that ``outputs`` need gets a number, inputs before their
    dependents.

    >>> from operator import add
    >>> g = to_task_graph({'a': 1, 'b': (add, 'a', 1), 'c': 2, 'd': (add, 'c', 1), 'e': (add, 'b', 'd')})
    >>> p = depth_first(g, ['e'])
    >>> p['e'] == 4 and p['a'] < p['b'] and p['c'] < p['d'] and abs(p['b'] - p['d']) == 2
    True
    """
    numbers: dict = {}  # key -> its number; -1 while its inputs are being walked
    count = 0
    for root in outputs:
        if root not in graph or root in numbers:
            continue
        stack = [root]
        while stack:
            key = stack[-1]
            number = numbers.get(key)
            if number is None:
                numbers[key] = -1
                stack.extend(dep for dep in graph[key].dependencies if dep in graph and dep not in numbers)
            else:
                stack.pop()
                if number == -1:
                    numbers[key] = count
                    count += 1
    return numbers


def annotations_of(dsk: Any) -> dict:
    """The per-key annotations of what dask handed the scheduler: ``{name: {key: value}}`` (``{}`` for a plain dict).

    >>> annotations_of({'a': 1})
    {}
    """
    annotations = getattr(dsk, "__dask_annotations__", None)
    return dict(annotations()) if callable(annotations) else {}


def controls_by_key(keys: Iterable[Hashable], annotations: Mapping, defaults: Any = None, normalize: Any = None) -> dict:
    """Task controls (:mod:`zdist.scheduling.controls`) of the ``keys`` that ``annotations`` or ``defaults`` give any.

    ``annotations`` is :func:`annotations_of`'s ``{name: {key: value}}``,
    from ``dask.annotate(priority=..., retries=..., resources=..., workers=...,
    allow_other_workers=...)``; annotations zdist does not know are ignored,
    as dask's schedulers do. ``defaults`` apply to every key.

    >>> c = controls_by_key(['a', 'b'], {'priority': {'a': 5}, 'span': {'a': 'x'}})
    >>> c['a'].priority, 'b' in c
    (5, False)
    """
    known = {name: values for name, values in annotations.items() if name in CONTROL_NAMES and values}
    if not known:
        return dict.fromkeys(keys, defaults) if defaults is not None else {}
    result = {}
    for key in keys:
        given = {name: (v(key) if callable(v) else v) for name, values in known.items() if (v := values.get(key)) is not None}
        controls = controls_from(**given, defaults=defaults, normalize=normalize) if given else defaults
        if controls is not None:
            result[key] = controls
    return result


def ready_keys(dependencies: Mapping, available: Collection, pending: Iterable[Hashable]) -> list:
    """The ``pending`` keys whose every dependency is ``available``, in ``pending``'s order.

    >>> ready_keys({'a': set(), 'b': {'a'}, 'c': {'b'}}, available={'a'}, pending=['b', 'c'])
    ['b']
    """
    return [key for key in pending if all(dep in available for dep in dependencies[key])]
