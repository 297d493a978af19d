"""The worker: a pool of Python processes, serving a manager or clients directly.

Stand-alone (no manager), the worker listens for clients and queues their tasks for its
pool, rejecting new ones beyond ``queue_size`` waiting tasks.

Managed (``manager=(host, port)``), it dials the manager, registers its capacity and
runs what the manager sends. If the link drops it reconnects with capped backoff and
registers again. Tasks the manager sent that had not started are dropped at once (the
manager re-sends them elsewhere); tasks already running finish, but their results
belong to a connection that is gone, so they are logged and counted as ``discarded``
rather than delivered. Until those tasks finish, the processes they hold are
registered as busy. A managed worker still listens, for status requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import time
import uuid
from typing import Any

import gevent
import gevent.event
import psutil

from argon import defaults
from argon.backoff import Backoff
from argon.connection import Connection, connect
from argon.errors import ArgonError, ConnectionLost, ProtocolError
from argon.pool import Job, Pool, Reply
from argon.protocol import Bye, Failure, Handback, Message, Ready, Register, Stats, StatusReply, StatusRequest, Task
from argon.server import ClientLink, Server, ServerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerConfig(ServerConfig):
    """Worker settings on top of :class:`~argon.server.ServerConfig`."""

    manager: tuple[str, int] | None = None
    workers: int | None = None
    max_requests: int | None = None
    manager_tls: ssl.SSLContext | None = None


class Worker(Server):
    """A process pool behind a server socket and, optionally, a manager link."""

    role = "worker"

    def __init__(self, config: WorkerConfig | None = None) -> None:
        config = config or WorkerConfig()
        super().__init__(config)
        self.config: WorkerConfig = config
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pool = Pool(
            config.workers, max_requests=config.max_requests, max_frame=config.max_frame, on_broken=self._pool_broken
        )
        #: Why this worker stopped on its own (its pool broke), or None.
        self.failure: str | None = None
        self.discarded = 0
        self._link: Connection | None = None
        self._session = 0
        self._released = gevent.event.Event()  # set once the manager will route us nothing more
        self.handed_back = 0
        self._linker: gevent.Greenlet | None = None

    @property
    def managed(self) -> bool:
        """Whether this worker serves a manager."""
        return self.config.manager is not None

    def start(self) -> None:
        """Start the pool, then listen, then (if managed) dial the manager."""
        self.pool.start()
        super().start()
        if self.config.manager is not None:
            self._linker = gevent.spawn(self._manager_loop, *self.config.manager)

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
        if self.config.manager is not None:
            client.conn.send(
                Failure(
                    task.id,
                    "ProtocolError",
                    f"worker {self.name} takes tasks only from"
                    f" its manager at {self.config.manager[0]}:{self.config.manager[1]}",
                )
            )
            return
        limit = self.config.queue_size
        pool = self.pool
        if limit is not None and pool.outstanding - pool.size >= limit:
            self.reject(client, task, f"worker {self.name} queue is full ({pool.queued} tasks waiting)")
            return
        job = Job(task, self._timed(client.reply, time.monotonic()), client)
        client.jobs[task.id] = job
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

    def _timed(self, deliver: Any, arrived: float) -> Any:
        """``deliver``, recording the task's latency first."""

        def done(reply: Reply) -> None:
            self.observe(arrived)
            deliver(reply)

        return done

    def cancel(self, client: ClientLink, task_id: int) -> bool:
        """Drop a client's task if it is still waiting for a process."""
        job = client.jobs.get(task_id)
        if job is None or not self.pool.cancel(lambda j: j is job):
            return False
        client.reply(Failure(task_id, "TaskCancelled", "task cancelled before it started"))
        return True

    def client_gone(self, client: ClientLink) -> None:
        """Drop the departed client's queued tasks; running ones finish unseen."""
        client.jobs.clear()
        self.pool.cancel(lambda job: job.tag is client)

    # -- managed: the link to the manager ---------------------------------------------------------

    def _manager_loop(self, host: str, port: int) -> None:
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
                self._serve_manager(conn)
                if self.stopping:
                    return
            gevent.sleep(backoff.next_delay() or defaults.RECONNECT_MAX_DELAY)

    def _serve_manager(self, conn: Connection) -> None:
        self._session += 1
        session = self._session
        self._released = gevent.event.Event()
        free = max(0, self.pool.size - self.pool.outstanding)
        conn.send_now(Register(self.id, self.address[0], self.address[1], self.pool.size, free, os.getpid()))
        self._link = conn
        log.info("registered with manager %s (%d of %d processes free)", conn.peer, free, self.pool.size)
        reporter = gevent.spawn(self._report_stats, conn)
        reason = conn.serve(lambda msg: self._manager_message(conn, session, msg))
        reporter.kill(block=False)
        self._released.set()  # nothing more can come on a closed link
        self._link = None
        dropped = self.pool.cancel(lambda job: job.tag == session)
        if not self.stopping:
            log.warning(
                "lost manager %s (%s); %d queued tasks left to the manager to re-send, %d still running; reconnecting",
                conn.peer,
                reason,
                len(dropped),
                self.pool.running,
            )

    def _manager_message(self, conn: Connection, session: int, msg: Message) -> None:
        if isinstance(msg, Task):
            if self.stopping:  # it crossed our goodbye: give it back at once, to run elsewhere
                self._hand_back(conn, [msg.id])
                return
            arrived = time.monotonic()
            self.pool.submit(Job(msg, lambda reply: self._managed_done(session, reply, arrived), session))
        elif isinstance(msg, StatusRequest):
            conn.send(StatusReply(msg.id, self.status()))
        elif isinstance(msg, Bye):
            if msg.error == ProtocolError.__name__:
                log.error("manager %s closed the link: %s", conn.peer, msg.reason)
            else:
                log.info("manager %s says: %s", conn.peer, msg.reason)
            if self.stopping and not msg.error:
                self._released.set()  # its answer to our goodbye: no task follows it
        else:
            log.warning("ignoring unexpected %s from manager %s", type(msg).__name__, conn.peer)

    def _hand_back(self, conn: Connection, ids: list[int]) -> None:
        """Return tasks this draining worker will not start to the manager, to run elsewhere."""
        self.handed_back += len(ids)
        log.info("draining: handing %d unstarted tasks back to manager %s", len(ids), conn.peer)
        with contextlib.suppress(ConnectionLost):
            conn.send(Handback(ids))

    def _managed_done(self, session: int, reply: Reply, arrived: float) -> None:
        self.observe(arrived)
        link = self._link
        if session == self._session and link is not None and not link.closed:
            link.reply(reply)
            return
        self.discarded += 1
        log.warning(
            "discarding the result of task %d: its manager connection is gone (the manager"
            " re-sends tasks of lost workers)",
            reply.id,
        )
        if link is not None and not link.closed:
            link.send(Ready(1))  # the process it held was registered as busy

    def _report_stats(self, conn: Connection) -> None:
        while not conn.closed:
            try:
                conn.send(Stats(self._figures()))
            except ConnectionLost:
                return
            gevent.sleep(max(self.config.heartbeat, 1.0) * 5)

    def _pool_broken(self, reason: str) -> None:
        """The pool cannot replace a process: say so loudly and stop, so a supervisor restarts us."""
        if self.failure is None and not self.stopping:
            self.failure = reason
            log.critical("worker %s is stopping: its pool cannot start processes (%s)", self.name, reason)
            gevent.spawn(self.shutdown)

    # -- reporting and stopping -------------------------------------------------------------------

    def _figures(self) -> dict[str, Any]:
        processes = self.pool.processes()
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = 0
        return {
            "rss": rss,
            "pool_rss": sum(p["rss"] for p in processes),
            "processes": processes,
            "replaced": self.pool.replaced,
            "discarded": self.discarded,
            "uptime": round(time.time() - self.started, 1),
            "started": self.started,
        }

    def status(self) -> dict[str, Any]:
        """This worker as its own one-worker network."""
        pool = self.pool
        me = {
            **self._figures(),
            "id": self.id,
            "host": self.address[0],
            "port": self.address[1],
            "pid": os.getpid(),
            "capacity": pool.size,
            "busy": pool.running,
            "completed": self.completed,
            "failed": self.failed,
            "draining": self.stopping,
        }
        manager = self.config.manager
        return {
            **self.base_status(),
            "workers": [me],
            "capacity": pool.size,
            "busy": pool.running,
            "queued": pool.queued,
            "discarded": self.discarded,
            "handed_back": self.handed_back,
            "manager": f"{manager[0]}:{manager[1]}" if manager else None,
            "manager_connected": self._link is not None and not self._link.closed,
        }

    def shutdown(self, grace: float | None = None) -> None:
        """Drain: take no new tasks, finish those in hand within ``grace``, leave, stop."""
        grace = self.config.grace if grace is None else grace
        log.info("worker %s draining (grace %.0fs, %d tasks in hand)", self.name, grace, self.pool.outstanding)
        self.say_goodbye(f"worker {self.name} is shutting down")
        link = self._link
        if link is not None:
            with contextlib.suppress(ConnectionLost):
                link.send(Bye("draining"))
            session = self._session
            unstarted = self.pool.cancel(lambda job: job.tag == session)
            if unstarted:
                self._hand_back(link, [job.task.id for job in unstarted])
        if not self.pool.join(grace):
            log.warning("grace period over; abandoning %d tasks", self.pool.outstanding)
        if link is not None:
            # Keep reading until the manager confirms it routes us nothing more, so a task
            # that crossed our goodbye is handed back rather than lost in a reset socket.
            if not self._released.wait(defaults.DRAIN_ACK_TIMEOUT):
                log.warning("manager %s did not answer our goodbye within %gs", link.peer, defaults.DRAIN_ACK_TIMEOUT)
            link.flush(2.0)
            link.close("worker stopped")
        if self._linker is not None:
            self._linker.kill(block=False)
        self.close_connections()
        self.pool.close()
        log.info("worker %s stopped", self.name)
        self.stopped()
