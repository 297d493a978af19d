"""The sending half of a connection: encoding, batching, signing and writing frames.

An :class:`Outbox` encodes each message when it is queued (so errors reach the sender),
packs the small messages that queue up together into one :class:`~argon.protocol.Batch`
frame, signs frames in the order they will go, and hands everything queued to the
socket in a single system call from a hub callback. What the socket does not take at
once goes out through a writer greenlet that waits until it is writable. It counts the
bytes waiting, so that its connection can stop reading from a peer that does not read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from argon import defaults
from argon.errors import MessageTooLarge
from argon.framing import BIG, frame_parts
from argon.protocol import Hello, Message, batch_body, encode_parts
from argon.security import MAC_BYTES, FrameSigner

#: Most buffers one ``sendmsg`` takes.
IOV_MAX = 1024


class Outbox:
    """What waits to go to one peer; see the module docstring.

    Args:
        sock: The connection's socket (gevent).
        raw: The socket's underlying plain socket, written straight from the hub; None
            for TLS, which always goes through the writer greenlet.
        peer: The peer's address, for messages.
        signer: Signs frames on a keyed link (None: frames carry no MAC).
        on_error: Called with the reason when the socket fails (the connection closes).
        on_drained: Called once fewer than ``OUTBOX_LOW`` bytes wait, after
            :meth:`watch_drain`.

    Attributes:
        queued: Bytes waiting to go to the socket.
        last_send: When (``time.monotonic()``) the socket last took something.
        sent_frames: Frames sent (a batch is one).
        sent_messages: Messages sent.
    """

    def __init__(
        self,
        sock: Any,
        raw: Any,
        peer: str,
        signer: FrameSigner | None,
        on_error: Callable[[str], None],
        on_drained: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._raw = raw
        self._signer = signer
        self._on_error = on_error
        self._on_drained = on_drained
        self.mac_size = MAC_BYTES if signer else 0
        self.queued = 0
        self.last_send = time.monotonic()
        self.sent_frames = 0
        self.sent_messages = 0
        self._out: list[bytes] = []  # frames ready to go
        self._small: list[bytes] = []  # bodies of small messages not framed yet (see seal)
        self._small_size = 0
        self._batch_count = 1  # most messages per frame: 1 until the peer's hello allows more
        self._batch_bytes = defaults.BATCH_BYTES
        self._limit = 0  # the peer's frame limit (0: not announced)
        self._loop = gevent.get_hub().loop
        self._scheduled = False  # a flush is on its way
        self._lingering: Any = None  # a timer that flushes what lingers (see put)
        self._linger = 0.0
        self._writing = False  # the writer greenlet owns the queue
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._writer: gevent.Greenlet | None = None
        self._watching = False
        self._closed = False

    @property
    def empty(self) -> bool:
        """Whether nothing is waiting to go."""
        return not self._out and not self._small

    @property
    def writing(self) -> bool:
        """Whether the writer greenlet is waiting for the socket to take the rest."""
        return self._writing

    def configure(self, hello: Hello) -> None:
        """Follow the peer's announced limits: its frame size and the batches it accepts."""
        self._limit = hello.max_frame
        self._batch_count = max(1, min(hello.batch, defaults.BATCH_MESSAGES))
        if hello.max_frame:
            self._batch_bytes = min(defaults.BATCH_BYTES, hello.max_frame - self.mac_size - 16)

    def encode(self, msg: Message) -> tuple[list[bytes], int]:
        """The body of ``msg`` as buffers (a large payload is one, uncopied), and its size.

        Raises:
            MessageTooLarge: The peer announced a smaller frame limit (checked before
                anything is signed, so a refused message uses up no sequence number).
        """
        parts = encode_parts(msg)
        size = len(parts[0]) if len(parts) == 1 else sum(len(part) for part in parts)
        limit = self._limit
        if limit and size + self.mac_size > limit:
            raise MessageTooLarge(
                f"a {type(msg).__name__} of {size + self.mac_size} bytes exceeds the {limit} byte"
                f" limit of {self.peer} (its --max-frame)"
            )
        return parts, size

    def _framed(self, parts: list[bytes], size: int) -> list[bytes]:
        """Sign (on a keyed link) and frame one body; frames are signed in sending order."""
        self.sent_frames += 1
        mac = self._signer.sign(*parts) if self._signer else b""
        return frame_parts(parts, mac, size)

    def put(self, msg: Message, linger: float = 0.0) -> None:
        """Queue a message (see :meth:`argon.connection.Connection.send`).

        Raises:
            MessageTooLarge: The peer announced a smaller frame limit.
        """
        parts, size = self.encode(msg)
        self.sent_messages += 1
        if len(parts) == 1 and size < self._batch_bytes:
            if len(self._small) >= self._batch_count or self._small_size + size > self._batch_bytes:
                self.seal()
            self._small.append(parts[0])
            self._small_size += size
            self.queued += size
        else:
            self.seal()  # what was queued before it goes before it
            self._out += self._framed(parts, size)
            self.queued += 4 + self.mac_size + size
        if not self._scheduled:
            self._idle.clear()
            if not linger:
                self._scheduled = True
                self._loop.run_callback(self.flush_now)
            elif self._lingering is None or not self._lingering.active:
                if self._lingering is None or self._linger != linger:
                    if self._lingering is not None:
                        self._lingering.close()
                    self._lingering, self._linger = self._loop.timer(linger), linger
                self._lingering.start(self._flush_lingering)

    def seal(self) -> None:
        """Frame the small messages queued so far: one frame, or one batch frame for several."""
        small = self._small
        if not small:
            return
        body = small[0] if len(small) == 1 else batch_body(small)
        self._out += self._framed([body], len(body))
        self.queued += 4 + self.mac_size + len(body) - self._small_size
        self._small = []
        self._small_size = 0

    def flush_now(self) -> None:
        """Send what is queued in one system call, from the hub, with no greenlet switch.

        Whatever the socket does not take at once is left to the writer greenlet, which
        waits until the socket is writable; while it works, it owns the queue.
        """
        self._scheduled = False
        if self._closed or self._writing:
            return
        self.seal()
        if not self._out:
            return
        buffers, self._out = _gather(self._out), []
        total = len(buffers[0]) if len(buffers) == 1 else sum(len(buffer) for buffer in buffers)
        sent = 0
        if self._raw is not None:
            try:
                sent = self._raw.send(buffers[0]) if len(buffers) == 1 else self._raw.sendmsg(buffers)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._on_error(f"send failed: {exc}")
                return
        self._sent(sent)
        if sent == total:
            self.last_send = time.monotonic()
            self._idle.set()
            return
        self._out[:0] = _unsent(buffers, sent)
        self._writing = True
        self._wake.set()

    def _flush_lingering(self) -> None:
        """Timer callback: what waited for company goes now (unless a flush is on its way)."""
        if not self._scheduled:
            self._scheduled = True
            self.flush_now()

    def watch_drain(self) -> None:
        """Call ``on_drained`` once no more than ``OUTBOX_LOW`` bytes wait."""
        self._watching = True

    def _sent(self, count: int) -> None:
        """Account for ``count`` bytes handed to the socket."""
        self.queued -= count
        if self._watching and self.queued <= defaults.OUTBOX_LOW:
            self._watching = False
            self._on_drained()

    def send_now(self, msg: Message) -> None:
        """Send one message from the calling greenlet (before :meth:`start`, nothing queued)."""
        for part in self._framed(*self.encode(msg)):
            self.sock.sendall(part)
        self.last_send = time.monotonic()

    def start(self) -> None:
        """Start the writer greenlet (for what the socket does not take at once, and TLS)."""
        self._writer = gevent.spawn(self._write_loop)

    def _write_loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                self.seal()
                while self._out:
                    buffers, self._out = _gather(self._out), []
                    for buffer in buffers:
                        self.sock.sendall(buffer)
                        self.last_send = time.monotonic()
                        self._sent(len(buffer))
                    self.seal()  # what was queued while this greenlet waited
                self._writing = False
                self._idle.set()
        except OSError as exc:
            self._on_error(f"send failed: {exc}")

    def wait(self, timeout: float) -> bool:
        """Wait until everything queued has been handed to the socket; False on timeout."""
        return bool(self._idle.wait(timeout))

    def close(self) -> None:
        """Drop what is queued and stop the writer and the linger timer."""
        self._closed = True
        self._out = []
        self._small = []
        self._idle.set()
        if self._lingering is not None:
            self._lingering.close()
        if self._writer is not None and self._writer is not gevent.getcurrent():
            self._writer.kill(block=False)


def _gather(buffers: list[bytes]) -> list[bytes]:
    """Join runs of small buffers, keep large ones whole: few, big buffers for ``sendmsg``."""
    if len(buffers) == 1:
        return buffers
    gathered: list[bytes] = []
    small: list[bytes] = []
    for buffer in buffers:
        if len(buffer) >= BIG:
            if small:
                gathered.append(b"".join(small))
                small = []
            gathered.append(buffer)
        else:
            small.append(buffer)
    if small:
        gathered.append(b"".join(small))
    if len(gathered) > IOV_MAX:  # sendmsg takes at most IOV_MAX buffers at once
        gathered[IOV_MAX - 1 :] = [b"".join(gathered[IOV_MAX - 1 :])]
    return gathered


def _unsent(buffers: list[bytes], sent: int) -> list[bytes]:
    """What is left of ``buffers`` after the first ``sent`` bytes went out."""
    for index, buffer in enumerate(buffers):
        if sent < len(buffer):
            return [memoryview(buffer)[sent:], *buffers[index + 1 :]]  # type: ignore[list-item]
        sent -= len(buffer)
    return []
