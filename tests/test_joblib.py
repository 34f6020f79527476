"""The joblib backend "zdist" on a real cluster: Parallel and scikit-learn's n_jobs run on the workers."""
from __future__ import annotations

import os

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")

import zdist.joblib  # noqa: E402  (registers the backend)
from zdist import Executor  # noqa: E402
from zdist.joblib import ZdistBackend  # noqa: E402

from .conftest import center_call  # noqa: E402


def pid_of(i):
    return i, os.getpid()


def fails(i):
    if i == 7:
        raise KeyError(f"no {i}")
    return i


def row_sum(a, i):
    return float(a[i].sum())


@pytest.fixture
def ex(cluster):
    with Executor(cluster.center_address) as e:
        yield e


def worker_pids(cluster) -> set[int]:
    return {process.pid for process in cluster.worker_processes.values()}


def test_parallel_runs_on_the_workers_and_equals_the_sequential_result(cluster):
    try:
        with joblib.parallel_config(backend="zdist", center=cluster.center_address, n_jobs=-1):
            out = joblib.Parallel()(joblib.delayed(pid_of)(i) for i in range(100))
    finally:
        zdist.joblib.shutdown()  # the client this module opened to the cluster
    assert [i for i, _ in out] == list(range(100))
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids
    assert pids <= worker_pids(cluster)


def test_an_executor_is_used_as_given_and_n_jobs_counts_its_cores(cluster, ex):
    with joblib.parallel_config(backend="zdist", center=ex) as config:
        backend = config["backend"]
        assert isinstance(backend, ZdistBackend) and backend.pool is ex.pool
        assert backend.effective_n_jobs(-1) == 2 and backend.effective_n_jobs(-2) == 1 and backend.effective_n_jobs(5) == 5
        assert joblib.effective_n_jobs() == 2
        out = joblib.Parallel(n_jobs=-1, return_as="generator_unordered")(joblib.delayed(pid_of)(i) for i in range(20))
        assert sorted(i for i, _ in out) == list(range(20))
    assert ex.submit(abs, -1).result(30) == 1  # still the caller's, still open


def test_exceptions_propagate_with_their_type(ex):
    with joblib.parallel_config(backend="zdist", center=ex):
        with pytest.raises(KeyError, match="no 7"):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fails)(i) for i in range(20))
        # the backend is still usable after an aborted call
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(fails)(i) for i in range(5)) == list(range(5))


def test_a_big_argument_is_scattered_once_for_all_its_tasks(cluster, ex):
    big = np.arange(500_000, dtype=float).reshape(1000, 500)  # 4 MB
    with joblib.parallel_config(backend="zdist", center=ex) as config:
        out = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(row_sum)(big, i) for i in range(20))
        assert out == [float(big[i].sum()) for i in range(20)]
        scattered = [key for key in center_call(cluster.center_address, "who_has") if key.startswith("scatter-")]
        assert len(scattered) == 1, scattered
        # the same array in a second Parallel call of the same backend: still that one copy
        joblib.Parallel(n_jobs=-1)(joblib.delayed(row_sum)(big, i) for i in range(5))
        assert [k for k in center_call(cluster.center_address, "who_has") if k.startswith("scatter-")] == scattered
        assert len(config["backend"]._scattered) == 1
        # small arguments travel with their tasks
        joblib.Parallel(n_jobs=-1)(joblib.delayed(row_sum)(big[:10].copy(), 0) for _ in range(3))
        assert len(config["backend"]._scattered) == 1


def accuracy_and_pid(estimator, X, y):
    """A multi-metric scorer that also says which process scored."""
    return {"accuracy": estimator.score(X, y), "pid": os.getpid()}


def test_scikit_learn_grid_search_gives_the_same_best_params(cluster, ex):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.01, 0.1, 1, 10], "kernel": ["linear", "rbf"]}
    search = dict(cv=3, scoring=accuracy_and_pid, refit="accuracy")
    local = GridSearchCV(SVC(), grid, n_jobs=1, **search).fit(X, y)
    with joblib.parallel_config(backend="zdist", center=ex, scatter_threshold=1000) as config:  # iris is small: scatter it anyway
        remote = GridSearchCV(SVC(), grid, n_jobs=-1, **search).fit(X, y)
        assert len(config["backend"]._scattered) == 2  # X and y, once for the 24 fits
    assert remote.best_params_ == local.best_params_
    assert remote.best_score_ == pytest.approx(local.best_score_)
    assert np.allclose(remote.cv_results_["mean_test_accuracy"], local.cv_results_["mean_test_accuracy"])
    pids = {int(pid) for split in range(3) for pid in remote.cv_results_[f"split{split}_test_pid"]}
    assert pids <= worker_pids(cluster) and os.getpid() not in pids  # the fits ran on the workers
