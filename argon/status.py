"""A worker's row in ``status()`` as a typed record; the ``argon status`` tables.

:class:`WorkerRow` is built in one place per server (a manager builds one per registered
worker, a worker one for itself) and read by :func:`render`, the metrics and the
dashboard. On the wire, and in ``Client.status()``, it is a plain dict
(:meth:`WorkerRow.as_dict`); :meth:`WorkerRow.from_dict` reads one back, filling in
defaults for the fields an older peer did not send.

With several managers, :func:`combine` merges what each one reports into network totals
and :func:`render_network` shows every manager (or that it is down) and the totals.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

R = TypeVar("R", bound="_Record")


class _Record:
    """Dict conversion for the frozen dataclasses below.

    Unknown keys are ignored, missing ones take their defaults, and a value of the wrong
    type is replaced by the default.
    """

    @classmethod
    def from_dict(cls: type[R], values: dict[str, Any]) -> R:
        """Read a record from its wire form (tolerant of older and newer peers)."""
        return cls(**cls._known(values))

    @classmethod
    def _known(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The fields of ``values`` this record has, where their type is right."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in values:
                continue
            value, default = values[field.name], _default(field)
            if isinstance(default, bool):
                ok = type(value) is bool
            elif isinstance(default, float):
                ok = type(value) in (int, float)
            else:
                ok = type(value) is type(default)
            if ok:
                kwargs[field.name] = value
        return kwargs

    def as_dict(self) -> dict[str, Any]:
        """The wire form."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@dataclasses.dataclass(frozen=True)
class WorkerStats(_Record):
    """A worker's own figures: sent to its manager in ``Stats`` and shown in its row.

    Attributes:
        rss: The worker process's resident memory (bytes).
        pool_rss: Its pool processes' resident memory, added up (bytes).
        processes: One dict per pool process: ``pid``, ``tasks``, ``rss``, ``uptime``.
        replaced: Pool processes replaced so far (died, timed out or recycled).
        discarded: Results dropped because the manager link they belonged to was gone.
        handed_back: Tasks handed back to the manager unstarted (steal-back, stalls, drain).
        started: When the worker started (``time.time()``).
        cpu: CPU use of the worker and its pool processes since its last report (% of one core).
        dashboards: Where the worker's other managers serve their dashboards, as the worker
            reaches them (each manager's dashboard links to the others it learns of this way).
    """

    rss: int = 0
    pool_rss: int = 0
    processes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    replaced: int = 0
    discarded: int = 0
    handed_back: int = 0
    started: float = 0.0
    cpu: float = 0.0
    dashboards: list[str] = dataclasses.field(default_factory=list)


#: A dashboard address a worker may report: ``http(s)://host:port/`` and nothing else.
DASHBOARD_URL = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}/")


def reachable_dashboard(url: str, dialed: str) -> str:
    """A manager's announced dashboard ``url`` as seen from a worker that dialed ``dialed``.

    A manager listening on every address (``0.0.0.0``, ``::``) announces that address;
    the host the worker reached it at is the one to link to. Returns "" for anything
    that is not a plain ``http(s)://host:port/`` address.
    """
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = f"[{dialed}]" if ":" in dialed else dialed
    candidate = f"{scheme}://{host}:{port}/"
    return candidate if len(candidate) <= 200 and DASHBOARD_URL.fullmatch(candidate) else ""


