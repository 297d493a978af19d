"""The Argon error tree: every error Argon raises derives from :class:`ArgonError`."""

from __future__ import annotations

import concurrent.futures

# Before Python 3.11, concurrent.futures had a TimeoutError of its own.
_WAIT_TIMEOUTS: tuple[type[Exception], ...] = (TimeoutError,)
if concurrent.futures.TimeoutError is not TimeoutError:
    _WAIT_TIMEOUTS += (concurrent.futures.TimeoutError,)


class ArgonError(Exception):
    """Base class of every error raised by Argon itself."""


class ProtocolError(ArgonError):
    """A peer sent something that is not valid Argon protocol; its connection is closed."""


class MessageTooLarge(ProtocolError):
    """A task, argument or result is larger than the receiving peer accepts (``--max-frame``)."""


class AuthenticationError(ArgonError):
    """A peer could not prove it holds the shared key, or refused ours."""


class ConnectionLost(ArgonError, ConnectionError):
    """The connection to a peer went away and could not be restored in time."""


class ServerBusy(ConnectionLost):
    """A server refused the connection because it holds its ``--max-connections`` already.

    Not an authentication failure: the same peer is admitted once there is room, so a
    client retries it like any lost connection.
    """


class ShuttingDown(ConnectionLost):
    """A server refused the connection, or a request, because it is stopping."""


class NoWorkers(ArgonError):
    """No worker has been registered with the manager for ``--worker-wait`` seconds."""


class TaskRejected(ArgonError):
    """The server's queue was full; raised once the client has used up its retries."""


class TaskTimeout(ArgonError, *_WAIT_TIMEOUTS):  # type: ignore[misc]
    """A task ran past its ``time_limit``, or a wait for a result past its ``timeout``.

    Also a ``TimeoutError`` (and ``concurrent.futures.TimeoutError``).
    """


class TaskCancelled(ArgonError, concurrent.futures.CancelledError):
    """The task was cancelled before it started (also a ``concurrent.futures.CancelledError``)."""


class ProcessDied(ArgonError):
    """The pool process running the task exited; the pool has replaced it."""


class WorkerLost(ArgonError):
    """The worker running the task went away too many times."""


class RemoteError(ArgonError):
    """A task raised an exception that could not be rebuilt as its own type.

    Attributes:
        type_name: The qualified name of the remote exception's type.
        remote_traceback: The formatted traceback from the worker.
    """

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RemoteTraceback(Exception):
    """Carries a worker-side traceback; attached as ``__cause__`` of a re-raised task error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


#: The wire name of a failure the task itself raised (the exception travels in the payload).
TASK_ERROR = "TaskError"

#: Errors that a server may report for a task, by the name used on the wire.
TASK_ERRORS: dict[str, type[ArgonError]] = {
    cls.__name__: cls
    for cls in (
        TaskRejected,
        TaskTimeout,
        TaskCancelled,
        ProcessDied,
        WorkerLost,
        ConnectionLost,
        ServerBusy,
        ShuttingDown,
        NoWorkers,
        ProtocolError,
        MessageTooLarge,
        RemoteError,
        AuthenticationError,
    )
}
