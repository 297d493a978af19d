"""The worker: a pool of Python processes, serving a manager or clients directly.

Stand-alone (no manager), the worker listens for clients and queues their tasks for its
pool, rejecting new ones beyond ``queue_size`` waiting tasks.

Managed (``managers=[(host, port), ...]``), it dials each manager, registers its capacity
with each and runs what they send, holding from each at most what its credit allows (see
:func:`~argon.flow.offers`): its idle processes, offered to every manager at once, plus a
share of the prefetch that :class:`~argon.flow.Prefetch` sizes from how long its tasks
take. Its pool starts tasks in the order they came, whichever manager sent them, and
never more at once than it has processes. It hands back tasks it has not started when a
manager asks (another process is idle), when every one of its processes is stuck on a
task far longer than usual, and when it drains.

Each link reconnects on its own with capped backoff and registers again. Tasks the
manager sent that had not started are dropped at once (the manager re-sends them
elsewhere); tasks already running finish, but their results belong to a connection that
is gone, so they are logged and counted as ``discarded`` rather than delivered. Until
those tasks finish, the processes they hold are registered as busy. A managed worker
still listens, for status requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import socket
import ssl
import time
import uuid
from collections import deque
from typing import Any

import gevent
import gevent.event
import psutil

from argon import defaults
from argon.backoff import Backoff
from argon.connection import Connection
from argon.errors import ArgonError, ConnectionLost, ProtocolError, TaskCancelled
from argon.flow import Prefetch, offers
from argon.handshake import connect
from argon.history import CpuMeter, Recorder
from argon.pool import Pool
from argon.process import Job, Reply
from argon.protocol import (
    Bye,
    Credit,
    Failure,
    Handback,
    Message,
    Reclaim,
    Register,
    Stats,
    StatusReply,
    StatusRequest,
    Task,
)
from argon.server import ClientLink, Histogram, Server, ServerConfig
from argon.states import LinkState, advance
from argon.status import WorkerRow, WorkerStats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerConfig(ServerConfig):
    """Worker settings on top of :class:`~argon.server.ServerConfig`.

    ``processes`` is the pool size (``--workers`` on the command line); ``managers`` the
    managers to serve (none: serve clients directly).
    """

    managers: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    processes: int | None = None
    max_requests: int | None = None
    manager_tls: ssl.SSLContext | None = None


def _tagged(tag: int, job: Job) -> bool:
    """Whether ``job`` came on the connection ``tag`` names."""
    return bool(job.tag == tag)


class ManagerLink:
    """This worker's link to one manager and the credit granted on it (see :class:`LinkState`).

    Attributes:
        address: The manager's ``(host, port)``.
        state: Where the link is in its life cycle.
        conn: The current connection (None while dialing or lost).
        session: This connection's tag on its tasks in the pool (unique in the worker): a
            task's reply goes only to the connection it came on.
        window: The credit granted on this connection: most tasks held at once.
        processes: How many of them start at once.
        freed: When recent results freed credits on this connection (to time round trips).
        released: Set once the manager will route nothing more on this connection (it
            answered our goodbye, or the connection closed).
        foreign: Tasks in the pool, when this connection registered, that were not its own
            and are still running (kept for a worker with one manager, whose credit it sets).
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.state = LinkState.DIALING
        self.conn: Connection | None = None
        self.session = 0
        self.window = 0
        self.processes = 0
        self.freed: deque[float] = deque(maxlen=defaults.MAX_PREFETCH)
        self.foreign = 0
        self.released = gevent.event.Event()

    def __repr__(self) -> str:
        return (
            f"<ManagerLink {self.name} {self.state.value} session {self.session},"
            f" credit {self.window}/{self.processes}>"
        )

    @property
    def name(self) -> str:
        """The manager's ``host:port``."""
        return f"{self.address[0]}:{self.address[1]}"

    def move(self, state: LinkState) -> None:
        """Change state (see :data:`argon.states.MOVES`)."""
        self.state = advance(self.state, state, self)  # type: ignore[assignment]

    @property
    def open(self) -> bool:
        """Whether tasks may still come and replies go on the current connection."""
        conn = self.conn
        return conn is not None and not conn.closed and self.state in (LinkState.SERVING, LinkState.DRAINING)