@dataclasses.dataclass(frozen=True)
class WorkerRow(_Record):
    """One worker's row in ``status()["workers"]``.

    Attributes:
        id: The worker's id.
        host: The address it listens on.
        port: The port it listens on.
        pid: Its process id.
        capacity: Its pool processes.
        busy: Tasks running (never more than ``capacity``).
        prefetched: Tasks it holds that have not started (see docs/concepts.md, "Flow").
        credit: Most tasks it will hold at once: its free processes plus its prefetch.
        completed: Tasks that returned a value.
        failed: Tasks that failed.
        draining: Whether it is stopping (it gets no new tasks).
        uptime: Seconds since the worker started.
        connected: Seconds since it registered (0 for a worker's own row).
        address: The address its manager sees it at (empty in a worker's own row).
        stats: Its own figures.
    """

    id: str = ""
    host: str = ""
    port: int = 0
    pid: int = 0
    capacity: int = 0
    busy: int = 0
    prefetched: int = 0
    credit: int = 0
    completed: int = 0
    failed: int = 0
    draining: bool = False
    uptime: float = 0.0
    connected: float = 0.0
    address: str = ""
    stats: WorkerStats = dataclasses.field(default_factory=WorkerStats)

    def as_dict(self) -> dict[str, Any]:
        """The wire form: the row's fields with the worker's figures at the same level."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stats"}
        return {**self.stats.as_dict(), **row}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkerRow:
        """Read a row back (its figures are at the same level as its fields)."""
        known = {name: value for name, value in cls._known(values).items() if name != "stats"}
        return cls(**known, stats=WorkerStats.from_dict(values))


def _size(count: float) -> str:
    """Bytes as a short human figure (``12.3M``)."""
    for unit in ("", "K", "M", "G"):
        if abs(count) < 1024 or unit == "G":
            return f"{count:.0f}{unit}" if unit == "" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}G"


def _duration(seconds: float) -> str:
    """Seconds as ``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def render(status: dict[str, Any]) -> str:
    """A table of workers and a line of totals, as ``argon status`` prints them."""
    header = ("WORKER", "PROCS", "BUSY", "PREFETCHED", "DONE", "FAILED", "UPTIME", "MEMORY", "STATE")
    rows = [header]
    for worker in map(WorkerRow.from_dict, status["workers"]):
        memory = worker.stats.rss + worker.stats.pool_rss
        rows.append(
            (
                f"{worker.host}:{worker.port}",
                str(worker.capacity),
                str(worker.busy),
                str(worker.prefetched),
                str(worker.completed),
                str(worker.failed),
                _duration(worker.uptime or worker.connected),
                _size(memory) if memory else "-",
                "draining" if worker.draining else "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"{status['role']} {status['name']}  (argon {status['version']}, up {_duration(status['uptime'])},"
        f" {status['clients']} clients)"
    ]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no workers registered)")
    idle = status.get("no_workers_for")
    if idle is not None:  # a manager's own figure: how long tasks have had nowhere to go
        wait = status.get("worker_wait")
        lines.append(f"no worker for {_duration(idle)}" + (f" (tasks fail after {wait:g}s)" if wait else ""))
    limit = status.get("queue_size")
    lines.append(
        f"capacity {status['capacity']}  busy {status['busy']}  prefetched {status.get('prefetched', 0)}"
        f"  queued {status['queued']}"
        f"{'/' + str(limit) if limit is not None else ''}  completed {status['completed']}"
        f"  failed {status['failed']}  rejected {status['rejected']}  {status.get('rate', 0):.1f} tasks/s"
    )
    return "\n".join(lines)


def combine(views: list[tuple[str, dict[str, Any] | None, str]]) -> dict[str, Any]:
    """The whole network as several managers see it.

    Args:
        views: ``(address, status, error)`` per manager: its ``status()``, or None and why
            it did not answer.

    Returns:
        ``{"managers": [...], "workers", "capacity", "busy", "queued", ...}``: each manager's
        own status (or ``up: False`` and the error), and network totals. A worker that
        serves several managers is counted once in ``workers``, ``capacity`` and ``busy``
        (each manager's row counts the tasks running on it whichever manager sent them;
        the highest is taken); the task counters add up, since each manager counts the
        tasks it routed, and so do ``prefetched`` and ``queued``, held for one manager each.
    """
    managers: list[dict[str, Any]] = []
    workers: dict[str, dict[str, Any]] = {}
    busy: dict[str, int] = {}
    counters = ("prefetched", "queued", "completed", "failed", "rejected", "redelivered", "clients")
    totals = dict.fromkeys(counters, 0)
    rate = 0.0
    for address, status, error in views:
        if status is None:
            managers.append({"address": address, "up": False, "error": error})
            continue
        managers.append({"address": address, "up": True, "status": status})
        for worker in status.get("workers", []):
            key = str(worker.get("id"))
            workers.setdefault(key, worker)
            busy[key] = max(busy.get(key, 0), int(worker.get("busy") or 0))
        for name in counters:
            totals[name] += int(status.get(name) or 0)
        rate += float(status.get("rate") or 0.0)
    up = sum(1 for m in managers if m["up"])
    return {
        "managers": managers,
        "up": up,
        "down": len(managers) - up,
        "workers": len(workers),
        "capacity": sum(
            busy[key] if worker.get("draining") else int(worker.get("capacity", 0)) for key, worker in workers.items()
        ),
        "busy": sum(busy.values()),
        **totals,
        "rate": round(rate, 1),
    }


def render_network(network: dict[str, Any]) -> str:
    """Each manager's table (or that it is down), then the network's totals."""
    parts = []
    for manager in network["managers"]:
        if manager["up"]:
            parts.append(render(manager["status"]))
        else:
            parts.append(f"manager {manager['address']}  DOWN  ({manager['error']})")
    parts.append(
        f"network: {network['up']} of {network['up'] + network['down']} managers up, {network['workers']} workers,"
        f" capacity {network['capacity']}  busy {network['busy']}  prefetched {network['prefetched']}"
        f"  queued {network['queued']}"
        f"  completed {network['completed']}  failed {network['failed']}  rejected {network['rejected']}"
        f"  {network['rate']:.1f} tasks/s"
    )
    return "\n\n".join(parts)
