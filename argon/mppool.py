"""``argon.Pool``: the ``multiprocessing.pool.Pool`` API on an Argon network.

Code written against ``multiprocessing.Pool`` switches with one line::

    with argon.Pool(4) as pool:                    # a local network of its own
        print(pool.map(abs, range(-5, 5)))

    with argon.Pool(address="mgrhost:8000", key_file="argon.key") as pool:
        print(pool.starmap(pow, [(2, 5), (3, 2)]))

Results equal ``multiprocessing.Pool``'s for the same calls. Where the semantics cannot
hold across machines, or deliberately differ (see docs/using.md):

- ``initializer(*initargs)`` runs once in each pool process, before the first task of
  this pool that the process runs (not when the process starts: processes belong to the
  network and serve every client).
- ``maxtasksperchild`` needs the embedded network (``address=None``); against an existing
  network, start its workers with ``--max-requests`` instead (a ``ValueError`` says so).
- ``processes`` sizes the embedded network; against an existing network the network's
  capacity decides the parallelism (and the default ``chunksize``).
- A pool process that dies fails only the task it ran (``ProcessDied``); the pool goes on.
- Callbacks run in the client's network thread, like multiprocessing's result thread:
  they must return quickly and must not wait for other results.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from argon.client import Client
from argon.deferred import Deferred
from argon.errors import TaskTimeout
from argon.executor import chunk_runner, chunks, start_local_network

if TYPE_CHECKING:
    from argon.local import LocalCluster

#: Tokens of the pools whose initializer has run in this process (pool processes only).
_initialized: set[str] = set()


def ensure_initialized(token: str, initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    """Run a pool's initializer in this process, the first time one of its tasks runs here."""
    if token not in _initialized:
        initializer(*initargs)
        _initialized.add(token)


def _with_initializer(
    func: Callable[..., Any], token: str, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]
) -> Callable[..., Any]:
    """``func``, preceded on each process by the pool's initializer (if it has one)."""
    if initializer is None:
        return func

    def initialized(*args: Any, **kwargs: Any) -> Any:
        ensure_initialized(token, initializer, initargs)
        return func(*args, **kwargs)

    return initialized


class ApplyResult:
    """The result of :meth:`Pool.apply_async` (``multiprocessing.pool.AsyncResult``)."""

    def __init__(
        self,
        deferreds: list[Deferred],
        callback: Callable[[Any], Any] | None,
        error_callback: Callable[[BaseException], Any] | None,
        single: bool,
    ) -> None:
        self._single = single
        self._callback = callback
        self._error_callback = error_callback
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._left = len(deferreds)
        self._value: Any = None
        self._success: bool | None = None
        self._deferreds = deferreds
        if not deferreds:
            self._set(True, [])
        for deferred in deferreds:
            deferred.add_done_callback(self._one_done)

    def _one_done(self, deferred: Any) -> None:
        error = deferred.exception(0) if not deferred.cancelled() else deferred._decoded()[1]
        with self._lock:
            if self._success is not None:
                return
            if error is not None:
                self._success = False
            else:
                self._left -= 1
                if self._left:
                    return
                self._success = True
        if error is not None:
            self._set(False, error)
        elif self._single:
            self._set(True, self._deferreds[0].result(0))
        else:
            self._set(True, [value for d in self._deferreds for value in d.result(0)])

    def _set(self, success: bool, value: Any) -> None:
        self._success = success
        self._value = value
        self._deferreds = []
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        finally:
            self._event.set()

    def ready(self) -> bool:
        """Whether the call has completed."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising.

        Raises:
            ValueError: The result is not ready.
        """
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is available or ``timeout`` seconds pass."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result; raise the call's exception if it raised.

        Raises:
            multiprocessing.TimeoutError: Not ready within ``timeout`` seconds.
        """
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value


#: ``map_async`` and ``starmap_async`` return the same kind of object, as in multiprocessing.
MapResult = ApplyResult


class IMapIterator:
    """The iterator of :meth:`Pool.imap` / :meth:`Pool.imap_unordered`; ``next(timeout)`` too."""

    def __init__(self, pool: Pool, runner: Callable[..., Any], pieces: Iterator[list[Any]], ordered: bool) -> None:
        self._pool = pool
        self._runner = runner
        self._pieces = pieces
        self._ordered = ordered
        self._window: collections.deque[Deferred] = collections.deque()
        self._ready: collections.deque[Any] = collections.deque()
        self._finished: collections.deque[Deferred] = collections.deque()
        self._cond = threading.Condition()
        for chunk in _take(pieces, pool.window):
            self._send(chunk)

    def _send(self, chunk: list[Any]) -> None:
        deferred = self._pool._defer(self._runner, chunk)
        self._window.append(deferred)
        if not self._ordered:
            deferred.add_done_callback(self._arrived)

    def _arrived(self, deferred: Any) -> None:
        with self._cond:
            self._finished.append(deferred)
            self._cond.notify()

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; wait at most ``timeout`` seconds for it.

        Raises:
            multiprocessing.TimeoutError: No result within ``timeout``.
            StopIteration: No more results.
        """
        if self._ready:
            return self._ready.popleft()
        if not self._window:
            raise StopIteration
        if self._ordered:
            deferred = self._window.popleft()
        else:
            with self._cond:
                if not self._finished and not self._cond.wait_for(lambda: self._finished, timeout):
                    raise multiprocessing.TimeoutError
                deferred = self._finished.popleft()
            self._window.remove(deferred)
        try:
            values = deferred.result(timeout)
        except TaskTimeout:
            self._window.appendleft(deferred)
            raise multiprocessing.TimeoutError from None
        chunk = next(self._pieces, None)
        if chunk is not None:
            self._send(chunk)
        self._ready.extend(values)
        if not self._ready:
            return self.next(timeout)
        return self._ready.popleft()

    __next__.__doc__ = next.__doc__


