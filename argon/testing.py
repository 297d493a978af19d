"""Support for programs that start Argon processes: the tests, the benchmarks and LocalCluster.

* :func:`wait_for` polls a condition with a deadline (never a bare sleep);
* :func:`read_ready` reads a server's ``ARGON READY <role> <host:port>`` line;
* :func:`child_env` and :func:`kill_group` (from :mod:`argon.osutil`) give a child a clean
  environment and stop its whole process group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any

import gevent

from argon.osutil import child_env, kill_group, parse_ready, ready_line

__all__ = ["WaitTimeout", "child_env", "kill_group", "parse_ready", "read_ready", "ready_line", "wait_for"]

#: Lines a process may print before its ready line.
MAX_LINES = 1000


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not come true in time (a failed assertion in a test, a timeout elsewhere)."""


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises:
        WaitTimeout: ``timeout`` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what or condition}")
        gevent.sleep(interval)


def read_ready(
    stream: IO[bytes], timeout: float, what: str = "the process", before: list[str] | None = None
) -> tuple[str, str, int]:
    """Read ``stream`` (a child's stdout) until its ready line; return ``(role, host, port)``.

    Args:
        stream: The child's standard output.
        timeout: Seconds to wait for the line.
        what: The child, as named in errors.
        before: If given, the lines printed before the ready line are appended to it
            (such as ``argon manager metrics on http://...``).

    Raises:
        WaitTimeout: No ready line within ``timeout`` seconds.
        RuntimeError: The stream ended (the process exited) first; the message holds what it printed.
    """
    seen: list[str] = [] if before is None else before
    with gevent.Timeout(timeout, WaitTimeout(f"{what} printed no ready line within {timeout}s")):
        for _ in range(MAX_LINES):
            line = stream.readline()
            if not line:
                break
            ready = parse_ready(line)
            if ready is not None:
                return ready
            seen.append(line.decode(errors="replace"))
    raise RuntimeError(f"{what} exited before it was ready; it printed: {''.join(seen)[-2000:]!r}")
