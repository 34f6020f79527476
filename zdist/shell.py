"""What every client shell shares: feed the scheduling core events, carry out its commands with rpc.

A :class:`Shell` lives on the client loop (:func:`zdist.session.client_loop`)
and owns one :class:`~zdist.scheduling.Scheduler`. Replies from workers and
the Center's news become events; the core's commands become messages.
Subclasses (the Pool's, ``zdist.dask.get``'s) say how a task travels
(:meth:`Shell.wire`) and what to do when tasks finish, fail or arrive.

Only the loop thread calls :meth:`Shell.feed`: calling threads :meth:`post`
events to it, so the core's state has one writer.
"""
from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from .output import show_output
from .rpc import rebuild_exception
from .scheduling import Scheduler, events
from .scheduling.gcpause import gc_paused
from .session import Session

logger = logging.getLogger(__name__)

#: News from other threads (handles dropped, tasks they sent) reaches the core within this.
MAIL_DELAY = 0.02
#: Tasks the loop takes from the mail in one turn: a map of a million items is
#: fed in parts, so that the session's heartbeat (the same loop) goes on meanwhile.
MAIL_TASKS_PER_TURN = 50_000


class Shell:
    """Carries out one :class:`Scheduler`'s commands for one client of the :class:`Session`."""

    #: Sent with every batch: the worker may run the tasks on its event loop.
    inline = False
    #: Sent with every batch: what the tasks print comes back, and is printed here (:mod:`zdist.output`).
    forward_output = False

    def __init__(self, core: Scheduler, session: Session):
        self.core = core
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self._queue: list = []
        self._feeding = False
        self._mail: list = []
        self._mail_scheduled = False
        self._urgent = False
        self._held: list = []  # mail taken but not fed yet (over MAIL_TASKS_PER_TURN): the loop's alone
        self._workers_fed = float("-inf")  # when the core last saw the Center's table
        self._who_has_wanted: list = []  # keys to ask the Center about, in one request
        self._background: set = set()
        self._commands = {
            events.SendBatch: self._send_batch, events.Delete: self._delete, events.DeleteEverywhere: self._delete_everywhere,
            events.Fetch: self._fetch, events.Finished: self._on_finished, events.Delivered: self._on_delivered,
            events.Erred: self._on_erred, events.AskWhoHas: self._ask_who_has, events.PollCenter: self._poll_center,
        }
        session.subscribers.add(self)

    # ------------------------------------------------------------------ events in

    def feed(self, *evs: Any) -> None:
        """Hand events to the core and carry out its commands (loop thread only; re-entrant calls queue)."""
        self._queue.extend(evs)
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    with gc_paused():  # the core makes and drops task states in bulk, without cycles
                        commands = self.core.handle(*batch, now=self.loop.time())
                except Exception as exc:  # noqa: BLE001 - a broken invariant: stop this client, loudly
                    logger.exception("the scheduling core failed")
                    self.on_fatal(exc)
                    return
                for command in commands:
                    self._commands[type(command)](command)
            self.after_feed()
        finally:
            self._feeding = False

    def post(self, event: Any, urgent: bool = False) -> None:
        """Have the loop feed ``event``, in order with earlier posts: at once if urgent, else within :data:`MAIL_DELAY`.

        For news that is not urgent (a handle dropped, a task sent by a
        calling thread): waking the loop thread for each costs more than a
        trivial task, and takes the GIL from the thread busy with the next
        one. ``list.append`` is atomic; the loop takes the whole list.
        """
        self._mail.append(event)
        if urgent and not self._urgent:
            self._urgent = True
            self.loop.call_soon_threadsafe(self._read_mail)
        elif not self._mail_scheduled:
            self._mail_scheduled = True
            self.loop.call_soon_threadsafe(self.loop.call_later, MAIL_DELAY, self._read_mail)

    def _read_mail(self) -> None:
        self._mail_scheduled = self._urgent = False
        mail, self._mail = self._mail, []
        if self._held:
            mail, self._held = self._held + mail, []
        if not mail or self.closed:
            return
        taken, size = 0, 0
        for event in mail:  # in order; at least one event a turn, however big
            size += len(getattr(event, "tasks", ())) or 1
            taken += 1
            if size >= MAIL_TASKS_PER_TURN:
                break
        if taken < len(mail):
            self._held = mail[taken:]
            self.loop.call_soon(self._read_mail)
        self.feed(*mail[:taken])

    def on_workers(self, info: dict) -> bool:
        """The Center's news: hand the table to the core if it changed or the core waits for a look; True if handed."""
        if self.closed:
            return False
        core = self.core
        # Nothing changed: the core needs the table only for tasks waiting for
        # a look, lost values it looks for, or once after a grace period ends (workers still missing are
        # then taken for gone). Otherwise a look costs O(1) here, not O(workers).
        if not info.get("changed", True) and not core.deferred and not core.lost_deadlines and core.grace_until < self._workers_fed:
            return False
        self._workers_fed = self.loop.time()
        self.feed(events.WorkersSeen(info["workers"], info.get("id"), info.get("heartbeat_timeout", 5.0)))
        return True

    def on_center_silent(self, seconds: float, error: BaseException) -> None:
        """The Center has not answered for ``seconds``; subclasses give up after their timeout."""

    # ------------------------------------------------------------------ commands out

    def wire(self, tasks: list) -> list:
        """The ``compute_batch`` entries ``[key, function, args, kwargs, dep_keys]`` for ``tasks``."""
        raise NotImplementedError

    def _send_batch(self, command: events.SendBatch) -> None:
        args = {"tasks": self.wire(command.tasks), "return_values": command.return_limit, "session": self.session.id}
        if self.inline:
            args["inline"] = True
        if self.forward_output:
            args["output"] = True
        if command.who_has:
            args["who_has"] = command.who_has  # the worker fetches inputs without asking the Center
        try:
            future = self.session.connections.get(command.worker).request("compute_batch", args, timeout=None)
        except Exception as exc:  # noqa: BLE001 - e.g. a function that cannot be pickled: its tasks fail with it
            self.feed(events.BatchFailed(command.worker, command.batch_id, exc))
            return
        future.add_done_callback(partial(self._batch_replied, command.worker, command.batch_id))

    def _batch_replied(self, worker: str, batch_id: int, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.feed(events.BatchFailed(worker, batch_id, error))
            return
        replies = future.result()
        warned = self.take_notes(replies)
        if warned is not None:
            self.on_warnings(warned["worker"], warned["warnings"])
        for reply in replies:
            if reply[1] != "ok":
                reply[2] = rebuild_exception(reply[2], worker)
        self.feed(events.BatchDone(worker, batch_id, replies))

    def _delete(self, command: events.Delete) -> None:
        self.session.outbox.delete(command.worker, command.keys, command.nbytes)

    def _delete_everywhere(self, command: events.DeleteEverywhere) -> None:
        self.spawn(self._delete_all_copies(command.keys))

    async def _delete_all_copies(self, keys: list) -> None:
        center = self.session.center
        try:
            await center.request("set_replicas", {"keys": {key: 1 for key in keys}}, timeout=10)
            who_has = await center.request("who_has", {"keys": keys}, timeout=10)
        except Exception as exc:  # noqa: BLE001
            logger.info("could not delete every copy of %d keys: %s", len(keys), exc)
            return
        for key, workers in who_has.items():
            for worker in workers:
                self.session.outbox.delete(worker, [key])

    def _fetch(self, command: events.Fetch) -> None:
        future = self.session.connections.get(command.worker).request("get_data", {"keys": command.keys}, timeout=None)
        future.add_done_callback(partial(self._fetched, command.worker, command.keys))

    def _fetched(self, worker: str, keys: list, future: asyncio.Future) -> None:
        if future.cancelled() or self.closed:
            return
        error = future.exception()
        if error is not None:
            self.feed(events.FetchFailed(worker, keys, error))
        else:
            self.feed(events.Fetched(worker, future.result()))

    def _ask_who_has(self, command: events.AskWhoHas) -> None:
        # The core asks key by key (each lost value on its own); the Center is
        # asked once for every key asked for in this turn of the loop.
        first = not self._who_has_wanted
        self._who_has_wanted.extend(command.keys)
        if first:
            self.spawn(self._ask_center_who_has())

    async def _ask_center_who_has(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's questions join the batch
        keys, self._who_has_wanted = list(dict.fromkeys(self._who_has_wanted)), []
        try:
            holders = await self.session.center.request("who_has", {"keys": keys}, timeout=10)
        except Exception as exc:  # noqa: BLE001 - as if nobody held them
            logger.info("could not ask the Center who holds %d keys: %s", len(keys), exc)
            holders = {}
        self.feed(events.HoldersFound({key: list(holders.get(key, ())) for key in keys}))

    def _poll_center(self, command: events.PollCenter) -> None:
        self.session.poll_now()

    def take_notes(self, replies: list) -> dict | None:
        """Take the entries after the tasks' own from a batch's replies: print what the tasks printed; return what they warned.

        Not the core's business: the core sees one reply per task.
        """
        warned = None
        while replies and replies[-1][0] is None:
            _, kind, note = replies.pop()
            if kind == "output":
                self.show_output(note)
            elif kind == "warnings":
                warned = note
        return warned

    def on_warnings(self, worker: str, warned: dict) -> None:
        """Tasks raised warnings on ``worker`` (``{key: [[category, message, filename, lineno], ...]}``): subclasses raise them again where the results are taken."""

    def show_output(self, forwarded: dict) -> None:
        """Print what a batch's tasks printed on their worker, each line prefixed ``[worker key]``."""
        try:
            show_output(forwarded["worker"], forwarded["output"], self.output_name)
        except Exception:  # noqa: BLE001 - a closed stdout must not stop the client
            logger.debug("could not show forwarded output", exc_info=True)

    def output_name(self, key: Any) -> Any:
        """How forwarded output names the task of ``key`` (the dask key for ``zdist.dask.get``)."""
        return key

    # ------------------------------------------------------------------ for subclasses

    def _on_finished(self, command: events.Finished) -> None:
        pass

    def _on_delivered(self, command: events.Delivered) -> None:
        pass

    def _on_erred(self, command: events.Erred) -> None:
        pass

    def after_feed(self) -> None:
        """Called once the commands of a step are carried out (e.g. to wake waiting threads once)."""

    def on_fatal(self, error: BaseException) -> None:
        """This client cannot go on (its core failed, or the Center closed its session)."""

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Delete what this client has on the cluster; stop listening to the Center."""
        if self.closed:
            return
        self._read_mail()
        if not self.core.closing:
            self.feed(events.Close())
        self.closed = True
        self.session.subscribers.discard(self)
        if wait:
            running = [f for f in self._background if not f.done()]
            if running:
                await asyncio.wait(running, timeout=timeout)
            await self.session.outbox.flush_and_wait(timeout)
        else:
            self.session.outbox.flush()
        await self.session.before_release()
        self.session.release()
