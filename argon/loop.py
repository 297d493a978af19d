"""The client's network loop, and waiting for it from any caller.

A :class:`NetworkLoop` is the gevent hub on which one client does all its network I/O:
either a hub in a daemon thread of its own (for programs that are not monkey-patched),
or the hub of the thread that made the client. :meth:`NetworkLoop.call` runs a function
on that hub from any thread; :func:`wait_future` waits for a result from any caller,
blocking only that caller (see :class:`argon.deferred.Signal`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

import gevent
from gevent.hub import Waiter

from argon.deferred import Signal, Wake
from argon.errors import TaskTimeout

log = logging.getLogger(__name__)


class NetworkLoop:
    """Where a client's network I/O runs: a gevent hub in a thread of its own, or the caller's hub."""

    def __init__(self, own_thread: bool) -> None:
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._signalled = False
        self._wakeup: Any = None
        self._stopper: Waiter | None = None
        self.thread: threading.Thread | None = None
        if not own_thread:
            self.hub = gevent.get_hub()
            self.ident = threading.get_ident()
            return
        started = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(started,), name="argon-client", daemon=True)
        self.thread.start()
        started.wait()
        self.ident = self.thread.ident or 0

    def _main(self, started: threading.Event) -> None:
        self.hub = gevent.get_hub()
        self._wakeup = self.hub.loop.async_()
        self._wakeup.start(self._drain)
        self._stopper = Waiter(self.hub)
        started.set()
        try:
            self._stopper.get()  # the hub runs the client's I/O until stop()
        finally:
            self._wakeup.close()
            self.hub.destroy(destroy_loop=True)

    def _drain(self) -> None:
        """Run, in the network loop, everything other threads handed over."""
        self._signalled = False
        inbox = self._inbox
        while inbox:
            func, args = inbox.popleft()
            try:
                func(*args)
            except Exception:
                log.exception("error in the client's network loop")

    def call(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` in the network loop: now if this is its thread, else soon."""
        if threading.get_ident() == self.ident:
            func(*args)
            return
        if self._wakeup is None:  # a caller's hub, reached from another thread
            self.hub.loop.run_callback_threadsafe(func, *args)
            return
        self._inbox.append((func, args))
        if not self._signalled:
            self._signalled = True
            self._wakeup.send()

    def spawn(self, func: Callable[..., Any], *args: Any) -> concurrent.futures.Future:  # type: ignore[type-arg]
        """Run ``func(*args)`` in a greenlet of the network loop; its outcome as a future."""
        future: concurrent.futures.Future = concurrent.futures.Future()  # type: ignore[type-arg]

        def run() -> None:
            try:
                future.set_result(func(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.call(gevent.spawn, run)
        return future

    def stop(self, timeout: float) -> None:
        """End the network thread (if the client has one) and wait for it."""
        stopper = self._stopper
        if self.thread is None or stopper is None:
            return
        self.call(stopper.switch, None)
        if threading.get_ident() != self.ident:
            self.thread.join(timeout)


def wait_future(future: concurrent.futures.Future, timeout: float | None) -> Any:  # type: ignore[type-arg]
    """Wait for a plain future, blocking only the caller (greenlet or thread).

    Raises:
        TaskTimeout: Not done within ``timeout`` seconds.
    """
    if not future.done():
        signal = Signal()
        wake = Wake(signal)
        future.add_done_callback(wake)
        try:
            if not signal.wait(timeout) and not future.done():
                raise TaskTimeout(f"no answer within {timeout}s")
        finally:
            signal.close()
    return future.result(0)
