"""The manager: routes clients' tasks to workers with free processes and results back.

Workers dial in and register their capacity. Each task goes to the registered worker
with the most free processes; no worker is ever sent more tasks than it has free
processes. When none is free, tasks wait in a FIFO queue, bounded by ``queue_size``:
beyond it they are rejected at once and the client retries them later.

A worker whose connection closes, or that misses its heartbeats, is dropped at once;
the tasks it was running go back to the front of the queue (each task is sent at most
``MAX_ATTEMPTS`` times, then fails with ``WorkerLost``).

The manager never deserializes task code or arguments: it forwards opaque bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from typing import Any

import gevent

from argon import defaults
from argon.connection import Connection
from argon.errors import ConnectionLost, MessageTooLarge, NoWorkers, ProtocolError
from argon.protocol import Bye, Failure, Handback, Message, Ready, Register, Result, Stats, Task
from argon.server import ClientLink, Server, ServerConfig

log = logging.getLogger(__name__)


class _Job:
    """A client's task while the manager holds it."""

    __slots__ = ("arrived", "attempts", "client", "id", "task", "worker")

    def __init__(self, job_id: int, client: ClientLink, task: Task) -> None:
        self.id = job_id
        self.client = client
        self.task = task
        self.attempts = 0
        self.worker: WorkerLink | None = None
        self.arrived = time.monotonic()

    def wanted(self) -> bool:
        """Whether the client that sent this task still waits for it."""
        return self.client.jobs.get(self.task.id) is self


class WorkerLink:
    """A registered worker as the manager sees it."""

    __slots__ = (
        "capacity",
        "completed",
        "conn",
        "draining",
        "failed",
        "free",
        "host",
        "id",
        "inflight",
        "joined",
        "pid",
        "port",
        "stats",
    )

    def __init__(self, conn: Connection, reg: Register) -> None:
        self.conn = conn
        self.id = reg.id
        self.host = reg.host
        self.port = reg.port
        self.capacity = reg.capacity
        self.free = 0
        self.pid = reg.pid
        self.inflight: dict[int, _Job] = {}
        self.completed = 0
        self.failed = 0
        self.joined = time.time()
        self.draining = False
        self.stats: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        """This worker's row in ``status()``."""
        started = self.stats.get("started")
        return {
            **self.stats,
            "uptime": round(time.time() - started, 1) if isinstance(started, float) else 0.0,
            "id": self.id,
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "capacity": self.capacity,
            "busy": len(self.inflight),
            "completed": self.completed,
            "failed": self.failed,
            "connected": round(time.time() - self.joined, 1),
            "draining": self.draining,
            "address": self.conn.peer,
        }


#: Figures a worker's Stats may carry, each a finite number of at least zero.
_STAT_NUMBERS = ("rss", "pool_rss", "replaced", "discarded", "uptime", "started")


def _checked_stats(values: dict[str, Any], capacity: int) -> dict[str, Any]:
    """A worker's Stats, checked: its figures are sane numbers, one process row per process at most.

    Raises:
        ProtocolError: A figure is out of range.
    """
    for name in _STAT_NUMBERS:
        value = values.get(name, 0)
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            raise ProtocolError(f"worker stats: {name} is {value!r:.40}")
    processes = values.get("processes", [])
    if type(processes) is not list or len(processes) > capacity or any(type(p) is not dict for p in processes):
        raise ProtocolError(f"worker stats: process rows {processes!r:.40} for {capacity} processes")
    return values


