"""Argon: a distributed task-processing network for Python.

Clients send callables to a manager, which routes them to workers running pools of
Python processes, and results (or the tasks' exceptions) come back to the client::

    from argon import Client

    with Client("127.0.0.1", 8000) as client:
        assert client.queue(lambda x, y: x + y, [4, 7]) == 11
"""

from argon._version import __version__
from argon.client import Client, Deferred
from argon.errors import (
    ArgonError,
    AuthenticationError,
    ConnectionLost,
    ProcessDied,
    ProtocolError,
    RemoteError,
    TaskCancelled,
    TaskRejected,
    TaskTimeout,
    WorkerLost,
)
from argon.local import LocalCluster

__all__ = [
    "ArgonError",
    "AuthenticationError",
    "Client",
    "ConnectionLost",
    "Deferred",
    "LocalCluster",
    "ProcessDied",
    "ProtocolError",
    "RemoteError",
    "TaskCancelled",
    "TaskRejected",
    "TaskTimeout",
    "WorkerLost",
    "__version__",
]
