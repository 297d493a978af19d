"""What managers and stand-alone workers share: listening, admitting peers, serving clients.

A :class:`Server` owns a gevent ``StreamServer``. Each accepted socket gets one
greenlet that runs the handshake (refusing non-loopback peers when there is no key),
then hands the :class:`~argon.connection.Connection` to the subclass. Client links are
served here: tasks go to :meth:`Server.submit`, status requests to
:meth:`Server.status`, cancellations to :meth:`Server.cancel`.

A server has one life cycle: :meth:`Server.start`, then :meth:`Server.stop`, which says
goodbye (stops listening, tells every peer), drains (the subclass's :meth:`Server._drain`),
then closes every connection. A server is also a context manager that does both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import gevent
import gevent.event
from gevent.server import StreamServer

from argon import defaults
from argon._version import __version__
from argon.connection import Connection
from argon.errors import ArgonError, ConnectionLost, MessageTooLarge, ProtocolError, ShuttingDown, TaskRejected
from argon.handshake import accept
from argon.protocol import Bye, Cancel, Failure, Message, NotCancelled, Result, StatusReply, StatusRequest, Task
from argon.security import BUSY, SHUTTING_DOWN, is_loopback, refuse

log = logging.getLogger(__name__)
_S = TypeVar("_S", bound="Server")


@dataclasses.dataclass
class ServerConfig:
    """Settings every server takes; see ``argon --help`` for their meaning."""

    host: str = defaults.HOST
    port: int = 0
    queue_size: int | None = None
    key: bytes | None = None
    insecure: bool = False
    max_frame: int = defaults.MAX_FRAME
    max_connections: int = defaults.MAX_CONNECTIONS
    heartbeat: float = defaults.HEARTBEAT
    grace: float = defaults.GRACE
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    max_items: int = defaults.MAX_ITEMS
    tls: ssl.SSLContext | None = None
    worker_wait: float = defaults.WORKER_WAIT  # manager only


class RateLimitedLog:
    """Logs a repeated warning at most once per ``interval`` seconds, with a count of the rest.

    A flood of connections must not become a flood of log lines.
    """

    def __init__(self, interval: float = defaults.LOG_INTERVAL) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: Any, now: float | None = None) -> bool:
        """Log ``message % args`` unless one was logged less than ``interval`` ago; True if logged."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (and %d more like it in the last %.0fs)"
            args = (*args, self._suppressed, self.interval)
        log.warning(message, *args)
        self._next, self._suppressed = now + self.interval, 0
        return True


class Histogram(Protocol):
    """Something that records task latencies (see :mod:`argon.metrics`)."""

    def observe(self, seconds: float) -> None: ...  # noqa: D102


class ClientLink:
    """A connected client and the tasks it has in this server.

    Attributes:
        conn: Its connection.
        tasks: The server's record of each of its tasks, by the client's task id.
    """

    __slots__ = ("conn", "tasks")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.tasks: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"<ClientLink {self.conn.peer} with {len(self.tasks)} tasks>"

    def reply(self, msg: Result | Failure) -> None:
        """Send a task's reply if the task is still wanted and the client still here."""
        if self.tasks.pop(msg.id, None) is not None and not self.conn.closed:
            self.conn.reply(msg)


