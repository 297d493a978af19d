"""The receiving half of a connection: reading, framing, checking and dispatching messages.

A :class:`Reader` cuts the bytes from its peer into frames, checks each frame's MAC on an
authenticated link, decodes it and hands every message but heartbeats to a handler; a
batch frame is handed on one message at a time. On a plain socket the hub itself reads
(an I/O watcher callback), so a message costs no greenlet switch; a TLS socket is read by
the greenlet that calls :meth:`Reader.run`. Its connection can pause it, to stop reading
from a peer that does not read what is sent to it.

Anything invalid closes the connection (and only it): a frame over the limit, a bad MAC
or an undecodable message goes to ``on_error``, an exception from the handler is logged
and closes it as an internal error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from argon.errors import ProtocolError
from argon.framing import Buffer, FrameBuffer
from argon.protocol import Batch, Message, Ping, decode
from argon.security import FrameSigner

log = logging.getLogger(__name__)

#: Most bytes one read asks the socket for.
RECV_SIZE = 256 * 1024


class Reader:
    """What comes in from one peer; see the module docstring.

    Args:
        sock: The connection's socket (gevent).
        raw: The socket's underlying plain socket, read straight from the hub; None for
            TLS, which is read by a greenlet.
        peer: The peer's address, for messages.
        checker: Checks the MAC of each frame on a keyed link (None: frames carry none).
        rest: Bytes that arrived with the handshake (the start of the first frames).
        max_frame: Largest frame accepted from the peer.
        max_items: Most elements in any array or map of a message.
        on_close: Called with the reason when the socket fails or the peer hangs up
            (the connection closes).
        on_error: Called with the error when the peer sent something invalid (the
            connection tells the peer why and closes).

    Attributes:
        last_recv: When (``time.monotonic()``) something last arrived.
        closed: Whether the connection has been closed (see :meth:`close`).
    """

    def __init__(
        self,
        sock: Any,
        raw: Any,
        peer: str,
        checker: FrameSigner | None,
        rest: bytes,
        max_frame: int,
        max_items: int,
        on_close: Callable[[str], None],
        on_error: Callable[[ProtocolError], None],
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.max_items = max_items
        self.last_recv = time.monotonic()
        self.closed = False
        self._raw = raw
        self._checker = checker
        self._on_close = on_close
        self._on_error = on_error
        self._frames = FrameBuffer(max_frame)
        self._backlog = self._frames.feed(rest)
        self._unbatched: list[Message] = []  # the rest of a batch recv_message read
        self._handler: Callable[[Message], None] = lambda msg: None
        self._loop = gevent.get_hub().loop
        self._watcher: Any = None
        self._ended = gevent.event.Event()
        self._resumed = gevent.event.Event()
        self._resumed.set()

    def recv_message(self) -> Message:
        """Read one message from the calling greenlet (for the handshake, before :meth:`run`).

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

    def run(self, handler: Callable[[Message], None]) -> None:
        """Pass each message to ``handler`` until the connection closes.

        Args:
            handler: Called for every message but heartbeats, possibly from the hub: it
                must not block. An exception from it closes the connection (and is logged).
        """
        self._handler = handler
        backlog, self._backlog = self._backlog, []
        try:
            self._receive(backlog)  # frames that came in with the hello
        except ProtocolError as exc:
            self._on_error(exc)
        if self._raw is not None:
            if not self.closed:
                self._watcher = self._loop.io(self._raw.fileno(), 1)
                if not self.paused:
                    self._watcher.start(self._on_readable)
            self._ended.wait()
            return
        try:
            recv = self.sock.recv
            while not self.closed:
                self._resumed.wait()
                if self.closed:
                    break
                data = recv(RECV_SIZE)
                if not data:
                    self._on_close("closed by peer")
                    break
                self.last_recv = time.monotonic()
                self._receive(self._frames.feed(data))
        except ProtocolError as exc:
            self._on_error(exc)
        except OSError as exc:
            self._on_close(f"connection error: {exc}")

    def _on_readable(self) -> None:
        """Hub callback: read what arrived and dispatch every complete message."""
        raw = self._raw
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
            self._on_close(f"connection error: {exc}")
            return
        if not count:
            self._on_close("closed by peer")
            return
        self.last_recv = time.monotonic()
        try:
            frames = self._frames.filled(count) if space is not None else self._frames.feed(data)
        except ProtocolError as exc:
            self._on_error(exc)
            return
        self._receive(frames)

    def _receive(self, frames: list[Buffer]) -> None:
        """Check (on a keyed link), decode and hand on each frame, in order.

        The first bad one closes the connection, logged, after those before it were handed
        on; so does a bad frame that :class:`~argon.framing.FrameBuffer` found behind them.
        """
        handler, limit, checker = self._handler, self.max_items, self._checker
        try:
            for frame in frames:
                msg = decode(checker.verify(frame) if checker is not None else frame, limit)
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
            if self._frames.error is not None:
                raise self._frames.error
        except ProtocolError as exc:
            self._on_error(exc)
        except Exception:
            log.exception("error handling a message from %s; closing its connection", self.peer)
            self._on_close("internal error")

    @property
    def paused(self) -> bool:
        """Whether reading is paused (see :meth:`pause`)."""
        return not self._resumed.is_set()

    def pause(self) -> None:
        """Stop reading from the peer until :meth:`resume`."""
        self._resumed.clear()
        if self._watcher is not None:
            self._watcher.stop()

    def resume(self) -> None:
        """Read from the peer again."""
        self._resumed.set()
        if self._watcher is not None and not self.closed:
            self._watcher.start(self._on_readable)

    def close(self) -> None:
        """Stop reading and let :meth:`run` return; the connection closes the socket."""
        self.closed = True
        if self._watcher is not None:
            self._watcher.close()
        self._ended.set()
        self._resumed.set()  # a paused TLS reader wakes up to see it is closed
