"""What a worker tells the Center about its tasks: per group, how many wait, run and finished.

A worker knows when each of its tasks starts and ends; the Center (and its
dashboard) only hears what the heartbeat carries. :class:`TaskProgress`
keeps, per **task group** (the tasks of one ``pool.map``, one layer of one
dask graph: see :func:`group_of`), four numbers: tasks queued on the worker,
executing now, done and erred. A heartbeat carries the groups that changed
since the last one (:meth:`TaskProgress.report`), a few numbers each, never a
key or a value: the Center stays free of user data and cheap per heartbeat.

Tasks run in batches, one thread-pool job per core, and a job's results come
back to the event loop only when the whole job ends. So that "done" rises as
tasks finish, not in steps of a job, a job fills a list the tracker can read
while it runs (``results``, appended to by the job's thread, one entry per
finished task): the tracker counts the entries that appeared since it last
looked, and the list's ``started`` says whether a thread took the job (:class:`JobResults`).

>>> progress = TaskProgress()
>>> results = []
>>> token = progress.started(['inc-1a2b3c4d-0', 'inc-1a2b3c4d-1'], results)
>>> results.append((True, 1, 28, 0.0, 0.1))   # the job's thread finished one task, runs the next
>>> progress.report()['groups']
{'inc-1a2b3c4d': [0, 1, 1, 0]}
>>> progress.finished(token, [*results, (False, ValueError(), '', 0.1, 0.2)])
>>> progress.report()['groups']
{'inc-1a2b3c4d': [0, 0, 1, 1]}
>>> progress.report()['groups']   # nothing changed since
{}
"""
from __future__ import annotations

import time
from typing import Any, Sequence

try:
    from dask.utils import key_split
except ImportError:  # pragma: no cover - dask is a dependency
    def key_split(key: Any) -> str:  # type: ignore[misc]
        return str(key).split("-", 1)[0]

#: Groups a worker keeps counts of; the oldest with nothing in flight go first.
MAX_GROUPS = 200
#: Group names of string keys remembered (a key prefix → its group).
_CACHE_SIZE = 4096
_cache: dict[str, str] = {}


def group_of(key: Any) -> str:
    """The task group of a key: what its tasks have in common, without the task's own part.

    A Pool key ``NAME-TOKEN-N`` (N counts the pool's tasks) is in group
    ``NAME-TOKEN``; a dask key ``(NAME-TOKEN, i, j)`` in ``NAME-TOKEN`` (one
    layer of one graph); another string key in its :func:`dask.utils.key_split`.

    >>> group_of('sleep-1a2b3c4d-17'), group_of(('sum-aggregate-9f8e', 0, 1)), group_of('inc-0f3bc2a9e1d44f7b')
    ('sleep-1a2b3c4d', 'sum-aggregate-9f8e', 'inc')
    """
    if type(key) is str:
        head, _, tail = key.rpartition("-")
        if head and tail.isdigit():
            return head
        group = _cache.get(key)
        if group is None:
            group = key_split(key)
            if len(_cache) >= _CACHE_SIZE:
                _cache.clear()
            _cache[key] = group
        return group
    if type(key) is tuple and key:
        return key[0] if type(key[0]) is str else group_of(key[0])
    if isinstance(key, bytes):
        return group_of(key.decode(errors="replace"))
    return type(key).__name__


def _runs(keys: Sequence) -> list:
    """``[[group, end], ...]``: the groups of ``keys`` as runs (``end`` the index past each run's last key).

    A batch is mostly one group: one :func:`group_of` per run, and a
    ``startswith`` per key of a Pool's, instead of a group per key.

    >>> _runs(['f-ab-0', 'f-ab-1', ('g-1', 0), ('g-1', 1), 'f-ab-2'])
    [['f-ab', 2], ['g-1', 4], ['f-ab', 5]]
    """
    runs: list = []
    prefix = None  # 'NAME-TOKEN-' of the current run of Pool keys
    group = None
    for index, key in enumerate(keys):
        if prefix is not None and type(key) is str and key.startswith(prefix):
            continue  # same run: the Pool's counter after the prefix
        this = group_of(key)
        if this != group:
            if group is not None:
                runs[-1][1] = index
            runs.append([this, index])
            group = this
        prefix = this + "-" if type(key) is str and key[len(this):len(this) + 1] == "-" and key[len(this) + 1:].isdigit() else None
    if runs:
        runs[-1][1] = len(keys)
    return runs


