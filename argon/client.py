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
import itertools
import logging
import os
import ssl
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any

import gevent
import gevent.monkey

from argon import defaults
from argon.deferred import Deferred, as_completed
from argon.errors import ConnectionLost, TaskTimeout
from argon.links import Links
from argon.loop import NetworkLoop, wait_future
from argon.protocol import StatusRequest, Task
from argon.security import as_client_tls, resolve_key
from argon.serialize import FunctionCache, dumps

if TYPE_CHECKING:
    from argon.executor import Executor

log = logging.getLogger(__name__)


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


class Client:
    """A connection to one or several managers, or to a stand-alone worker.

    See the module docstring for how it works from threads, greenlets and coroutines.

    Args:
        host: The server: a host name (with ``port``), ``"host:port"``,
            ``"h1:p1,h2:p2"`` or a list of such strings (several managers).
        port: Server port, for a ``host`` without one (default 8000, the manager's).
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
        port: int | None = defaults.MANAGER_PORT,
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
        self._functions = FunctionCache()
        self._functions_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False  # the caller side's flag; the network loop's is ``_links.closed``
        self._links = Links(
            self,
            self.addresses,
            ids=self._ids,
            key=resolve_key(key, key_file),
            tls=as_client_tls(tls),
            max_frame=max_frame,
            connect_timeout=connect_timeout,
            reconnect_deadline=reconnect_deadline,
            retries=retries,
        )
        self._submit = self._links.submit  # bound once: defer() hands every task to it
        if own_thread is None:
            own_thread = not gevent.monkey.is_module_patched("threading")
        self._loop = NetworkLoop(own_thread)
        try:
            wait_future(self._loop.spawn(self._links.start), connect_timeout * len(self._links) + 5)
        except BaseException:
            self._loop.stop(1.0)
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = ",".join(f"{link.host}:{link.port}" for link in self._links)
        return f"<Client {where} pending={len(self._links.pending)}>"

    @property
    def duplicates(self) -> int:
        """Answers that arrived for tasks already answered (at-least-once delivery)."""
        return self._links.duplicates

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
        return as_completed(deferreds, timeout)

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
        self._loop.call(self._links.submit_status, deferred)
        return deferred.result(timeout=defaults.STATUS_TIMEOUT)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the connections; tasks still waiting fail with ``ConnectionLost``."""
        if self._closed:
            return
        self._closed = self._links.closed = True
        try:
            wait_future(self._loop.spawn(self._links.shutdown), 5.0)
        except TaskTimeout:
            log.warning("the client's network loop did not close within 5s")
        self._loop.stop(5.0)

    # -- caller side of cancelling -----------------------------------------------------------

    def _cancel(self, deferreds: list[Deferred], wait: bool = True) -> list[bool]:
        """Ask for each task to be dropped; with ``wait``, wait for every verdict."""
        verdicts = [concurrent.futures.Future() for _ in deferreds]  # type: ignore[var-annotated]
        self._loop.call(self._links.cancel, deferreds, verdicts)
        if not wait:
            return []
        answers = []
        for verdict in verdicts:
            try:
                answers.append(bool(wait_future(verdict, defaults.CANCEL_TIMEOUT)))
            except TaskTimeout:
                answers.append(False)
        return answers