class FreeSlots:
    """Workers with free processes, bucketed by how many of them are free.

    Picking the least loaded worker costs the same whether ten or ten thousand are
    registered.
    """

    def __init__(self) -> None:
        self._buckets: list[dict[WorkerLink, None]] = [{}]
        self._top = 0  # no bucket above this one holds a worker

    def _highest(self) -> int:
        """The most free processes any worker has (lowering the mark past empty buckets)."""
        buckets, top = self._buckets, self._top
        while top and not buckets[top]:
            top -= 1
        self._top = top
        return top

    def __bool__(self) -> bool:
        return self._highest() > 0

    def add(self, link: WorkerLink, count: int) -> None:
        """Give ``link`` ``count`` more free processes."""
        if count <= 0:
            return
        self._buckets[link.free].pop(link, None)
        link.free += count
        while len(self._buckets) <= link.free:
            self._buckets.append({})
        self._buckets[link.free][link] = None
        self._top = max(self._top, link.free)

    def remove(self, link: WorkerLink) -> None:
        """Take ``link`` out of routing altogether."""
        self._buckets[link.free].pop(link, None)
        link.free = 0

    def take(self) -> WorkerLink | None:
        """Claim one process on the worker with the most free ones; None if all are busy."""
        free = self._highest()
        if not free:
            return None
        bucket = self._buckets[free]
        link = next(iter(bucket))
        del bucket[link]
        link.free = free - 1
        self._buckets[free - 1][link] = None
        return link


