"""The Center's web dashboard: its JSON API, the CLI switches, and the page in a real browser."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from zdist import LocalCluster, Pool, rpc
from zdist.center import Center

from .conftest import make_cluster, read_lines_until, wait_for

aiohttp = pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp (pip install '.[dashboard]')")

from zdist.dashboard import Dashboard, serve_dashboard  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def inc(x):
    return x + 1


def gated(item):
    """Wait (bounded) until the gate file exists, then take a moment: a task the test releases."""
    gate, x = item
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.03)
    return x


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.read())


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def stop(process: subprocess.Popen) -> str:
    """Terminate, wait (kill if needed), and return what it wrote on stderr."""
    if process.poll() is None:
        process.terminate()
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return (err or b"").decode(errors="replace")


def test_no_dashboard_unless_asked():
    async def main():
        async with Center() as center:
            return center.info()["dashboard"]

    assert asyncio.run(main()) is None


def test_the_center_does_not_load_its_dashboard():
    """The dashboard is a view that whoever starts a Center adds; the Center never imports it."""
    code = "import sys, zdist, zdist.center, zdist.cluster; print('zdist.dashboard' in sys.modules, 'aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_json_api_of_an_in_process_cluster():
    with make_cluster(2, processes=False, dashboard=True) as cluster:
        url = cluster.dashboard_url
        assert url and url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert cluster.center.info()["dashboard"] == url

        status, content_type, body = get(url)
        assert status == 200 and content_type.startswith("text/html")
        assert b"zdist" in body and b"/static/uPlot.iife.min.js" in body and b"/static/dashboard.js" in body
        for name in ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css"):
            status, _, body = get(url + "static/" + name)
            assert status == 200 and body

        workers = get_json(url + "api/workers")
        assert workers["center"] == cluster.center_address
        assert sorted(w["address"] for w in workers["workers"]) == sorted(cluster.worker_addresses)
        for w in workers["workers"]:
            assert w["ncores"] == 1 and w["name"].startswith("worker-")
            assert {"nkeys", "nbytes", "memory", "executing", "tasks_done", "task_rate", "last_seen", "last_seen_age"} <= set(w)
        assert workers["totals"]["workers"] == 2 and workers["totals"]["ncores"] == 2

        # Rates count from each worker's first heartbeat (which carries its metrics).
        wait_for(lambda: all(w["memory"] is not None for w in get_json(url + "api/workers")["workers"]), message="first heartbeats")
        with Pool(cluster.center_address) as pool:
            results = pool.map(inc, range(40))
            assert pool.gather(results) == list(range(1, 41))

            # Keys and bytes per worker, and the totals.
            keys = wait_for(lambda: (k := get_json(url + "api/keys"))["total"]["nkeys"] >= 40 and k, message="/api/keys counts the results")
            assert set(keys["workers"]) == set(cluster.worker_addresses)
            assert keys["total"]["nkeys_held"] == sum(w["nkeys"] for w in keys["workers"].values())
            assert keys["total"]["nbytes"] == sum(w["nbytes"] for w in keys["workers"].values()) > 0

            # Task rates come from the heartbeats' tasks_done deltas.
            wait_for(lambda: get_json(url + "api/workers")["totals"]["tasks_done"] >= 40, message="heartbeats report tasks_done")
            tasks = wait_for(lambda: (t := get_json(url + "api/tasks?window=60"))["tasks_done_total"] >= 40 and sum(t["done_per_s"]) > 0 and t,
                             message="/api/tasks shows the work done")
            assert len(tasks["times"]) == len(tasks["done_per_s"]) == len(tasks["running"]) >= 1
            assert tasks["times"] == sorted(tasks["times"])

            # The task stream: asking for it turns on the polling of the workers' task logs.
            wanted = {r.key for r in results}

            def streamed():
                stream = get_json(url + "api/task-stream?limit=1000")
                return wanted <= {t["key"] for t in stream["tasks"]} and stream

            stream = wait_for(streamed, message="/api/task-stream lists every task")
            assert stream["polling"] is True
            entry = next(t for t in stream["tasks"] if t["key"] in wanted)
            assert entry["worker"] in cluster.worker_addresses and entry["group"] == "inc" and entry["ok"] is True
            assert entry["stop"] >= entry["start"] and entry["duration"] >= 0
            newer = get_json(url + f"api/task-stream?after={stream['seq']}")
            assert all(t["seq"] > stream["seq"] for t in newer["tasks"])
            with pytest.raises(urllib.error.HTTPError) as info:
                get(url + "api/task-stream?after=x")
            assert info.value.code == 400
    with pytest.raises(OSError):
        get(url + "api/workers")  # stopped with its Center


def test_center_cli_prints_the_dashboard_address():
    process = subprocess.Popen(
        [sys.executable, "-m", "zdist_cli.center", "--port", "0", "--dashboard-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        lines = read_lines_until(process, "Dashboard at")
        assert lines[-2].startswith("Start center at 127.0.0.1:")
        url = lines[-1].split("Dashboard at", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert get_json(url + "api/workers")["workers"] == []
    finally:
        stop(process)


def test_center_cli_without_dashboard():
    process = subprocess.Popen(
        [sys.executable, "-m", "zdist_cli.center", "--port", "0", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        lines = read_lines_until(process, "Start center at")
        assert not any("Dashboard" in line for line in lines)
    finally:
        stop(process)
    assert process.returncode == 0


def test_center_cli_runs_on_without_aiohttp():
    code = "import sys; sys.modules['aiohttp'] = None; from zdist_cli.center import main; sys.exit(main(['--port', '0', '--dashboard-port', '0']))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        lines = read_lines_until(process, "Start center at")
        assert not any("Dashboard" in line for line in lines)
    finally:
        err = stop(process)
    assert "pip install '.[dashboard]'" in err
    assert len([line for line in err.splitlines() if "dashboard" in line]) == 1


def test_missing_aiohttp_is_a_clear_import_error(monkeypatch):
    import zdist.dashboard

    monkeypatch.setattr(zdist.dashboard, "web", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[dashboard\]'"):
        zdist.dashboard.Dashboard(Center().info)
    with pytest.raises(ImportError, match=r"pip install '\.\[dashboard\]'"):
        LocalCluster(n_workers=1, dashboard=True)


def test_busy_dashboard_port_falls_back_to_a_free_one():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]

    async def main():
        async with Center() as center:
            dashboard = await serve_dashboard(center, port=port)
            try:
                assert dashboard.port not in (0, port)
                url = dashboard.url
                assert center.info()["dashboard"] == url
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, get_json, url + "api/keys")
            finally:
                await dashboard.stop()

    try:
        keys = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        busy.close()
    assert keys["total"] == {"nkeys": 0, "nkeys_held": 0, "nbytes": 0}


def test_a_dashboard_can_view_a_center_over_rpc():
    """The dashboard reads only ``info()``: an rpc proxy's ``info`` serves as well as the Center's own."""

    async def main():
        async with Center() as center:
            center.register(address="127.0.0.1:9", ncores=3, name="alice")
            center.add_keys(address="127.0.0.1:9", keys={"x": 8, "y": 4})
            async with rpc(center.address, timeout=10) as proxy:
                dashboard = await Dashboard(proxy.info, port=0).start()
                try:
                    loop = asyncio.get_running_loop()
                    workers = await loop.run_in_executor(None, get_json, dashboard.url + "api/workers")
                    keys = await loop.run_in_executor(None, get_json, dashboard.url + "api/keys")
                finally:
                    await dashboard.stop()
            return center.address, workers, keys

    address, workers, keys = asyncio.run(asyncio.wait_for(main(), 30))
    assert workers["center"] == address
    assert [(w["address"], w["name"], w["ncores"], w["nkeys"], w["nbytes"]) for w in workers["workers"]] == [("127.0.0.1:9", "alice", 3, 2, 12)]
    assert keys["total"] == {"nkeys": 2, "nkeys_held": 2, "nbytes": 12}


# ------------------------------------------------------------------ the page in a browser


def test_dashboard_page_in_headless_chromium(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the 'test' extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: run .ci/install-browser (apt-get install chromium) to run the browser test")

    gate = tmp_path / "go"
    n_tasks = 60
    with make_cluster(2, dashboard=True) as cluster:
        assert cluster.dashboard_url and cluster.dashboard_url.startswith("http://127.0.0.1:")
        pool = Pool(cluster.center_address)
        outcome: dict = {}

        def job():
            try:
                results = pool.map(gated, [(str(gate), i) for i in range(n_tasks)])
                outcome["values"] = pool.gather(results)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                outcome["error"] = exc

        thread = threading.Thread(target=job, name="pool-job", daemon=True)
        thread.start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.goto(cluster.dashboard_url, wait_until="load", timeout=30_000)

                    # The worker table lists every worker.
                    page.wait_for_function("n => document.querySelectorAll('#workers tbody tr[data-address]').length === n", arg=2, timeout=30_000)
                    listed = page.eval_on_selector_all("#workers tbody tr[data-address]", "rows => rows.map(r => r.dataset.address)")
                    assert sorted(listed) == sorted(cluster.worker_addresses)
                    table_text = page.inner_text("#workers")
                    assert all(address in table_text for address in cluster.worker_addresses)

                    # The job is under way but held at the gate: tasks are running, none done.
                    page.wait_for_function("() => Number(document.getElementById('total-executing').dataset.value) > 0", timeout=30_000)
                    done_before = int(float(page.get_attribute("#total-done", "data-value")))
                    assert done_before == 0

                    # Release the tasks: the count of tasks done rises on the live page, up to all of them.
                    gate.touch()
                    page.wait_for_function(
                        "n => Number(document.getElementById('total-done').dataset.value) > n", arg=done_before, timeout=30_000
                    )
                    page.wait_for_function(
                        "n => Number(document.getElementById('total-done').dataset.value) >= n", arg=n_tasks, timeout=60_000
                    )
                    # The task stream shows which worker ran which key.
                    page.wait_for_function("() => document.querySelectorAll('#recent tbody tr:not(.empty)').length > 0", timeout=30_000)
                    recent = page.inner_text("#recent")
                    assert "gated-" in recent
                    assert page.inner_text("#live-text").startswith("live")

                    shot = tmp_path / "dashboard.png"
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.stat().st_size > 10_000
                    if os.environ.get("ZDIST_SCREENSHOT_DIR"):  # to look at it by hand
                        shutil.copy(shot, os.environ["ZDIST_SCREENSHOT_DIR"])
                finally:
                    browser.close()
        finally:
            gate.touch()
            thread.join(60)
            pool.close()
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["values"] == list(range(n_tasks))


# ------------------------------------------------------------------ the truth while a map runs


def nap(seconds):
    time.sleep(seconds)
    return seconds


def fails_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def total(values):
    return sum(values)


def test_activity_api_counts_groups_errors_transfers_and_memory():
    """/api/activity and /api/workers: per group done and erred, bytes moved peer to peer, memory against the limit."""
    with make_cluster(2, processes=False, dashboard=True, memory_limit="2GB") as cluster:
        url = cluster.dashboard_url
        with Pool(cluster.center_address) as pool:
            # map_async, held until every task ended: pool.map would raise at the
            # first failure and drop the handles, and queued tasks of dropped
            # handles may never run (then fewer than 5 would err).
            errors = []
            ended = threading.Event()
            failing = pool.map_async(fails_on_odd, range(10), error_callback=lambda e: (errors.append(e), ended.set()))
            assert ended.wait(60) and isinstance(errors[0], ValueError) and "odd" in str(errors[0])
            # Values on both workers, summed on one: the others' move peer to peer.
            spread = pool.map(inc, range(20))
            assert pool.apply(total, [spread]).get(timeout=60) == sum(range(1, 21))

            def groups():
                answer = get_json(url + "api/activity")
                by_label = {g["label"]: g for g in answer["groups"]}
                ok = by_label.get("fails_on_odd", {}).get("erred") == 5 and by_label.get("inc", {}).get("done") == 20
                return ok and answer["bytes_moved"] > 0 and answer

            activity = wait_for(groups, timeout=30, message=lambda: f"heartbeats carry the groups' counts and the transfers: {get_json(url + 'api/activity')}")
            del failing
        by_label = {g["label"]: g for g in activity["groups"]}
        assert by_label["fails_on_odd"]["done"] == 5 and by_label["fails_on_odd"]["total"] == 10
        assert by_label["inc"]["total"] == 20 and by_label["inc"]["executing"] == by_label["inc"]["queued"] == 0
        moved = activity["transfers"][0]
        assert moved["from"] in cluster.worker_addresses and moved["to"] in cluster.worker_addresses and moved["from"] != moved["to"]
        workers = get_json(url + "api/workers")
        assert workers["totals"]["tasks_failed"] >= 5 and workers["totals"]["bytes_fetched"] > 0
        for w in workers["workers"]:
            assert w["memory_limit"] == 2 * 10**9 and w["bytes_on_disk"] == 0 and w["restarts"] == 0
            assert w["executing"] == 0 and w["queued"] == 0


def test_dashboard_tells_the_truth_during_a_map_of_sleeps(tmp_path):
    """A map of short sleeps on 4 one-core workers: executing never above 4, done rises before the end, one bar for the map."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the 'test' extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: run .ci/install-browser (apt-get install chromium) to run the browser test")

    import random

    rng = random.Random(15)
    durations = [rng.uniform(0.1, 0.3) for _ in range(160)]
    cores = 4
    with Pool(processes=cores, dashboard=True) as pool:
        url = pool.dashboard_link
        assert url and url.startswith("http://127.0.0.1:")
        finished = threading.Event()
        outcome: dict = {}

        def job():
            try:
                outcome["values"] = pool.gather(pool.map(nap, durations))
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc
            finally:
                finished.set()

        read = """() => {
            const v = id => Number(document.getElementById(id).dataset.value);
            const bar = document.querySelector('#groups .group[data-group^="nap-"]');
            return {executing: v('total-executing'), queued: v('total-queued'), done: v('total-done'), rate: v('total-rate'),
                    bar: bar ? [Number(bar.dataset.done), Number(bar.dataset.total)] : null};
        }"""
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                page.goto(url, wait_until="load", timeout=30_000)
                page.wait_for_function("n => document.querySelectorAll('#workers tbody tr[data-address]').length === n", arg=cores, timeout=30_000)
                thread = threading.Thread(target=job, name="map-of-sleeps", daemon=True)
                thread.start()
                samples = []
                deadline = time.monotonic() + 120
                while not finished.is_set() and time.monotonic() < deadline:
                    samples.append(page.evaluate(read))
                    time.sleep(0.25)
                thread.join(60)
                assert "error" not in outcome, outcome.get("error")
                assert outcome["values"] == durations
                # While the map ran: never more executing than cores; done rose in several steps, not all at the end.
                assert samples and max(s["executing"] for s in samples) <= cores, samples
                assert any(s["executing"] > 0 for s in samples), samples
                during = sorted({s["done"] for s in samples if 0 < s["done"] < len(durations)})
                assert len(during) >= 3, samples
                assert any(s["queued"] > 0 for s in samples), samples
                assert any(s["rate"] > 0 for s in samples), samples
                # The map's bar knows its whole from the start, and fills.
                bars = [s["bar"] for s in samples if s["bar"]]
                assert bars and all(total == len(durations) for _, total in bars), bars
                page.wait_for_function(
                    "n => Number(document.getElementById('total-done').dataset.value) >= n && "
                    "Number(document.getElementById('total-executing').dataset.value) === 0", arg=len(durations), timeout=30_000,
                )
                page.screenshot(path=str(tmp_path / "map-of-sleeps.png"), full_page=True)
                if os.environ.get("ZDIST_SCREENSHOT_DIR"):
                    shutil.copy(tmp_path / "map-of-sleeps.png", os.environ["ZDIST_SCREENSHOT_DIR"])
            finally:
                browser.close()
                finished.wait(60)


