"""Flow control between a manager and its workers: credits, prefetch, routing.

A worker decides how many of a manager's tasks it holds: its **credit** is a window
(tasks held at most, running or waiting) and the processes that start them at once. The
difference is its **prefetch**: tasks that wait in the worker so that its processes never
idle for a round trip to the manager between short tasks. :class:`Prefetch` sizes it from
how long the worker's tasks take: deep for tasks much shorter than a round trip, none for
long ones, and none while every process is stuck on a task far longer than usual.

The manager files each worker in :class:`Routes` by its idle processes and its spare
credit: a task goes to the worker with the most idle processes, and waits in a worker's
prefetch only when no process is idle anywhere; then one worker's spare credit is filled
before the next one's, so that its tasks travel together. A worker that holds tasks
beyond its processes is listed in :attr:`Routes.prefetching`, so the manager can take
them back when a process is idle elsewhere.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, Protocol, TypeVar

from argon import defaults


class Routable(Protocol):
    """What :class:`Routes` reads and writes on a worker's link."""

    inflight: dict[int, Any]  # tasks sent and not yet answered or returned
    window: int  # the worker's credit: most tasks it holds
    processes: int  # how many of them start at once
    routable: bool  # False while it registers, drains or after it is gone
    reclaiming: int  # tasks the manager has asked back from it and not heard about yet
    idle: int  # its bucket in Routes (maintained by Routes)
    spare: int  # its bucket in Routes (maintained by Routes)
    waiting: int  # tasks it holds beyond its processes (maintained by Routes)


L = TypeVar("L", bound=Routable)


class Routes(Generic[L]):
    """Workers filed by idle processes, then by spare credit; picking costs the same for 10 or 10,000.

    Attributes:
        idle: Idle processes in all (processes credited and not holding a task).
        waiting: Tasks held by workers beyond their processes, in all (their prefetch).
        prefetching: Workers holding more tasks than they have processes that have not been
            asked for them back yet (oldest first).
    """

    def __init__(self) -> None:
        self._idle: list[dict[L, None]] = [{}]  # [n]: workers with n idle processes (n >= 1)
        self._spare: list[dict[L, None]] = [{}]  # [n]: workers with n spare credits, no idle process
        self._top_idle = 0  # no bucket above these holds a worker
        self._top_spare = 0
        self._run: L | None = None  # the worker whose spare credit is being filled (see take)
        self.idle = 0
        self.waiting = 0
        self.prefetching: dict[L, None] = {}

    def take(self) -> L | None:
        """The worker the next task should go to, or None if none has room.

        The one with the most idle processes; with none idle anywhere, the worker whose
        spare credit is being filled until it is full (then the one with the most), so
        that a run of tasks goes to one worker in one frame rather than one task to each
        of many. The caller adds the task to its ``inflight`` and calls :meth:`update`.
        """
        buckets, top = self._idle, self._top_idle
        while top and not buckets[top]:
            top -= 1
        self._top_idle = top
        if top:
            return next(iter(buckets[top]))
        run = self._run
        if run is not None:
            return run  # fill its credit: its tasks travel together, in one frame
        buckets, top = self._spare, self._top_spare
        while top and not buckets[top]:
            top -= 1
        self._top_spare = top
        if top:
            run = self._run = next(iter(buckets[top]))
            return run
        return None

    def update(self, link: L) -> None:
        """Re-file ``link`` after its credit, its tasks or its state changed."""
        if link.routable:
            load, processes = len(link.inflight), link.processes
            idle = processes - load if processes > load else 0
            spare = link.window - (load if load > processes else processes)
            if spare < 0:
                spare = 0
            waiting = load - processes if load > processes else 0
        else:
            idle = spare = waiting = 0
        if idle != link.idle:
            self._move(self._idle, link, link.idle, idle)
            self.idle += idle - link.idle
            link.idle = idle
            if idle > self._top_idle:
                self._top_idle = idle
        if idle:
            spare = 0  # a worker with an idle process is found by that; file its credit later
        if spare != link.spare:
            self._move(self._spare, link, link.spare, spare)
            link.spare = spare
            if spare > self._top_spare:
                self._top_spare = spare
            if not spare and link is self._run:
                self._run = None
        if waiting != link.waiting:
            self.waiting += waiting - link.waiting
            link.waiting = waiting
        if waiting and not link.reclaiming:
            if link not in self.prefetching:
                self.prefetching[link] = None
        elif self.prefetching:
            self.prefetching.pop(link, None)

    @staticmethod
    def _move(buckets: list[dict[L, None]], link: L, old: int, new: int) -> None:
        if old:
            del buckets[old][link]
        if new:
            while len(buckets) <= new:
                buckets.append({})
            buckets[new][link] = None


