"""Frames: length-prefixed byte strings on a stream (a socket or a pool process's pipes).

A frame is a 4-byte big-endian length ``L`` followed by ``L`` bytes: a MAC (on
authenticated connections, see :mod:`argon.security`) and then the body, whose meaning
is :mod:`argon.protocol`'s. This module builds frame headers, splits a received byte
stream into frames (:class:`FrameBuffer`, refusing any over the peer's limit before
reading it) and reads one frame from a blocking stream (:func:`read_frame`).

Nothing here knows the messages: every frame on every link passes through this module,
so it is a few plain functions and one class, with nothing between them and ``struct``.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from argon.errors import ProtocolError

#: Frame header: the length of the rest of the frame.
HEADER = struct.Struct("!I")

#: Payloads at least this large travel as buffers of their own (see
#: :func:`argon.protocol.encode_parts`), and frames this large are received in place.
BIG = 64 * 1024

#: What frames and bodies may be held in: large ones are read in place, not copied.
Buffer = bytes | bytearray | memoryview


def frame(body: bytes, mac: bytes = b"") -> bytes:
    """Build a frame: header, then ``mac``, then ``body``."""
    return HEADER.pack(len(mac) + len(body)) + mac + body


def frame_parts(parts: list[bytes], mac: bytes = b"", body_size: int | None = None) -> list[bytes]:
    """A frame made of the buffers of :func:`argon.protocol.encode_parts`.

    The header (and ``mac``) joins the first buffer; the others go as they are.
    ``body_size`` (the parts' total length) saves adding them up again when it is known.
    """
    if body_size is None:
        body_size = sum(len(part) for part in parts)
    return [HEADER.pack(len(mac) + body_size) + mac + parts[0], *parts[1:]]


class FrameBuffer:
    """Splits a byte stream into frames, refusing any frame over ``max_frame`` bytes.

    The length is checked as soon as the header arrives, before the frame's bytes are
    read, so an oversized claim costs nothing. A large frame is received into chunks of
    ``CHUNK`` bytes (the reader fills them in place: :meth:`space`, :meth:`filled`), so
    memory grows with the bytes that really arrive, never with what a header claims.
    """

    CHUNK = 1 << 20

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._chunks: list[bytearray] | None = None  # a large frame being received
        self._need = 0
        self._have = 0
        self._fill = 0
        #: Why the stream cannot go on, found behind frames that :meth:`feed` returned
        #: (they are good and are handed on first); the next :meth:`feed` raises it.
        self.error: ProtocolError | None = None

    def feed(self, data: bytes | memoryview) -> list[Buffer]:
        """Add received bytes and return the frames they complete (without headers).

        Raises:
            ProtocolError: A header claims more than ``max_frame`` bytes (when complete
                frames came before it in the same bytes, they are returned and the error
                is kept in :attr:`error` instead, raised by the next call).
        """
        if self.error is not None:
            raise self.error
        frames: list[Buffer] = []
        view = memoryview(data)
        while self._chunks is not None and view:  # the rest of a large frame
            space = self.space()
            assert space is not None
            count = min(len(space), len(view))
            space[:count] = view[:count]
            frames += self.filled(count)
            view = view[count:]
        if not view:
            return frames
        buf = self._buf
        buf += view
        pos = 0
        end = len(buf)
        rest = b""
        with memoryview(buf) as whole:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                if size > self.max_frame:
                    error = ProtocolError(f"frame of {size} bytes exceeds the {self.max_frame} byte limit")
                    if not frames:
                        raise error
                    self.error = error
                    break
                if end - pos - 4 < size:
                    if size >= BIG:  # receive the rest in place, chunk by chunk
                        self._chunks, self._need, self._have, self._fill = [], size, 0, 0
                        rest = bytes(whole[pos + 4 : end])
                        pos = end
                    break
                frames.append(bytes(whole[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        if pos:
            del buf[:pos]
        if self._chunks is not None and rest:
            frames += self.feed(rest)
        return frames

    def space(self) -> memoryview | None:
        """Where to receive more of a large frame directly, if one is pending."""
        chunks = self._chunks
        if chunks is None:
            return None
        if not chunks or self._fill == len(chunks[-1]):
            # Chunks grow with what has arrived (64 KiB, then doubling up to CHUNK): a
            # header that claims a lot but sends little costs little.
            size = min(self.CHUNK, max(BIG, self._have), self._need - self._have)
            chunks.append(bytearray(size))
            self._fill = 0
        return memoryview(chunks[-1])[self._fill :]

    def filled(self, count: int) -> list[Buffer]:
        """Note ``count`` bytes received into :meth:`space`; return the frame once complete."""
        self._fill += count
        self._have += count
        chunks = self._chunks
        if chunks is None or self._have < self._need:
            return []
        self._chunks = None
        return [chunks[0] if len(chunks) == 1 else b"".join(chunks)]


def read_frame(stream: BinaryIO, max_frame: int) -> bytes | None:
    """Read one frame body from a blocking stream; None at a clean end of stream.

    Raises:
        ProtocolError: The stream ended inside a frame or the frame is too large.
    """
    header = stream.read(4)
    if not header:
        return None
    if len(header) < 4:
        raise ProtocolError("stream ended inside a frame header")
    (size,) = HEADER.unpack(header)
    if size > max_frame:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_frame} byte limit")
    body = stream.read(size)
    if len(body) < size:
        raise ProtocolError("stream ended inside a frame")
    return body
