"""A worker's side of its managers: dialing them, running what they send, within its credit.

A managed worker (``managers=[(host, port), ...]``) dials each manager, registers its
capacity with each and runs what they send, holding from each at most what its credit
allows (see :func:`~argon.flow.offers`): its idle processes, offered to every manager at
once, plus a share of the prefetch that :class:`~argon.flow.Prefetch` sizes from how long
its tasks take. Its pool starts tasks in the order they came, whichever manager sent
them, and never more at once than it has processes. It hands back tasks it has not
started when a manager asks (another process is idle), when every one of its processes
is stuck on a task far longer than usual, and when it drains.

Each link reconnects on its own with capped backoff and registers again. Tasks the
manager sent that had not started are dropped at once (the manager re-sends them
elsewhere); tasks already running finish, but their results belong to a connection that
is gone, so they are logged and counted as ``discarded`` rather than delivered. Until
those tasks finish, the processes they hold are registered as busy.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from argon import defaults
from argon.backoff import Backoff
from argon.connection import Connection
from argon.errors import ArgonError, ConnectionLost, ProtocolError
from argon.flow import Prefetch, offers
from argon.handshake import connect
from argon.manager_link import ManagerLink
from argon.pool import Pool
from argon.process import Job, Reply
from argon.protocol import (
    Bye,
    Cancel,
    Credit,
    Handback,
    Message,
    NotCancelled,
    Reclaim,
    Register,
    Stats,
    StatusReply,
    StatusRequest,
    Task,
)
from argon.server import Server
from argon.states import LinkState
from argon.status import WorkerStats, reachable_dashboard

log = logging.getLogger("argon.worker")  # a worker's events, under the name users filter on


def _tagged(tag: int, job: Job) -> bool:
    """Whether ``job`` came on the connection ``tag`` names."""
    return bool(job.tag == tag)


class Uplink:
    """A worker's links to its managers (see the module docstring); the worker composes one.

    Args:
        worker: The worker these links serve: its name, address, settings, clock, latency
            record, ``stopping`` flag and :meth:`~argon.server.Server.status`.
        managers: The managers' ``(host, port)`` (none: a stand-alone worker, no links).
        pool: The worker's pool, where the managers' tasks run.
        prefetch: Sizes the prefetch from the pool's task times and the round trips.
        worker_id: The id the worker registers under.
        tls: The TLS context to dial managers with, if any.
        figures: The worker's stats, sent to each manager every few heartbeats.

    Attributes:
        links: One per manager, in the order given.
        discarded: Results dropped because the connection their task came on is gone.
        handed_back: Tasks handed back unstarted.
    """

    def __init__(
        self,
        worker: Server,
        managers: list[tuple[str, int]],
        pool: Pool,
        prefetch: Prefetch,
        *,
        worker_id: str,
        tls: ssl.SSLContext | None,
        figures: Callable[[], WorkerStats],
    ) -> None:
        self.worker = worker
        self.pool = pool
        self.prefetch = prefetch
        self.worker_id = worker_id
        self.tls = tls
        self.figures = figures
        self.links = [ManagerLink(address) for address in managers]
        self.discarded = 0
        self.handed_back = 0
        # Read on every task: bound once.
        self._clock = worker.clock
        self._observe = worker.observe
        self._linkers: list[gevent.Greenlet] = []
        self._sessions = itertools.count(1)
        self._stalled = False  # prefetch is off until a process frees up (all were stuck on long tasks)
        self._offer_due = False  # a credit update is scheduled for this turn of the loop
        self._watch: Any = None  # timer looking for stalls while tasks wait in the pool

    def start(self) -> None:
        """Dial every manager (each link in a greenlet of its own, redialing until the worker stops)."""
        self._linkers = [gevent.spawn(self._manager_loop, link) for link in self.links]

    def drain(self) -> list[tuple[ManagerLink, Connection]]:
        """Say goodbye to every serving manager and hand back the tasks it sent that have not started.

        Returns:
            The links left, with their connections, for :meth:`close`.
        """
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
        return leaving

    def close(self, leaving: list[tuple[ManagerLink, Connection]]) -> None:
        """Close the links :meth:`drain` left, once each manager answers our goodbye; stop dialing."""
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

    def release(self) -> None:
        """Stop the stall watch (idempotent)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    # -- each link ----------------------------------------------------------------------------

    def _manager_loop(self, link: ManagerLink) -> None:
        host, port = link.address
        worker, config = self.worker, self.worker.config
        backoff = Backoff.reconnect()  # unbounded on purpose: a worker waits for its manager
        failures = 0
        while not worker.stopping:
            try:
                conn = connect(
                    host,
                    port,
                    role="worker",
                    name=worker.name,
                    key=config.key,
                    max_frame=config.max_frame,
                    tls=self.tls,
                    heartbeat=config.heartbeat,
                )
            except (ArgonError, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:  # say it once, then now and then
                    log.warning("cannot reach manager %s:%d (attempt %d): %s", host, port, failures, exc)
            except Exception:  # whatever a peer's reply provokes, this loop must go on dialling
                failures += 1
                log.exception("unexpected error reaching manager %s:%d (attempt %d)", host, port, failures)
            else:
                failures = 0
                backoff.reset()
                self._serve_manager(link, conn)
                if worker.stopping:
                    return
                if link.state is not LinkState.DIALING:  # (it still is if registering failed)
                    link.move(LinkState.DIALING)
            gevent.sleep(backoff.next_delay() or defaults.RECONNECT_MAX_DELAY)

    def _serve_manager(self, link: ManagerLink, conn: Connection) -> None:
        session = link.session = next(self._sessions)
        link.foreign = self.pool.outstanding  # tasks of other connections, running (queued ones were dropped)
        free = self._free()
        host, port = self.worker.address
        try:
            conn.send_now(Register(self.worker_id, host, port, self.pool.size, free, os.getpid()))
        except (ArgonError, OSError) as exc:
            conn.close(f"cannot register: {exc}")
            log.warning("cannot register with manager %s: %s", conn.peer, exc)
            return
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
        if self.worker.stopping:
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
            arrived = self._clock()
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
        elif isinstance(msg, Cancel):  # its client wants it no more: drop it unless it has started
            if self.pool.cancel(lambda job: job.tag == session and job.task.id == msg.id, 1):
                log.debug("task %d cancelled by manager %s before it started", msg.id, conn.peer)
                conn.send(Handback([msg.id], "cancelled"))
                self._offer()
            else:
                conn.send(NotCancelled(msg.id))
        elif isinstance(msg, StatusRequest):
            conn.send(StatusReply(msg.id, self.worker.status()))
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

    def _managed_done(self, link: ManagerLink, session: int, reply: Reply, arrived: float) -> None:
        self._observe(arrived)
        self._stalled = False  # a process is free again
        if session == link.session and link.open:
            assert link.conn is not None
            # While tasks wait here, the manager needs no result to keep this worker busy:
            # let results go out together.
            link.conn.reply(reply, defaults.LINGER if self.pool.queued else 0.0)
            link.freed.append(self._clock())
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

    def _report_stats(self, conn: Connection) -> None:
        while not conn.closed:
            try:
                conn.send(Stats({**self.figures().as_dict(), "dashboards": self._other_dashboards(conn)}))
            except ConnectionLost:
                return
            gevent.sleep(max(self.worker.config.heartbeat, 1.0) * 5)

    def _other_dashboards(self, conn: Connection) -> list[str]:
        """Where this worker's other managers serve their dashboards (as it reaches them)."""
        urls = []
        for link in self.links:
            other = link.conn
            if other is None or other is conn or other.closed or other.hello is None or not other.hello.dashboard:
                continue
            url = reachable_dashboard(other.hello.dashboard, link.address[0])
            if url and url not in urls:
                urls.append(url)
        return urls[: defaults.MAX_DASHBOARDS]

    # -- credit ---------------------------------------------------------------------------------

    def _free(self) -> int:
        """Processes that hold no task (none while a task waits in the pool)."""
        pool = self.pool
        return max(0, pool.size - pool.running - pool.queued)

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

    # -- stalls ---------------------------------------------------------------------------------

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
