"""One authenticated, framed, heartbeating link between two Argon peers.

A :class:`Connection` owns a socket. Sending goes through its
:class:`~argon.outbox.Outbox`, which encodes the message at once (so errors reach the
caller) and sends everything that piled up in one system call, small messages in one
batch frame. The reader runs in the hub (or, for TLS, in whichever greenlet calls
:meth:`Connection.serve`) and hands each decoded message to a handler; a timer sends
heartbeats on an idle link and closes one whose peer went silent.

:func:`connect` and :func:`accept` build connections: TLS (optional), the handshake of
:mod:`argon.security`, then an exchange of :class:`~argon.protocol.Hello` messages.
"""

from __future__ import annotations

import _socket as _csocket
import contextlib
import logging
import socket as _stdsocket
import ssl as _stdssl
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.socket
import gevent.ssl

from argon import defaults
from argon._version import __version__
from argon.errors import TASK_ERRORS, ArgonError, AuthenticationError, ConnectionLost, MessageTooLarge, ProtocolError
from argon.outbox import Outbox
from argon.protocol import (
    VERSION,
    Batch,
    Buffer,
    Bye,
    Failure,
    FrameBuffer,
    Hello,
    Message,
    Ping,
    Result,
    decode,
)
from argon.security import Session, client_handshake, refuse, server_handshake

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
SERIALIZER = "pickle+dill"


