"""The client: send callables to a manager (or a stand-alone worker) and get results back.

One :class:`Client` holds one connection, shared by every greenlet that uses it; any
number of tasks may be in flight on it. Waiting for a result blocks only the calling
greenlet. The client works with or without ``gevent.monkey.patch_all()``; without it,
use it from one thread.

If the connection drops, the client reconnects on its own and re-sends every task that
had no answer yet (it keeps their payloads); tasks that cannot be re-sent within
``reconnect_deadline`` seconds fail with :class:`~argon.errors.ConnectionLost`.
A rejected task (the server's queue was full) is re-sent after a growing, jittered
delay, up to ``retries`` times, then fails with :class:`~argon.errors.TaskRejected`.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import gevent
import gevent.event
import gevent.queue

from argon import defaults
from argon.connection import Connection, connect
from argon.errors import (
    TASK_ERRORS,
    ArgonError,
    AuthenticationError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    TaskCancelled,
    TaskTimeout,
)
from argon.protocol import Bye, Cancel, Failure, Message, Result, StatusReply, StatusRequest, Task
from argon.security import as_client_tls, resolve_key
from argon.serialize import FunctionCache, dumps, loads, loads_exception

log = logging.getLogger(__name__)

_UNSENT, _SENT, _BACKOFF, _DONE = range(4)


class _Pending:
    """A request the client has not had an answer to yet."""

    __slots__ = ("msg", "resends", "result", "retries", "sent_at", "since", "state", "tries")

    def __init__(self, msg: Task | StatusRequest, retries: int) -> None:
        self.msg = msg
        self.result = gevent.event.AsyncResult()
        self.retries = retries
        self.tries = 0
        self.sent_at: float | None = None
        self.resends = 0
        self.state = _UNSENT
        self.since = time.monotonic()


class Deferred:
    """A task's future result: call it to wait for the value (or the task's exception).

    Calling it again returns the same value (or raises the same error) at once.
    """

    __slots__ = ("_client", "_outcome", "_pending")

    def __init__(self, client: Client, pending: _Pending) -> None:
        self._client = client
        self._pending = pending
        self._outcome: tuple[bool, Any] | None = None

    @property
    def id(self) -> int:
        """The task's id on its client's connection."""
        return self._pending.msg.id

    @property
    def tries(self) -> int:
        """How many times the task was sent (more than once after rejections or reconnects)."""
        return self._pending.tries

    @property
    def sent_at(self) -> float | None:
        """When (``time.monotonic()``) the task was last sent; None if it never was.

        The time from here to the result is what the network took for the accepted send,
        without the client's own waits between retries.
        """
        return self._pending.sent_at

    def done(self) -> bool:
        """Whether the result (or error) has arrived."""
        return self._pending.result.ready()

    def __call__(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value.

        Args:
            timeout: Seconds to wait (default: the client's ``timeout``; None waits until
                the result arrives or the task fails).

        Raises:
            TaskTimeout: No result within ``timeout``; the task itself goes on, and calling
                the deferred again waits again.
            Exception: Whatever the task raised, or an :class:`~argon.errors.ArgonError`.
        """
        if self._outcome is None:
            if timeout is None:
                timeout = self._client.timeout
            try:
                reply = self._pending.result.get(timeout=timeout)
            except gevent.Timeout:
                raise TaskTimeout(f"no result for task {self.id} within {timeout}s") from None
            self._outcome = _decode(reply)
        ok, value = self._outcome
        if ok:
            return value
        raise value

    def cancel(self) -> bool:
        """Ask the server to drop the task if it has not started yet.

        Returns:
            False if the result is already here; True if the request was sent. A task
            that was cancelled in time fails with :class:`~argon.errors.TaskCancelled`;
            one that had started completes normally.
        """
        if self.done():
            return False
        return self._client._cancel(self._pending)


def _progress_bar(iterable: Iterable[Any]) -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    try:
        from tqdm import tqdm  # optional: loaded only when a bar is asked for
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install tqdm (or 'argon-tasks[progress]')") from None
    total = len(iterable) if isinstance(iterable, Sized) else None
    return tqdm(total=total, unit="task", disable=None)


def _decode(reply: Any) -> tuple[bool, Any]:
    """Turn a reply into ``(True, value)`` or ``(False, exception)``."""
    kind = type(reply)
    if kind is Result:
        try:
            return True, loads(reply.value)
        except Exception as exc:
            return False, exc
    if kind is Failure:
        if reply.error == "TaskError":
            return False, loads_exception(reply.payload, reply.message, reply.traceback)
        error = TASK_ERRORS.get(reply.error, ArgonError)
        return False, error(reply.message)
    if kind is StatusReply:
        return True, reply.status
    return False, reply  # an exception set by the client itself