def _take(pieces: Iterator[list[Any]], count: int) -> list[list[Any]]:
    out = []
    for _ in range(count):
        chunk = next(pieces, None)
        if chunk is None:
            break
        out.append(chunk)
    return out


class Pool:
    """A ``multiprocessing.pool.Pool`` whose tasks run on an Argon network.

    Args:
        processes: Processes of the embedded network (default: the CPUs); with an
            ``address``, only checked (the network decides).
        initializer: Called as ``initializer(*initargs)`` once in each pool process before
            the first task of this pool it runs.
        initargs: Arguments for ``initializer``.
        maxtasksperchild: Replace a process after this many tasks (embedded network only).
        address: The manager(s) to use; None starts an embedded local network.
        key: The shared key, for an ``address``.
        key_file: A key file, as for :class:`~argon.client.Client`.

    Raises:
        ValueError: ``processes`` below 1, ``maxtasksperchild`` with an ``address``, or
            ``key`` without one (an embedded network takes ``key_file``).
        TypeError: ``initializer`` is not callable.
    """

    #: Chunks ``imap`` keeps in flight ahead of the consumer.
    window = 64

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        address: str | list[str] | None = None,
        key: bytes | str | None = None,
        key_file: str | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if maxtasksperchild is not None and address is not None:
            raise ValueError(
                "maxtasksperchild needs the embedded network (address=None); start the network's"
                " workers with --max-requests N instead"
            )
        self._token = uuid.uuid4().hex
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._state = "RUN"
        self._outstanding: set[Deferred] = set()
        self._lock = threading.Lock()
        self._cluster: LocalCluster | None = None
        if address is None:
            if key is not None:
                raise ValueError("key= needs an address; an embedded network takes key_file=")
            self._cluster, self._client = start_local_network(
                processes, key_file=key_file, max_requests=maxtasksperchild
            )
        else:
            self._client = Client(address, key=key, key_file=key_file)
        self._processes = processes or int(self._client.status()["capacity"]) or 1

    def __repr__(self) -> str:
        return f"<argon.Pool state={self._state} processes={self._processes}>"

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    # -- sending ------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        return _with_initializer(func, self._token, self._initializer, self._initargs)

    def _defer(self, func: Callable[..., Any], *args: Any, kwargs: dict[str, Any] | None = None) -> Deferred:
        with self._lock:
            self._check_running()
            deferred = self._client.defer(func, args, kwargs)
            self._outstanding.add(deferred)
        deferred.add_done_callback(self._outstanding.discard)
        return deferred

    def _chunksize(self, items: list[Any], chunksize: int | None) -> int:
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            return max(1, chunksize + bool(extra))
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        return chunksize

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[Any], Any] | None,
        error_callback: Callable[[BaseException], Any] | None,
        star: bool,
    ) -> MapResult:
        self._check_running()
        items = list(iterable) if star else [(item,) for item in iterable]
        size = self._chunksize(items, chunksize)
        runner = chunk_runner(self._wrap(func))
        deferreds = [self._defer(runner, chunk) for chunk in chunks(items, size)]
        return MapResult(deferreds, callback, error_callback, single=False)

    # -- the multiprocessing.pool.Pool API -----------------------------------------------------

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None) -> Any:
        """Run ``func(*args, **kwds)`` and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> ApplyResult:
        """Send ``func(*args, **kwds)``; return an :class:`ApplyResult` at once."""
        deferred = self._defer(self._wrap(func), *args, kwargs=kwds or None)
        return ApplyResult([deferred], callback, error_callback, single=True)

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        """``list(map(func, iterable))``, run in chunks on the network."""
        return self._map_async(func, iterable, chunksize, None, None, star=False).get()  # type: ignore[no-any-return]

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> MapResult:
        """Like :meth:`map`, returning an :class:`ApplyResult` at once."""
        return self._map_async(func, iterable, chunksize, callback, error_callback, star=False)

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None
    ) -> list[Any]:
        """``[func(*args) for args in iterable]``, run in chunks on the network."""
        return self._map_async(func, map(tuple, iterable), chunksize, None, None, star=True).get()  # type: ignore[no-any-return]

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> MapResult:
        """Like :meth:`starmap`, returning an :class:`ApplyResult` at once."""
        return self._map_async(func, map(tuple, iterable), chunksize, callback, error_callback, star=True)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results of ``func`` over ``iterable`` in order, as they come; the input is read lazily."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Like :meth:`imap`, but each result as soon as it is ready, in any order."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int, ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        runner = chunk_runner(self._wrap(func))
        pieces = chunks(((item,) for item in iterable), chunksize)
        return IMapIterator(self, runner, pieces, ordered)

    def close(self) -> None:
        """Take no more tasks; those sent finish, and :meth:`join` waits for them."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop at once: drop tasks that have not started and release the network."""
        if self._state == "TERMINATE":
            return
        self._state = "TERMINATE"
        with self._lock:
            pending = [d for d in self._outstanding if not d.done()]
        if pending:
            self._client._cancel(pending, wait=False)
        self._release()

    def join(self) -> None:
        """Wait for every task sent, then release the network (after :meth:`close`).

        Raises:
            ValueError: The pool is still running (call :meth:`close` first).
        """
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        if self._state == "CLOSE":
            with self._lock:
                pending = list(self._outstanding)
            for deferred in pending:
                with contextlib.suppress(Exception):  # join only waits; errors belong to the callers
                    deferred.exception()
        self._release()

    def _release(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
