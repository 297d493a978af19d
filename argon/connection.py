"""One authenticated, framed, heartbeating link between two Argon peers.

A :class:`Connection` owns a socket and composes the three parts of a link:

- its :class:`~argon.outbox.Outbox` sends: it encodes each message at once (so errors
  reach the caller) and sends everything that piled up in one system call, small
  messages in one batch frame;
- its :class:`~argon.reader.Reader` receives: it runs in the hub (or, for TLS, in
  whichever greenlet calls :meth:`Connection.serve`) and hands each decoded message to a
  handler;
- its :class:`~argon.keepalive.Keepalive` sends heartbeats on an idle link and closes
  one whose peer went silent.

The connection itself applies backpressure (a server stops reading from a peer that does
not read) and closes all three. :mod:`argon.handshake` builds connections.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import gevent.ssl

from argon import defaults
from argon.errors import ArgonError, ConnectionLost, MessageTooLarge, ProtocolError
from argon.keepalive import Keepalive
from argon.outbox import Outbox
from argon.protocol import Bye, Failure, Hello, Message, Result
from argon.reader import Reader
from argon.security import Session

log = logging.getLogger(__name__)


class Connection:
    """A framed link to one peer; see the module docstring.

    Attributes:
        peer: The peer's address as ``host:port``.
        hello: The peer's :class:`Hello` (set once the handshake is done).
        closed: Whether the connection has been closed.
        reason: Why it was closed.
        outbox: What waits to go to the peer.
        reader: What comes in from the peer.
        keepalive: The heartbeat.
        guard: Stop reading from the peer while more than ``OUTBOX_HIGH`` bytes wait to
            go to it (servers only, so two peers can never both stop reading).
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
        self.peer = peer
        self._hello: Hello | None = None
        self.closed = False
        self.reason = ""
        # A plain socket is written and read straight from the hub; TLS goes through greenlets.
        raw = None if isinstance(sock, gevent.ssl.SSLSocket) else getattr(sock, "_sock", None)
        self._raw = raw
        self.reader = Reader(
            sock, raw, peer, session.recv, session.rest, max_frame, max_items, self.close, self._protocol_error
        )
        self.outbox = Outbox(sock, raw, peer, session.send, self.close, self.reader.resume)
        self.keepalive = Keepalive(self.reader, self.outbox, heartbeat, self.send, self.close)
        self.guard = False

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
        if self.guard and outbox.queued > defaults.OUTBOX_HIGH and not self.reader.paused:
            # The peer does not read: stop reading from it until it does (the outbox
            # resumes the reader once it has drained).
            self.reader.pause()
            outbox.watch_drain()

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

        See :meth:`argon.reader.Reader.recv_message`.
        """
        return self.reader.recv_message()

    def serve(self, handler: Callable[[Message], None], misses: int = defaults.HEARTBEAT_MISSES) -> str:
        """Run the connection until it closes, passing each message to ``handler``.

        On a plain socket the hub itself reads and dispatches (an I/O watcher callback),
        so a message costs no greenlet switch; the calling greenlet just waits for the
        end. A TLS socket is read by the calling greenlet. While the link is idle a ping
        goes out every heartbeat interval (this side's, or the peer's if shorter).

        Args:
            handler: Called for every message but heartbeats, possibly from the hub: it
                must not block. An exception from it closes this connection (and is logged).
            misses: Close the connection when nothing arrives for ``misses`` of this
                side's heartbeats (0: never; the peer is then watched by TCP keepalive).

        Returns:
            Why the connection closed.
        """
        self.outbox.start()
        self.keepalive.configure(misses, self.hello.heartbeat if self.hello is not None else 0.0)
        self.keepalive.start()
        self.reader.run(handler)
        return self.reason

    def _protocol_error(self, exc: ProtocolError) -> None:
        """The peer sent something invalid: tell it why, if that can go at once, and close."""
        log.warning("closing connection from %s: protocol error: %s", self.peer, exc)
        reason = f"protocol error: {exc}"
        if self._raw is not None and not self.closed and not self.outbox.writing:
            # Tell the peer why, if the socket takes it at once (this may run in the hub,
            # so nothing here may wait); it then fails with a ProtocolError naming it.
            with contextlib.suppress(ArgonError):
                self.send(Bye(reason, ProtocolError.__name__))
                self.outbox.flush_now()
        self.close(reason)

    # -- closing ----------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """Close the socket, stop reading, writing and heartbeats; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.outbox.close()
        self.reader.close()
        self.keepalive.close()
        with contextlib.suppress(OSError):
            self.sock.close()
