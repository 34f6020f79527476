"""The pure graph logic of zdist.dask: no sockets, no cluster."""
from __future__ import annotations

import pickle
from operator import add

import dask
import dask.array as da
import numpy as np
from dask._task_spec import Alias, DataNode, Task, TaskRef

from zdist.dask.graph import (
    convert_recording_literals,
    cull,
    depth_first,
    dependencies_of,
    dependents_of,
    external_keys,
    flatten_keys,
    nest_results,
    priorities,
    ready_keys,
    to_task_graph,
)
from zdist.dask.plan import make_plan
from zdist.scheduling.policy import check_invariants, choose_worker, releasable, to_recompute, worth_moving
from zdist.dask.tasks import TaskBatch, run_task_spec
from zdist.protocol import deserialize, serialize


def inc(x):
    return x + 1


# ---------------------------------------------------------------- conversion


def test_legacy_graph_becomes_task_spec():
    graph = to_task_graph({"x": 1, "y": (inc, "x"), "z": "y", "w": (sum, ["x", "y", 10])})
    assert isinstance(graph["x"], DataNode)
    assert isinstance(graph["y"], Task)
    assert isinstance(graph["z"], Alias)
    assert dependencies_of(graph) == {"x": frozenset(), "y": {"x"}, "z": {"y"}, "w": {"x", "y"}}


def test_collection_expression_is_materialized():
    captured = {}

    def capture(dsk, keys, **kwargs):
        captured["dsk"], captured["keys"] = dsk, keys
        return dask.get(dsk, keys)

    da.arange(10, chunks=5).sum().compute(scheduler=capture)
    assert not isinstance(captured["dsk"], dict)  # dask hands over an expression
    graph = to_task_graph(captured["dsk"])
    assert set(flatten_keys(captured["keys"])) <= set(graph)
    assert dask.get(graph, captured["keys"])[0] == 45


def test_known_keys_turn_literals_into_dependencies():
    graph, candidates = convert_recording_literals({"y": (add, "x", 1)})
    assert "x" in candidates and graph["y"].dependencies == frozenset()
    graph = to_task_graph({"y": (add, "x", 1)}, known_keys={"x"})
    assert graph["y"].dependencies == {"x"}


def test_task_spec_graph_has_no_candidates():
    graph = {"y": Task("y", add, TaskRef("x"), 1)}
    converted, candidates = convert_recording_literals(graph)
    assert candidates == set() and converted["y"].dependencies == {"x"}
    assert external_keys(dependencies_of(converted)) == {"x"}


def test_flatten_and_nest_keys():
    keys = [["a", ("x", 0)], "b", [[("x", 1)]]]
    assert flatten_keys(keys) == ["a", ("x", 0), "b", ("x", 1)]
    assert flatten_keys(("x", 0)) == [("x", 0)]
    values = {"a": 1, ("x", 0): 2, "b": 3, ("x", 1): 4}
    assert nest_results(keys, values) == ((1, 2), 3, ((4,),))
    assert nest_results(("x", 1), values) == 4


def test_cull_keeps_only_what_outputs_need():
    graph = to_task_graph({"a": 1, "b": (inc, "a"), "c": (inc, "b"), "d": (inc, "a")})
    assert set(cull(graph, ["c"])) == {"a", "b", "c"}
    # As many requested keys as tasks, some of them not in the graph.
    assert set(cull(to_task_graph({"a": 1, "b": (inc, "a"), "z": 5}), ["b", "y", "q"])) == {"a", "b"}


def test_priorities_are_dask_order():
    graph = to_task_graph({"a": 1, "b": 2, "c": (inc, "a"), "d": (add, "b", "c")})
    assert priorities(graph) == dask.order.order(graph)


