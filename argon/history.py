"""What a server measured over time, for the dashboard: task times, departures, samples, CPU.

- :class:`Recorder`: the manager and the pool call it as tasks leave the queue and come
  back (wait and run time percentiles, busy processes over time) and as workers leave
  (lost or drained); a few operations per task, so every server keeps one, dashboard or not.
- :class:`History`: a five-minute ring buffer of the server's counters, one sample a
  second, so a dashboard page opened now already has history; and each worker's tasks/s.
- :class:`CpuMeter`: the CPU use of a worker and its pool processes between readings.

:mod:`argon.dashboard` serves these figures over HTTP; nothing here serves or imports
anything of a server's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from argon import defaults

#: Counters the history keeps, one column each, sampled every second (``busy``: the
#: average over that second).
HISTORY_FIELDS = ("completed", "failed", "rejected", "redelivered", "queued", "busy", "capacity")
#: Worker-row fields that are too bulky for a page refreshed every second.
BULKY = ("processes",)


class Recorder:
    """What the dashboard learns as it happens: task wait and run times, departed workers.

    The server calls it with one line at each point: :meth:`started` when a task leaves
    the queue, :meth:`finished` when its reply comes back, :meth:`departed` when a
    worker goes. Each costs a clock read, a ``deque.append`` and a little arithmetic.

    The same two calls count busy processes up and down over time, so that the dashboard
    can chart the average number busy over each second: the count at the moment of a
    sample says little when tasks are short (all of them busy, or none, by chance).

    Args:
        keep: Most recent tasks whose times are kept (for the percentiles).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(self, keep: int = defaults.DASHBOARD_SAMPLES, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.waits: deque[tuple[float, float]] = deque(maxlen=keep)
        self.runs: deque[tuple[float, float]] = deque(maxlen=keep)
        self.gone: deque[dict[str, Any]] = deque(maxlen=defaults.DASHBOARD_DEPARTED)
        self._busy = 0  # tasks out (counted here; reset from the server's figure at each sample)
        self._capacity = 1 << 30  # ... of which at most this many count as busy (tasks beyond wait)
        self._busy_area = 0.0  # busy processes x seconds since the last sample
        self._busy_since = self._sampled = clock()

    def started(self, arrived: float) -> float:
        """A task that arrived at ``arrived`` (monotonic) leaves the queue now; returns now."""
        now = self.clock()
        self.waits.append((now, now - arrived))
        busy = self._busy
        self._busy_area += (busy if busy < self._capacity else self._capacity) * (now - self._busy_since)
        self._busy_since = now
        self._busy += 1
        return now

    def finished(self, started: float) -> None:
        """The reply to a task that left the queue at ``started`` (monotonic) is in."""
        now = self.clock()
        self.runs.append((now, now - started))
        busy = self._busy
        if busy:  # (a task of a lost worker may reply after the count was reset)
            self._busy_area += (busy if busy < self._capacity else self._capacity) * (now - self._busy_since)
            self._busy_since = now
            self._busy -= 1

    def busy_average(self, busy_now: int, capacity: int) -> float:
        """Average busy processes since the previous call; then count on from ``busy_now``.

        Tasks sent beyond ``capacity`` wait in a worker's prefetch and count as nothing.
        Restarting from the server's own figures each time corrects what the counting
        cannot see (tasks of a lost worker, tasks handed back), so an error lasts one
        sample at most.
        """
        now = self.clock()
        area = self._busy_area + min(self._busy, self._capacity) * (now - self._busy_since)
        elapsed = now - self._sampled
        self._busy, self._busy_area, self._busy_since, self._sampled = busy_now, 0.0, now, now
        self._capacity = capacity
        return area / elapsed if elapsed > 0 else float(busy_now)

    def departed(self, row: dict[str, Any], lost: bool) -> None:
        """A worker (its last ``status()`` row) left: drained (``lost=False``) or lost."""
        kept = {k: v for k, v in row.items() if k not in BULKY}
        self.gone.append({**kept, "busy": 0, "state": "lost" if lost else "left", "since": time.time()})

    def timings(self, window: float = defaults.DASHBOARD_WINDOW) -> dict[str, Any]:
        """Wait and run time percentiles (seconds) of the tasks of the last ``window`` seconds."""
        since = self.clock() - window
        return {"window": window, "wait": percentiles(self.waits, since), "run": percentiles(self.runs, since)}

    def departed_since(self, window: float = defaults.DASHBOARD_WINDOW) -> list[dict[str, Any]]:
        """Workers that left in the last ``window`` seconds, most recent first."""
        since = time.time() - window
        return [row for row in reversed(self.gone) if row["since"] >= since]


def percentiles(samples: Iterable[tuple[float, float]], since: float) -> dict[str, Any]:
    """p50, p95 and p99 (nearest rank) of the values of ``(when, value)`` samples taken at or after ``since``."""
    values = sorted(value for when, value in samples if when >= since)
    out: dict[str, Any] = {"count": len(values)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        out[name] = values[max(0, math.ceil(q * len(values)) - 1)] if values else None
    return out


class CpuMeter:
    """CPU use of some processes, as a percentage of one core, between successive readings."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self._value = 0.0

    def read(self, pids: Iterable[int]) -> float:
        """CPU use since the previous reading (readings closer than a second apart repeat it)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < 1.0:
            return self._value
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue  # a pool process that just exited
            total += times.user + times.system
        if self._last is not None:
            # A replaced pool process takes its CPU time with it; never report less than 0.
            self._value = round(max(0.0, 100 * (total - self._last[1]) / (now - self._last[0])), 1)
        self._last = (now, total)
        return self._value


class History:
    """The server's counters, one row a second for the last five minutes, and worker rates."""

    def __init__(self, length: int = int(defaults.DASHBOARD_WINDOW)) -> None:
        self.rows: deque[tuple[float, ...]] = deque(maxlen=length)
        self.taken = 0  # samples taken so far
        self._done: dict[str, deque[tuple[float, int]]] = {}

    def add(self, status: dict[str, Any], busy: float | None = None) -> None:
        """Record one sample of ``status``, with ``busy`` (if given) in place of its ``busy``."""
        now = time.time()
        self.taken += 1
        values = status if busy is None else {**status, "busy": busy}
        self.rows.append((round(now, 2), *(values.get(name) or 0 for name in HISTORY_FIELDS)))
        seen = set()
        for row in status["workers"]:
            worker = str(row["id"])
            seen.add(worker)
            self._done.setdefault(worker, deque(maxlen=defaults.DASHBOARD_RATE_SAMPLES)).append(
                (now, row["completed"] + row["failed"])
            )
        for worker in self._done.keys() - seen:
            del self._done[worker]

    def rate(self, worker: str) -> float:
        """Tasks per second ``worker`` finished over its last few samples."""
        samples = self._done.get(worker)
        if not samples or len(samples) < 2:
            return 0.0
        (then, before), (now, after) = samples[0], samples[-1]
        return round((after - before) / (now - then), 1) if now > then else 0.0

    def columns(self) -> dict[str, list[float]]:
        """The samples as columns: ``time`` (Unix seconds) and one per counter."""
        names = ("time", *HISTORY_FIELDS)
        if not self.rows:
            return {name: [] for name in names}
        return {name: list(column) for name, column in zip(names, zip(*self.rows, strict=True), strict=True)}
