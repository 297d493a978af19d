"""The named states of Argon's long-lived objects, and the moves allowed between them.

Each life cycle is one ``str`` enum with a table of allowed moves; the object that owns
a state changes it only through :func:`advance`, which refuses a move the table does
not list, so an impossible sequence of events fails loudly where it happens instead of
leaving an object half in two states. ``docs/concepts.md`` draws the same tables.
"""

from __future__ import annotations

import enum
from typing import Any


class InvalidTransition(RuntimeError):
    """An object was asked to move to a state it cannot reach from its current one."""


class ProcessState(str, enum.Enum):
    """A pool process, as its pool sees it."""

    STARTING = "starting"  #: started, its hello not read yet
    IDLE = "idle"  #: waiting for a task
    BUSY = "busy"  #: running a task
    OVERDUE = "overdue"  #: its task ran past its time limit; being killed
    RETIRING = "retiring"  #: ran its --max-requests; closing its input and exiting
    DEAD = "dead"  #: exited, killed or retired; its successor (if any) is starting

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class WorkerState(str, enum.Enum):
    """A worker's link, as its manager sees it."""

    CONNECTED = "connected"  #: handshake done, no Register yet
    ACTIVE = "active"  #: registered: routed tasks up to its credit
    DRAINING = "draining"  #: said goodbye: finishes what it holds, gets nothing new
    GONE = "gone"  #: dropped; the tasks it held went back to the queue

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class LinkState(str, enum.Enum):
    """A worker's link to its manager, as the worker sees it."""

    DIALING = "dialing"  #: connecting (again, after a loss)
    SERVING = "serving"  #: registered: takes the manager's tasks
    DRAINING = "draining"  #: the worker is stopping: finishes what it runs, takes nothing new
    LOST = "lost"  #: the connection dropped; the worker dials again
    CLOSED = "closed"  #: the worker stopped

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


State = ProcessState | WorkerState | LinkState

#: For each life cycle, the states each state may move to. (Kept per enum: a ``str`` enum's
#: members equal their values, so states of different enums with one name must not share a
#: dict.)
MOVES: dict[type[State], dict[Any, frozenset[Any]]] = {
    ProcessState: {
        ProcessState.STARTING: frozenset({ProcessState.IDLE, ProcessState.DEAD}),
        ProcessState.IDLE: frozenset({ProcessState.BUSY, ProcessState.RETIRING, ProcessState.DEAD}),
        ProcessState.BUSY: frozenset(
            {ProcessState.IDLE, ProcessState.OVERDUE, ProcessState.RETIRING, ProcessState.DEAD}
        ),
        ProcessState.OVERDUE: frozenset({ProcessState.DEAD}),
        ProcessState.RETIRING: frozenset({ProcessState.DEAD}),
        ProcessState.DEAD: frozenset(),
    },
    WorkerState: {
        WorkerState.CONNECTED: frozenset({WorkerState.ACTIVE, WorkerState.GONE}),
        WorkerState.ACTIVE: frozenset({WorkerState.DRAINING, WorkerState.GONE}),
        WorkerState.DRAINING: frozenset({WorkerState.GONE}),
        WorkerState.GONE: frozenset(),
    },
    LinkState: {
        LinkState.DIALING: frozenset({LinkState.SERVING, LinkState.CLOSED}),
        LinkState.SERVING: frozenset({LinkState.DRAINING, LinkState.LOST, LinkState.CLOSED}),
        LinkState.DRAINING: frozenset({LinkState.CLOSED}),
        LinkState.LOST: frozenset({LinkState.DIALING, LinkState.CLOSED}),
        LinkState.CLOSED: frozenset(),
    },
}


def advance(current: State, new: State, owner: object) -> State:
    """Return ``new`` if ``current`` may move to it; else raise.

    Raises:
        InvalidTransition: The table does not allow the move (``owner`` names who tried).
    """
    if type(new) is not type(current) or new not in MOVES[type(current)][current]:
        raise InvalidTransition(f"{owner!r} cannot go from {current.value} to {new.value}")
    return new