class Server:
    """Base of :class:`~argon.manager.Manager` and :class:`~argon.worker.Worker`.

    Subclasses set :attr:`role` and implement :meth:`handle`, :meth:`submit`,
    :meth:`cancel`, :meth:`client_gone`, :meth:`status` and the drain of :meth:`stop`
    (:meth:`_drain`, and :meth:`_release` if they hold more than connections).

    Args:
        config: Its settings.
        clock: Where it reads the time for latencies (``time.monotonic``; tests pass their own).
        latency: Where each task's latency (arrival to reply) is recorded, if anywhere
            (see :class:`argon.metrics.LatencyHistogram`).

    Example::

        with Manager(ServerConfig(port=0)) as manager:  # started; stopped (drained) on exit
            print(manager.name)
    """

    role = "server"
    #: Tasks that returned a value, and tasks that failed (kept by each subclass).
    completed: int
    failed: int

    def __init__(
        self, config: ServerConfig, *, clock: Callable[[], float] = time.monotonic, latency: Histogram | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self.latency = latency
        self.started = time.time()
        self.address: tuple[str, int] = (config.host, config.port)
        self.rejected = 0
        #: Set once :meth:`stop` has begun: new connections and tasks are refused.
        self.stopping = False
        #: Where this server's dashboard is served, announced to peers in its hello (set by
        #: :func:`~argon.dashboard.serve_dashboard` once its port is bound; empty: none).
        self.dashboard_url = ""
        #: Why this server stopped on its own (a worker whose pool broke), or None.
        self.failure: str | None = None
        self._connections: set[Connection] = set()
        # Connections still in their handshake, oldest first: they count against
        # max_connections, and the oldest is shed when a new one needs its slot.
        self._handshaking: dict[gevent.Greenlet, tuple[str, Any]] = {}
        self._shed_log = RateLimitedLog()
        self._refused_log = RateLimitedLog()
        self._server: StreamServer | None = None
        self._sampler: gevent.Greenlet | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=6)
        self._stopped = gevent.event.Event()

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def name(self) -> str:
        """``host:port`` this server listens on."""
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> None:
        """Bind and start accepting connections (port 0 picks a free port)."""
        config = self.config
        if config.key is None and not config.insecure and not is_loopback(config.host):
            log.warning(
                "listening on %s without a key: only loopback peers will be admitted;"
                " create a key with 'argon keygen FILE' and pass --key FILE",
                config.host,
            )
        # A bounded pool of connection greenlets stops accepting when it is full, so a flood
        # can never hold more descriptors than this (the slack lets newcomers in to shed
        # the oldest unfinished handshakes, or to hear why they are refused).
        slots = config.max_connections + defaults.ACCEPT_SLACK
        self._server = StreamServer((config.host, config.port), self._accept, spawn=slots)
        self._server.start()
        self.address = self._server.address[:2]
        self._sampler = gevent.spawn(self._sample_rate)
        log.info("%s listening on %s", self.role, self.name)

    def _sample_rate(self) -> None:
        """Every second, note how many tasks have finished (for the tasks/s in status)."""
        while True:
            self._samples.append((time.monotonic(), self.completed + self.failed))
            gevent.sleep(1.0)

    def rate(self) -> float:
        """Tasks finished per second over the last few seconds."""
        if not self._samples:
            return 0.0
        then, count = self._samples[0]
        elapsed = time.monotonic() - then
        return round((self.completed + self.failed - count) / elapsed, 1) if elapsed > 0 else 0.0

    def observe(self, started: float) -> None:
        """Record the latency of a task that arrived at ``started`` (by :attr:`clock`), if measured."""
        if self.latency is not None:
            self.latency.observe(self.clock() - started)

    def _accept(self, sock: Any, address: tuple[Any, ...]) -> None:
        peer = f"{address[0]}:{address[1]}"
        config = self.config
        if self.stopping or not self._make_room():
            code, why = (
                (SHUTTING_DOWN, f"{self.role} {self.name} is shutting down")
                if self.stopping
                else (BUSY, f"too many connections ({config.max_connections}); try again later")
            )
            self._refused_log.warning("refusing %s: %s", peer, why)
            with contextlib.suppress(OSError):
                refuse(sock, why, code)
            sock.close()
            return
        allowed = config.key is not None or config.insecure or is_loopback(address[0])
        me = gevent.getcurrent()
        self._handshaking[me] = (peer, sock)
        try:
            conn = accept(
                sock,
                address,
                role=self.role,
                name=self.name,
                key=config.key,
                allowed=allowed,
                max_frame=config.max_frame,
                tls=config.tls,
                heartbeat=config.heartbeat,
                timeout=config.handshake_timeout,
                max_items=config.max_items,
                dashboard=self.dashboard_url,
            )
        except (ArgonError, OSError) as exc:
            if self._handshaking.pop(me, None) is not None:  # a shed one was logged already
                log.warning("handshake with %s failed: %s", peer, exc)
            sock.close()
            return
        if self._handshaking.pop(me, None) is None:
            conn.close("shed")  # shed just as it finished; returning at once beats the pending kill
            return
        self._connections.add(conn)
        try:
            self.handle(conn)
        finally:
            self._connections.discard(conn)
            conn.close()

    def _make_room(self) -> bool:
        """Whether a new connection may start its handshake, shedding the oldest unfinished one if need be.

        A flood of idle sockets then costs real peers nothing but a retry: the slots it
        holds are taken back, oldest first, and descriptors stay within the limit.
        """
        if len(self._connections) + len(self._handshaking) < self.config.max_connections:
            return True
        if not self._handshaking:
            return False  # every slot holds an admitted peer
        oldest = next(iter(self._handshaking))
        peer, sock = self._handshaking.pop(oldest)
        with contextlib.suppress(OSError):
            sock.close()  # its descriptor goes now (behind TLS, when the kill lands)
        oldest.kill(block=False)
        self._shed_log.warning(
            "at --max-connections %d: shed %s, the oldest connection still in its handshake",
            self.config.max_connections,
            peer,
        )
        return True

    def handle(self, conn: Connection) -> None:
        """Serve one admitted connection until it closes."""
        raise NotImplementedError

    def serve_client(self, conn: Connection) -> None:
        """Serve a client link: tasks, cancellations, status requests."""
        client = ClientLink(conn)
        log.debug("client %s connected", conn.peer)
        reason = conn.serve(lambda msg: self.client_message(client, msg), misses=0)
        log.debug("client %s left: %s", conn.peer, reason)
        self.client_gone(client)

    def client_message(self, client: ClientLink, msg: Message) -> None:
        """Handle one message from a client (its connection calls this for each).

        Raises:
            ProtocolError: The client sent something it may not (its connection closes).
        """
        if isinstance(msg, Task):
            if msg.id in client.tasks:
                raise ProtocolError(f"task id {msg.id} is already in use")
            if self.stopping:
                self.reject(client, msg, f"{self.role} {self.name} is shutting down")
            else:
                self.submit(client, msg)
        elif isinstance(msg, StatusRequest):
            try:
                client.conn.send(StatusReply(msg.id, self.status()))
            except MessageTooLarge as exc:  # the client's --max-frame, not its fault: that request fails
                client.conn.send(Failure(msg.id, MessageTooLarge.__name__, str(exc)))
        elif isinstance(msg, Cancel):
            if self.cancel(client, msg.id) is False:  # None: the answer comes later
                client.conn.send(NotCancelled(msg.id))
        elif isinstance(msg, Bye):
            client.conn.close("client said goodbye")
        else:
            raise ProtocolError(f"a client may not send {type(msg).__name__}")

    def reject(self, client: ClientLink, task: Task, why: str) -> None:
        """Refuse a task at once (the client retries it later)."""
        self.rejected += 1
        client.conn.send(Failure(task.id, TaskRejected.__name__, why))

    def submit(self, client: ClientLink, task: Task) -> None:
        """Accept, queue or reject a task from a client."""
        raise NotImplementedError

    def cancel(self, client: ClientLink, task_id: int) -> bool | None:
        """Drop a client's task if it has not started (it then fails with ``TaskCancelled``).

        Returns:
            True if the task was dropped; False if it has started or is unknown; None if
            the answer comes later (the client gets ``TaskCancelled`` or ``NotCancelled``).
        """
        raise NotImplementedError

    def client_gone(self, client: ClientLink) -> None:
        """Forget a departed client's queued tasks."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """The figures ``Client.status()`` returns."""
        raise NotImplementedError

    def base_status(self) -> dict[str, Any]:
        """Fields every server reports."""
        return {
            "role": self.role,
            "name": self.name,
            "version": __version__,
            "uptime": round(time.time() - self.started, 1),
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "clients": self.clients(),
            "stopping": self.stopping,
            "queue_size": self.config.queue_size,
            "rate": self.rate(),
        }

    def clients(self) -> int:
        """Connected clients."""
        return sum(1 for c in self._connections if c.hello is not None and c.hello.role == "client")

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> None:
        """Stop: say goodbye, drain within ``grace`` seconds, close every connection.

        Goodbye: stop listening and tell every connected peer that this server is going
        away (a ``Bye`` naming ``ShuttingDown``); from then on new tasks are refused. Drain:
        the subclass's part (:meth:`_drain`), bounded by ``grace``. Close: flush what is
        queued to each peer, close them all, release what the server holds
        (:meth:`_release`). A second call, while or after the first runs, waits for it.

        Args:
            grace: Seconds to finish the tasks in hand (default: ``config.grace``).
        """
        if self.stopping:
            self._stopped.wait()
            return
        self._say_goodbye(f"{self.role} {self.name} is shutting down")
        self._drain(self.config.grace if grace is None else grace)
        self._close_connections()
        self._release()
        if self._sampler is not None:
            self._sampler.kill(block=False)
        log.info("%s %s stopped", self.role, self.name)
        self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished (or ``timeout`` seconds pass); True if it has."""
        return bool(self._stopped.wait(timeout))

    def abort(self) -> None:
        """Release at once what outlives this process (a worker's pool processes), without draining.

        For a process about to exit at once (a second SIGTERM): connections end with it.
        """
        self.stopping = True
        self._release()

    def _say_goodbye(self, reason: str) -> None:
        """Stop listening and tell every connected peer this server is going away."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            with contextlib.suppress(ConnectionLost):
                conn.send(Bye(reason, ShuttingDown.__name__))

    def _drain(self, grace: float) -> None:
        """Finish the tasks in hand, within ``grace`` seconds (peers have been told goodbye)."""

    def _close_connections(self, timeout: float = 2.0) -> None:
        """Flush what is queued to every peer (within ``timeout``), then close them all."""
        deadline = time.monotonic() + timeout
        for conn in list(self._connections):
            conn.flush(max(0.0, deadline - time.monotonic()))
            conn.close("server stopped")

    def _release(self) -> None:
        """Free what the server holds besides its connections (idempotent)."""
