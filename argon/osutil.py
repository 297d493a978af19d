"""Operating-system helpers shared by the pool processes, the command line and LocalCluster.

Nothing here imports gevent: pool processes import this module too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import site
import sys
from collections.abc import Mapping

_PR_SET_PDEATHSIG = 1

#: What a server prints on standard output once it is ready: ``ARGON READY <role> <host:port>``.
READY = "ARGON READY"
_READY = re.compile(r"^ARGON READY (\w+) (\S+):(\d+)\s*$")

#: The directory that holds this copy of the ``argon`` package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``signum`` to this process when its parent exits.

    Elsewhere this does nothing. If the parent is already gone, exit at once.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ready_line(role: str, address: str) -> str:
    """The machine-readable line a server prints once it is ready (see :func:`parse_ready`)."""
    return f"{READY} {role} {address}"


def parse_ready(line: str | bytes) -> tuple[str, str, int] | None:
    """``(role, host, port)`` from a :func:`ready_line`, or None for any other line."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    match = _READY.match(text)
    if match is None:
        return None
    return match.group(1), match.group(2).strip("[]"), int(match.group(3))


def importable(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this copy of argon first on ``PYTHONPATH`` (unless it is installed in site-packages)."""
    site_dirs = {*site.getsitepackages(), site.getusersitepackages()}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in site_dirs and ROOT not in paths:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, *paths])
    return env


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for an Argon process this one starts.

    It is ``base`` (default: this process's environment) without any ``ARGON_*`` setting,
    so the child gets exactly the options it is given on its command line, with this
    copy of argon importable, plus ``extra``. Everything else (``PATH``, the virtualenv,
    ``PYTHONPATH``) passes through, so tasks import what the caller can.
    """
    source = os.environ if base is None else base
    env = {name: value for name, value in source.items() if not name.startswith("ARGON_")}
    env.update(extra)
    return importable(env)


def raise_open_files(wanted: int) -> int:
    """Raise the soft limit on open files to ``wanted`` if it is lower; return the limit now.

    Never past the hard limit. Servers that hold many sockets do the same.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    except (OSError, ValueError):
        return soft
    return raised


def kill_group(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal the process group led by ``pid`` (a child started in its own session); ignore it if gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