class Worker(Server):
    """A process pool behind a server socket and, optionally, links to managers.

    Args:
        config: Its settings.
        latency: Where each task's latency is recorded, if anywhere (``--metrics-port``).
    """

    role = "worker"

    def __init__(self, config: WorkerConfig | None = None, *, latency: Histogram | None = None) -> None:
        config = config or WorkerConfig()
        super().__init__(config, latency=latency)
        self.config: WorkerConfig = config
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefetch = Prefetch()
        self.pool = Pool(
            config.processes,
            max_requests=config.max_requests,
            max_frame=config.max_frame,
            observe=self.prefetch.observe,
            on_broken=self._pool_broken,
        )
        self.discarded = 0
        self.handed_back = 0
        self.links = [ManagerLink(address) for address in config.managers]
        self._linkers: list[gevent.Greenlet] = []
        self._sessions = itertools.count(1)
        self._stalled = False  # prefetch is off until a process frees up (all were stuck on long tasks)
        self._offer_due = False  # a credit update is scheduled for this turn of the loop
        self._watch: Any = None  # timer looking for stalls while tasks wait in the pool
        self._cpu = CpuMeter()

    @property
    def managed(self) -> bool:
        """Whether this worker serves managers."""
        return bool(self.links)

    def start(self) -> None:
        """Start the pool, then listen, then (if managed) dial every manager.

        Raises:
            ArgonError: The pool would not start.
            OSError: The port cannot be bound (the pool is stopped again).
        """
        self.pool.start()
        try:
            super().start()
        except BaseException:
            self.pool.close()
            raise
        self._linkers = [gevent.spawn(self._manager_loop, link) for link in self.links]

    def handle(self, conn: Connection) -> None:
        """Serve a client (a managed worker only answers status requests)."""
        assert conn.hello is not None
        if conn.hello.role == "client":
            self.serve_client(conn)
        else:
            log.warning("refusing %s: a worker does not accept %r peers", conn.peer, conn.hello.role)

    # -- stand-alone: tasks from clients --------------------------------------------------------

    def submit(self, client: ClientLink, task: Task) -> None:
        """Queue a client's task for the pool, or reject it."""
        if self.links:
            where = ", ".join(link.name for link in self.links)
            why = f"worker {self.name} takes tasks only from its manager at {where}"
            client.conn.send(Failure(task.id, ProtocolError.__name__, why))
            return
        limit = self.config.queue_size
        pool = self.pool
        if limit is not None and pool.outstanding - pool.size >= limit:
            self.reject(client, task, f"worker {self.name} queue is full ({pool.queued} tasks waiting)")
            return
        job = Job(task, self._timed(client.reply, self.clock()), client)
        client.tasks[task.id] = job
        pool.submit(job)

    # The pool already counts every reply it delivers: these are its figures.
    @property
    def completed(self) -> int:  # type: ignore[override]
        """Tasks that returned a value."""
        return self.pool.completed

    @property
    def failed(self) -> int:  # type: ignore[override]
        """Tasks that failed."""
        return self.pool.failed

    @property
    def recorder(self) -> Recorder:
        """Wait and run times of the pool's tasks (for the dashboard)."""
        return self.pool.recorder

    def oldest_arrival(self) -> float | None:
        """When (monotonic) the task that has waited longest for a process arrived."""
        return self.pool.oldest_arrival()

    def _timed(self, deliver: Any, arrived: float) -> Any:
        """``deliver``, recording the task's latency first."""

        def done(reply: Reply) -> None:
            self.observe(arrived)
            deliver(reply)

        return done

    def cancel(self, client: ClientLink, task_id: int) -> bool:
        """Drop a client's task if it is still waiting for a process."""
        job = client.tasks.get(task_id)
        if job is None or not self.pool.cancel(lambda j: j is job):
            return False
        client.reply(Failure(task_id, TaskCancelled.__name__, "task cancelled before it started"))
        return True

    def client_gone(self, client: ClientLink) -> None:
        """Drop the departed client's queued tasks; running ones finish unseen."""
        client.tasks.clear()
        self.pool.cancel(lambda job: job.tag is client)

    # -- managed: the links to the managers ------------------------------------------------------

    def _manager_loop(self, link: ManagerLink) -> None:
        host, port = link.address
        backoff = Backoff.reconnect()  # unbounded on purpose: a worker waits for its manager
        failures = 0
        while not self.stopping:
            try:
                conn = connect(
                    host,
                    port,
                    role="worker",
                    name=self.name,
                    key=self.config.key,
                    max_frame=self.config.max_frame,
                    tls=self.config.manager_tls,
                    heartbeat=self.config.heartbeat,
                )
            except (ArgonError, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:  # say it once, then now and then
                    log.warning("cannot reach manager %s:%d (attempt %d): %s", host, port, failures, exc)
            else:
                failures = 0
                backoff.reset()
                self._serve_manager(link, conn)
                if self.stopping:
                    return
                link.move(LinkState.DIALING)
            gevent.sleep(backoff.next_delay() or defaults.RECONNECT_MAX_DELAY)

    def _free(self) -> int:
        """Processes that hold no task (none while a task waits in the pool)."""
        pool = self.pool
        return max(0, pool.size - pool.running - pool.queued)

    def _serve_manager(self, link: ManagerLink, conn: Connection) -> None:
        session = link.session = next(self._sessions)
        link.foreign = self.pool.outstanding  # tasks of other connections, running (queued ones were dropped)
        free = self._free()
        conn.send_now(Register(self.id, self.address[0], self.address[1], self.pool.size, free, os.getpid()))
        link.conn, link.window, link.processes = conn, free, free
        link.released = gevent.event.Event()
        link.freed.clear()
        link.move(LinkState.SERVING)
        log.info("registered with manager %s (%d of %d processes free)", conn.peer, free, self.pool.size)
        self._offer_now()
        reporter = gevent.spawn(self._report_stats, conn)
        reason = conn.serve(lambda msg: self._manager_message(link, session, msg))
        reporter.kill(block=False)
        link.released.set()  # nothing more can come on a closed link
        link.conn = None
        dropped = self.pool.cancel(lambda job: job.tag == session)
        if self.stopping:
            link.move(LinkState.CLOSED)
            return
        link.move(LinkState.LOST)
        self._offer()  # the processes its tasks held are for the other managers now
        log.warning(
            "lost manager %s (%s); %d queued tasks left to the manager to re-send, %d still running; reconnecting",
            conn.peer,
            reason,
            len(dropped),
            self.pool.running_tags()[session],
        )

    def _manager_message(self, link: ManagerLink, session: int, msg: Message) -> None:
        conn = link.conn
        assert conn is not None
        if isinstance(msg, Task):
            if link.state is not LinkState.SERVING:  # it crossed our goodbye: give it back, to run elsewhere
                self._hand_back(link, [msg.id], "draining")
                return
            arrived = self.clock()
            self._timed_round_trip(link, arrived)
            self.pool.submit(Job(msg, lambda reply: self._managed_done(link, session, reply, arrived), session))
            if len(self.links) > 1:
                self._offer()  # the process it took is no longer the other managers' to fill
            if self.pool.queued and self._watch is None:
                self._watch_stalls()
        elif isinstance(msg, Reclaim):
            jobs = self.pool.cancel(lambda job: job.tag == session, max(0, msg.limit))
            self._hand_back(link, [job.task.id for job in jobs], "reclaimed")
            if jobs:
                self._offer()
        elif isinstance(msg, StatusRequest):
            conn.send(StatusReply(msg.id, self.status()))
        elif isinstance(msg, Bye):
            if msg.error == ProtocolError.__name__:
                log.error("manager %s closed the link: %s", conn.peer, msg.reason)
            else:
                log.info("manager %s says: %s", conn.peer, msg.reason)
            if link.state is LinkState.DRAINING and not msg.error:
                link.released.set()  # its answer to our goodbye: no task follows it
        else:
            log.warning("ignoring unexpected %s from manager %s", type(msg).__name__, conn.peer)

    def _timed_round_trip(self, link: ManagerLink, now: float) -> None:
        """A task arrived: time it from the result that freed its credit, if that is recent.

        An older one freed a credit the manager had no task for; waiting for clients is
        not a round trip.
        """
        freed = link.freed
        horizon = self.prefetch.max_horizon
        while freed and now - freed[0] > horizon:
            freed.popleft()
        if freed:
            self.prefetch.observe_round_trip(now - freed.popleft())

    def _hand_back(self, link: ManagerLink, ids: list[int], reason: str) -> None:
        """Tell the manager these tasks will not run here (they are out of the pool already)."""
        self.handed_back += len(ids)
        if link.conn is not None and ids:
            # Draining is rare and worth a line; steal-back and stalls happen all the time.
            level = logging.INFO if reason == "draining" else logging.DEBUG
            log.log(level, "%s: handing %d unstarted tasks back to manager %s", reason, len(ids), link.conn.peer)
        if link.conn is not None:
            with contextlib.suppress(ConnectionLost):
                link.conn.send(Handback(ids, reason))

    def _managed_done(self, link: ManagerLink, session: int, reply: Reply, arrived: float) -> None:
        self.observe(arrived)
        self._stalled = False  # a process is free again
        if session == link.session and link.open:
            assert link.conn is not None
            # While tasks wait here, the manager needs no result to keep this worker busy:
            # let results go out together.
            link.conn.reply(reply, defaults.LINGER if self.pool.queued else 0.0)
            link.freed.append(self.clock())
        else:
            self.discarded += 1
            if session != link.session:  # counted in ``foreign`` when the current connection registered
                link.foreign -= 1
            log.warning(
                "discarding the result of task %d: its connection to manager %s is gone (the manager"
                " re-sends tasks of lost workers)",
                reply.id,
                link.name,
            )
        self._offer()

    def _offer(self) -> None:
        """Update every manager's credit: at once for one manager, else once the pool has settled.

        With several, the update waits for the end of this turn of the loop, because a
        finishing task's reply comes before the pool starts the next queued task (whose
        manager that process then belongs to), and several replies often come in one
        turn: one update covers them all.
        """
        if len(self.links) == 1:
            self._offer_now()
        elif not self._offer_due:
            self._offer_due = True
            gevent.get_hub().loop.run_callback(self._offer_now)

    def _offer_now(self) -> None:
        """Send each serving link its credit, if it changed (see :func:`argon.flow.offers`)."""
        self._offer_due = False
        if len(self.links) == 1:
            self._offer_sole(self.links[0])
            return
        serving = [link for link in self.links if link.state is LinkState.SERVING and link.conn is not None]
        if not serving:
            return
        size = self.pool.size
        running = self.pool.running_tags()
        prefetch = 0 if self._stalled else self.prefetch.depth(size)
        mine = [running[link.session] for link in serving]
        for link, (window, processes) in zip(serving, offers(size, self._free(), mine, prefetch), strict=True):
            if window != link.window or processes != link.processes:
                link.window, link.processes = window, processes
                assert link.conn is not None
                with contextlib.suppress(ConnectionLost):
                    link.conn.send(Credit(window, processes))

    def _offer_sole(self, link: ManagerLink) -> None:
        """The credit of a worker's only manager: every process not busy with an earlier connection's task.

        The same as :func:`~argon.flow.offers` gives for one manager, without looking at the
        pool, on the path every finished task takes.
        """
        if link.state is not LinkState.SERVING or link.conn is None:
            return
        processes = max(0, self.pool.size - link.foreign)
        window = processes + (0 if self._stalled else self.prefetch.depth(processes))
        if window != link.window or processes != link.processes:
            link.window, link.processes = window, processes
            with contextlib.suppress(ConnectionLost):
                link.conn.send(Credit(window, processes))

    def _watch_stalls(self) -> None:
        """While tasks wait in the pool, look every so often whether they wait behind stuck processes."""
        interval = self.prefetch.stall_after / 2
        self._watch = gevent.get_hub().loop.timer(interval, interval)
        self._watch.start(self._check_stall)

    def _check_stall(self) -> None:
        """Timer callback: hand back waiting tasks if every process is far over its usual time."""
        pool = self.pool
        serving = [link for link in self.links if link.state is LinkState.SERVING]
        if not pool.queued or not serving:
            self._watch.close()
            self._watch = None
            return
        youngest = pool.youngest(time.monotonic())
        if youngest is None or not self.prefetch.stalled(youngest):
            return
        self._stalled = True
        for link in serving:
            session = link.session
            jobs = pool.cancel(functools.partial(_tagged, session))
            if jobs:
                log.info(
                    "handing back %d waiting tasks: every process has run its task for %.2fs", len(jobs), youngest
                )
                self._hand_back(link, [job.task.id for job in jobs], "waiting behind long tasks")
        self._offer_now()

    def _pool_broken(self, reason: str) -> None:
        """The pool cannot replace a process: say so loudly and stop, so a supervisor restarts us."""
        if self.failure is None and not self.stopping:
            self.failure = reason
            log.critical("worker %s is stopping: its pool cannot start processes (%s)", self.name, reason)
            gevent.spawn(self.stop)

    def _report_stats(self, conn: Connection) -> None:
        while not conn.closed:
            try:
                conn.send(Stats(self._figures().as_dict()))
            except ConnectionLost:
                return
            gevent.sleep(max(self.config.heartbeat, 1.0) * 5)

    # -- reporting and stopping -------------------------------------------------------------------

    def _figures(self) -> WorkerStats:
        processes = self.pool.processes()
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = 0
        return WorkerStats(
            rss=rss,
            pool_rss=sum(p["rss"] for p in processes),
            processes=processes,
            replaced=self.pool.replaced,
            discarded=self.discarded,
            handed_back=self.handed_back,
            started=self.started,
            cpu=self._cpu.read([os.getpid(), *(p["pid"] for p in processes)]),
        )

    def status(self) -> dict[str, Any]:
        """This worker as its own one-worker network."""
        pool = self.pool
        links = self.links
        row = WorkerRow(
            id=self.id,
            host=self.address[0],
            port=self.address[1],
            pid=os.getpid(),
            capacity=pool.size,
            busy=pool.running,
            prefetched=pool.queued if links else 0,
            credit=sum(link.window for link in links) if links else pool.size,
            completed=self.completed,
            failed=self.failed,
            draining=self.stopping,
            uptime=round(time.time() - self.started, 1),
            stats=self._figures(),
        )
        return {
            **self.base_status(),
            "workers": [row.as_dict()],
            "capacity": pool.size,
            "busy": pool.running,
            "prefetched": row.prefetched,
            "queued": 0 if links else pool.queued,
            "discarded": self.discarded,
            "handed_back": self.handed_back,
            "manager": ",".join(link.name for link in links) or None,
            "manager_connected": bool(links) and all(link.open for link in links),
            "managers": [{"address": link.name, "connected": link.open} for link in links],
        }

    def _drain(self, grace: float) -> None:
        """Tell the managers, hand back waiting tasks, finish running ones within ``grace``, leave."""
        log.info("worker %s draining (grace %.0fs, %d tasks in hand)", self.name, grace, self.pool.outstanding)
        leaving: list[tuple[ManagerLink, Connection]] = []
        for link in self.links:
            conn = link.conn
            if conn is None or link.state is not LinkState.SERVING:
                continue
            leaving.append((link, conn))
            link.move(LinkState.DRAINING)
            with contextlib.suppress(ConnectionLost):
                conn.send(Bye("draining"))  # first, so the manager routes what comes back elsewhere
            session = link.session
            unstarted = self.pool.cancel(functools.partial(_tagged, session))
            if unstarted:
                self._hand_back(link, [job.task.id for job in unstarted], "draining")
        if not self.pool.join(grace):
            log.warning("grace period over; abandoning %d tasks", self.pool.outstanding)
        deadline = time.monotonic() + defaults.DRAIN_ACK_TIMEOUT
        for link, conn in leaving:
            # Keep reading until the manager confirms it routes us nothing more, so a task
            # that crossed our goodbye is handed back rather than lost in a reset socket.
            if not link.released.wait(max(0.0, deadline - time.monotonic())):
                log.warning("manager %s did not answer our goodbye within %gs", conn.peer, defaults.DRAIN_ACK_TIMEOUT)
            conn.flush(2.0)
            conn.close("worker stopped")
        for linker in self._linkers:
            linker.kill(block=False)

    def _release(self) -> None:
        """Stop the stall watch and the pool's processes (whatever they still run is abandoned)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self.pool.close()
