"""The task functions every benchmark runs, importable by Argon's pool processes and every peer.

They live in an importable module so that every system sends them by reference, the
cheapest way each one has.
"""

from __future__ import annotations

import time


def noop(i: int) -> int:
    """The trivial task: return the argument."""
    return i


def sleep(seconds: float) -> None:
    """Sleep, using no CPU: a task whose capacity is known in advance."""
    time.sleep(seconds)


def echo(data: bytes) -> bytes:
    """Return the argument (payload both ways)."""
    return data


def size(data: bytes) -> int:
    """Return the argument's length (payload in, nothing out)."""
    return len(data)


def blob(n: int) -> bytes:
    """Return ``n`` bytes (nothing in, payload out)."""
    return b"x" * n
