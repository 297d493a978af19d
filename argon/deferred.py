"""A task's future result, and waiting for it from any caller.

:class:`Deferred` is a :class:`concurrent.futures.Future`: it works with
``concurrent.futures.wait``/``as_completed``, ``asyncio`` (``await deferred``) and
callbacks, and calling it still returns the result. The client's network loop sets it
from whichever thread runs that loop; a caller may wait from any OS thread, any
greenlet or any coroutine.

How a caller waits depends on where it runs. A thread with a gevent hub (a greenlet, or
a thread whose gevent loop has other greenlets to run) waits *cooperatively*: only that
greenlet blocks, and its hub is woken from the network thread through an ``async``
watcher. A plain thread waits on the future's lock, like any ``Future``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import TYPE_CHECKING, Any

import gevent
import greenlet
from gevent._hub_local import get_hub_if_exists
from gevent.hub import Waiter

from argon.errors import TASK_ERRORS, ArgonError, TaskCancelled, TaskTimeout
from argon.protocol import Failure, Result, StatusReply
from argon.serialize import loads, loads_exception

if TYPE_CHECKING:
    from argon.protocol import StatusRequest, Task

_OVER = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)


class RequestState(str, enum.Enum):
    """Where a client's request is in its life.

    ``QUEUED`` (not on the wire: before the first send, or while the connection is down)
    → ``SENT`` → ``DONE``; a rejected task goes ``SENT`` → ``BACKOFF`` → ``SENT`` again;
    a lost connection sends ``SENT`` back to ``QUEUED``. Any state may end in ``DONE``.
    """

    QUEUED = "queued"
    SENT = "sent"
    BACKOFF = "backoff"
    DONE = "done"


_MOVES = {
    RequestState.QUEUED: {RequestState.SENT, RequestState.DONE, RequestState.QUEUED},
    RequestState.SENT: {RequestState.QUEUED, RequestState.BACKOFF, RequestState.DONE, RequestState.SENT},
    RequestState.BACKOFF: {RequestState.SENT, RequestState.QUEUED, RequestState.DONE},
    RequestState.DONE: set(),
}


def decode(reply: Any) -> tuple[bool, Any]:
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


class Signal:
    """A wake-up that any thread may :meth:`set` and one caller :meth:`wait` s for.

    In a thread with a gevent hub the wait blocks only the calling greenlet (an ``async``
    watcher wakes the hub from another thread); in a plain thread it is a
    ``threading.Event``.
    """

    __slots__ = ("_event", "_flag", "_hub", "_lock", "_waiter", "_watcher")

    def __init__(self) -> None:
        hub = get_hub_if_exists()
        self._hub = hub if hub is not None and greenlet.getcurrent() is not hub else None
        self._flag = False
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self._watcher: Any = None
        self._waiter: Waiter | None = None
        if self._hub is None:
            self._event = threading.Event()
        else:
            self._waiter = Waiter(self._hub)
            self._watcher = self._hub.loop.async_()
            self._watcher.start(self._wake)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and self._flag:
            waiter.switch(None)

    def set(self) -> None:
        """Wake the waiter (from any thread)."""
        with self._lock:
            if self._flag:
                return
            self._flag = True
            if self._event is not None:
                self._event.set()
            elif self._watcher is not None:
                self._watcher.send()

    def wait(self, timeout: float | None) -> bool:
        """Wait until :meth:`set` (True) or ``timeout`` seconds (False)."""
        if self._flag:
            return True
        if self._event is not None:
            return self._event.wait(timeout)
        assert self._waiter is not None
        with gevent.Timeout(timeout, False):
            self._waiter.get()
            return True
        return self._flag

    def clear(self) -> None:
        """Arm the signal again (only the waiter calls this)."""
        with self._lock:
            self._flag = False
            if self._event is not None:
                self._event.clear()
            elif self._hub is not None:
                self._waiter = Waiter(self._hub)

    def close(self) -> None:
        """Release the hub watcher; further :meth:`set` calls do nothing."""
        with self._lock:
            self._flag = True
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.close()


class Deferred(concurrent.futures.Future):  # type: ignore[type-arg]
    """A task's future result; see the module docstring.

    Besides the ``Future`` API, calling it waits for the value: ``deferred()`` or
    ``deferred(timeout=5)``. Waiting again after a result returns the same value (or
    raises the same error) at once. Where ``timeout`` is None, the client's default
    ``timeout`` applies.
    """

    def __init__(self, client: Any, msg: Task | StatusRequest, retries: int) -> None:
        super().__init__()
        self._client = client
        self.msg = msg
        self.retries = retries
        self.state = RequestState.QUEUED
        self._tries = 0
        self._sent_at: float | None = None
        self.resends = 0
        self.since = 0.0
        self.link: Any = None
        self._reply: Any = None
        self._outcome: tuple[bool, Any] | None = None
        self._cancel_verdict: Any = None

    def __repr__(self) -> str:
        return f"<Deferred task {self.msg.id} {self.state.value}>"

    # -- life cycle (the client's network loop only) -------------------------------------

    def move(self, state: RequestState) -> None:
        """Change state; an impossible move is a bug and raises ``AssertionError``."""
        if state not in _MOVES[self.state]:
            raise AssertionError(f"task {self.msg.id}: {self.state.value} -> {state.value}")
        self.state = state

    def sent(self, now: float) -> None:
        """Note one more send of the request."""
        self.move(RequestState.SENT)
        self._tries += 1
        self._sent_at = now

    def deliver(self, reply: Any) -> None:
        """Store the server's reply (or an error raised by the client) and wake waiters."""
        self.state = RequestState.DONE
        self._reply = reply
        self.answer_cancel(False)
        if self._state == PENDING:
            self.set_result(reply)

    def drop(self) -> bool:
        """Mark the task cancelled (it never ran); False if it had already finished."""
        self.state = RequestState.DONE
        with self._condition:
            if self._state != PENDING:
                return False
            self._state = CANCELLED
            self._condition.notify_all()
        self.set_running_or_notify_cancel()  # CANCELLED_AND_NOTIFIED: wakes wait()/as_completed()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        self.answer_cancel(True)
        return True

    def answer_cancel(self, cancelled: bool) -> None:
        """Give a pending :meth:`cancel` its answer (once: later answers are ignored)."""
        verdict, self._cancel_verdict = self._cancel_verdict, None
        if verdict is not None and not verdict.done():
            verdict.set_result(cancelled)

    # -- what callers see ---------------------------------------------------------------------

    @property
    def id(self) -> int:
        """The task's id on its client's connection."""
        return self.msg.id

    @property
    def tries(self) -> int:
        """How many times the task was sent (more than once after rejections or reconnects)."""
        return self._tries

    @property
    def sent_at(self) -> float | None:
        """When (``time.monotonic()``) the task was last sent; None if it never was.

        The time from here to the result is what the network took for the accepted send,
        without the client's own waits between retries.
        """
        return self._sent_at

    def running(self) -> bool:
        """True from when the task leaves the client until its result is in.

        Argon does not report the moment a remote process starts a task, so a task that
        waits in the manager's queue also counts as running.
        """
        return self._state == PENDING and self._tries > 0

    def cancel(self) -> bool:
        """Drop the task if it has not started.

        A task still on this side of the network is dropped at once. One the server holds
        is dropped only if no process has started it yet: this asks the server and waits
        for its answer (a round trip).

        Returns:
            True if the task was cancelled (it will never run; :meth:`result` raises
            :class:`~argon.errors.TaskCancelled`, a ``CancelledError``); False once the
            task has started, finished, or cannot be reached to be stopped.
        """
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return True
        if self._state == FINISHED:
            return False
        return bool(self._client._cancel([self])[0])

    def remove_done_callback(self, callback: Any) -> None:
        """Forget a callback added with ``add_done_callback`` (if it has not run yet)."""
        with self._condition:
            callbacks = self._done_callbacks  # type: ignore[attr-defined]
            if callback in callbacks:
                callbacks.remove(callback)

    def _wait(self, timeout: float | None) -> None:
        """Wait until the task is over; raise :class:`TaskTimeout` after ``timeout`` seconds."""
        if self._state in _OVER:
            return
        if timeout is None:
            timeout = self._client.timeout
        hub = get_hub_if_exists()
        if hub is not None and greenlet.getcurrent() is hub:
            raise ArgonError(
                f"cannot wait for task {self.id} inside a gevent loop callback (a done callback"
                " must not block): wait from a greenlet or a thread instead"
            )
        if hub is None:
            try:
                super().exception(timeout)  # the Future's own wait on its lock
            except concurrent.futures.TimeoutError:
                raise TaskTimeout(f"no result for task {self.id} within {timeout}s") from None
            except concurrent.futures.CancelledError:
                pass
            return
        signal = Signal()
        wake = Wake(signal)
        self.add_done_callback(wake)
        try:
            if not signal.wait(timeout) and self._state not in _OVER:
                raise TaskTimeout(f"no result for task {self.id} within {timeout}s")
        finally:
            signal.close()
            self.remove_done_callback(wake)

    def _decoded(self) -> tuple[bool, Any]:
        outcome = self._outcome
        if outcome is None:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                outcome = (False, TaskCancelled(f"task {self.id} was cancelled before it started"))
            else:
                outcome = decode(self._reply)
            self._outcome = outcome
        return outcome

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value.

        Args:
            timeout: Seconds to wait (None: the client's ``timeout``, which by default
                waits until the result arrives or the task fails).

        Raises:
            TaskTimeout: No result within ``timeout`` (also a ``TimeoutError``); the task
                itself goes on, and waiting again waits again.
            TaskCancelled: The task was cancelled (also a ``CancelledError``).
            Exception: Whatever the task raised, or an :class:`~argon.errors.ArgonError`.
        """
        self._wait(timeout)
        ok, value = self._decoded()
        if ok:
            return value
        raise value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the task and return its exception, or None if it returned a value.

        Raises:
            TaskTimeout: As for :meth:`result`.
            TaskCancelled: The task was cancelled.
        """
        self._wait(timeout)
        ok, value = self._decoded()
        if ok:
            return None
        if isinstance(value, TaskCancelled) and self.cancelled():
            raise value
        return value  # type: ignore[no-any-return]

    def __call__(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value (see :meth:`result`)."""
        return self.result(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await deferred`` in asyncio: the event loop goes on while the task runs."""
        return asyncio.wrap_future(self).__await__()


def as_completed(deferreds: Iterable[Deferred], timeout: float | None = None) -> Iterator[Deferred]:
    """Yield each deferred as soon as its result (or error) is in, waiting from any caller.

    Stopping early (``break``) leaves nothing behind on the deferreds.

    Raises:
        TaskTimeout: Some were still not done when ``timeout`` seconds ran out.
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


class Wake:
    """A done callback that sets a :class:`Signal` (an object, so it can be removed again)."""

    __slots__ = ("signal",)

    def __init__(self, signal: Signal) -> None:
        self.signal = signal

    def __call__(self, _: Any) -> None:
        """Set the signal (the future is done)."""
        self.signal.set()
