"""The manager: routes clients' tasks to workers, within the credit each worker grants.

Workers dial in and register; each then says with a :class:`~argon.protocol.Credit` how
many of the manager's tasks it will hold (its window) and how many of those start at once
(its processes); the rest wait in the worker, its prefetch. A task goes to the worker with
the most idle processes, and into a worker's prefetch only when no process is idle
anywhere (see :mod:`argon.flow`). When none has room, tasks wait in a FIFO queue, bounded
by ``queue_size``: beyond it they are rejected at once and the client retries them later.

No task waits behind a running one while a process is idle elsewhere: when the queue is
empty, a process is idle and some worker holds tasks it has not started, the manager asks
for them back (:class:`~argon.protocol.Reclaim`), once per turn of its event loop for all
the processes idle by then. The worker hands back only tasks that have not started, and
they never run there (:class:`~argon.protocol.Handback`); they go back to the front of
the queue. A draining worker hands back what it has not started too.

A worker whose connection closes, or that misses its heartbeats, is dropped at once;
the tasks it held go back to the front of the queue (each task is sent at most
``MAX_ATTEMPTS`` times, then fails with ``WorkerLost``; tasks handed back do not count).

While no worker takes tasks for ``worker_wait`` seconds, queued and new tasks fail with
``NoWorkers`` instead of waiting for ever.

The manager never deserializes task code or arguments: it forwards opaque bytes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent

from argon import defaults
from argon.connection import Connection
from argon.errors import ConnectionLost, MessageTooLarge, NoWorkers, ProtocolError, TaskCancelled, WorkerLost
from argon.flow import Routes
from argon.history import Recorder
from argon.protocol import (
    Bye,
    Cancel,
    Credit,
    Failure,
    Handback,
    Message,
    NotCancelled,
    Reclaim,
    Register,
    Result,
    Stats,
    Task,
)
from argon.server import ClientLink, Histogram, Server, ServerConfig
from argon.states import WorkerState
from argon.worker_link import Ticket, WorkerLink

log = logging.getLogger(__name__)


class Manager(Server):
    """Routes tasks from clients to registered workers; see the module docstring.

    Args:
        config: Its settings.
        clock: Where it reads the time (``time.monotonic``; tests pass their own).
        latency: Where each task's latency is recorded, if anywhere (``--metrics-port``).
    """

    role = "manager"

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        latency: Histogram | None = None,
    ) -> None:
        super().__init__(config or ServerConfig(), clock=clock, latency=latency)
        self.completed = 0
        self.failed = 0
        self.redelivered = 0
        self.handed_back = 0
        self._workers: dict[str, WorkerLink] = {}
        self._routes: Routes[WorkerLink] = Routes()
        self._pending: deque[Ticket] = deque()
        self._reclaiming = 0  # tasks asked back from all workers and not answered yet
        self._reclaim_due = False  # a _reclaim is scheduled (see _pump)
        self._next_id = 0
        # Since when no registered worker takes tasks (None: one does); see fail_unserved.
        self._unserved_since: float | None = self.clock()
        self._waiting: gevent.Greenlet | None = None
        self.recorder = Recorder(clock=self.clock)  # task times and departures, for the dashboard

    # -- connections --------------------------------------------------------------------

    def handle(self, conn: Connection) -> None:
        """Serve a client or a worker, by the role it announced."""
        assert conn.hello is not None
        if conn.hello.role == "client":
            self.serve_client(conn)
        elif conn.hello.role == "worker":
            link = WorkerLink(conn)
            reason = conn.serve(functools.partial(self.worker_message, link))
            self.drop_worker(link, reason)
        else:
            log.warning("refusing %s: unexpected role %r", conn.peer, conn.hello.role)

    def worker_message(self, link: WorkerLink, msg: Message) -> None:
        """Handle one message from a worker (its connection calls this for each).

        Raises:
            ProtocolError: The worker sent something it may not (its connection closes).
        """
        if isinstance(msg, Register):
            self._register(link, msg)
            return
        if link.state is WorkerState.CONNECTED:
            raise ProtocolError(f"{type(msg).__name__} before Register from worker {link.conn.peer}")
        if isinstance(msg, (Result, Failure)):
            self._reply(link, msg)
        elif isinstance(msg, Credit):
            link.credit(msg)
            self._routes.update(link)
            self._pump()
        elif isinstance(msg, Handback):
            self._handback(link, msg)
        elif isinstance(msg, NotCancelled):
            ticket = link.inflight.get(msg.id)
            if ticket is not None and ticket.cancelling:
                self._cancelled(ticket, dropped=False)
        elif isinstance(msg, Stats):
            link.report(msg)
        elif isinstance(msg, Bye):
            if link.state is WorkerState.ACTIVE:
                self._draining(link, msg.reason)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from worker {link.conn.peer}")

    def _register(self, link: WorkerLink, reg: Register) -> None:
        old = self._workers.get(reg.id)
        link.register(reg)
        if old is not None:
            old.conn.close("worker registered again on a new connection")
            self.drop_worker(old, "replaced by a new connection")
        self._workers[link.id] = link
        self._routes.update(link)
        log.info(
            "worker %s registered from %s with %d processes (%d free)", link.id, link.conn.peer, reg.capacity, reg.free
        )
        self._workers_changed()
        self._pump()

    def _draining(self, link: WorkerLink, reason: str) -> None:
        """The worker said goodbye: route it nothing more, and tell it so."""
        log.info("worker %s is draining: %s", link.id, reason)
        link.move(WorkerState.DRAINING)
        self._routes.update(link)
        self._workers_changed()
        # Everything routed to it before this goodbye is ahead of it on the link: once the
        # worker reads this, it knows no further task can come (it hands back any that did).
        with contextlib.suppress(ConnectionLost):
            link.conn.send(Bye(f"manager {self.name} routes nothing more to worker {link.id}"))

    def drop_worker(self, link: WorkerLink, reason: str) -> None:
        """Forget a worker whose link ended; the tasks it held go back to the queue."""
        if link.state is WorkerState.GONE:
            return
        registered, drained = link.state is not WorkerState.CONNECTED, link.state is WorkerState.DRAINING
        link.move(WorkerState.GONE)
        self._routes.update(link)
        self._reclaiming -= link.reclaiming
        link.reclaiming = 0
        if self._workers.get(link.id) is link:
            del self._workers[link.id]
        if not registered:
            return
        self._workers_changed()
        tickets = list(link.inflight.values())
        link.inflight.clear()
        self.recorder.departed(link.row().as_dict(), lost=bool(tickets) or not (drained or self.stopping))
        if drained and not tickets:
            log.info("worker %s (%s) left after draining", link.id, link.conn.peer)
        elif self.stopping and not tickets:  # this manager is closing its links: nothing lost
            log.info("worker %s (%s) disconnected: %s", link.id, link.conn.peer, reason)
        else:
            log.warning(
                "worker %s (%s) lost: %s; %d tasks it held to redeliver", link.id, link.conn.peer, reason, len(tickets)
            )
        # A worker starts tasks (almost always) in the order they were sent, at most `capacity`
        # at a time, and the answered ones are gone from `inflight`: those after the first
        # `capacity` were still waiting in its prefetch. They never ran, so this send does not
        # count. (A short task pipelined behind a running one can start before an older one
        # waiting behind another process: then one send that did run goes uncounted.)
        for ticket in tickets[link.capacity :]:
            ticket.attempts -= 1
            if ticket.cancelling:
                self._cancelled(ticket, dropped=True)
        for ticket in reversed(tickets):
            if ticket.cancelling:  # it may have started there: it runs again elsewhere
                self._cancelled(ticket, dropped=False)
            if not ticket.wanted():
                continue
            if ticket.attempts >= defaults.MAX_ATTEMPTS:
                self.failed += 1
                ticket.client.reply(
                    Failure(
                        ticket.task.id,
                        WorkerLost.__name__,
                        f"the worker running the task was lost {ticket.attempts} times"
                        f" (last: {link.id} at {link.conn.peer}: {reason})",
                    )
                )
            else:
                ticket.worker = None
                self._pending.appendleft(ticket)
                self.redelivered += 1
        self._pump()

    # -- routing ------------------------------------------------------------------------

    def _workers_changed(self) -> None:
        """Note when the manager is left without a worker that takes tasks (for ``--worker-wait``)."""
        if any(link.state is WorkerState.ACTIVE for link in self._workers.values()):
            self._unserved_since = None
        elif self._unserved_since is None:
            self._unserved_since = self.clock()
            self._arm_worker_wait()

    def _arm_worker_wait(self) -> None:
        """Make sure queued tasks are failed once ``--worker-wait`` passes without a worker."""
        if self._unserved_since is not None and self._pending and self._waiting is None:
            left = self._unserved_since + self.config.worker_wait - self.clock()
            self._waiting = gevent.spawn_later(max(0.0, left), self.fail_unserved)

    def fail_unserved(self, now: float | None = None) -> int:
        """Fail every queued task with ``NoWorkers`` if no worker has taken tasks for ``--worker-wait``.

        Args:
            now: The time by :attr:`clock` (for tests; default: now).

        Returns:
            How many tasks failed.
        """
        self._waiting = None
        since = self._unserved_since
        if since is None:
            return 0
        now = self.clock() if now is None else now
        if now - since < self.config.worker_wait:
            self._arm_worker_wait()  # the manager lost its workers again since this was armed
            return 0
        tickets, self._pending = self._pending, deque()
        why = self._no_workers(now - since)
        for ticket in tickets:
            if ticket.wanted():
                self.failed += 1
                ticket.client.reply(Failure(ticket.task.id, NoWorkers.__name__, why))
        if tickets:
            log.warning("failed %d queued tasks: %s", len(tickets), why)
        return len(tickets)

    def _no_workers(self, idle: float) -> str:
        return (
            f"manager {self.name} has had no worker for {idle:.0f}s (--worker-wait {self.config.worker_wait:g});"
            " is a worker running, with the manager's address and the same key?"
        )

    def submit(self, client: ClientLink, task: Task) -> None:
        """Queue a client's task, or reject it when ``queue_size`` tasks wait already.

        Tasks wait here or in a worker's prefetch: both count, so a task that is accepted
        waits for at most ``queue_size`` others, wherever they are.
        """
        since = self._unserved_since
        if since is not None and self.clock() - since >= self.config.worker_wait:
            self.failed += 1
            client.conn.send(Failure(task.id, NoWorkers.__name__, self._no_workers(self.clock() - since)))
            return
        limit = self.config.queue_size
        if limit is not None and not self._routes.idle:
            waiting = len(self._pending) + self._routes.waiting
            if waiting >= limit:
                self.reject(client, task, f"manager {self.name} queue is full ({waiting} tasks waiting)")
                return
        self._next_id += 1
        ticket = Ticket(self._next_id, client, task, self.clock())
        client.tasks[task.id] = ticket
        self._pending.append(ticket)
        self._pump()

    def _pump(self) -> None:
        """Send queued tasks to workers while there are both; then take back what waits needlessly."""
        pending, routes = self._pending, self._routes
        while pending:
            link = routes.take()
            if link is None:
                self._arm_worker_wait()  # tasks wait: they fail if no worker comes within --worker-wait
                return
            ticket = pending.popleft()
            ticket.attempts += 1
            ticket.worker = link
            ticket.sent = self.recorder.started(ticket.arrived)
            link.inflight[ticket.id] = ticket
            routes.update(link)
            task = ticket.task
            try:
                link.conn.send(Task(ticket.id, task.func, task.args, task.timeout))
            except MessageTooLarge as exc:
                del link.inflight[ticket.id]
                routes.update(link)
                self.failed += 1
                ticket.client.reply(Failure(task.id, MessageTooLarge.__name__, str(exc)))
            except ConnectionLost as exc:
                self.drop_worker(link, str(exc))
        if routes.prefetching and routes.idle > self._reclaiming and not self._reclaim_due:
            # Once the loop has handled everything that arrived with this: results from
            # other workers add idle processes (one Reclaim asks for all of them), and
            # new tasks may fill them (none need be taken back).
            self._reclaim_due = True
            gevent.get_hub().loop.run_callback(self._reclaim)

    def _reclaim(self) -> None:
        """Ask workers holding unstarted tasks for as many as there are idle processes elsewhere."""
        self._reclaim_due = False
        if self._pending:
            return  # only while nothing is queued (queued tasks go to idle processes first)
        idle = self._routes.idle - self._reclaiming
        for link in list(self._routes.prefetching):  # only those not asked already
            if idle <= 0:
                return
            count = min(link.waiting, idle)
            try:
                link.conn.send(Reclaim(count))
            except ConnectionLost:
                continue  # its connection is closing: dropping it returns its tasks anyway
            link.reclaiming = count
            self._reclaiming += count
            self._routes.update(link)
            idle -= count

    def _handback(self, link: WorkerLink, msg: Handback) -> None:
        """Tasks a worker handed back unstarted: to the front of the queue, in their order.

        Raises:
            ProtocolError: It hands back a task it does not hold (or one twice).
        """
        self._reclaiming -= link.reclaiming  # this answers the last Reclaim, if one was sent
        link.reclaiming = 0  # (the update below lists it again if it still holds waiting tasks)
        held = link.inflight
        if any(i not in held for i in msg.ids) or len(set(msg.ids)) != len(msg.ids):
            raise ProtocolError(f"worker {link.id} hands back tasks it does not hold: {msg.ids!r:.60}")
        back = [held.pop(task_id) for task_id in msg.ids]
        self._routes.update(link)
        cancelled = [ticket for ticket in back if ticket.cancelling]
        back = [ticket for ticket in back if not ticket.cancelling]
        for ticket in cancelled:
            self._cancelled(ticket, dropped=True)  # it never ran, and its client wants it no more
        if back:
            log.debug("worker %s handed back %d tasks (%s)", link.id, len(back), msg.reason)
            self.handed_back += len(back)
            for ticket in reversed(back):
                ticket.attempts -= 1  # it never ran: this send does not count against MAX_ATTEMPTS
                ticket.worker = None
                if ticket.wanted():
                    self._pending.appendleft(ticket)
        self._pump()

    def _reply(self, link: WorkerLink, msg: Result | Failure) -> None:
        ticket = link.inflight.pop(msg.id, None)
        if ticket is None:
            log.debug("worker %s replied to unknown task %d", link.id, msg.id)
            return
        self.recorder.finished(ticket.sent)
        if type(msg) is Result:
            self.completed += 1
            link.completed += 1
        else:
            self.failed += 1
            link.failed += 1
        self._routes.update(link)
        if self.latency is not None:
            self.observe(ticket.arrived)
        task_id = ticket.task.id
        ticket.client.reply(Result(task_id, msg.value) if type(msg) is Result else msg._replace(id=task_id))
        self._pump()

    def cancel(self, client: ClientLink, task_id: int) -> bool | None:
        """Drop a queued task at once; ask the worker holding one to drop it if it has not started.

        Returns:
            True if it was queued (and is dropped); False if it is unknown; None if its
            worker was asked (its :class:`~argon.protocol.Handback` or
            :class:`~argon.protocol.NotCancelled` answers the client).
        """
        ticket = client.tasks.get(task_id)
        if ticket is None:
            return False
        link = ticket.worker
        if link is None:
            self._pending.remove(ticket)
            self._cancelled(ticket, dropped=True)
            return True
        if not ticket.cancelling:
            try:
                link.conn.send(Cancel(ticket.id))
            except ConnectionLost:
                return False  # the link is closing: its tasks go back to the queue or fail
            ticket.cancelling = True
        return None

    def _cancelled(self, ticket: Ticket, dropped: bool) -> None:
        """Answer a client that asked to cancel ``ticket``: dropped, or too late."""
        ticket.cancelling = False
        if not ticket.wanted():
            return
        if dropped:
            ticket.client.reply(Failure(ticket.task.id, TaskCancelled.__name__, "task cancelled before it started"))
        else:
            with contextlib.suppress(ConnectionLost):
                ticket.client.conn.send(NotCancelled(ticket.task.id))

    def client_gone(self, client: ClientLink) -> None:
        """Forget the departed client's queued tasks; those workers hold finish unseen."""
        if client.tasks:
            client.tasks.clear()
            self._pending = deque(ticket for ticket in self._pending if ticket.client is not client)

    # -- reporting and stopping -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Workers, capacity, queue length and counters."""
        rows = [link.row() for link in self._workers.values()]
        since = self._unserved_since
        return {
            **self.base_status(),
            "workers": [row.as_dict() for row in rows],
            # A draining worker takes nothing new: only its processes still running a task
            # count, so that busy never exceeds capacity.
            "capacity": sum(row.busy if row.draining else row.capacity for row in rows),
            "busy": sum(row.busy for row in rows),
            "prefetched": sum(row.prefetched for row in rows),
            "queued": len(self._pending),
            "redelivered": self.redelivered,
            "handed_back": self.handed_back,
            "worker_wait": self.config.worker_wait,
            "no_workers_for": None if since is None else round(self.clock() - since, 1),
        }

    def oldest_arrival(self) -> float | None:
        """When (by :attr:`clock`) the task that has waited longest in the queue arrived; None if none waits."""
        return self._pending[0].arrived if self._pending else None

    def busy(self) -> int:
        """Tasks queued or held by workers."""
        return len(self._pending) + sum(len(w.inflight) for w in self._workers.values())

    def _drain(self, grace: float) -> None:
        """Keep routing the tasks in hand, for up to ``grace`` seconds or until no worker is left."""
        log.info("manager %s shutting down (grace %.0fs, %d tasks in hand)", self.name, grace, self.busy())
        deadline = time.monotonic() + grace
        while self.busy() and self._workers and time.monotonic() < deadline:
            gevent.sleep(0.05)
