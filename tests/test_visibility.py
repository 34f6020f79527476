"""Seeing inside a remote run and shipping code to it: forwarded output, logs, uploads, run, preload."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from zdist import Executor, Pool

from .conftest import make_cluster, wait_for
from .test_cli import programs, start_worker  # noqa: F401 - programs is a fixture

ADDRESS = r"(?:127\.0\.0\.1:\d+|ipc://\S+)"  # private (ipc://) local clusters by default, TCP on request


def chatty(x):
    print(f"hello from task {x}")
    print(f"complaint {x}", file=sys.stderr)
    logging.getLogger("user.code").warning("logged by task %s", x)
    return x


def quiet(x):
    return x + 1


def fails(x):
    logging.getLogger("user.code").warning("about to fail on %s", x)
    raise ValueError(f"failing on purpose with {x}")


def uses_module(x):
    import zdist_uploaded_mod

    return (zdist_uploaded_mod.VERSION, os.getpid())


def module_version():
    import zdist_uploaded_mod

    return zdist_uploaded_mod.VERSION


def test_task_output_reaches_the_client_with_worker_and_key(capsys):
    with make_cluster(2) as cluster, Pool(cluster, forward_output=True) as pool:
        handles = pool.map(chatty, range(4))
        assert pool.gather(handles) == [0, 1, 2, 3]
        assert pool.apply(chatty, (9,)).get() == 9  # sent from this thread: the same
        captured = capsys.readouterr()
    for handle, x in zip(handles, range(4)):
        assert re.search(rf"^\[{ADDRESS} {re.escape(handle.key)}\] hello from task {x}$", captured.out, re.M), captured.out
        assert re.search(rf"^\[{ADDRESS} {re.escape(handle.key)}\] complaint {x}$", captured.err, re.M), captured.err
        assert re.search(rf"^\[{ADDRESS} {re.escape(handle.key)}\] WARNING user.code: logged by task {x}$", captured.err, re.M)
    assert re.search(rf"^\[{ADDRESS} chatty-\S+\] hello from task 9$", captured.out, re.M)
    workers = set(re.findall(rf"^\[({ADDRESS}) ", captured.out, re.M))
    assert workers <= set(cluster.worker_addresses)


def test_output_is_not_forwarded_unless_asked_when_joining_a_cluster(capfd):
    with make_cluster(1) as cluster:
        with Pool(cluster) as pool:
            pool.gather(pool.map(chatty, range(2)))
        assert "hello from task" not in capfd.readouterr().out
        with Executor(cluster, forward_output=True) as ex:
            assert ex.submit(chatty, 5).result() == 5
        assert "hello from task 5" in capfd.readouterr().out


def test_a_pool_that_starts_its_cluster_forwards_by_default(capsys):
    with Pool(processes=1) as pool:
        pool.gather(pool.map(chatty, [7]))
    assert "] hello from task 7" in capsys.readouterr().out


def test_dask_get_forwards_output_under_the_dask_key(capsys):
    from zdist.dask import get

    with make_cluster(1) as cluster:
        assert get(cluster.center_address, {"a": 1, "b": (chatty, "a")}, "b", forward_output=True) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^\[{ADDRESS} b\] hello from task 1$", out, re.M), out


def test_worker_logs_keep_a_failed_task(capsys):
    with make_cluster(2) as cluster, Pool(cluster) as pool:
        with pytest.raises(ValueError, match="failing on purpose with 3"):
            pool.apply(fails, (3,))
        logs = wait_for(lambda: _with(pool.get_worker_logs(), "failing on purpose with 3"), message="the failure in a worker's log")
        assert set(logs) == set(cluster.worker_addresses)

        # The same from the command line, for the worker that ran it, and for the whole cluster.
        (worker,) = [a for a, records in logs.items() if any("failing on purpose" in r["message"] for r in records)]
        for args in ([worker], []):
            out = subprocess.run([sys.executable, "-m", "zdist_cli.main", "logs", cluster.center_address, *args], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert re.search(rf"^\[{re.escape(worker)}\] \S+ WARNING zdist.worker: task 'fails-\S+' failed on {re.escape(worker)}", out.stdout, re.M), out.stdout
            assert "ValueError: failing on purpose with 3" in out.stdout
            assert "WARNING user.code: about to fail on 3" in out.stdout  # what the task logged before it raised


def _with(logs: dict, text: str) -> dict | None:
    return logs if any(text in r["message"] for records in logs.values() for r in records) else None


def test_zdist_logs_names_an_unknown_worker():
    with make_cluster(1) as cluster:
        out = subprocess.run([sys.executable, "-m", "zdist_cli.main", "logs", cluster.center_address, "nosuchworker"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "no worker named nosuchworker" in out.stderr


def test_zdist_logs_follow_prints_new_records(tmp_path):
    printed = tmp_path / "follow.txt"
    with make_cluster(1) as cluster, Pool(cluster) as pool, open(printed, "wb") as out:
        follower = subprocess.Popen(
            [sys.executable, "-u", "-m", "zdist_cli.main", "logs", cluster.center_address, "--follow"], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            with pytest.raises(ValueError):
                pool.apply(fails, (11,))
            wait_for(lambda: b"failing on purpose with 11" in printed.read_bytes(), timeout=30, interval=0.1, message="zdist logs --follow shows the new failure")
            assert follower.poll() is None  # still following
        finally:
            follower.kill()
            follower.wait(10)


def test_run_returns_one_result_per_worker():
    with make_cluster(3) as cluster, Pool(cluster) as pool:
        pids = pool.run(os.getpid)
        assert sorted(pids) == sorted(cluster.worker_addresses)
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
        assert sorted(cluster.worker_processes[a].pid for a in pids) == sorted(pids.values())
        # Arguments, the worker object, one worker only, and errors noting the worker.
        assert pool.run(pow, 2, exp=5) == {a: 32 for a in cluster.worker_addresses}
        one = cluster.worker_addresses[0]
        assert pool.run(_worker_address, workers=[one]) == {one: one}
        with pytest.raises(ZeroDivisionError) as info:
            pool.run(_divide, 0)
        assert any("on worker" in note for note in getattr(info.value, "__notes__", []))


def _worker_address(zdist_worker=None):
    return zdist_worker.address


def _divide(x):
    return 1 / x


def test_upload_file_reaches_every_worker_including_later_ones(tmp_path):
    module = tmp_path / "zdist_uploaded_mod.py"
    module.write_text("VERSION = 1\n")
    with make_cluster(2) as cluster, Pool(cluster) as pool:
        loaded = pool.upload_file(module)
        assert loaded == {a: ["zdist_uploaded_mod"] for a in cluster.worker_addresses}
        assert _on_every_worker(pool, cluster) == {a: 1 for a in cluster.worker_addresses}

        # Uploaded again: reloaded where it was imported.
        module.write_text("VERSION = 2\n")
        pool.upload_file(module)
        assert _on_every_worker(pool, cluster) == {a: 2 for a in cluster.worker_addresses}

        # A worker started after the upload gets it before its first task.
        late = cluster.start_worker()
        wait_for(lambda: late in pool.sync_center(), message="the new worker is seen")
        assert _on_every_worker(pool, cluster)[late] == 2
        assert pool.run(module_version) == {a: 2 for a in cluster.worker_addresses}


def _on_every_worker(pool: Pool, cluster) -> dict:
    """Run a task that imports the uploaded module on each worker (its input placed there): ``{worker: VERSION}``."""
    addresses = pool.sync_center()
    inputs = [pool.scatter([i], workers=[a])[0] for i, a in enumerate(addresses)]
    handles = [pool.apply_async(uses_module, (x,)) for x in inputs]
    pids = {proc.pid: a for a, proc in cluster.worker_processes.items()}
    return {pids[pid]: version for version, pid in pool.gather(handles)}


def test_upload_a_zip_package_and_bad_uploads(tmp_path):
    import zipfile

    archive = tmp_path / "zdist_zipped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zdist_zipped_pkg/__init__.py", "from .inner import NAME\n")
        z.writestr("zdist_zipped_pkg/inner.py", "NAME = 'first'\n")
    with make_cluster(1) as cluster, Pool(cluster) as pool:
        assert list(pool.upload_file(archive).values()) == [["zdist_zipped_pkg"]]
        assert list(pool.run(_zipped_name).values()) == ["first"]
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("zdist_zipped_pkg/__init__.py", "from .inner import NAME\n")
            z.writestr("zdist_zipped_pkg/inner.py", "NAME = 'second'\n")
        pool.upload_file(archive)
        assert list(pool.run(_zipped_name).values()) == ["second"]

        bad = tmp_path / "notes.txt"
        bad.write_text("x")
        with pytest.raises(ValueError, match="upload_file takes"):
            pool.upload_file(bad)
        broken = tmp_path / "zdist_broken_mod.py"
        broken.write_text("raise RuntimeError('broken on import')\n")
        with pytest.raises(RuntimeError, match="broken on import"):
            pool.upload_file(broken)


def _zipped_name():
    import zdist_zipped_pkg

    return zdist_zipped_pkg.NAME


def test_worker_preload_runs_set_up_code(programs, tmp_path):
    preload = tmp_path / "zdist_preload_mod.py"
    preload.write_text(
        textwrap.dedent(
            """
            SETUP = []

            def zdist_setup(worker):
                SETUP.append(worker.address)
            """
        )
    )
    with make_cluster(0) as cluster, Pool(cluster) as pool:
        _, address = start_worker(programs, cluster.center_address, "--no-nanny", "--preload", str(preload), "--preload", "json")
        wait_for(lambda: address in pool.sync_center())
        # eval, a builtin, travels by reference: zdist-worker has not this test module on its path.
        check = "__import__('zdist_preload_mod').SETUP, 'json' in __import__('sys').modules"
        assert pool.run(eval, check) == {address: ([address], True)}

        # Under a nanny: it passes --preload on to the worker it starts.
        nanny = programs("zdist-worker", cluster.center_address, "--preload", str(preload))
        supervised = nanny.wait_for_line(rf"^Start worker at: ({ADDRESS})$").group(1)
        wait_for(lambda: supervised in pool.sync_center())
        assert pool.run(eval, "__import__('zdist_preload_mod').SETUP", workers=[supervised]) == {supervised: [supervised]}
        assert nanny.stop(signal.SIGTERM) == 0  # the nanny stops its worker too (a SIGKILL would orphan it)

    # A preload that fails stops the worker, saying which.
    broken = tmp_path / "zdist_broken_preload.py"
    broken.write_text("def zdist_setup(worker):\n    raise RuntimeError('no set-up today')\n")
    with make_cluster(0) as cluster:
        worker = programs("zdist-worker", cluster.center_address, "--no-nanny", "--preload", str(broken))
        assert worker.process.wait(60) != 0
        assert "preload" in worker.stderr_text() and "no set-up today" in worker.stderr_text()


# ---------------------------------------------------------------- metrics


def scrape(url: str) -> dict:
    """``/metrics`` parsed by prometheus-client's own parser: ``{(sample name, labels): value}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_metrics_parse_and_counters_rise_during_a_map():
    pytest.importorskip("aiohttp")
    with make_cluster(2, dashboard=True) as cluster, Pool(cluster) as pool:
        url = cluster.dashboard_url + "metrics"
        before = scrape(url)
        assert total(before, "zdist_workers") == 2
        assert total(before, "zdist_cores") == 2
        for address in cluster.worker_addresses:
            assert total(before, "zdist_worker_cores", worker=address) == 1
            assert ("zdist_worker_heartbeat_age_seconds", (("name", address), ("worker", address))) in before
        handles = pool.map(quiet, range(200))
        wait_for(lambda: total(scrape(url), "zdist_worker_tasks_done_total") >= total(before, "zdist_worker_tasks_done_total") + 200, message="tasks_done rises")
        after = scrape(url)
        assert total(after, "zdist_keys") >= 200
        assert total(after, "zdist_worker_keys") >= 200
        assert total(after, "zdist_worker_bytes", where="memory") > 0 and total(after, "zdist_worker_bytes", where="disk") == 0
        assert total(after, "zdist_worker_restarts_total") == 0
        # A task on each worker whose input is on the other: bytes move between workers.
        inputs = pool.scatter([b"x" * 100_000, b"y" * 100_000], workers=cluster.worker_addresses)
        pool.gather([pool.apply_async(len, (inputs[0],), workers=[cluster.worker_addresses[1]])])
        wait_for(lambda: total(scrape(url), "zdist_worker_fetched_bytes_total") >= 100_000, message="bytes fetched rise")
        with pytest.raises(ValueError):
            pool.apply(fails, (1,))
        wait_for(lambda: total(scrape(url), "zdist_worker_tasks_failed_total") >= 1, message="a failure is counted")
        del handles


