"""Warnings raised inside a task reach the client, with the task's key, when it takes the result."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from zdist import Executor, Pool


class OddWarning(UserWarning):
    pass


def warn_and_return(x: int) -> int:
    if x % 2:
        warnings.warn(f"{x} is odd", OddWarning)
    return x


def divide_by_zero(x: float) -> float:
    return float(np.float64(x) / np.float64(0.0))


def warn_then_fail() -> None:
    warnings.warn("about to fail", RuntimeWarning)
    raise ValueError("failed after a warning")


def test_pool_results_bring_their_warnings(cluster):
    with Pool(cluster.center_address) as pool:
        with pytest.warns(RuntimeWarning, match=r"divide by zero .*\(in task divide_by_zero-"):
            assert pool.apply(divide_by_zero, (1.0,)).get() == float("inf")
        handles = pool.map(warn_and_return, range(6))
        with pytest.warns(OddWarning) as record:
            assert pool.gather(handles) == list(range(6))
        assert sorted(str(w.message).split(" (in task")[0] for w in record) == ["1 is odd", "3 is odd", "5 is odd"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # taken once: fetching again raises nothing
            assert pool.gather(handles) == list(range(6))
        chunked = pool.map(warn_and_return, range(4), chunksize=2)
        with pytest.warns(OddWarning):
            assert pool.gather(chunked) == [0, 1, 2, 3]
        with pytest.warns(RuntimeWarning, match="about to fail"), pytest.raises(ValueError, match="failed after a warning"):
            pool.apply(warn_then_fail).get()


def test_executor_futures_bring_their_warnings(cluster):
    with Executor(cluster.center_address) as ex:
        with pytest.warns(OddWarning, match="3 is odd"):
            assert ex.submit(warn_and_return, 3).result() == 3


def test_dask_get_raises_the_tasks_warnings_in_the_caller(cluster):
    import dask.array as da

    from zdist.dask import get

    x = da.from_array(np.array([1.0, -1.0, 0.0, 2.0]), chunks=2)
    with pytest.warns(RuntimeWarning, match="(invalid value|divide by zero)"):
        result = (x / 0).compute(scheduler=functools.partial(get, cluster.center_address))
    assert np.isnan(result[2]) and np.isinf(result[0])