class Manager(Server):
    """Routes tasks from clients to registered workers; see the module docstring."""

    role = "manager"

    def __init__(self, config: ServerConfig | None = None) -> None:
        super().__init__(config or ServerConfig())
        self.completed = 0
        self.failed = 0
        self.redelivered = 0
        self._workers: dict[str, WorkerLink] = {}
        self._free = FreeSlots()
        self._pending: deque[_Job] = deque()
        self._next_id = 0
        self.handed_back = 0
        # Since when no registered worker takes tasks (None: one does); see fail_unserved.
        self._unserved_since: float | None = time.monotonic()
        self._waiting: gevent.Greenlet | None = None

    # -- connections --------------------------------------------------------------------

    def handle(self, conn: Connection) -> None:
        """Serve a client or a worker, by the role it announced."""
        assert conn.hello is not None
        if conn.hello.role == "client":
            self.serve_client(conn)
        elif conn.hello.role == "worker":
            self._serve_worker(conn)
        else:
            log.warning("refusing %s: unexpected role %r", conn.peer, conn.hello.role)

    def _serve_worker(self, conn: Connection) -> None:
        link: WorkerLink | None = None

        def on_message(msg: Message) -> None:
            nonlocal link
            if link is not None and isinstance(msg, (Result, Failure)):
                self._worker_reply(link, msg)
            elif link is None and isinstance(msg, Register):
                link = self._register(conn, msg)
            elif link is not None and isinstance(msg, Ready):
                self._ready(link, msg.free)
            elif link is not None and isinstance(msg, Stats):
                link.stats = _checked_stats(msg.values, link.capacity)
            elif link is not None and isinstance(msg, Bye):
                self._draining(link, msg.reason)
            elif link is not None and isinstance(msg, Handback):
                self._handback(link, msg.ids)
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} from worker {conn.peer}")

        reason = conn.serve(on_message)
        if link is not None:
            self._drop_worker(link, reason)

    def _register(self, conn: Connection, reg: Register) -> WorkerLink:
        if not 1 <= reg.capacity <= defaults.MAX_CAPACITY or not 0 <= reg.free <= reg.capacity:
            raise ProtocolError(
                f"bad registration: capacity {reg.capacity} (1 to {defaults.MAX_CAPACITY}), free {reg.free}"
            )
        if not 0 <= reg.port <= 65535 or reg.pid < 0 or not 0 < len(reg.id) <= 256 or len(reg.host) > 256:
            raise ProtocolError(f"bad registration: id {reg.id[:40]!r}, host {reg.host[:40]!r}, port {reg.port}")
        old = self._workers.get(reg.id)
        if old is not None:
            old.conn.close("worker registered again on a new connection")
            self._drop_worker(old, "replaced by a new connection")
        link = WorkerLink(conn, reg)
        self._workers[link.id] = link
        self._free.add(link, reg.free)
        log.info("worker %s registered from %s with %d processes (%d free)", link.id, conn.peer, reg.capacity, reg.free)
        self._workers_changed()
        self._pump()
        return link

    def _ready(self, link: WorkerLink, count: int) -> None:
        """``count`` more of the worker's processes are free (tasks of an earlier link finished)."""
        # Never believe more free processes than the worker registered: an absurd claim
        # would make the manager overcommit it (and allocate routing buckets for it).
        if count < 1 or link.free + len(link.inflight) + count > link.capacity:
            raise ProtocolError(
                f"worker {link.id} claims {count} more free processes, but it has {link.capacity},"
                f" of which {link.free} are free and {len(link.inflight)} are running tasks"
            )
        if not link.draining:
            self._free.add(link, count)
            self._pump()

    def _draining(self, link: WorkerLink, reason: str) -> None:
        """The worker said goodbye: route it nothing more, and tell it so."""
        log.info("worker %s is draining: %s", link.id, reason)
        link.draining = True
        self._free.remove(link)
        self._workers_changed()
        # Everything routed to it before this goodbye is ahead of it on the link: once the
        # worker reads this, it knows no further task can come (it hands back any that did).
        with contextlib.suppress(ConnectionLost):
            link.conn.send(Bye(f"manager {self.name} routes nothing more to worker {link.id}"))

    def _handback(self, link: WorkerLink, ids: list[Any]) -> None:
        """The worker returns tasks it will not run: queue them first, for another worker."""
        held = link.inflight
        if any(type(i) is not int or i not in held for i in ids) or len(set(ids)) != len(ids):
            raise ProtocolError(f"worker {link.id} hands back tasks it does not hold: {ids!r:.60}")
        jobs = [link.inflight.pop(job_id) for job_id in ids]
        if not link.draining:
            self._free.add(link, len(jobs))
        for job in reversed(jobs):
            job.worker = None
            job.attempts -= 1  # it never ran
            if job.wanted():
                self._pending.appendleft(job)
        self.handed_back += len(jobs)
        log.info("worker %s handed back %d tasks it had not started", link.id, len(jobs))
        self._pump()

    def _drop_worker(self, link: WorkerLink, reason: str) -> None:
        if self._workers.get(link.id) is not link:
            return
        del self._workers[link.id]
        self._free.remove(link)
        self._workers_changed()
        jobs = list(link.inflight.values())
        link.inflight.clear()
        if link.draining and not jobs:
            log.info("worker %s (%s) left after draining", link.id, link.conn.peer)
        else:
            log.warning(
                "worker %s (%s) lost: %s; %d running tasks to redeliver", link.id, link.conn.peer, reason, len(jobs)
            )
        for job in reversed(jobs):
            if not job.wanted():
                continue
            if job.attempts >= defaults.MAX_ATTEMPTS:
                self.failed += 1
                job.client.reply(
                    Failure(
                        job.task.id,
                        "WorkerLost",
                        f"the worker running the task was lost {job.attempts} times"
                        f" (last: {link.id} at {link.conn.peer}: {reason})",
                    )
                )
            else:
                job.worker = None
                self._pending.appendleft(job)
                self.redelivered += 1
        self._pump()

    # -- routing ------------------------------------------------------------------------

    def _workers_changed(self) -> None:
        """Note when the manager is left without a worker that takes tasks (for ``--worker-wait``)."""
        if any(not link.draining for link in self._workers.values()):
            self._unserved_since = None
        elif self._unserved_since is None:
            self._unserved_since = time.monotonic()
            self._arm_worker_wait()

    def _arm_worker_wait(self) -> None:
        """Make sure queued tasks are failed once ``--worker-wait`` passes without a worker."""
        if self._unserved_since is not None and self._pending and self._waiting is None:
            left = self._unserved_since + self.config.worker_wait - time.monotonic()
            self._waiting = gevent.spawn_later(max(0.0, left), self.fail_unserved)

    def fail_unserved(self, now: float | None = None) -> int:
        """Fail every queued task with ``NoWorkers`` if no worker has taken tasks for ``--worker-wait``.

        Args:
            now: The monotonic time (for tests; default: now).

        Returns:
            How many tasks failed.
        """
        self._waiting = None
        since = self._unserved_since
        if since is None:
            return 0
        now = time.monotonic() if now is None else now
        if now - since < self.config.worker_wait:
            self._arm_worker_wait()  # the manager lost its workers again since this was armed
            return 0
        jobs, self._pending = self._pending, deque()
        why = self._no_workers(now - since)
        for job in jobs:
            if job.wanted():
                self.failed += 1
                job.client.reply(Failure(job.task.id, NoWorkers.__name__, why))
        if jobs:
            log.warning("failed %d queued tasks: %s", len(jobs), why)
        return len(jobs)

    def _no_workers(self, idle: float) -> str:
        return (
            f"manager {self.name} has had no worker for {idle:.0f}s (--worker-wait {self.config.worker_wait:g});"
            " is a worker running, with the manager's address and the same key?"
        )

    def submit(self, client: ClientLink, task: Task) -> None:
        """Queue a client's task, or reject it when the queue is full (or fail it: no workers)."""
        since = self._unserved_since
        if since is not None and time.monotonic() - since >= self.config.worker_wait:
            self.failed += 1
            client.conn.send(Failure(task.id, NoWorkers.__name__, self._no_workers(time.monotonic() - since)))
            return
        limit = self.config.queue_size
        if limit is not None and len(self._pending) >= limit and not self._free:
            self.reject(client, task, f"manager {self.name} queue is full ({len(self._pending)} tasks waiting)")
            return
        self._next_id += 1
        job = _Job(self._next_id, client, task)
        client.jobs[task.id] = job
        self._pending.append(job)
        self._pump()
        self._arm_worker_wait()

    def _pump(self) -> None:
        """Send queued tasks to free processes while there are both."""
        pending = self._pending
        while pending:
            link = self._free.take()
            if link is None:
                return
            job = pending.popleft()
            job.attempts += 1
            job.worker = link
            link.inflight[job.id] = job
            task = job.task
            try:
                link.conn.send(Task(job.id, task.func, task.args, task.timeout))
            except MessageTooLarge as exc:
                del link.inflight[job.id]
                self._free.add(link, 1)
                self.failed += 1
                job.client.reply(Failure(task.id, "MessageTooLarge", str(exc)))
            except ConnectionLost as exc:
                self._drop_worker(link, str(exc))

    def _worker_reply(self, link: WorkerLink, msg: Result | Failure) -> None:
        job = link.inflight.pop(msg.id, None)
        if job is None:
            log.debug("worker %s replied to unknown task %d", link.id, msg.id)
            return
        if type(msg) is Result:
            self.completed += 1
            link.completed += 1
        else:
            self.failed += 1
            link.failed += 1
        if not link.draining:
            self._free.add(link, 1)
        if self.latency is not None:
            self.observe(job.arrived)
        job.client.reply(Result(job.task.id, msg.value) if type(msg) is Result else msg._replace(id=job.task.id))
        self._pump()

    def cancel(self, client: ClientLink, task_id: int) -> bool:
        """Drop a queued task (a running one finishes normally)."""
        job = client.jobs.get(task_id)
        if job is None or job.worker is not None:
            return False
        self._pending.remove(job)
        client.reply(Failure(task_id, "TaskCancelled", "task cancelled before it started"))
        return True

    def client_gone(self, client: ClientLink) -> None:
        """Forget the departed client's queued tasks; its running ones finish unseen."""
        if client.jobs:
            client.jobs.clear()
            self._pending = deque(job for job in self._pending if job.client is not client)

    # -- reporting and stopping -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Workers, capacity, queue length and counters."""
        workers = [link.describe() for link in self._workers.values()]
        since = self._unserved_since
        return {
            **self.base_status(),
            "workers": workers,
            "capacity": sum(w["capacity"] for w in workers if not w["draining"]),
            "busy": sum(w["busy"] for w in workers),
            "queued": len(self._pending),
            "redelivered": self.redelivered,
            "handed_back": self.handed_back,
            "worker_wait": self.config.worker_wait,
            "no_workers_for": None if since is None else round(time.monotonic() - since, 1),
        }

    def busy(self) -> int:
        """Tasks queued or running."""
        return len(self._pending) + sum(len(w.inflight) for w in self._workers.values())

    def shutdown(self, grace: float | None = None) -> None:
        """Stop taking tasks, finish queued and running ones within ``grace``, then close."""
        grace = self.config.grace if grace is None else grace
        log.info("manager %s shutting down (grace %.0fs, %d tasks in hand)", self.name, grace, self.busy())
        self.say_goodbye(f"manager {self.name} is shutting down")
        deadline = time.monotonic() + grace
        while self.busy() and self._workers and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.close_connections()
        log.info("manager %s stopped", self.name)
        self.stopped()
