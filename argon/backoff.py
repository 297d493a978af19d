"""Growing, jittered, capped delays between retries: the one backoff every retry loop uses.

A :class:`Backoff` hands out the delay before each next attempt, and None once the
attempts or the time it was given are used up, so every loop built on it is bounded in
count or time (or says plainly that it is not: ``attempts=None, within=None``). The
clock is injectable, so its tests need no sleeping::

    backoff = Backoff.reconnect()
    while (delay := backoff.next_delay()) is not None:
        ...try once; on success: break (or backoff.reset() to start over)...
        gevent.sleep(delay)

The constants live in :mod:`argon.defaults`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from argon import defaults


def delay(
    attempt: int, first: float, factor: float, cap: float, jitter: float = 0.0, rng: Callable[[], float] = random.random
) -> float:
    """The delay before retry number ``attempt`` (1 for the first retry).

    Args:
        attempt: Which retry this is, from 1.
        first: The delay before the first retry.
        factor: How much each delay grows over the one before.
        cap: The longest delay (before jitter).
        jitter: Spread each delay by up to this fraction either way (0.2: 80% to 120%), so
            many peers retrying at once do not retry in step.
        rng: A source of floats in [0, 1).
    """
    base = min(first * factor ** max(0, attempt - 1), cap)
    return base * (1 + jitter * (2 * rng() - 1))


class Backoff:
    """The delays of one retry loop; see the module docstring.

    Args:
        first: Delay before the first retry.
        factor: Growth of each delay over the one before.
        cap: The longest delay (before jitter).
        jitter: Fractional spread of each delay (see :func:`delay`).
        attempts: Most retries before :meth:`next_delay` returns None (None: no bound).
        within: Seconds, counted from construction or :meth:`reset`, after which
            :meth:`next_delay` returns None (None: no bound); a delay never runs past it.
        clock: Monotonic seconds (injectable for tests).
        rng: A source of floats in [0, 1) (injectable for tests).
    """

    def __init__(
        self,
        first: float,
        factor: float = 2.0,
        cap: float = defaults.RECONNECT_MAX_DELAY,
        *,
        jitter: float = defaults.BACKOFF_JITTER,
        attempts: int | None = None,
        within: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.first = first
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self.attempts = attempts
        self.within = within
        self._clock = clock
        self._rng = rng
        self.tries = 0
        self.started = clock()

    def __repr__(self) -> str:
        bound = f"/{self.attempts}" if self.attempts is not None else ""
        return f"<Backoff try {self.tries}{bound}, first {self.first}s, cap {self.cap}s>"

    def reset(self) -> None:
        """Start over (after a success): the next delay is the first one again."""
        self.tries = 0
        self.started = self._clock()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when no attempt is left."""
        if self.attempts is not None and self.tries >= self.attempts:
            return None
        left = None if self.within is None else self.started + self.within - self._clock()
        if left is not None and left <= 0:
            return None
        self.tries += 1
        wait = delay(self.tries, self.first, self.factor, self.cap, self.jitter, self._rng)
        return wait if left is None else min(wait, left)

    @classmethod
    def reconnect(
        cls,
        within: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> Backoff:
        """Delays between attempts to reach a lost peer (a worker's manager, a client's server).

        Args:
            within: Give up after this many seconds (None: keep trying, about
                ``RECONNECT_MAX_DELAY`` apart).
            clock: Monotonic seconds (for tests).
            rng: Floats in [0, 1) (for tests).
        """
        return cls(
            defaults.RECONNECT_DELAY,
            defaults.RECONNECT_BACKOFF,
            defaults.RECONNECT_MAX_DELAY,
            within=within,
            clock=clock,
            rng=rng,
        )

    @classmethod
    def pool_start(
        cls, *, clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random
    ) -> Backoff:
        """Delays between attempts to start a pool process; bounded, so a pool that cannot start says so."""
        return cls(
            defaults.POOL_START_DELAY,
            defaults.POOL_START_BACKOFF,
            defaults.POOL_START_MAX_DELAY,
            attempts=defaults.POOL_START_ATTEMPTS,
            clock=clock,
            rng=rng,
        )