class Prefetch:
    """How many tasks a worker holds beyond its processes, from how long its tasks take.

    It keeps enough work waiting per process to cover twice a round trip to the manager
    (the time from a result leaving to the next task arriving; at least ``horizon``, at
    most ``max_horizon``), so no process idles between short tasks, and none for tasks
    longer than that. Run times and round trips are medians of the last few samples: a
    change of workload shows at once, and one outlier changes nothing.

    Args:
        horizon: Least seconds of work to keep waiting per process (0: never prefetch).
        max_horizon: Most seconds of work to keep waiting per process.
        limit: Most tasks to hold beyond the processes.
        stall_after: Seconds after which processes that are all still on their tasks
            count as stuck (at least; more for workers whose tasks are slower).
    """

    #: How many recent samples the medians are taken over.
    SAMPLES = 15

    def __init__(
        self,
        horizon: float = defaults.PREFETCH_HORIZON,
        max_horizon: float = defaults.PREFETCH_MAX_HORIZON,
        limit: int = defaults.MAX_PREFETCH,
        stall_after: float = defaults.STALL_AFTER,
    ) -> None:
        self.min_horizon = horizon
        self.max_horizon = max(horizon, max_horizon)
        self.limit = limit
        self.stall_after = stall_after
        self._runs: deque[float] = deque(maxlen=self.SAMPLES)
        self._trips: deque[float] = deque(maxlen=self.SAMPLES)
        self._typical: float | None = None  # cached median of _runs
        self._unsorted = 0  # samples since _typical was last computed
        self._horizon: float | None = None  # cached, from _trips

    def __repr__(self) -> str:
        typical = self.typical
        service = "?" if typical is None else f"{typical * 1e3:.3f}ms"
        return f"<Prefetch typical={service} horizon={self.horizon * 1e3:.1f}ms limit={self.limit}>"

    def observe(self, seconds: float) -> None:
        """Note how long one task ran."""
        self._runs.append(seconds)
        self._unsorted += 1
        if self._unsorted >= 4 or self._typical is None:  # a median per task would cost more than it tells
            self._typical, self._unsorted = None, 0

    def observe_round_trip(self, seconds: float) -> None:
        """Note how long the manager took to send a task after a result freed a credit."""
        self._trips.append(seconds)
        self._horizon = None

    @property
    def typical(self) -> float | None:
        """The median run time of the last few tasks (None before the first)."""
        if self._typical is None and self._runs:
            self._typical = sorted(self._runs)[len(self._runs) // 2]
        return self._typical

    @property
    def horizon(self) -> float:
        """Seconds of work to keep waiting per process."""
        if self._horizon is None:
            trip = sorted(self._trips)[len(self._trips) // 2] if self._trips else 0.0
            self._horizon = min(self.max_horizon, max(self.min_horizon, 2 * trip)) if self.min_horizon else 0.0
        return self._horizon

    def depth(self, processes: int) -> int:
        """Tasks to hold beyond ``processes``: a power of two (or 0), so it changes seldom.

        None until a task has finished: a new worker holds only what it can start.
        """
        typical = self.typical
        horizon = self.horizon
        if typical is None or processes <= 0 or not horizon:
            return 0
        wanted = min(self.limit, int(processes * horizon / max(typical, 1e-6)))
        return 1 << (wanted.bit_length() - 1) if wanted else 0

    def short(self) -> bool:
        """Whether tasks are short enough to pipeline one behind each running task (see :mod:`argon.pool`)."""
        return self.depth(1) > 0

    def stalled(self, youngest: float) -> bool:
        """Whether processes whose newest task started ``youngest`` seconds ago are stuck."""
        return youngest > max(self.stall_after, 8 * (self.typical or 0.0))


def offers(size: int, free: int, running: list[int], prefetch: int) -> list[tuple[int, int]]:
    """The credit ``(window, processes)`` a worker gives each of its managers.

    Every idle process is offered to every manager at once: a manager with work waiting
    takes it in one trip, and a quiet manager is never left without an offer because a
    busy one holds the rest. If two managers take the same process, the task that comes
    second waits in the worker's queue; its manager's next credit no longer counts it as
    started, so that manager sees it as waiting and takes it back when a process is idle
    elsewhere (:class:`~argon.protocol.Reclaim`). The pool starts queued tasks in the order
    they came, whichever manager sent them, so no manager is served ahead of its turn
    (only a short task pipelined behind a running one may start before an older one).

    The prefetch is split between the managers; with several, each gets room for at
    least one waiting task (while there is any prefetch), so a manager whose tasks arrive
    while a busy one keeps every process full still gets its task into the worker's
    queue, and is served in turn.

    Args:
        size: The worker's processes.
        free: Its idle processes (none while any task waits in it).
        running: For each manager, how many of its tasks are running.
        prefetch: Tasks the worker holds beyond its processes, in all (0: none).

    Returns:
        ``(window, processes)`` for each manager, in the order of ``running``.
    """
    count = len(running)
    credits = []
    for index, mine in enumerate(running):
        processes = min(size, mine + free)
        share = (prefetch + index) // count  # the shares add up to ``prefetch``
        if count > 1 and prefetch:
            share = max(share, 1)
        credits.append((processes + share, processes))
    return credits