def test_a_dashboard_beyond_loopback_asks_for_its_token():
    """Served beyond loopback it wants the token printed at start-up; token=True asks for it on loopback (all this test may use)."""
    import http.cookiejar

    from zdist.dashboard import needs_token

    assert needs_token("0.0.0.0") and needs_token("10.1.2.3") and not needs_token("127.0.0.1")

    async def main():
        async with Center() as center:
            dashboard = await Dashboard(center.info, token=True).start()
            try:
                assert Dashboard(center.info).token is None  # loopback: no token unless asked
                url = dashboard.url
                base, token = url.split("?token=")
                assert token == dashboard.token and len(token) >= 24

                def probe():
                    codes = {}
                    for name, target in (("plain", base + "api/workers"), ("wrong", base + "api/workers?token=x" + token)):
                        try:
                            codes[name] = urllib.request.urlopen(target, timeout=10).status
                        except urllib.error.HTTPError as exc:
                            codes[name] = exc.code
                            codes[name + "_text"] = exc.read().decode()
                    header = urllib.request.Request(base + "api/workers", headers={"Authorization": f"token {token}"})
                    codes["header"] = urllib.request.urlopen(header, timeout=10).status
                    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
                    codes["with_token"] = browser.open(url, timeout=10).status
                    codes["cookie"] = browser.open(base + "api/activity", timeout=10).status  # the page's own requests
                    return codes

                return await asyncio.get_running_loop().run_in_executor(None, probe)
            finally:
                await dashboard.stop()

    codes = asyncio.run(asyncio.wait_for(main(), 60))
    assert codes["plain"] == codes["wrong"] == 403
    assert "token" in codes["plain_text"]
    assert codes["header"] == codes["with_token"] == codes["cookie"] == 200


def test_nanny_restarts_show_per_worker():
    """A worker killed under its nanny comes back; the dashboard counts the restart against it."""
    with make_cluster(1, nanny=True, dashboard=True) as cluster:
        url = cluster.dashboard_url
        wait_for(lambda: len(get_json(url + "api/workers")["workers"]) == 1, timeout=30, message="the worker registered")
        cluster.kill_worker(cluster.worker_addresses[0])

        def restarted():
            workers = get_json(url + "api/workers")["workers"]
            return len(workers) == 1 and workers[0]["restarts"] == 1 and workers

        (worker,) = wait_for(restarted, timeout=60, message="the nanny's new worker, with restarts=1")
        assert get_json(url + "api/workers")["totals"]["restarts"] == 1
