"""Heartbeats: ping an idle link, close one whose peer went silent.

A :class:`Keepalive` runs on a libev timer, not a greenlet, so a manager with a thousand
idle workers wakes no greenlets to keep them alive. Every interval it pings the peer if
nothing went out for that long, and closes the connection if nothing came in for a given
number of this side's heartbeats. It takes the time as ``now=``, so tests run its checks
without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent

from argon import defaults
from argon.errors import ConnectionLost
from argon.outbox import Outbox
from argon.protocol import Message, Ping
from argon.reader import Reader

log = logging.getLogger(__name__)


class Keepalive:
    """The heartbeat of one connection; see the module docstring.

    Args:
        reader: The connection's reader (when something last arrived; whether it is paused).
        outbox: The connection's outbox (when something last went; what waits).
        heartbeat: This side's heartbeat interval, in seconds.
        send: Sends a message on the connection (for pings).
        close: Closes the connection, with the reason.

    Attributes:
        heartbeat: This side's heartbeat interval.
        interval: How often :meth:`beat` runs: ``heartbeat``, or the peer's interval if shorter.
        silence: Seconds without a message from the peer after which the connection
            closes (None: never).
    """

    def __init__(
        self,
        reader: Reader,
        outbox: Outbox,
        heartbeat: float,
        send: Callable[[Message], None],
        close: Callable[[str], None],
    ) -> None:
        self.heartbeat = heartbeat
        self.interval = heartbeat
        self.silence: float | None = None
        self._reader = reader
        self._outbox = outbox
        self._send = send
        self._close = close
        self._tick = 0.0
        self._drain_mark = 0
        self._timer: Any = None

    def configure(self, misses: int, peer_interval: float = 0.0, now: float | None = None) -> float:
        """Set the interval and the allowed silence; returns the interval.

        Args:
            misses: Heartbeats of this side the peer may miss (0: never time it out; the
                peer is then watched by TCP keepalive).
            peer_interval: The peer's heartbeat interval from its hello (0: not announced).
            now: The time (``time.monotonic()``); tests pass their own.
        """
        if not peer_interval >= defaults.MIN_HEARTBEAT:  # absent, tiny, negative or NaN: ignore it
            peer_interval = self.heartbeat
        self.interval = min(self.heartbeat, peer_interval)
        self.silence = self.heartbeat * misses or None
        self._tick = time.monotonic() if now is None else now
        return self.interval

    def start(self) -> None:
        """Run :meth:`beat` every :attr:`interval` seconds until :meth:`close`."""
        self._timer = gevent.get_hub().loop.timer(self.interval, self.interval)
        self._timer.start(self.beat)

    def beat(self, now: float | None = None) -> None:
        """Ping an idle link; close one whose peer went silent (the timer runs it every interval).

        Args:
            now: The time (``time.monotonic()``); tests pass it to run the checks without
                waiting.
        """
        if now is None:
            now = time.monotonic()
        reader, outbox = self._reader, self._outbox
        interval, timeout = self.interval, self.silence
        if now - self._tick > 2 * interval:
            # This process itself was frozen or starved: give the peer a fresh chance.
            reader.last_recv = now
        queued = outbox.queued
        if reader.paused and queued < self._drain_mark:
            reader.last_recv = now  # we stopped reading it, but it is taking our data: alive
        self._tick, self._drain_mark = now, queued
        silent = now - reader.last_recv
        if timeout is not None and silent > timeout:
            log.warning("no heartbeat from %s for %.1fs; closing", reader.peer, silent)
            self._close(f"no heartbeat for {silent:.1f}s")
        elif now - outbox.last_send >= interval and outbox.empty:
            with contextlib.suppress(ConnectionLost):
                self._send(Ping())

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.close()
