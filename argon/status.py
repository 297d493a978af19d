"""Rendering a server's ``status()`` for people (the ``argon status`` table), and a network's.

With several managers, :func:`combine` merges what each one reports into network totals
and :func:`render_network` shows every manager (or that it is down) and the totals.
"""

from __future__ import annotations

from typing import Any


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
    header = ("WORKER", "PROCS", "BUSY", "DONE", "FAILED", "UPTIME", "MEMORY", "STATE")
    rows = [header]
    for worker in status["workers"]:
        memory = worker.get("rss", 0) + worker.get("pool_rss", 0)
        state = "draining" if worker.get("draining") else "ok"
        uptime = worker.get("uptime", worker.get("connected", 0))
        rows.append(
            (
                f"{worker['host']}:{worker['port']}",
                str(worker["capacity"]),
                str(worker["busy"]),
                str(worker["completed"]),
                str(worker["failed"]),
                _duration(uptime),
                _size(memory) if memory else "-",
                state,
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
    limit = status.get("queue_size")
    lines.append(
        f"capacity {status['capacity']}  busy {status['busy']}  queued {status['queued']}"
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
        serves several managers is counted once in ``workers`` and ``capacity``; the task
        counters add up, since each manager counts the tasks it routed.
    """
    managers: list[dict[str, Any]] = []
    workers: dict[str, dict[str, Any]] = {}
    counters = ("busy", "queued", "completed", "failed", "rejected", "redelivered", "clients")
    totals = dict.fromkeys(counters, 0)
    rate = 0.0
    for address, status, error in views:
        if status is None:
            managers.append({"address": address, "up": False, "error": error})
            continue
        managers.append({"address": address, "up": True, "status": status})
        for worker in status.get("workers", []):
            workers.setdefault(str(worker.get("id")), worker)
        for name in counters:
            totals[name] += int(status.get(name) or 0)
        rate += float(status.get("rate") or 0.0)
    up = sum(1 for m in managers if m["up"])
    return {
        "managers": managers,
        "up": up,
        "down": len(managers) - up,
        "workers": len(workers),
        "capacity": sum(int(w.get("capacity", 0)) for w in workers.values() if not w.get("draining")),
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
        f" capacity {network['capacity']}  busy {network['busy']}  queued {network['queued']}"
        f"  completed {network['completed']}  failed {network['failed']}  rejected {network['rejected']}"
        f"  {network['rate']:.1f} tasks/s"
    )
    return "\n\n".join(parts)
