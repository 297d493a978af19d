"""The worker: a pool of Python processes, serving a manager or clients directly.

Stand-alone (no manager), the worker listens for clients and queues their tasks for its
pool, rejecting new ones beyond ``queue_size`` waiting tasks.

Managed (``managers=[(host, port), ...]``), it runs what its managers send, within the
credit it offers each: its :class:`~argon.uplink.Uplink` dials them, redials lost ones
and hands back tasks that have not started. A managed worker still listens, for status
requests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import ssl
import time
import uuid
from typing import Any

import gevent
import psutil

from argon.connection import Connection
from argon.errors import ProtocolError, TaskCancelled
from argon.flow import Prefetch
from argon.history import CpuMeter, Recorder
from argon.pool import Pool
from argon.process import Job, Reply
from argon.protocol import Failure, Task
from argon.server import ClientLink, Histogram, Server, ServerConfig
from argon.status import WorkerRow, WorkerStats
from argon.uplink import Uplink

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


class Worker(Server):
    """A process pool behind a server socket and, optionally, links to managers.

    Args:
        config: Its settings.
        latency: Where each task's latency is recorded, if anywhere (``--metrics-port``).

    Attributes:
        id: The id it registers under with its managers.
        pool: Its processes.
        uplink: Its links to its managers (none when stand-alone).
    """

    role = "worker"

    def __init__(self, config: WorkerConfig | None = None, *, latency: Histogram | None = None) -> None:
        config = config or WorkerConfig()
        super().__init__(config, latency=latency)
        self.config: WorkerConfig = config
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        prefetch = Prefetch()
        self.pool = Pool(
            config.processes,
            max_requests=config.max_requests,
            max_frame=config.max_frame,
            observe=prefetch.observe,
            pipeline=prefetch.short,
            on_broken=self._pool_broken,
        )
        self.uplink = Uplink(
            self,
            config.managers,
            self.pool,
            prefetch,
            worker_id=self.id,
            tls=config.manager_tls,
            figures=self._figures,
        )
        self._cpu = CpuMeter()

    @property
    def managed(self) -> bool:
        """Whether this worker serves managers."""
        return bool(self.uplink.links)

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
        self.uplink.start()

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
        if self.managed:
            where = ", ".join(link.name for link in self.uplink.links)
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
            discarded=self.uplink.discarded,
            handed_back=self.uplink.handed_back,
            started=self.started,
            cpu=self._cpu.read([os.getpid(), *(p["pid"] for p in processes)]),
        )

    def status(self) -> dict[str, Any]:
        """This worker as its own one-worker network."""
        pool = self.pool
        links = self.uplink.links
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
            "discarded": self.uplink.discarded,
            "handed_back": self.uplink.handed_back,
            "manager": ",".join(link.name for link in links) or None,
            "manager_connected": bool(links) and all(link.open for link in links),
            "managers": [{"address": link.name, "connected": link.open} for link in links],
        }

    def _pool_broken(self, reason: str) -> None:
        """The pool cannot replace a process: say so loudly and stop, so a supervisor restarts us."""
        if self.failure is None and not self.stopping:
            self.failure = reason
            log.critical("worker %s is stopping: its pool cannot start processes (%s)", self.name, reason)
            gevent.spawn(self.stop)

    def _drain(self, grace: float) -> None:
        """Tell the managers, hand back waiting tasks, finish running ones within ``grace``, leave."""
        log.info("worker %s draining (grace %.0fs, %d tasks in hand)", self.name, grace, self.pool.outstanding)
        leaving = self.uplink.drain()
        if not self.pool.join(grace):
            log.warning("grace period over; abandoning %d tasks", self.pool.outstanding)
        self.uplink.close(leaving)

    def _release(self) -> None:
        """Stop the stall watch and the pool's processes (whatever they still run is abandoned)."""
        self.uplink.release()
        self.pool.close()