def test_graphs_over_the_limit_are_ordered_depth_first_inputs_first(monkeypatch):
    import zdist.dask.graph as graph_module

    x = da.ones((40, 40), chunks=(5, 5))
    graph = to_task_graph(dict((x + x.T).sum().__dask_graph__()))
    (root,) = flatten_keys([(x + x.T).sum().__dask_keys__()])
    numbers = depth_first(graph, [root])
    assert sorted(numbers.values()) == list(range(len(graph)))  # every task, once
    assert all(numbers[dep] < numbers[key] for key, node in graph.items() for dep in node.dependencies)
    monkeypatch.setattr(graph_module, "DASK_ORDER_LIMIT", 10)
    assert priorities(graph, [root]) == numbers
    assert priorities(graph) == dask.order.order(graph)  # without outputs: dask.order, whatever the size


# ---------------------------------------------------------------- readiness, placement, release


def test_dependents_and_readiness():
    deps = {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": {"c"}}
    dependents = dependents_of(deps)
    assert dependents["a"] == {"b", "c"} and dependents["d"] == set()
    assert ready_keys(deps, available=set(), pending=["a", "b"]) == ["a"]
    assert ready_keys(deps, available={"a", "b"}, pending=["c", "d"]) == ["c"]


def test_choose_worker_prefers_bytes_then_load():
    who_has = {"x": {"A"}, "y": {"B"}, "z": {"A", "B"}}
    nbytes = {"x": 1000, "y": 10, "z": 500}
    assert choose_worker(["x", "y"], who_has, nbytes, {"A": 9.0, "B": 0.0}) == "A"
    assert choose_worker(["y"], who_has, nbytes, {"A": 0.0, "B": 9.0}) == "B"
    # Equal bytes: the least loaded.
    assert choose_worker(["z"], who_has, nbytes, {"A": 1.0, "B": 0.5}) == "B"
    # Holders that are not eligible do not count.
    assert choose_worker(["x"], who_has, nbytes, {"B": 3.0, "C": 1.0}) == "C"
    assert choose_worker(["x"], who_has, nbytes, {}) is None


def test_choose_worker_without_inputs_weighs_cores():
    # 4 tasks on 4 cores is a lighter load than 2 tasks on 1 core.
    loads = {"big": 4 / 4, "small": 2 / 1}
    assert choose_worker([], {}, {}, loads) == "big"


def test_worth_moving():
    assert not worth_moving(100_000_000, queued=1, task_seconds=0.01, ncores=1)
    assert worth_moving(1_000, queued=50, task_seconds=0.01, ncores=1)
    assert not worth_moving(1_000, queued=10, task_seconds=0.01, ncores=100)


def test_releasable():
    dependents = {"a": {"b", "c"}, "b": {"d"}, "c": set(), "d": set()}
    assert not releasable("a", dependents, done={"a", "b"}, outputs=set())
    assert releasable("a", dependents, done={"a", "b", "c"}, outputs=set())
    assert not releasable("c", dependents, done={"a", "b", "c"}, outputs={"c"})
    assert releasable("c", dependents, done={"a", "b", "c"}, outputs=set())


# ---------------------------------------------------------------- recovery


CHAIN = {"a": set(), "b": {"a"}, "c": {"b"}, "d": {"c"}}


def test_recompute_lost_chain_back_to_what_is_available():
    dependents = dependents_of(CHAIN)
    # a and b released, c lost, d not done: c needs b needs a.
    redo = to_recompute(["c"], CHAIN, dependents, done={"a", "b", "c"}, available=set(), outputs={"d"})
    assert redo == {"a", "b", "c"}
    # b still available somewhere: only c.
    assert to_recompute(["c"], CHAIN, dependents, done={"a", "b", "c"}, available={"b"}, outputs={"d"}) == {"c"}


def test_lost_but_unneeded_keys_are_not_recomputed():
    dependents = dependents_of(CHAIN)
    assert to_recompute(["b"], CHAIN, dependents, done={"a", "b", "c"}, available={"c"}, outputs={"d"}) == set()
    # An output not delivered yet is needed even with every dependent done.
    assert to_recompute(["d"], CHAIN, dependents, done=set(CHAIN), available={"c"}, outputs={"d"}) == {"d"}


def test_recompute_diamond_and_external_inputs():
    deps = {"x": {"ext"}, "l": {"x"}, "r": {"x"}, "out": {"l", "r"}}
    dependents = dependents_of(deps)
    redo = to_recompute(["l", "r"], deps, dependents, done={"x", "l", "r"}, available=set(), outputs={"out"})
    # x is recomputed; ext cannot be (not in the graph), so it comes back for the caller to report.
    assert redo == {"l", "r", "x", "ext"}


def test_check_invariants_catches_inconsistent_states():
    deps = {"a": set(), "b": {"a"}, "c": {"b"}}
    dependents = dependents_of(deps)
    ok = {"a": "released", "b": "memory", "c": "processing"}
    assert check_invariants(ok, deps, dependents, {"b": {"W"}}, {"c"}) == []
    bad = {"a": "memory", "b": "released", "c": "ready"}
    problems = check_invariants(bad, deps, dependents, {}, {"c"})
    assert any("'a' is in memory but no worker holds it" in p for p in problems)
    assert any("'b' was released while still needed" in p for p in problems)


# ---------------------------------------------------------------- plan


def test_plan_numbers_tasks_in_priority_order():
    graph = to_task_graph({"a": 1, "b": 2, "c": (inc, "a"), "d": (add, "b", "c"), "unused": (inc, "a")})
    plan = make_plan(graph, ["d"])
    order = priorities(cull(graph, ["d"]))
    assert plan.keys == sorted(order, key=order.get)
    index = {key: i for i, key in enumerate(plan.keys)}
    assert set(plan.deps[index["d"]]) == {index["b"], index["c"]}
    assert index["d"] in plan.dependents[index["c"]]
    assert plan.output_ids == {"d": index["d"]} and "unused" not in plan.keys


def test_plan_external_inputs_and_outputs():
    graph = {"y": Task("y", add, TaskRef("x"), 1)}
    plan = make_plan(graph, ["y", "x"])
    assert plan.ext_deps == [("x",)] and plan.external_outputs == ["x"] and plan.external == {"x"}


# ---------------------------------------------------------------- what workers run


def _roundtrip(batch):
    s = serialize(batch)
    return deserialize(s.kind, s.blob, s.buffers)


def test_task_batch_runs_tasks_aliases_data_and_containers():
    graph = to_task_graph({"x": 1, "y": (inc, "x"), "z": "y", "w": (sum, ["x", "y", 10]), "d": (dict, [["k", "y"]])})
    nodes = [graph[k] for k in ["x", "y", "z", "w", "d"]]
    dep_keys = [(), ("x",), ("y",), ("x", "y"), ("y",)]
    batch = _roundtrip(TaskBatch.pack(nodes, dep_keys))
    assert run_task_spec(batch, 0) == 1
    assert run_task_spec(batch, 1, 1) == 2
    assert run_task_spec(batch, 2, 2) == 2
    assert run_task_spec(batch, 3, 1, 2) == 13
    assert run_task_spec(batch, 4, 2) == {"k": 2}


def test_task_batch_pickles_lambdas_and_keeps_arrays_out_of_band():
    data = np.arange(100_000)
    nodes = [Task("f", lambda v: v * 2, TaskRef("a")), DataNode("arr", data)]
    batch = TaskBatch.pack(nodes, [("a",), ()])
    assert [memoryview(b).nbytes for b in batch.buffers] == [data.nbytes]
    s = serialize(batch)
    assert len(s.blob) < 10_000  # the array travels as a frame of its own
    batch2 = deserialize(s.kind, s.blob, s.buffers)
    assert run_task_spec(batch2, 0, 21) == 42
    assert run_task_spec(batch2, 1).sum() == data.sum()


def test_task_batch_is_not_walked_by_ref_substitution():
    # The worker substitutes Refs inside lists, tuples and dicts; a batch is none of them.
    batch = TaskBatch.pack([DataNode("x", 1)], [()])
    assert not isinstance(batch, (list, tuple, dict))
    assert pickle.loads(pickle.dumps(batch)).tasks()[1] == [()]
