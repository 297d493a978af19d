"""Argon: a distributed task-processing network for Python.

Clients send callables to a manager, which routes them to workers running pools of
Python processes, and results (or the tasks' exceptions) come back to the client::

    from argon import Client

    with Client("127.0.0.1", 8000) as client:
        assert client.queue(lambda x, y: x + y, [4, 7]) == 11

:class:`Client`, :class:`Deferred`, :class:`Executor`, :class:`Pool` and
:class:`LocalCluster` are loaded on first use, so
that ``import argon.manager`` (what a manager process runs) never loads the serializer:
a manager only forwards task payloads, it never unpickles them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from argon._version import __version__
from argon.errors import (
    ArgonError,
    AuthenticationError,
    ConnectionLost,
    MessageTooLarge,
    NoWorkers,
    ProcessDied,
    ProtocolError,
    RemoteError,
    ServerBusy,
    ShuttingDown,
    TaskCancelled,
    TaskRejected,
    TaskTimeout,
    WorkerLost,
)

if TYPE_CHECKING:
    from argon.client import Client
    from argon.deferred import Deferred
    from argon.executor import Executor
    from argon.local import LocalCluster
    from argon.mppool import Pool

_LAZY = {
    "Client": "argon.client",
    "Deferred": "argon.deferred",
    "Executor": "argon.executor",
    "LocalCluster": "argon.local",
    "Pool": "argon.mppool",
}

__all__ = [
    "ArgonError",
    "AuthenticationError",
    "Client",
    "ConnectionLost",
    "Deferred",
    "Executor",
    "LocalCluster",
    "MessageTooLarge",
    "NoWorkers",
    "Pool",
    "ProcessDied",
    "ProtocolError",
    "RemoteError",
    "ServerBusy",
    "ShuttingDown",
    "TaskCancelled",
    "TaskRejected",
    "TaskTimeout",
    "WorkerLost",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Load the client-side classes on first use (see the module docstring)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'argon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
