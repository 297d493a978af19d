"""The client: send callables to managers (or a stand-alone worker) and get results back.

One :class:`Client` may be shared by OS threads, greenlets and asyncio tasks at once. Its
network I/O runs on one gevent loop, the *network loop*:

- In a program that is not monkey-patched (the usual case), the network loop is a gevent
  hub in a daemon thread of its own. ``defer()`` serializes the task in the caller's
  thread and hands it to that loop at once, so the task is on its way while the caller
  goes on computing; callers wait on :class:`~argon.deferred.Deferred` futures.
- In a program that called ``gevent.monkey.patch_all()``, every "thread" is a greenlet
  and the network loop is the caller's own hub, as in any gevent program (no thread hop;
  a task goes out when the caller next yields).

Either way a blocking call blocks only its caller: a plain thread waits on a lock, a
greenlet waits on its own hub (the others go on), a coroutine awaits.

The client may talk to several managers (``Client("h1:8000,h2:8000")``): each task goes to
the live one holding the fewest of this client's tasks. If a connection drops, its
unanswered tasks are sent again through another live one, or through the same one once it
is back (the client reconnects on its own); tasks that cannot be re-sent within
``reconnect_deadline`` seconds fail with :class:`~argon.errors.ConnectionLost`. Delivery
is at least once: a late answer to a task already answered is dropped (and counted in
``Client.duplicates``). A rejected task (the server's queue was full) is re-sent
after a growing, jittered delay, up to ``retries`` times, then fails with
:class:`~argon.errors.TaskRejected`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import os
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any

import gevent
import gevent.monkey

from argon import backoff, defaults
from argon.backoff import Backoff
from argon.connection import Connection
from argon.deferred import Deferred, RequestState, Signal
from argon.errors import (
    TASK_ERRORS,
    ArgonError,
    AuthenticationError,
    ConnectionLost,
    MessageTooLarge,
    NoWorkers,
    ProtocolError,
    ShuttingDown,
    TaskCancelled,
    TaskRejected,
    TaskTimeout,
)
from argon.handshake import connect
from argon.loop import NetworkLoop, wait_future
from argon.protocol import Bye, Cancel, Failure, Message, NotCancelled, Result, StatusReply, StatusRequest, Task
from argon.security import as_client_tls, resolve_key
from argon.serialize import FunctionCache, dumps, loads, loads_exception

if TYPE_CHECKING:
    from argon.executor import Executor

log = logging.getLogger(__name__)

QUEUED, SENT, BACKOFF, DONE = RequestState.QUEUED, RequestState.SENT, RequestState.BACKOFF, RequestState.DONE


def parse_addresses(address: str | Sequence[str], port: int | None = None) -> list[tuple[str, int]]:
    """Turn ``"host"``, ``"host:port"``, ``"h1:p1,h2:p2"`` or a list of those into pairs.

    A bracketed IPv6 address keeps its brackets off: ``"[::1]:8000"`` is ``("::1", 8000)``.
    Where no port is given, ``port`` (default: the manager's default port) applies.

    Raises:
        ValueError: An empty address or a port that is not a number.
    """
    items = address.split(",") if isinstance(address, str) else [part for a in address for part in a.split(",")]
    pairs = []
    for item in (part.strip() for part in items):
        if not item:
            raise ValueError(f"empty address in {address!r}")
        host, sep, number = item.rpartition(":")
        if not sep or (host.count(":") and not host.startswith("[")):  # a bare (IPv6) host
            host, number = item, ""
        host = host.strip("[]")
        try:
            pairs.append((host, int(number) if number else (port or defaults.MANAGER_PORT)))
        except ValueError:
            raise ValueError(f"bad port in address {item!r}") from None
    if not pairs:
        raise ValueError("no address given")
    return pairs


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


def _time_limit(time_limit: float | None, timeout: float | None) -> float | None:
    """The run limit, accepting the deprecated ``timeout=`` spelling of it."""
    if timeout is None:
        return time_limit
    warnings.warn(
        "timeout= on queue/defer/map is deprecated: it limits the task's run time, so it is now"
        " spelled time_limit= (timeout= on a deferred or the Client bounds a wait)",
        DeprecationWarning,
        stacklevel=3,
    )
    return timeout if time_limit is None else time_limit


class _Link:
    """One server the client talks to: its connection, and the tasks that went through it."""

    __slots__ = ("conn", "held", "host", "port", "supervisor", "up")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.conn: Connection | None = None
        self.up = False
        self.held: dict[int, Deferred] = {}
        self.supervisor: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        return f"<link {self.host}:{self.port} {'up' if self.up else 'down'} held={len(self.held)}>"


class Client:
    """A connection to one or several managers, or to a stand-alone worker.

    See the module docstring for how it works from threads, greenlets and coroutines.

    Args:
        host: The server: a host name (with ``port``), ``"host:port"``,
            ``"h1:p1,h2:p2"`` or a list of such strings (several managers).
        port: Server port, for a ``host`` without one.
        key: The shared key (hex text or bytes), or None.
        key_file: A file holding the key (see ``argon keygen``), instead of ``key``.
        retries: Times to re-send a rejected task before raising ``TaskRejected``.
        timeout: Default seconds a wait for a result lasts (None: no limit). This bounds
            waiting only; a task's run time is limited by ``time_limit=``.
        connect_timeout: Seconds allowed to connect and authenticate.
        reconnect_deadline: Seconds unanswered tasks wait for a connection to return.
        tls: Encrypt the connection: a ``gevent.ssl.SSLContext`` (see
            :func:`argon.security.client_tls`), the path of a PEM file of the authority (or
            self-signed certificate) to trust, True for the system's authorities, or None
            for no TLS.
        max_frame: Largest message accepted from the server (bytes).
        own_thread: Run the network loop in a thread of its own (True) or on the caller's
            gevent hub (False); None (the default) picks the thread unless the program
            is monkey-patched.

    Raises:
        ConnectionLost: No server can be reached.
        AuthenticationError: The server and this client do not hold the same key.
    """

    def __init__(
        self,
        host: str | Sequence[str] = defaults.HOST,
        port: int | None = None,
        key: bytes | str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        retries: int = defaults.RETRIES,
        timeout: float | None = None,
        *,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        reconnect_deadline: float = defaults.RECONNECT_DEADLINE,
        tls: ssl.SSLContext | str | os.PathLike[str] | bool | None = None,
        max_frame: int = defaults.MAX_FRAME,
        own_thread: bool | None = None,
    ) -> None:
        self.addresses = parse_addresses(host, port)
        self.host: str = self.addresses[0][0]
        self.port: int = self.addresses[0][1]
        self.retries = retries
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_deadline = reconnect_deadline
        #: Answers that arrived for tasks already answered (at-least-once delivery).
        self.duplicates = 0
        self._key = resolve_key(key, key_file)
        self._tls = as_client_tls(tls)
        self._max_frame = max_frame
        self._functions = FunctionCache()
        self._functions_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred] = {}
        self._closed = False
        self._links = [_Link(h, p) for h, p in self.addresses]
        self._warned = 0.0
        self._watcher: gevent.Greenlet | None = None
        if own_thread is None:
            own_thread = not gevent.monkey.is_module_patched("threading")
        self._loop = NetworkLoop(own_thread)
        try:
            wait_future(self._loop.spawn(self._start), connect_timeout * len(self._links) + 5)
        except BaseException:
            self._loop.stop(1.0)
            raise

    _decode = staticmethod(_decode)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = ",".join(f"{link.host}:{link.port}" for link in self._links)
        return f"<Client {where} pending={len(self._pending)}>"

    # -- public API ------------------------------------------------------------------------

    def defer(
        self,
        func: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        time_limit: float | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred:
        """Send a task and return at once; the task is on its way when this returns.

        Args:
            func: The callable to run on a worker.
            args: Positional arguments (any sequence).
            kwargs: Keyword arguments.
            time_limit: Seconds the task may run on the worker; past it the process
                running it is killed and the task fails with ``TaskTimeout``.
            timeout: Deprecated spelling of ``time_limit``.

        Returns:
            A :class:`~argon.deferred.Deferred` (a ``concurrent.futures.Future``); call it
            to wait for the result.

        Raises:
            ConnectionLost: The client is closed.
            Exception: ``func`` or its arguments cannot be serialized.
        """
        limit = _time_limit(time_limit, timeout)
        if self._closed:
            raise ConnectionLost("client is closed")
        with self._functions_lock:
            code = self._functions.dumps(func)
        task = Task(next(self._ids), code, dumps((tuple(args), kwargs)), limit)
        deferred = Deferred(self, task, self.retries)
        self._loop.call(self._submit, deferred)
        return deferred

    def submit(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred:
        """Send ``func(*args, **kwargs)``, like ``concurrent.futures.Executor.submit``.

        Every keyword goes to ``func``; for a run-time limit use :meth:`defer`.
        """
        return self.defer(func, args, kwargs or None)

    def queue(
        self,
        func: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        time_limit: float | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run a task and wait for its result (blocking only the caller).

        Raises:
            Exception: Whatever the task raised, or an :class:`~argon.errors.ArgonError`.
        """
        return self.defer(func, args, kwargs, _time_limit(time_limit, timeout))()

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        window: int = 1000,
        progress: bool = False,
        time_limit: float | None = None,
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
            time_limit: Per-task run limit on the worker, as for :meth:`defer`.
            timeout: Deprecated spelling of ``time_limit``.

        Raises:
            Exception: The first failing task's error, when its result is reached; tasks
                still in flight are then cancelled where they have not started.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        limit = _time_limit(time_limit, timeout)
        return self._map(func, iterable, window, progress, limit)

    def _map(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], window: int, progress: bool, limit: float | None
    ) -> Iterator[Any]:
        bar = _progress_bar(iterable) if progress else None
        inflight: collections.deque[Deferred] = collections.deque()
        try:
            for item in iterable:
                if len(inflight) >= window:
                    yield inflight.popleft()()
                    if bar is not None:
                        bar.update(1)
                inflight.append(self.defer(func, (item,), None, limit))
            while inflight:
                yield inflight.popleft()()
                if bar is not None:
                    bar.update(1)
        finally:
            if inflight:
                self._cancel(list(inflight), wait=False)
            if bar is not None:
                bar.close()

    def as_completed(self, deferreds: Iterable[Deferred], timeout: float | None = None) -> Iterator[Deferred]:
        """Yield each deferred as soon as its result (or error) is in.

        Stopping early (``break``) leaves nothing behind on the deferreds.

        Args:
            deferreds: Deferreds from this client.
            timeout: Seconds to wait for all of them (None: no limit).

        Raises:
            TaskTimeout: Some were still not done when ``timeout`` ran out.
        """
        waiting = list(deferreds)
        finished: collections.deque[Deferred] = collections.deque()
        signal = Signal()

        def done(deferred: Any) -> None:
            finished.append(deferred)
            signal.set()

        for deferred in waiting:
            deferred.add_done_callback(done)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for _ in range(len(waiting)):
                while not finished:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not signal.wait(left) and not finished:
                        raise TaskTimeout(f"tasks still running after {timeout}s")
                    signal.clear()
                yield finished.popleft()
        finally:
            signal.close()
            for deferred in waiting:
                deferred.remove_done_callback(done)

    def executor(self, *, time_limit: float | None = None) -> Executor:
        """A ``concurrent.futures.Executor`` that sends its calls through this client.

        Shutting it down does not close the client.
        """
        from argon.executor import Executor  # executor imports this module

        return Executor(client=self, time_limit=time_limit)

    def status(self) -> dict[str, Any]:
        """The server's workers, capacity and counters (see the documentation).

        With several managers, the first live one answers (see ``argon status`` for the
        whole network).

        Raises:
            ConnectionLost: No live server to ask (or it is shutting down).
            TaskTimeout: No answer within the status timeout.
        """
        if self._closed:
            raise ConnectionLost("client is closed")
        deferred = Deferred(self, StatusRequest(next(self._ids)), 0)
        self._loop.call(self._submit_status, deferred)
        return deferred.result(timeout=defaults.STATUS_TIMEOUT)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the connections; tasks still waiting fail with ``ConnectionLost``."""
        if self._closed:
            return
        self._closed = True
        try:
            wait_future(self._loop.spawn(self._shutdown), 5.0)
        except TaskTimeout:
            log.warning("the client's network loop did not close within 5s")
        self._loop.stop(5.0)

    # -- caller side of cancelling -----------------------------------------------------------

    def _cancel(self, deferreds: list[Deferred], wait: bool = True) -> list[bool]:
        """Ask for each task to be dropped; with ``wait``, wait for every verdict."""
        verdicts = [concurrent.futures.Future() for _ in deferreds]  # type: ignore[var-annotated]
        self._loop.call(self._cancel_in_loop, deferreds, verdicts)
        if not wait:
            return []
        answers = []
        for verdict in verdicts:
            try:
                answers.append(bool(wait_future(verdict, defaults.CANCEL_TIMEOUT)))
            except TaskTimeout:
                answers.append(False)
        return answers

    # -- the network loop: sending -------------------------------------------------------------

    def _start(self) -> None:
        """Connect to every server (at least one must answer), then supervise each link."""
        errors = []
        for link in self._links:
            try:
                self._connect(link)
            except (ArgonError, OSError) as exc:
                errors.append(exc)
        if len(errors) == len(self._links):
            auth = [e for e in errors if isinstance(e, AuthenticationError)]
            raise auth[0] if auth else errors[0]
        for link in self._links:
            link.supervisor = gevent.spawn(self._supervise, link)
        self._watcher = gevent.spawn(self._watch_waits)

    def _connect(self, link: _Link) -> None:
        link.conn = connect(
            link.host,
            link.port,
            role="client",
            name=f"pid {os.getpid()}",
            key=self._key,
            timeout=self.connect_timeout,
            max_frame=self._max_frame,
            tls=self._tls,
        )
        link.up = True

    def _submit(self, deferred: Deferred) -> None:
        if self._closed:
            deferred.deliver(ConnectionLost("client is closed"))
            return
        deferred.since = time.monotonic()
        self._pending[deferred.id] = deferred
        self._send(deferred)

    def _submit_status(self, deferred: Deferred) -> None:
        if not any(link.up for link in self._links):
            deferred.deliver(ShuttingDown("no server is connected: it is shutting down or unreachable"))
            return
        self._submit(deferred)

    def _pick(self, avoid: _Link | None = None) -> _Link | None:
        """The live link holding the fewest of this client's tasks (other than ``avoid``)."""
        best = None
        for link in self._links:
            if link.up and link is not avoid and (best is None or len(link.held) < len(best.held)):
                best = link
        return best

    def _send(self, deferred: Deferred, avoid: _Link | None = None) -> None:
        link = self._pick(avoid)
        if link is not None and link.conn is not None:
            try:
                link.conn.send(deferred.msg)
            except MessageTooLarge as exc:
                self._finish(deferred.id, exc)
                return
            except ConnectionLost:
                pass
            else:
                deferred.sent(time.monotonic())
                deferred.link = link
                link.held[deferred.id] = deferred
                return
        if deferred.state is not QUEUED:
            deferred.move(QUEUED)
        deferred.since = time.monotonic()

    def _cancel_in_loop(self, deferreds: list[Deferred], verdicts: list[concurrent.futures.Future]) -> None:  # type: ignore[type-arg]
        for deferred, verdict in zip(deferreds, verdicts, strict=True):
            if deferred.state is DONE or deferred.done():
                verdict.set_result(deferred.cancelled())
                continue
            deferred._cancel_verdict = verdict
            link = deferred.link
            if deferred.state is not SENT or link is None or link.conn is None:
                self._forget(deferred)
                deferred.drop()
                continue
            try:
                link.conn.send(Cancel(deferred.id))
            except ConnectionLost:
                verdict.set_result(False)

    # -- the network loop: receiving -------------------------------------------------------------

    def _on_message(self, link: _Link, msg: Message) -> None:
        if isinstance(msg, (Result, StatusReply)):
            self._finish(msg.id, msg)
        elif isinstance(msg, Failure):
            self._on_failure(msg)
        elif isinstance(msg, NotCancelled):
            deferred = self._pending.get(msg.id)
            if deferred is not None and deferred._cancel_verdict is not None:
                verdict, deferred._cancel_verdict = deferred._cancel_verdict, None
                verdict.set_result(False)
        elif isinstance(msg, Bye):
            log.info("server %s:%d says: %s", link.host, link.port, msg.reason)
            link.up = False  # new tasks go elsewhere, or wait for the next connection
            error = TASK_ERRORS.get(msg.error, ShuttingDown)
            for deferred in list(link.held.values()):
                if type(deferred.msg) is StatusRequest:  # tasks stay: a stopping server drains them
                    self._finish(deferred.id, error(f"{link.host}:{link.port}: {msg.reason}"))
        else:
            raise ProtocolError(f"a server may not send {type(msg).__name__} to a client")

    def _on_failure(self, msg: Failure) -> None:
        deferred = self._pending.get(msg.id)
        if deferred is None:
            return
        if msg.error == TaskRejected.__name__ and deferred.retries > 0:
            deferred.retries -= 1
            self._forget_link(deferred)
            deferred.move(BACKOFF)
            gevent.spawn_later(self._delay(deferred), self._retry, deferred)
        elif msg.error == TaskCancelled.__name__ and deferred._cancel_verdict is not None:
            self._forget(deferred)
            deferred.drop()
        elif msg.error == NoWorkers.__name__ and self._elsewhere(deferred):
            # That manager has no workers, another one is up: send the task there instead.
            deferred.resends += 1
            failed = deferred.link
            self._forget_link(deferred)
            deferred.move(QUEUED)
            self._send(deferred, avoid=failed)
        else:
            self._finish(msg.id, msg)

    def _elsewhere(self, deferred: Deferred) -> bool:
        """Whether another live link could take a task its link could not run."""
        if deferred.resends >= defaults.MAX_RESENDS:
            return False
        return any(link.up and link is not deferred.link for link in self._links)

    def _delay(self, deferred: Deferred) -> float:
        used = self.retries - deferred.retries
        return backoff.delay(
            used, defaults.RETRY_DELAY, defaults.RETRY_BACKOFF, defaults.RETRY_MAX_DELAY, defaults.RETRY_JITTER
        )

    def _retry(self, deferred: Deferred) -> None:
        if deferred.state is BACKOFF:
            self._send(deferred)

    def _forget_link(self, deferred: Deferred) -> None:
        link = deferred.link
        if link is not None:
            link.held.pop(deferred.id, None)
            deferred.link = None

    def _forget(self, deferred: Deferred) -> None:
        self._pending.pop(deferred.id, None)
        self._forget_link(deferred)

    def _finish(self, task_id: int, outcome: Any) -> None:
        deferred = self._pending.pop(task_id, None)
        if deferred is None:
            if type(outcome) in (Result, Failure):
                self.duplicates += 1
            return
        self._forget_link(deferred)
        deferred.deliver(outcome)

    def _fail_all(self, error: Exception) -> None:
        for task_id in list(self._pending):
            self._finish(task_id, error)

    # -- the network loop: each link's life ----------------------------------------------------------

    def _supervise(self, link: _Link) -> None:
        """Serve a link; when it drops, re-send its tasks elsewhere and reconnect."""
        while True:
            conn = link.conn
            reason = "not connected"
            if conn is not None:
                reason = conn.serve(lambda msg: self._on_message(link, msg), defaults.CLIENT_HEARTBEAT_MISSES)
            link.up = False
            link.conn = None
            if self._closed:
                return
            if conn is not None:
                log.warning("lost connection to %s:%d (%s); reconnecting", link.host, link.port, reason)
            self._requeue(link, reason)
            self._reconnect(link)
            log.info("connected to %s:%d; sending %d waiting tasks", link.host, link.port, self._queued())
            self._send_queued()

    def _requeue(self, link: _Link, reason: str) -> None:
        """Take back the tasks a lost link held; send them through another live link."""
        now = time.monotonic()
        for task_id, deferred in list(link.held.items()):
            self._forget_link(deferred)
            if deferred.state is not SENT:
                continue
            deferred.move(QUEUED)
            deferred.since = now
            deferred.resends += 1
            if type(deferred.msg) is StatusRequest:
                self._finish(task_id, ConnectionLost(f"lost {link.host}:{link.port} ({reason})"))
            elif deferred.resends > defaults.MAX_RESENDS:
                self._finish(
                    task_id,
                    ConnectionLost(
                        f"the connection dropped {deferred.resends} times while this task was in flight"
                        f" (last: {link.host}:{link.port}: {reason})"
                    ),
                )
        self._send_queued()

    def _queued(self) -> int:
        return sum(1 for d in self._pending.values() if d.state is QUEUED)

    def _send_queued(self) -> None:
        if self._pick() is None:
            return
        for deferred in list(self._pending.values()):
            if deferred.state is QUEUED:
                self._send(deferred)

    def _reconnect(self, link: _Link) -> None:
        """Dial ``link`` until it answers (tasks waiting for it expire on their own deadline)."""
        delays = Backoff.reconnect()
        while not self._closed:
            try:
                self._connect(link)
                return
            except (ArgonError, OSError) as exc:
                self._expire(link, exc)
            gevent.sleep(delays.next_delay() or defaults.RECONNECT_MAX_DELAY)

    def _expire(self, link: _Link, error: BaseException) -> None:
        """Fail the tasks that found no connection for ``reconnect_deadline`` seconds."""
        deadline = time.monotonic() - self.reconnect_deadline
        kind = AuthenticationError if isinstance(error, AuthenticationError) else ConnectionLost
        for task_id, deferred in list(self._pending.items()):
            if deferred.state is QUEUED and deferred.since < deadline:
                where = ", ".join(f"{lk.host}:{lk.port}" for lk in self._links)
                self._finish(task_id, kind(f"no connection to {where} for {self.reconnect_deadline}s: {error}"))

    def _watch_waits(self) -> None:
        """Warn, now and then, when tasks wait long at a server that has no workers."""
        while not self._closed:
            gevent.sleep(defaults.WAIT_CHECK)
            now = time.monotonic()
            if now - self._warned < defaults.WAIT_WARNING_EVERY:
                continue
            limit = defaults.WAIT_WARNING
            old = [d for d in self._pending.values() if d.state is SENT and now - (d.sent_at or now) > limit]
            link = old[0].link if old else None
            if link is None:
                continue
            probe = Deferred(self, StatusRequest(next(self._ids)), 0)
            probe.add_done_callback(functools.partial(self._warn_if_no_workers, count=len(old), link=link))
            self._submit(probe)

    def _warn_if_no_workers(self, probe: Any, *, count: int, link: _Link) -> None:
        ok, status = _decode(probe._reply)
        if ok and isinstance(status, dict) and not status.get("capacity"):
            self._warned = time.monotonic()
            log.warning(
                "%d tasks have waited over %.0fs at %s:%d, which has no workers registered; they"
                " fail with NoWorkers once none has been there for the server's --worker-wait",
                count,
                defaults.WAIT_WARNING,
                link.host,
                link.port,
            )

    def _shutdown(self) -> None:
        """Say goodbye on every link, close them, and fail what is still waiting."""
        if self._watcher is not None:
            self._watcher.kill(block=False)
        for link in self._links:
            conn, link.up = link.conn, False
            if conn is not None and not conn.closed:
                try:
                    conn.send(Bye("client closed"))
                    conn.flush(1.0)
                except ConnectionLost:
                    pass
                conn.close("client closed")
            if link.supervisor is not None:
                link.supervisor.kill(block=False)
        self._fail_all(ConnectionLost("client closed"))
