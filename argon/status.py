"""Rendering a server's ``status()`` for people: the ``argon status`` table."""

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
