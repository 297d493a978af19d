"""A worker's link to one manager, as the worker keeps it: its state and the credit granted on it.

The worker's :class:`~argon.uplink.Uplink` holds one per manager, dials it, and serves it.
"""

from __future__ import annotations

from collections import deque

import gevent.event

from argon import defaults
from argon.connection import Connection
from argon.states import LinkState, advance


class ManagerLink:
    """A worker's link to one manager and the credit granted on it (see :class:`LinkState`).

    Attributes:
        address: The manager's ``(host, port)``.
        state: Where the link is in its life cycle.
        conn: The current connection (None while dialing or lost).
        session: This connection's tag on its tasks in the pool (unique in the worker): a
            task's reply goes only to the connection it came on.
        window: The credit granted on this connection: most tasks held at once.
        processes: How many of them start at once.
        freed: When recent results freed credits on this connection (to time round trips).
        released: Set once the manager will route nothing more on this connection (it
            answered our goodbye, or the connection closed).
        foreign: Tasks in the pool, when this connection registered, that were not its own
            and are still running (kept for a worker with one manager, whose credit it sets).
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.state = LinkState.DIALING
        self.conn: Connection | None = None
        self.session = 0
        self.window = 0
        self.processes = 0
        self.freed: deque[float] = deque(maxlen=defaults.MAX_PREFETCH)
        self.foreign = 0
        self.released = gevent.event.Event()

    def __repr__(self) -> str:
        return (
            f"<ManagerLink {self.name} {self.state.value} session {self.session},"
            f" credit {self.window}/{self.processes}>"
        )

    @property
    def name(self) -> str:
        """The manager's ``host:port``."""
        return f"{self.address[0]}:{self.address[1]}"

    def move(self, state: LinkState) -> None:
        """Change state (see :data:`argon.states.MOVES`)."""
        self.state = advance(self.state, state, self)  # type: ignore[assignment]

    @property
    def open(self) -> bool:
        """Whether tasks may still come and replies go on the current connection."""
        conn = self.conn
        return conn is not None and not conn.closed and self.state in (LinkState.SERVING, LinkState.DRAINING)
