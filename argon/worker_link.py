"""A worker as the manager sees it: its link, registration, credit and the tasks it holds.

:class:`Ticket` is the manager's record of a client's task: queued in the manager, or held
by one :class:`WorkerLink` until the worker answers it or hands it back. The manager
(:class:`~argon.manager.Manager`) routes tickets to links; the checks here keep what a
worker claims (its registration, credits and stats) within range.
"""

from __future__ import annotations

import math
import time
from typing import Any

from argon import defaults
from argon.connection import Connection
from argon.errors import ProtocolError
from argon.protocol import Credit, Register, Stats, Task
from argon.server import ClientLink
from argon.states import WorkerState, advance
from argon.status import DASHBOARD_URL, WorkerRow, WorkerStats


class Ticket:
    """A client's task while the manager holds it (queued, or held by a worker)."""

    __slots__ = ("arrived", "attempts", "cancelling", "client", "id", "sent", "task", "worker")

    def __init__(self, ticket_id: int, client: ClientLink, task: Task, arrived: float) -> None:
        self.id = ticket_id
        self.client = client
        self.task = task
        self.attempts = 0
        self.worker: WorkerLink | None = None
        self.arrived = arrived
        self.sent = 0.0  # when it last left the queue for a worker
        self.cancelling = False  # its client asked to cancel it; the worker holding it was asked

    def __repr__(self) -> str:
        where = f"at {self.worker.id}" if self.worker is not None else "queued"
        return f"<Ticket {self.id} (client task {self.task.id}) {where}, attempt {self.attempts}>"

    def wanted(self) -> bool:
        """Whether the client that sent this task still waits for it."""
        return self.client.tasks.get(self.task.id) is self


#: Figures a worker's Stats may carry, each a finite number of at least zero.
_STAT_NUMBERS = ("rss", "pool_rss", "replaced", "discarded", "handed_back", "uptime", "started", "cpu")


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
    dashboards = values.get("dashboards", [])
    if (
        type(dashboards) is not list
        or len(dashboards) > defaults.MAX_DASHBOARDS
        or not all(type(url) is str and len(url) <= 200 and DASHBOARD_URL.fullmatch(url) for url in dashboards)
    ):
        raise ProtocolError(f"worker stats: dashboards {dashboards!r:.60}")
    return values


class WorkerLink:
    """A worker's link as the manager sees it: its registration, credit and tasks.

    See :class:`~argon.states.WorkerState` for its life cycle; :class:`~argon.flow.Routes`
    files it by ``idle`` and ``spare``.
    """

    __slots__ = (
        "capacity",
        "completed",
        "conn",
        "failed",
        "host",
        "id",
        "idle",
        "inflight",
        "joined",
        "pid",
        "port",
        "processes",
        "reclaiming",
        "routable",
        "spare",
        "state",
        "stats",
        "waiting",
        "window",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.state = WorkerState.CONNECTED
        self.routable = False
        self.id = ""
        self.host = ""
        self.port = 0
        self.pid = 0
        self.capacity = 0
        self.window = 0  # its credit: most tasks it holds
        self.processes = 0  # how many of them start at once
        self.idle = 0  # filed in Routes under this many idle processes
        self.spare = 0  # ... and this much spare credit
        self.waiting = 0  # ... holding this many tasks beyond its processes
        self.inflight: dict[int, Ticket] = {}  # sent, not yet answered or returned (in order)
        self.reclaiming = 0  # tasks asked back and not answered yet
        self.completed = 0
        self.failed = 0
        self.joined = time.time()
        self.stats = WorkerStats()

    def __repr__(self) -> str:
        return (
            f"<WorkerLink {self.id or '?'}@{self.conn.peer} {self.state.value}"
            f" holding {len(self.inflight)}/{self.window}, {self.processes} processes>"
        )

    def move(self, state: WorkerState) -> None:
        """Change state (see :data:`argon.states.MOVES`); only an active worker is routed to."""
        self.state = advance(self.state, state, self)  # type: ignore[assignment]
        self.routable = state is WorkerState.ACTIVE

    def register(self, reg: Register) -> None:
        """Take the worker's registration; until its first credit, it holds ``reg.free`` tasks.

        Raises:
            ProtocolError: A count is out of range, or the worker registered already.
        """
        if self.state is not WorkerState.CONNECTED:
            raise ProtocolError(f"worker {self.id} registered twice")
        if not 1 <= reg.capacity <= defaults.MAX_CAPACITY or not 0 <= reg.free <= reg.capacity:
            raise ProtocolError(
                f"bad registration: capacity {reg.capacity} (1 to {defaults.MAX_CAPACITY}), free {reg.free}"
            )
        if not 0 <= reg.port <= 65535 or reg.pid < 0 or not 0 < len(reg.id) <= 256 or len(reg.host) > 256:
            raise ProtocolError(f"bad registration: id {reg.id[:40]!r}, host {reg.host[:40]!r}, port {reg.port}")
        self.id, self.host, self.port, self.pid = reg.id, reg.host, reg.port, reg.pid
        self.capacity = reg.capacity
        self.window = self.processes = reg.free
        self.move(WorkerState.ACTIVE)

    def credit(self, credit: Credit) -> None:
        """Take a new credit (it replaces the last one).

        Raises:
            ProtocolError: It claims more processes than the worker has, or an out-of-range window.
        """
        if not 0 <= credit.processes <= self.capacity:
            raise ProtocolError(f"credit for {credit.processes} processes; the worker has {self.capacity}")
        if not credit.processes <= credit.window <= self.capacity + defaults.MAX_PREFETCH:
            raise ProtocolError(
                f"credit window {credit.window} out of range ({credit.processes} to"
                f" {self.capacity + defaults.MAX_PREFETCH})"
            )
        self.window, self.processes = credit.window, credit.processes

    def report(self, stats: Stats) -> None:
        """Take the worker's latest figures (they replace the last ones).

        Raises:
            ProtocolError: A figure is out of range.
        """
        self.stats = WorkerStats.from_dict(_checked_stats(stats.values, self.capacity))

    def row(self) -> WorkerRow:
        """This worker's row in ``status()``."""
        now = time.time()
        held = len(self.inflight)
        started = min(held, self.processes)
        busy = min(self.capacity, self.capacity - self.processes + started)  # tasks of an earlier link too
        return WorkerRow(
            id=self.id,
            host=self.host,
            port=self.port,
            pid=self.pid,
            capacity=self.capacity,
            busy=busy,
            prefetched=held - started,
            credit=self.window,
            completed=self.completed,
            failed=self.failed,
            draining=self.state is WorkerState.DRAINING,
            uptime=round(now - self.stats.started, 1) if self.stats.started else 0.0,
            connected=round(now - self.joined, 1),
            address=self.conn.peer,
            stats=self.stats,
        )