class Client:
    """A connection to a manager or stand-alone worker; see the module docstring.

    Args:
        host: Server address.
        port: Server port.
        key: The shared key (hex text or bytes), or None.
        key_file: A file holding the key (see ``argon keygen``), instead of ``key``.
        retries: Times to re-send a rejected task before raising ``TaskRejected``.
        timeout: Default seconds a deferred waits for its result (None: no limit).
        connect_timeout: Seconds allowed to connect and authenticate.
        reconnect_deadline: Seconds unanswered tasks wait for a lost connection to return.
        tls: Encrypt the connection: a ``gevent.ssl.SSLContext`` (see
            :func:`argon.security.client_tls`), the path of a PEM file of the authority (or
            self-signed certificate) to trust, True for the system's authorities, or None
            for no TLS.
        max_frame: Largest message accepted from the server (bytes).

    Raises:
        ConnectionLost: The server cannot be reached.
        AuthenticationError: The server and this client do not hold the same key.
    """

    def __init__(
        self,
        host: str = defaults.HOST,
        port: int = defaults.MANAGER_PORT,
        key: bytes | str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        retries: int = defaults.RETRIES,
        timeout: float | None = None,
        *,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        reconnect_deadline: float = defaults.RECONNECT_DEADLINE,
        tls: ssl.SSLContext | str | os.PathLike[str] | bool | None = None,
        max_frame: int = defaults.MAX_FRAME,
    ) -> None:
        self.host = host
        self.port = port
        self.retries = retries
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_deadline = reconnect_deadline
        self._key = resolve_key(key, key_file)
        self._tls = as_client_tls(tls)
        self._max_frame = max_frame
        self._functions = FunctionCache()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._connected = gevent.event.Event()
        self._conn: Connection | None = self._connect()
        self._connected.set()
        self._supervisor = gevent.spawn(self._supervise, self._conn)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.host}:{self.port} pending={len(self._pending)}>"

    # -- public API ------------------------------------------------------------------------

    def defer(
        self,
        func: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Deferred:
        """Send a task and return at once.

        Args:
            func: The callable to run on a worker.
            args: Positional arguments (any sequence).
            kwargs: Keyword arguments.
            timeout: Time limit in seconds for running the task on the worker; past it the
                process running it is killed and the task fails with ``TaskTimeout``.

        Returns:
            A :class:`Deferred`; call it to wait for the result.
        """
        if self._closed:
            raise ConnectionLost("client is closed")
        task = Task(next(self._ids), self._functions.dumps(func), dumps((tuple(args), kwargs)), timeout)
        pending = _Pending(task, self.retries)
        self._pending[task.id] = pending
        self._send(pending)
        return Deferred(self, pending)

    def queue(
        self,
        func: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run a task and wait for its result (blocking only the calling greenlet).

        Raises:
            Exception: Whatever the task raised, or an :class:`~argon.errors.ArgonError`.
        """
        return self.defer(func, args, kwargs, timeout)()

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        window: int = 1000,
        progress: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Run ``func(item)`` for every item and yield the results in input order.

        At most ``window`` tasks are in flight at once and the iterable is read only as
        results are consumed, so memory stays bounded however long the input is.

        Args:
            func: The callable, applied to each item.
            iterable: The items (any iterable, possibly endless).
            window: Most tasks in flight at once.
            progress: Show a progress bar on stderr when it is a terminal (needs tqdm).
            timeout: Per-task time limit on the worker, as for :meth:`defer`.

        Raises:
            Exception: The first failing task's error, when its result is reached; tasks
                still in flight are then cancelled where they have not started.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        bar = _progress_bar(iterable) if progress else None
        inflight: deque[Deferred] = deque()
        try:
            for item in iterable:
                if len(inflight) >= window:
                    yield inflight.popleft()()
                    if bar is not None:
                        bar.update(1)
                inflight.append(self.defer(func, (item,), None, timeout))
            while inflight:
                yield inflight.popleft()()
                if bar is not None:
                    bar.update(1)
        finally:
            for deferred in inflight:
                deferred.cancel()
            if bar is not None:
                bar.close()

    def as_completed(self, deferreds: Iterable[Deferred], timeout: float | None = None) -> Iterator[Deferred]:
        """Yield each deferred as soon as its result (or error) is in.

        Args:
            deferreds: Deferreds from this client.
            timeout: Seconds to wait for all of them (None: no limit).

        Raises:
            TaskTimeout: Some were still not done when ``timeout`` ran out.
        """
        waiting = list(deferreds)
        done: gevent.queue.Queue[Deferred] = gevent.queue.Queue()
        for deferred in waiting:
            deferred._pending.result.rawlink(lambda _, d=deferred: done.put(d))
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in range(len(waiting)):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                yield done.get(timeout=left)
            except gevent.queue.Empty:
                raise TaskTimeout(f"tasks still running after {timeout}s") from None

    def status(self) -> dict[str, Any]:
        """The server's workers, capacity and counters (see the documentation)."""
        if self._closed:
            raise ConnectionLost("client is closed")
        pending = _Pending(StatusRequest(next(self._ids)), 0)
        self._pending[pending.msg.id] = pending
        self._send(pending)
        return Deferred(self, pending)(timeout=defaults.STATUS_TIMEOUT)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the connection; tasks still waiting fail with ``ConnectionLost``."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.send(Bye("client closed"))
                conn.flush(1.0)
            except ConnectionLost:
                pass
            conn.close("client closed")
        self._supervisor.kill(block=False)
        self._fail_all(ConnectionLost("client closed"))

    # -- sending and receiving ---------------------------------------------------------

    def _send(self, pending: _Pending) -> None:
        conn = self._conn
        if conn is not None and self._connected.is_set():
            try:
                conn.send(pending.msg)
                pending.state = _SENT
                pending.tries += 1
                pending.sent_at = time.monotonic()
                return
            except MessageTooLarge as exc:
                self._finish(pending.msg.id, exc)
                return
            except ConnectionLost:
                pass
        pending.state = _UNSENT
        pending.since = time.monotonic()

    def _cancel(self, pending: _Pending) -> bool:
        conn = self._conn
        if pending.state != _SENT or conn is None:
            self._finish(pending.msg.id, TaskCancelled("task cancelled before it was sent"))
            return True
        try:
            conn.send(Cancel(pending.msg.id))
        except ConnectionLost:
            return False
        return True

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, (Result, StatusReply)):
            self._finish(msg.id, msg)
        elif isinstance(msg, Failure):
            pending = self._pending.get(msg.id)
            if pending is None:
                return
            if msg.error == "TaskRejected" and pending.retries > 0:
                pending.retries -= 1
                pending.state = _BACKOFF
                gevent.spawn_later(self._delay(pending), self._retry, pending)
            else:
                self._finish(msg.id, msg)
        elif isinstance(msg, Bye):
            log.info("server %s:%d says: %s", self.host, self.port, msg.reason)
            self._connected.clear()  # new tasks wait for the next connection
        else:
            raise ProtocolError(f"a server may not send {type(msg).__name__} to a client")

    def _delay(self, pending: _Pending) -> float:
        used = self.retries - pending.retries
        delay = min(defaults.RETRY_DELAY * defaults.RETRY_BACKOFF ** (used - 1), defaults.RETRY_MAX_DELAY)
        return delay * random.uniform(0.75, 1.25)

    def _retry(self, pending: _Pending) -> None:
        if pending.state == _BACKOFF:
            self._send(pending)

    def _finish(self, task_id: int, outcome: Any) -> None:
        pending = self._pending.pop(task_id, None)
        if pending is not None:
            pending.state = _DONE
            pending.result.set(outcome)

    def _fail_all(self, error: Exception) -> None:
        for task_id in list(self._pending):
            self._finish(task_id, error)

    # -- the connection's life ---------------------------------------------------------

    def _connect(self) -> Connection:
        return connect(
            self.host,
            self.port,
            role="client",
            name=f"pid {os.getpid()}",
            key=self._key,
            timeout=self.connect_timeout,
            max_frame=self._max_frame,
            tls=self._tls,
        )

    def _supervise(self, conn: Connection) -> None:
        """Serve the connection; when it drops, reconnect and re-send unanswered tasks."""
        while True:
            reason = conn.serve(self._on_message, defaults.CLIENT_HEARTBEAT_MISSES)
            self._connected.clear()
            self._conn = None
            if self._closed:
                return
            log.warning("lost connection to %s:%d (%s); reconnecting", self.host, self.port, reason)
            now = time.monotonic()
            for task_id, pending in list(self._pending.items()):
                if pending.state != _SENT:
                    continue
                pending.state, pending.since = _UNSENT, now
                pending.resends += 1
                if pending.resends > defaults.MAX_RESENDS:
                    self._finish(
                        task_id,
                        ConnectionLost(
                            f"the connection dropped {pending.resends} times while"
                            f" this task was in flight (last: {reason})"
                        ),
                    )
            conn = self._reconnect()
            self._conn = conn
            self._connected.set()
            log.info("reconnected to %s:%d; re-sending %d tasks", self.host, self.port, len(self._pending))
            for pending in list(self._pending.values()):
                if pending.state == _UNSENT:
                    self._send(pending)

    def _reconnect(self) -> Connection:
        delay = 0.05
        while True:
            try:
                return self._connect()
            except (ArgonError, OSError) as exc:
                error = exc
            deadline = time.monotonic() - self.reconnect_deadline
            for task_id, pending in list(self._pending.items()):
                if pending.state == _UNSENT and pending.since < deadline:
                    kind = AuthenticationError if isinstance(error, AuthenticationError) else ConnectionLost
                    self._finish(
                        task_id,
                        kind(f"no connection to {self.host}:{self.port} for {self.reconnect_deadline}s: {error}"),
                    )
            gevent.sleep(min(delay * random.uniform(0.8, 1.2), defaults.RECONNECT_MAX_DELAY))
            delay = min(delay * 2, defaults.RECONNECT_MAX_DELAY)
