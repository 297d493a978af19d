"""A client's links to its managers: the side of the client that runs on its network loop.

:class:`argon.client.Client` is what callers use from any thread; it hands each request to
its :class:`Links`, which does everything else on the client's network loop (see
:mod:`argon.loop`): one :class:`Link` per manager address (or stand-alone worker), connecting
and reconnecting each, sending each task through the live link holding the fewest of the
client's tasks (``Links._pick``), taking the answers and waking the waiting
:class:`~argon.deferred.Deferred`.

When a link drops, the tasks it held go out again through another live link, or through the
same one once it is back (``Links._requeue``); a task a manager refuses with
``NoWorkers`` goes to another live manager; a rejected task (full queue) is sent again after
a growing, jittered delay. Delivery is at least once, so a late answer to a task already
answered is dropped and counted in :attr:`Links.duplicates`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import ssl
import time
from collections.abc import Iterator
from typing import Any

import gevent

from argon import backoff, defaults
from argon.backoff import Backoff
from argon.connection import Connection
from argon.deferred import Deferred, RequestState, decode
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
)
from argon.handshake import connect
from argon.protocol import Bye, Cancel, Failure, Message, NotCancelled, Result, StatusReply, StatusRequest

# The client's messages keep the logger name users filter on (and logs show as the component).
log = logging.getLogger("argon.client")

QUEUED, SENT, BACKOFF, DONE = RequestState.QUEUED, RequestState.SENT, RequestState.BACKOFF, RequestState.DONE


class Link:
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


class Links:
    """A client's links to its servers, and the requests in flight through them.

    Every method runs on the client's network loop, except that the client sets
    :attr:`closed` from its caller's thread. Iterating gives the :class:`Link` objects in
    address order.

    Args:
        owner: The client; the status probes this sends on its own are its Deferreds.
        addresses: ``(host, port)`` of each server.
        ids: The client's request ids (shared with the caller side).
        key: The shared key, or None.
        tls: The TLS context, or None.
        max_frame: Largest message accepted from a server (bytes).
        connect_timeout: Seconds allowed to connect and authenticate.
        reconnect_deadline: Seconds unanswered tasks wait for a connection to return.
        retries: Times the client re-sends a rejected task.
    """

    def __init__(
        self,
        owner: Any,
        addresses: list[tuple[str, int]],
        *,
        ids: itertools.count[int],
        key: bytes | None,
        tls: ssl.SSLContext | None,
        max_frame: int,
        connect_timeout: float,
        reconnect_deadline: float,
        retries: int,
    ) -> None:
        self._owner = owner
        self._links = [Link(h, p) for h, p in addresses]
        self._ids = ids
        self._key = key
        self._tls = tls
        self._max_frame = max_frame
        self._connect_timeout = connect_timeout
        self._reconnect_deadline = reconnect_deadline
        self._retries = retries
        #: The requests not yet answered, by id.
        self.pending: dict[int, Deferred] = {}
        #: Answers that arrived for tasks already answered (at-least-once delivery).
        self.duplicates = 0
        #: Set once the client closes: no more sending, no more reconnecting.
        self.closed = False
        self._warned = 0.0
        self._watcher: gevent.Greenlet | None = None

    def __iter__(self) -> Iterator[Link]:
        return iter(self._links)

    def __getitem__(self, index: int) -> Link:
        return self._links[index]

    def __len__(self) -> int:
        return len(self._links)

    def __repr__(self) -> str:
        return f"<Links {self._links} pending={len(self.pending)}>"

    # -- connecting ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to every server (at least one must answer), then supervise each link.

        Raises:
            AuthenticationError: No server answered, and one refused the key.
            ConnectionLost: No server answered (the first one's error).
        """
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

    def _connect(self, link: Link) -> None:
        link.conn = connect(
            link.host,
            link.port,
            role="client",
            name=f"pid {os.getpid()}",
            key=self._key,
            timeout=self._connect_timeout,
            max_frame=self._max_frame,
            tls=self._tls,
        )
        link.up = True

    # -- sending ---------------------------------------------------------------------------------

    def submit(self, deferred: Deferred) -> None:
        """Take a new request and send it (or keep it queued until a link is up)."""
        if self.closed:
            deferred.deliver(ConnectionLost("client is closed"))
            return
        deferred.since = time.monotonic()
        self.pending[deferred.id] = deferred
        self._send(deferred)

    def submit_status(self, deferred: Deferred) -> None:
        """Take a status request: it fails at once when no server is connected."""
        if not any(link.up for link in self._links):
            deferred.deliver(ShuttingDown("no server is connected: it is shutting down or unreachable"))
            return
        self.submit(deferred)

    def _pick(self, avoid: Link | None = None) -> Link | None:
        """The live link holding the fewest of this client's tasks (other than ``avoid``)."""
        best = None
        for link in self._links:
            if link.up and link is not avoid and (best is None or len(link.held) < len(best.held)):
                best = link
        return best

    def _send(self, deferred: Deferred, avoid: Link | None = None) -> None:
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

    def cancel(self, deferreds: list[Deferred], verdicts: list[concurrent.futures.Future]) -> None:  # type: ignore[type-arg]
        """Drop each task still on this side; ask its server to drop the others.

        Each verdict future gets True (cancelled) or False (too late, or unreachable).
        """
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
                deferred.answer_cancel(False)  # the task will be sent again; it is not cancelled

    # -- receiving -------------------------------------------------------------------------------

    def _on_message(self, link: Link, msg: Message) -> None:
        if isinstance(msg, (Result, StatusReply)):
            self._finish(msg.id, msg)
        elif isinstance(msg, Failure):
            self._on_failure(msg)
        elif isinstance(msg, NotCancelled):
            deferred = self.pending.get(msg.id)
            if deferred is not None:
                deferred.answer_cancel(False)
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
        deferred = self.pending.get(msg.id)
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
        used = self._retries - deferred.retries
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
        self.pending.pop(deferred.id, None)
        self._forget_link(deferred)

    def _finish(self, task_id: int, outcome: Any) -> None:
        deferred = self.pending.pop(task_id, None)
        if deferred is None:
            if type(outcome) in (Result, Failure):
                self.duplicates += 1
            return
        self._forget_link(deferred)
        deferred.deliver(outcome)

    # -- each link's life ------------------------------------------------------------------------

    def _supervise(self, link: Link) -> None:
        """Serve a link; when it drops, re-send its tasks elsewhere and reconnect."""
        while True:
            conn = link.conn
            reason = "not connected"
            if conn is not None:
                reason = conn.serve(lambda msg: self._on_message(link, msg), defaults.CLIENT_HEARTBEAT_MISSES)
            link.up = False
            link.conn = None
            if self.closed:
                return
            if conn is not None:
                log.warning("lost connection to %s:%d (%s); reconnecting", link.host, link.port, reason)
            self._requeue(link, reason)
            self._reconnect(link)
            log.info("connected to %s:%d; sending %d waiting tasks", link.host, link.port, self._queued())
            self._send_queued()

    def _requeue(self, link: Link, reason: str) -> None:
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
        return sum(1 for d in self.pending.values() if d.state is QUEUED)

    def _send_queued(self) -> None:
        if self._pick() is None:
            return
        for deferred in list(self.pending.values()):
            if deferred.state is QUEUED:
                self._send(deferred)

    def _reconnect(self, link: Link) -> None:
        """Dial ``link`` until it answers (tasks waiting for it expire on their own deadline)."""
        delays = Backoff.reconnect()
        while not self.closed:
            try:
                self._connect(link)
                return
            except (ArgonError, OSError) as exc:
                self._expire(exc)
            except Exception as exc:  # whatever a server's reply provokes, keep dialling (and expiring)
                log.exception("unexpected error connecting to %s:%d", link.host, link.port)
                self._expire(exc)
            gevent.sleep(delays.next_delay() or defaults.RECONNECT_MAX_DELAY)

    def _expire(self, error: BaseException) -> None:
        """Fail the tasks that found no connection for ``reconnect_deadline`` seconds."""
        deadline = time.monotonic() - self._reconnect_deadline
        kind = AuthenticationError if isinstance(error, AuthenticationError) else ConnectionLost
        for task_id, deferred in list(self.pending.items()):
            if deferred.state is QUEUED and deferred.since < deadline:
                where = ", ".join(f"{lk.host}:{lk.port}" for lk in self._links)
                self._finish(task_id, kind(f"no connection to {where} for {self._reconnect_deadline}s: {error}"))

    def _watch_waits(self) -> None:
        """Warn, now and then, when tasks wait long at a server that has no workers."""
        while not self.closed:
            gevent.sleep(defaults.WAIT_CHECK)
            now = time.monotonic()
            if now - self._warned < defaults.WAIT_WARNING_EVERY:
                continue
            limit = defaults.WAIT_WARNING
            old = [d for d in self.pending.values() if d.state is SENT and now - (d.sent_at or now) > limit]
            link = old[0].link if old else None
            if link is None:
                continue
            probe = Deferred(self._owner, StatusRequest(next(self._ids)), 0)
            probe.add_done_callback(functools.partial(self._warn_if_no_workers, count=len(old), link=link))
            self.submit(probe)

    def _warn_if_no_workers(self, probe: Deferred, *, count: int, link: Link) -> None:
        ok, status = decode(probe._reply)
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

    # -- closing ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
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
        for task_id in list(self.pending):
            self._finish(task_id, ConnectionLost("client closed"))