class JobResults(list):
    """A job's results, appended as its tasks end; ``started`` once a thread took the job."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        super().__init__()
        self.started = False


class _Tasks:
    """Tasks handed out together: their groups as runs, and how many of them were counted as finished."""

    __slots__ = ("runs", "n", "results", "job", "counted", "awaited")

    def __init__(self, runs: list, n: int, results: list | None, job: Any, awaited: bool):
        self.runs = runs
        self.n = n
        self.results = results  # filled by the job as its tasks finish; None when only the end is known
        self.job = job  # a concurrent.futures.Future: running() once a thread took it
        self.counted = 0
        self.awaited = awaited  # coroutines on the loop: all of them run at once


class TaskProgress:
    """Per task group: ``[queued, executing, done, erred]`` on this worker.

    ``queued`` and ``executing`` are what is in flight now; ``done`` and
    ``erred`` count since the worker started. :meth:`started` when tasks
    are handed to the thread pool or the loop, :meth:`finished` when their
    results are back; :meth:`report` for the heartbeat.
    """

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # group → [in flight, done, erred]
        self.changed: set[str] = set()
        self.touched: dict[str, float] = {}  # group → when it last changed
        self.inflight: dict[int, _Tasks] = {}
        self._next = 0
        self.done = 0
        self.erred = 0

    def _count(self, group: str, column: int, n: int = 1) -> None:
        counts = self.counts.get(group)
        if counts is None:
            counts = self.counts[group] = [0, 0, 0]
            if len(self.counts) > MAX_GROUPS:
                self._forget_old()
        counts[column] += n
        self.changed.add(group)

    def started(self, keys: Sequence, results: list | None = None, job: Any = None, awaited: bool = False) -> int:
        """Tasks with these keys were handed out; a token for :meth:`finished`."""
        runs = _runs(keys)
        begin = 0
        for group, end in runs:
            self._count(group, 0, end - begin)
            begin = end
        token = self._next
        self._next += 1
        self.inflight[token] = _Tasks(runs, len(keys), results, job, awaited)
        return token

    def failed(self, keys: Sequence) -> None:
        """Tasks that erred without running (inputs lost, session closed)."""
        for key in keys:
            self._count(group_of(key), 2)
            self.erred += 1

    def _harvest(self, tasks: _Tasks, results: Sequence, end: int | None = None) -> None:
        """Count the results that appeared since the last look (up to ``end``: the rest had none)."""
        start = tasks.counted
        if end is None:
            end = min(len(results), tasks.n)
        if end <= start:
            return
        begin = 0
        for group, run_end in tasks.runs:
            a, b = max(begin, start), min(run_end, end)
            begin = run_end
            if a >= b:
                continue
            n = b - a
            failed = [r[0] for r in results[a:b]].count(False) if b <= len(results) else n
            counts = self.counts.get(group)
            if counts is not None:  # else forgotten meanwhile (very old)
                counts[0] -= n
                counts[1] += n - failed
                counts[2] += failed
                self.changed.add(group)
            self.done += n - failed
            self.erred += failed
        tasks.counted = end

    def finished(self, token: int, results: Sequence) -> None:
        """The tasks of ``token`` are back, with these results (one per task, ``ok`` first)."""
        tasks = self.inflight.pop(token, None)
        if tasks is None:
            return
        self._harvest(tasks, results)
        if tasks.counted < tasks.n:  # no result at all (the worker is stopping): no longer in flight
            begin = 0
            for group, run_end in tasks.runs:
                n = min(run_end, tasks.n) - max(begin, tasks.counted)
                begin = run_end
                counts = self.counts.get(group)
                if n > 0 and counts is not None:
                    counts[0] -= n
                    self.changed.add(group)

    def snapshot(self) -> tuple[dict[str, list[int]], int, int]:
        """Count what finished so far; ``({group: [queued, executing, done, erred]}, executing, queued)`` of every group."""
        executing: dict[str, int] = {}
        for tasks in self.inflight.values():
            if tasks.results is not None:
                self._harvest(tasks, tasks.results)
            if tasks.counted >= tasks.n:
                continue
            if tasks.awaited:  # coroutines: all not finished are running
                begin = 0
                for group, run_end in tasks.runs:
                    n = run_end - max(begin, tasks.counted)
                    begin = run_end
                    if n > 0:
                        executing[group] = executing.get(group, 0) + n
            elif getattr(tasks.results, "started", True):
                # A job runs its tasks one after the other: the first not finished is running.
                group = next(group for group, run_end in tasks.runs if run_end > tasks.counted)
                executing[group] = executing.get(group, 0) + 1
        table = {}
        for group, (inflight, done, erred) in self.counts.items():
            running = executing.get(group, 0)
            table[group] = [inflight - running, running, done, erred]
        total_executing = sum(executing.values())
        total_queued = sum(row[0] for row in table.values())
        for group in executing:
            self.changed.add(group)
        return table, total_executing, total_queued

    def report(self) -> dict:
        """For a heartbeat: totals, and the groups that changed since the last report."""
        table, executing, queued = self.snapshot()
        now = time.time()
        groups = {}
        for group in self.changed:
            row = table.get(group)
            if row is not None:
                groups[group] = row
                self.touched[group] = now
        self.changed = {group for group, row in table.items() if row[1]}  # executing ones are sent again: they end
        return {"executing": executing, "queued": queued, "done": self.done, "erred": self.erred, "groups": groups}

    def _forget_old(self) -> None:
        """Drop the groups that changed longest ago and have nothing in flight."""
        idle = sorted((self.touched.get(g, 0.0), g) for g, counts in self.counts.items() if counts[0] == 0)
        for _, group in idle[: max(1, len(self.counts) - MAX_GROUPS // 2)]:
            del self.counts[group]
            self.touched.pop(group, None)
            self.changed.discard(group)


#: Groups the Center keeps (over all workers); those that changed longest ago go first.
CENTER_GROUPS = 1000


class ClusterActivity:
    """The Center's side: the latest task-group rows and transfer counters each worker sent.

    Fed by heartbeats (:meth:`note`), read by the dashboard (:meth:`summary`);
    numbers and group names only. O(groups in one heartbeat) per heartbeat.

    >>> activity = ClusterActivity()
    >>> activity.note('w1', {'inc-ab12cd34': [2, 1, 5, 0]}, {'w2': 800})
    >>> activity.note('w2', {'inc-ab12cd34': [0, 1, 3, 1]}, None)
    >>> activity.summary()['groups']['inc-ab12cd34']
    {'queued': 2, 'executing': 2, 'done': 8, 'erred': 1, 'waiting': 0, 'total': 13, 'workers': 2}
    >>> activity.note_submitted('session-1', {'inc-ab12cd34': 20})   # the client sent 20 in all
    >>> activity.summary()['groups']['inc-ab12cd34']['waiting']
    7
    >>> activity.summary()['transfers']
    [{'from': 'w2', 'to': 'w1', 'bytes': 800}]
    """

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, list]] = {}  # worker → group → [queued, executing, done, erred]
        self.touched: dict[str, float] = {}  # group → when a heartbeat last changed it
        self.transfers: dict[str, dict[str, int]] = {}  # worker → peer it fetched from → bytes
        self.submitted: dict[str, dict[str, int]] = {}  # client session → group → tasks it submitted

    def note(self, worker: str, groups: Any, transfers: Any) -> None:
        """What one heartbeat said; malformed parts are ignored (a peer's mistake, not the Center's)."""
        now = time.time()
        if isinstance(groups, dict):
            table = self.groups.setdefault(worker, {})
            for group, row in groups.items():
                if isinstance(group, str) and isinstance(row, (list, tuple)) and len(row) == 4 and all(type(n) is int for n in row):
                    table[group] = list(row)
                    self.touched[group] = now
            if len(self.touched) > CENTER_GROUPS:
                self._forget_old()
        if isinstance(transfers, dict):
            moved = self.transfers.setdefault(worker, {})
            for peer, n in transfers.items():
                if isinstance(peer, str) and type(n) is int:
                    moved[peer] = n

    def note_submitted(self, session: str, groups: Any) -> None:
        """A client session's count of tasks submitted per group: the whole of a progress bar."""
        if not isinstance(groups, dict):
            return
        now = time.time()
        table = self.submitted.setdefault(session, {})
        for group, n in groups.items():
            if isinstance(group, str) and type(n) is int and n >= 0:
                table[group] = n
                self.touched[group] = now
        if len(self.touched) > CENTER_GROUPS:
            self._forget_old()

    def remove_session(self, session: str) -> None:
        self.submitted.pop(session, None)

    def remove(self, worker: str) -> None:
        self.groups.pop(worker, None)
        self.transfers.pop(worker, None)

    def _forget_old(self) -> None:
        for _, group in sorted((t, g) for g, t in self.touched.items())[: len(self.touched) - CENTER_GROUPS // 2]:
            del self.touched[group]
            for table in (*self.groups.values(), *self.submitted.values()):
                table.pop(group, None)

    def summary(self, limit: int = 50) -> dict:
        """The ``limit`` groups changed last, summed over workers; transfers as (from, to, bytes)."""
        recent = sorted(self.touched, key=self.touched.__getitem__, reverse=True)[:limit]
        groups = {}
        for group in recent:
            queued = executing = done = erred = workers = 0
            for table in self.groups.values():
                row = table.get(group)
                if row is not None:
                    queued, executing, done, erred = queued + row[0], executing + row[1], done + row[2], erred + row[3]
                    workers += 1
            seen = queued + executing + done + erred
            submitted = sum(table.get(group, 0) for table in self.submitted.values())
            # Tasks a client holds back (not yet sent to a worker) count only in what it submitted.
            total = max(seen, submitted)
            groups[group] = {"queued": queued, "executing": executing, "done": done, "erred": erred, "waiting": total - seen, "total": total, "workers": workers}
        transfers = [{"from": peer, "to": worker, "bytes": n} for worker, moved in self.transfers.items() for peer, n in moved.items() if n]
        transfers.sort(key=lambda t: -t["bytes"])
        return {"groups": groups, "touched": {g: self.touched[g] for g in recent}, "transfers": transfers}