# ---------------------------------------------------------------- performance report


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_performance_report_opens_offline_in_headless_chromium(tmp_path):
    from .test_dashboard import CHROMIUM, CHROMIUM_ARGS

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the 'test' extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: run .ci/install-browser (apt-get install chromium) to run the browser test")
    import zdist

    path = tmp_path / "report.html"
    with make_cluster(2) as cluster:
        with zdist.performance_report(path):
            with Pool(cluster) as pool:
                naps = pool.map(nap, [0.05] * 20)
                big = pool.scatter([b"z" * 200_000], workers=cluster.worker_addresses[:1])[0]
                pool.gather([pool.apply_async(len, (big,), workers=cluster.worker_addresses[1:])])
                with pytest.raises(ValueError):
                    pool.apply(fails, (2,))
                del naps
    html = path.read_text()
    assert "<script src" not in html and "<link" not in html and "http://" not in html.replace("http://www.w3.org", "")
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", html, re.S).group(1))
    assert data["summary"]["workers"] == 2 and data["summary"]["tasks"] >= 22 and data["summary"]["failed"] == 1
    assert {g["group"] for g in data["groups"]} >= {"nap", "len", "fails"}
    nap_group = next(g for g in data["groups"] if g["group"] == "nap")
    assert nap_group["count"] == 20 and nap_group["mean"] >= 0.04
    assert sum(t["fetched"] for t in data["transfers"]) >= 200_000
    assert all(len(points) >= 2 for points in data["memory"].values())

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.goto(path.as_uri(), wait_until="load", timeout=30_000)
            page.wait_for_function("() => document.body.dataset.rendered === 'yes'", timeout=30_000)
            assert int(page.get_attribute("#stream", "data-tasks")) == data["summary"]["tasks"]
            assert page.get_attribute("#stream", "data-workers") == "2"
            assert page.get_attribute("#memory", "data-series") == "2"
            assert "nap" in page.inner_text("#groups") and "fails" in page.inner_text("#groups")
            # The task stream is drawn: some pixels of the canvas are coloured.
            painted = page.evaluate(
                "() => { const c = document.getElementById('stream'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] && !(d[i] > 240 && d[i + 1] > 240 && d[i + 2] > 240)) n++; return n; }"
            )
            assert painted > 1000
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert [url for url in requests if not url.startswith("file://")] == []
        finally:
            browser.close()
