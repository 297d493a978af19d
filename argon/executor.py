"""``argon.Executor``: the ``concurrent.futures.Executor`` API on an Argon network.

Code written against ``ProcessPoolExecutor`` or ``ThreadPoolExecutor`` switches with one
line::

    with argon.Executor() as pool:                 # a local network of its own
        print(list(pool.map(pow, range(10), range(10), chunksize=4)))

    with argon.Executor("mgrhost:8000", key_file="argon.key") as pool:
        future = pool.submit(sum, [1, 2, 3])

Where it deliberately differs from the standard executors (see docs/using.md):

- ``max_workers`` sizes the embedded network (``address=None``); against an existing
  network it is only checked, since the network's workers decide the parallelism.
- A pool process that dies fails only the task it ran (``ProcessDied``), and a lost worker's
  tasks are sent to other workers: nothing like ``BrokenProcessPool`` ever breaks the
  executor.
- ``map`` sends each chunk of ``chunksize`` items as one task (one round trip), for any
  executor; ``buffersize`` (as in Python 3.14) bounds how many chunks are in flight, so an
  endless input can be mapped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from argon.client import Client
from argon.deferred import Deferred
from argon.errors import TaskTimeout

if TYPE_CHECKING:
    from argon.local import LocalCluster

#: How long :func:`wait_out` waits at a time (a lock wait cannot take an infinite timeout).
_WAIT_STEP = 3600.0


def chunk_runner(func: Callable[..., Any]) -> Callable[[list[tuple[Any, ...]]], list[Any]]:
    """A task that applies ``func`` to every argument tuple of a chunk, in order.

    The runner is a closure over ``func``, so the client's function cache serializes it
    once for all the chunks of a map.
    """

    def run_chunk(chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [func(*args) for args in chunk]

    return run_chunk


def chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Split ``iterable`` into lists of ``size`` items (the last may be shorter)."""
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def start_local_network(
    processes: int | None,
    *,
    key_file: str | None = None,
    max_requests: int | None = None,
    client_options: dict[str, Any] | None = None,
) -> tuple[LocalCluster, Client]:
    """Start an embedded local network (a manager and one worker) and a client for it.

    Args:
        processes: The worker's processes (None: the CPUs).
        key_file: The key every process and the client use (None: loopback only, no key).
        max_requests: Replace a pool process after this many tasks (None: never).
        client_options: Options of the :class:`~argon.client.Client` (``retries``, ``timeout``...).
    """
    from argon.local import LocalCluster  # only executors without an address start one

    cluster = LocalCluster(nodes=1, workers=processes, key_file=key_file, max_requests=max_requests)
    cluster.start()
    try:
        return cluster, cluster.client(**(client_options or {}))
    except BaseException:
        cluster.close()
        raise


def wait_out(future: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
    """Wait until ``future`` is over, however long, whatever the client's default ``timeout``."""
    while True:
        try:
            future.exception(timeout=_WAIT_STEP)
            return
        except (TaskTimeout, concurrent.futures.TimeoutError):
            continue  # not over yet: wait again
        except concurrent.futures.CancelledError:
            return


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on an Argon network.

    Args:
        address: The manager (``"host:port"``, several separated by commas, or a list);
            None starts an embedded local network owned by this executor, stopped by
            :meth:`shutdown`.
        max_workers: Processes of the embedded network (default: the CPUs).
        key: The shared key, as for :class:`~argon.client.Client`.
        key_file: A key file, as for :class:`~argon.client.Client`.
        time_limit: Seconds each task may run on its worker (None: no limit).
        client: Use this existing client instead (see ``Client.executor()``); it is not
            closed by :meth:`shutdown`.
        options: More :class:`~argon.client.Client` options (``retries``, ``timeout``,
            ``tls``...), for the embedded network's client too.

    Raises:
        ValueError: ``max_workers`` is below 1, or ``key`` is given without an ``address``
            (an embedded network takes ``key_file``).
    """

    def __init__(
        self,
        address: str | list[str] | None = None,
        *,
        max_workers: int | None = None,
        key: bytes | str | None = None,
        key_file: str | None = None,
        time_limit: float | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self.time_limit = time_limit
        self._cluster: LocalCluster | None = None
        self._owns_client = client is None
        self._shutdown = False
        self._lock = threading.Lock()
        self._futures: set[Deferred] = set()
        if client is not None:
            self.client = client
        elif address is None:
            if key is not None:
                raise ValueError("key= needs an address; an embedded network takes key_file=")
            self._cluster, self.client = start_local_network(max_workers, key_file=key_file, client_options=options)
        else:
            self.client = Client(address, key=key, key_file=key_file, **options)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<argon.Executor {self.client.host}:{self.client.port} {state}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred:
        """Schedule ``fn(*args, **kwargs)``; return its future (a :class:`~argon.deferred.Deferred`).

        Raises:
            RuntimeError: The executor was shut down.
        """
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = self.client.defer(fn, args, kwargs or None, self.time_limit)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like the builtin ``map(fn, *iterables)``, with the calls run on the network.

        Args:
            fn: The callable; it gets one item of each iterable.
            iterables: The arguments.
            timeout: Seconds, from this call, within which each result must be ready; the
                iterator raises ``TimeoutError`` (:class:`~argon.errors.TaskTimeout`) at
                the first that is not, and cancels the rest.
            chunksize: Items sent together as one task (one round trip for the chunk).
            buffersize: Most chunks in flight at once (None: the whole input is sent at
                once, like the standard executors, which read all of it up front).

        Raises:
            ValueError: ``chunksize`` or ``buffersize`` is below 1.
            RuntimeError: The executor was shut down.
            Exception: The first failing call's error, when its result is reached.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end = None if timeout is None else time.monotonic() + timeout
        runner = chunk_runner(fn)
        pieces = chunks(zip(*iterables, strict=False), chunksize)
        window = collections.deque(self.submit(runner, chunk) for chunk in itertools.islice(pieces, buffersize))
        return _results(self, window, pieces, runner, end, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; with ``wait``, wait for those in flight, then release the network.

        Args:
            wait: Wait for every pending future before returning (and stopping an
                embedded network); False returns at once and releases the network when
                the last of them is done.
            cancel_futures: Cancel every future that has not started.
        """
        with self._lock:
            self._shutdown = True
            pending = [f for f in list(self._futures) if not f.done()]
        if cancel_futures and pending:
            self.client._cancel(pending, wait=wait)
        if wait:
            try:
                for future in pending:
                    wait_out(future)
            finally:
                self._release()
        elif not pending:
            self._release()
        else:
            remaining = [len(pending)]

            def one_done(_: Any) -> None:
                remaining[0] -= 1
                if not remaining[0]:
                    threading.Thread(target=self._release, daemon=True).start()

            for future in pending:
                future.add_done_callback(one_done)

    def _release(self) -> None:
        if self._owns_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


def _results(
    executor: Executor,
    window: collections.deque[Deferred],
    pieces: Iterator[list[Any]],
    runner: Callable[..., Any],
    end: float | None,
    timeout: float | None,
) -> Iterator[Any]:
    """Yield each chunk's results in order, topping the window up as chunks are consumed."""
    try:
        while window:
            future = window.popleft()
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0 and not future.done():
                raise TaskTimeout(f"map: a result was not ready within {timeout}s")
            values = future.result(left)
            del future  # hold no reference to what the caller has moved on from
            refill = next(pieces, None)
            if refill is not None:
                window.append(executor.submit(runner, refill))
            values.reverse()
            while values:
                yield values.pop()
    finally:
        if window:
            executor.client._cancel(list(window), wait=False)