class Connection:
    """A framed link to one peer; see the module docstring.

    Attributes:
        peer: The peer's address as ``host:port``.
        hello: The peer's :class:`Hello` (set once the handshake is done).
        closed: Whether the connection has been closed.
        reason: Why it was closed.
    """

    def __init__(
        self,
        sock: Any,
        peer: str,
        session: Session,
        max_frame: int = defaults.MAX_FRAME,
        heartbeat: float = defaults.HEARTBEAT,
        max_items: int = defaults.MAX_ITEMS,
    ) -> None:
        self.sock = sock
        self.heartbeat = heartbeat
        self.max_items = max_items
        self.peer = peer
        self._hello: Hello | None = None
        self.closed = False
        self.reason = ""
        self.last_recv = time.monotonic()
        self._checker = session.recv
        self._frames = FrameBuffer(max_frame)
        self._backlog = self._frames.feed(session.rest)
        self._unbatched: list[Message] = []  # the rest of a batch recv_message read
        self._loop = gevent.get_hub().loop
        # A plain socket is written and read straight from the hub; TLS goes through greenlets.
        self._raw = None if isinstance(sock, gevent.ssl.SSLSocket) else getattr(sock, "_sock", None)
        self.outbox = Outbox(sock, self._raw, peer, session.send, self.close, self._drained)
        self._keepalive: Any = None
        self._interval = heartbeat
        self._silence: float | None = None
        self._tick = 0.0
        self._handler: Callable[[Message], None] = lambda msg: None
        self._reading: Any = None
        self._ended = gevent.event.Event()
        # Backpressure (servers only, so two peers can never both stop reading): while
        # more than OUTBOX_HIGH bytes wait to go to this peer, stop reading from it.
        self.guard = False
        self._drain_mark = 0
        self._resumed = gevent.event.Event()
        self._resumed.set()

    def __repr__(self) -> str:
        role = self.hello.role if self.hello else "?"
        return f"<Connection {role}@{self.peer}{' closed' if self.closed else ''}>"

    @property
    def hello(self) -> Hello | None:
        """The peer's :class:`~argon.protocol.Hello` (None until the handshake is done)."""
        return self._hello

    @hello.setter
    def hello(self, hello: Hello | None) -> None:
        self._hello = hello
        if hello is not None:
            self.outbox.configure(hello)  # batch no more than the peer takes, in frames it accepts

    # -- sending ----------------------------------------------------------------------

    @property
    def last_send(self) -> float:
        """When (``time.monotonic()``) the socket last took something from this side."""
        return self.outbox.last_send

    @last_send.setter
    def last_send(self, when: float) -> None:
        self.outbox.last_send = when

    def send(self, msg: Message, linger: float = 0.0) -> None:
        """Queue a message; it goes out with everything else queued in this loop iteration.

        Small messages that queue up together travel in one :class:`~argon.protocol.Batch`
        frame when the peer accepts batches; large ones get a frame of their own.

        Args:
            msg: The message.
            linger: Seconds it may wait for company, so that messages nobody waits for
                urgently share frames and system calls (anything sent without a linger
                takes it along at once).

        Raises:
            ConnectionLost: The connection is closed.
            MessageTooLarge: The peer announced a smaller frame limit.
        """
        if self.closed:
            raise ConnectionLost(f"connection to {self.peer} is closed: {self.reason}")
        outbox = self.outbox
        outbox.put(msg, linger)
        if self.guard and outbox.queued > defaults.OUTBOX_HIGH and self._resumed.is_set():
            self._resumed.clear()  # the peer does not read: stop reading from it until it does
            outbox.watch_drain()
            if self._reading is not None:
                self._reading.stop()

    def _drained(self) -> None:
        """The outbox has drained: read from the peer again."""
        self._resumed.set()
        if self._reading is not None and not self.closed:
            self._reading.start(self._on_readable)

    def reply(self, msg: Result | Failure, linger: float = 0.0) -> None:
        """Send a task's reply; one too large for the peer goes as a failure saying so."""
        try:
            self.send(msg, linger)
        except MessageTooLarge as exc:
            self.send(Failure(msg.id, MessageTooLarge.__name__, str(exc)), linger)

    def send_now(self, msg: Message) -> None:
        """Send one message from the calling greenlet (before :meth:`serve`, nothing queued)."""
        self.outbox.send_now(msg)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been handed to the socket; False on timeout."""
        return self.outbox.wait(timeout)

    # -- receiving --------------------------------------------------------------------

    def recv_message(self) -> Message:
        """Read one message from the calling greenlet (for the handshake, before :meth:`serve`).

        A batch is returned one message at a time, like everything else.

        Raises:
            ConnectionResetError: The peer closed the connection.
            ProtocolError: The peer sent something invalid.
        """
        if self._unbatched:
            return self._unbatched.pop(0)
        while not self._backlog:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError(f"{self.peer} closed the connection")
            self._backlog = self._frames.feed(data)
        body = self._backlog.pop(0)
        msg = decode(self._checker.verify(body) if self._checker else body, self.max_items)
        if type(msg) is Batch:
            self._unbatched = list(msg.messages)  # type: ignore[union-attr]
            return self.recv_message()
        return msg

    def serve(self, handler: Callable[[Message], None], misses: int = defaults.HEARTBEAT_MISSES) -> str:
        """Run the connection until it closes, passing each message to ``handler``.

        On a plain socket the hub itself reads and dispatches (an I/O watcher callback),
        so a message costs no greenlet switch; the calling greenlet just waits for the
        end. A TLS socket is read by the calling greenlet. While the link is idle a ping
        goes out every :attr:`heartbeat` seconds (or the peer's interval, if shorter).

        Args:
            handler: Called for every message but heartbeats, possibly from the hub: it
                must not block. An exception from it closes this connection (and is logged).
            misses: Close the connection when nothing arrives for ``misses`` of this
                side's heartbeats (0: never; the peer is then watched by TCP keepalive).

        Returns:
            Why the connection closed.
        """
        self._handler = handler
        self.outbox.start()
        interval = self.keepalive(misses)
        # A libev timer, not a greenlet: a manager with a thousand idle workers wakes no
        # greenlets to keep them alive.
        self._keepalive = self._loop.timer(interval, interval)
        self._keepalive.start(self.beat)
        backlog, self._backlog = self._backlog, []
        try:
            self._receive(self._checked(backlog))  # frames that came in with the hello
        except ProtocolError as exc:
            self._protocol_error(exc)
        if self._raw is not None and not self.closed:
            watcher = self._loop.io(self._raw.fileno(), 1)
            self._reading = watcher
            watcher.start(self._on_readable)
            self._ended.wait()
            return self.reason
        try:
            recv = self.sock.recv
            while not self.closed:
                self._resumed.wait()
                data = recv(RECV_SIZE)
                if not data:
                    self.close("closed by peer")
                    break
                self.last_recv = time.monotonic()
                self._receive(self._frames_of(data))
        except ProtocolError as exc:
            self._protocol_error(exc)
        except OSError as exc:
            self.close(self.reason or f"connection error: {exc}")
        return self.reason

    def _on_readable(self) -> None:
        """Hub callback: read what arrived and dispatch every complete message."""
        raw = self._raw
        assert raw is not None
        space = self._frames.space()
        try:
            if space is not None:  # the rest of a large frame: straight into its buffer
                with space:
                    count = raw.recv_into(space)
                data = b""
            else:
                data = raw.recv(RECV_SIZE)
                count = len(data)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(self.reason or f"connection error: {exc}")
            return
        if not count:
            self.close("closed by peer")
            return
        self.last_recv = time.monotonic()
        try:
            frames = self._checked(self._frames.filled(count)) if space is not None else self._frames_of(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._receive(frames)

    def _frames_of(self, data: bytes) -> list[Buffer]:
        return self._checked(self._frames.feed(data))

    def _checked(self, frames: list[Buffer]) -> list[Buffer]:
        """The bodies of ``frames``, each MAC checked on an authenticated connection."""
        checker = self._checker
        return [checker.verify(f) for f in frames] if checker is not None else frames

    def _receive(self, bodies: list[Buffer]) -> None:
        """Decode and hand on each body; any failure closes the connection, logged."""
        handler, limit = self._handler, self.max_items
        try:
            for body in bodies:
                msg = decode(body, limit)
                kind = type(msg)
                if kind is Batch:
                    for item in msg.messages:  # type: ignore[union-attr]
                        if type(item) is not Ping:
                            handler(item)
                        if self.closed:
                            return
                elif kind is not Ping:
                    handler(msg)
                if self.closed:
                    return
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("error handling a message from %s; closing its connection", self.peer)
            self.close("internal error")

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("closing connection from %s: protocol error: %s", self.peer, exc)
        reason = f"protocol error: {exc}"
        if self._raw is not None and not self.closed and not self.outbox.writing:
            # Tell the peer why, if the socket takes it at once (this may run in the hub,
            # so nothing here may wait); it then fails with a ProtocolError naming it.
            with contextlib.suppress(ArgonError):
                self.send(Bye(reason, ProtocolError.__name__))
                self.outbox.flush_now()
        self.close(reason)

    def keepalive(self, misses: int, now: float | None = None) -> float:
        """Set up heartbeats (see :meth:`serve`) and return the interval :meth:`beat` runs at.

        Args:
            misses: Heartbeats of this side the peer may miss (0: never time it out).
            now: The time (``time.monotonic()``); tests pass their own.
        """
        peer_interval = self.hello.heartbeat if self.hello is not None else 0.0
        if not peer_interval >= defaults.MIN_HEARTBEAT:  # absent, tiny, negative or NaN: ignore it
            peer_interval = self.heartbeat
        self._interval = min(self.heartbeat, peer_interval)
        self._silence = self.heartbeat * misses or None
        self._tick = time.monotonic() if now is None else now
        return self._interval

    def beat(self, now: float | None = None) -> None:
        """Ping an idle link; close one whose peer went silent (a timer runs it every interval).

        Args:
            now: The time (``time.monotonic()``); tests pass it to run the checks without
                waiting.
        """
        if now is None:
            now = time.monotonic()
        interval, timeout = self._interval, self._silence
        if now - self._tick > 2 * interval:
            # This process itself was frozen or starved: give the peer a fresh chance.
            self.last_recv = now
        queued = self.outbox.queued
        if not self._resumed.is_set() and queued < self._drain_mark:
            self.last_recv = now  # we stopped reading it, but it is taking our data: alive
        self._tick, self._drain_mark = now, queued
        if timeout is not None and now - self.last_recv > timeout:
            log.warning("no heartbeat from %s for %.1fs; closing", self.peer, now - self.last_recv)
            self.close(f"no heartbeat for {now - self.last_recv:.1f}s")
        elif now - self.last_send >= interval and self.outbox.empty:
            with contextlib.suppress(ConnectionLost):
                self.send(Ping())

    # -- closing ----------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """Close the socket and stop the writer; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.outbox.close()
        if self._reading is not None:
            self._reading.close()
        self._ended.set()
        if self._keepalive is not None:
            self._keepalive.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def _dial(host: str, port: int) -> Any:
    """Connect a gevent socket to ``host:port``.

    A numeric address is resolved by the C library directly: gevent's resolver would start
    a thread pool, and a process with threads should not fork (the pool forks to start
    its processes). Names go through gevent's resolver, so they do not block the hub.
    """
    try:
        infos = _csocket.getaddrinfo(host, port, 0, _stdsocket.SOCK_STREAM, 0, _stdsocket.AI_NUMERICHOST)
    except _csocket.gaierror:
        return gevent.socket.create_connection((host, port))
    family, kind, proto, _, address = infos[0]
    sock = gevent.socket.socket(family, kind, proto)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _tune(sock: Any) -> None:
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(_stdsocket, name):
            sock.setsockopt(_stdsocket.IPPROTO_TCP, getattr(_stdsocket, name), value)


PYTHON = ".".join(map(str, sys.version_info[:3]))


def _hello(role: str, name: str, heartbeat: float, max_frame: int, max_items: int = defaults.MAX_ITEMS) -> Hello:
    batch = min(defaults.BATCH_MESSAGES, max_items)  # a batch is one array: max_items bounds it
    return Hello(VERSION, role, name, __version__, PYTHON, SERIALIZER, heartbeat, max_frame, batch)


def _check_hello(msg: Message, peer: str) -> Hello:
    """``msg`` if it is a hello this side can work with.

    Raises:
        ProtocolError: It is not a hello, or names another protocol version or another
            Python major.minor (pickled tasks, results and exceptions do not cross Python
            versions reliably), or an unusable frame limit. The message names both sides'
            versions.
    """
    if type(msg) is not Hello:
        raise ProtocolError(f"{peer} sent {type(msg).__name__} before hello")
    if msg.version != VERSION:
        raise ProtocolError(
            f"{peer} speaks protocol version {msg.version} (Argon {msg.argon or '?'});"
            f" this side speaks {VERSION} (Argon {__version__})"
        )
    # An empty field means "not announced" (a raw tool's hello); anything else must match.
    if msg.python and msg.python.split(".")[:2] != PYTHON.split(".")[:2]:
        raise ProtocolError(
            f"{peer} runs Python {msg.python[:20]}; this side runs Python {PYTHON}: every peer"
            " must run the same Python major.minor version"
        )
    if 0 < msg.max_frame < defaults.MIN_FRAME:
        raise ProtocolError(
            f"{peer} announces a frame limit of {msg.max_frame} bytes; at least {defaults.MIN_FRAME} is needed"
        )
    return msg


def connect(
    host: str,
    port: int,
    *,
    role: str,
    name: str = "",
    key: bytes | None = None,
    timeout: float = defaults.CONNECT_TIMEOUT,
    max_frame: int = defaults.MAX_FRAME,
    tls: _stdssl.SSLContext | None = None,
    heartbeat: float = defaults.HEARTBEAT,
) -> Connection:
    """Dial a server, run the handshake and exchange hellos.

    Args:
        host: Server address.
        port: Server port.
        role: This side's role (``client`` or ``worker``).
        name: This side's name, shown in the server's logs and status.
        key: The shared key, or None.
        timeout: Bound on connecting plus the whole handshake.
        max_frame: Largest frame accepted from the server.
        tls: A client-side SSL context to wrap the socket in, or None.
        heartbeat: This side's heartbeat interval (see :meth:`Connection.serve`).

    Raises:
        ConnectionLost: The server could not be reached or hung up during the handshake.
        ServerBusy: The server is full (``--max-connections``); try again later.
        ShuttingDown: The server is stopping.
        AuthenticationError: See :func:`argon.security.client_handshake`.
        ProtocolError: The server is not a compatible Argon peer (another protocol or
            Python version: the message names both).
    """
    server = f"{host}:{port}"
    sock = None
    try:
        with gevent.Timeout(timeout, ConnectionLost(f"handshake with {server} timed out after {timeout}s")):
            sock = _dial(host, port)
            _tune(sock)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            session = client_handshake(sock, key, server)
            conn = Connection(sock, server, session, max_frame, heartbeat)
            conn.send_now(_hello(role, name, heartbeat, max_frame))
            reply = conn.recv_message()
            if isinstance(reply, Bye):
                kind = TASK_ERRORS.get(reply.error)
                if kind is None or not issubclass(kind, (ProtocolError, ConnectionLost)):
                    kind = ProtocolError
                raise kind(f"{server} refused the connection: {reply.reason}")
            conn.hello = _check_hello(reply, server)
            return conn
    except OSError as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, ArgonError):  # ConnectionLost and its kind are OSErrors too
            raise
        raise ConnectionLost(f"cannot connect to {server}: {exc.strerror or exc}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def accept(
    sock: Any,
    address: tuple[Any, ...],
    *,
    role: str,
    name: str,
    key: bytes | None,
    allowed: bool,
    timeout: float = defaults.HANDSHAKE_TIMEOUT,
    max_frame: int = defaults.MAX_FRAME,
    tls: _stdssl.SSLContext | None = None,
    heartbeat: float = defaults.HEARTBEAT,
    max_items: int = defaults.MAX_ITEMS,
) -> Connection:
    """Run the server side of a new connection's handshake.

    Args:
        sock: The accepted socket.
        address: The peer's address.
        role: This server's role (``manager`` or ``worker``).
        name: This server's name.
        key: The shared key, or None.
        allowed: False to refuse the peer (protected mode) with a one-line reason.
        timeout: Bound on the whole handshake.
        max_frame: Largest frame accepted from the peer.
        tls: A server-side SSL context, or None.
        heartbeat: This side's heartbeat interval (see :meth:`Connection.serve`).
        max_items: Most elements in any array or map of a message from the peer.

    Raises:
        ArgonError: The peer failed the handshake (the caller logs it; ``sock`` is
            closed); a peer that hung up gives :class:`ConnectionLost`.
    """
    peer = f"{address[0]}:{address[1]}"
    try:
        with gevent.Timeout(timeout, ProtocolError(f"handshake not finished within {timeout}s")):
            _tune(sock)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_side=True)
            if not allowed:
                refuse(
                    sock,
                    f"{peer} is not a loopback address and this server has no key. Create one"
                    " with 'argon keygen FILE' and start every peer with --key FILE"
                    " (or start the server with --insecure)",
                )
                raise AuthenticationError("refused a non-loopback peer: this server has no key")
            session = server_handshake(sock, key)
            conn = Connection(sock, peer, session, max_frame, heartbeat, max_items)
            conn.guard = True
            try:
                conn.hello = _check_hello(conn.recv_message(), peer)
            except ProtocolError as exc:
                with contextlib.suppress(OSError):
                    conn.send_now(Bye(str(exc), ProtocolError.__name__))  # say why, so the peer's error can too
                raise
            conn.send_now(_hello(role, name, heartbeat, max_frame, max_items))
            return conn
    except BaseException as exc:
        # Also when this greenlet is killed (a server sheds an unfinished handshake): the
        # descriptor must go at once, and a TLS wrapper owns it instead of ``sock``.
        with contextlib.suppress(OSError):
            sock.close()
        if isinstance(exc, OSError):
            raise ConnectionLost(f"{peer} dropped during the handshake: {exc}") from None
        raise
