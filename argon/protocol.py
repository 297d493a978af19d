"""The wire protocol's messages: their types and their msgpack encoding.

Each message is the body of one frame (:mod:`argon.framing`: a length, a MAC when
there is a key, then the body). The body is a msgpack array ``[kind, field, ...]``:
``kind`` is a small integer naming the message type and the fields follow in
declaration order. Fields added in later protocol versions go at the end with defaults,
so a peer ignores fields it does not know and fills in the ones an older peer did not
send.

This is the only module that imports msgpack. Task code and arguments travel as opaque
``bytes`` fields: nothing here (nor in the manager) ever deserializes them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from argon import defaults
from argon.errors import ProtocolError
from argon.framing import BIG, Buffer

#: Bumped when a change would break older peers; older peers are refused at hello.
#: Version 2 (Argon 0.2): credits, steal-back and batch frames; ``Ready`` is retired.
VERSION = 2

# msgpack decodes to exact builtin types, so fields are checked with exact type sets
# (which also keeps a bool from passing as an int).
_INT = frozenset({int})
_STR = frozenset({str})
_BYTES = frozenset({bytes})
_DICT = frozenset({dict})
_LIST = frozenset({list})
_NUMBER = frozenset({float, int})
_OPT_NUMBER = frozenset({float, int, type(None)})
_OPT_BYTES = frozenset({bytes, type(None)})


class Hello(NamedTuple):
    """First message on every connection, in both directions.

    Attributes:
        version: Protocol version of the sender.
        role: ``client``, ``worker`` or ``manager``.
        name: A human-readable name of the sender (host:port or process id).
        argon: The sender's Argon version.
        python: The sender's Python version (``3.11.7``).
        serializer: How task payloads are encoded (``pickle+dill``).
        heartbeat: Seconds between the sender's heartbeats; the peer pings at least this
            often, so the sender never mistakes an idle link for a dead one.
        max_frame: Largest frame the sender accepts; the peer refuses to send a larger
            one and reports a clear error instead (0: not announced).
        batch: Most messages the sender accepts in one :class:`Batch` frame (0: send it
            none).
        dashboard: Where the sender serves its web dashboard (``http://host:port/``), or
            empty; a worker passes its managers' on to each other (see
            :attr:`~argon.status.WorkerStats.dashboards`).
    """

    version: int
    role: str
    name: str = ""
    argon: str = ""
    python: str = ""
    serializer: str = ""
    heartbeat: float = 0.0
    max_frame: int = 0
    batch: int = 0
    dashboard: str = ""


class Task(NamedTuple):
    """Run a function: client to server, manager to worker, worker to pool process.

    Attributes:
        id: Chosen by the sender; the reply echoes it.
        func: The serialized callable (opaque bytes).
        args: The serialized ``(args, kwargs)`` pair (opaque bytes).
        timeout: Seconds the task may run before its process is killed, or None.
    """

    id: int
    func: bytes
    args: bytes
    timeout: float | None = None


class Result(NamedTuple):
    """A task's return value (serialized, opaque bytes), in reply to :class:`Task`."""

    id: int
    value: bytes


class Failure(NamedTuple):
    """A task did not produce a value.

    Attributes:
        id: The task's id.
        error: ``TaskError`` when the task raised; otherwise the name of an
            :mod:`argon.errors` class (``ProcessDied``, ``TaskRejected``...).
        message: A one-line description.
        payload: For ``TaskError``, the serialized exception if it could be pickled.
        traceback: The formatted remote traceback, if any.
    """

    id: int
    error: str
    message: str
    payload: bytes | None = None
    traceback: str = ""


class Register(NamedTuple):
    """A worker offers its processes to a manager.

    Attributes:
        id: The worker's id (stable for the life of the worker process).
        host: Address the worker listens on.
        port: Port the worker listens on.
        capacity: Number of pool processes.
        free: Processes free right now (fewer than capacity after a reconnect): the
            manager may send this many tasks until the worker's first :class:`Credit`.
        pid: The worker's process id.
    """

    id: str
    host: str
    port: int
    capacity: int
    free: int
    pid: int = 0


class Credit(NamedTuple):
    """Worker to manager: how many of the manager's tasks the worker will hold.

    Each credit replaces the last one (it is a level, not an increment), so a worker
    can raise or lower it at any time and a lost race costs nothing: tasks already on
    the way are taken and held. A worker serving several managers gives each its own
    credit, and moves free processes to whichever has work by changing them.

    Attributes:
        window: Most tasks from this manager the worker holds at once (sent and not yet
            answered, handed back or lost), running or waiting.
        processes: How many of them start at once: the worker's processes that are this
            manager's to fill. The ``window - processes`` others wait in the worker
            (its prefetch), and the manager may take them back with :class:`Reclaim`.
    """

    window: int
    processes: int


class Reclaim(NamedTuple):
    """Manager to worker: hand back up to ``limit`` tasks that have not started."""

    limit: int


class Batch(NamedTuple):
    """Several messages in one frame (one header, one MAC, one decode).

    A connection packs small messages that queue up together into one batch, up to the
    peer's :attr:`Hello.batch`; the receiver handles them in order, as if each had
    come in a frame of its own. A batch never holds another batch.
    """

    messages: list[Message]


class Ping(NamedTuple):
    """Heartbeat; sent on an idle link so the peer knows this side is alive."""


class StatusRequest(NamedTuple):
    """Ask a server for its :meth:`status`."""

    id: int


class StatusReply(NamedTuple):
    """A server's status, as documented for ``Client.status()``."""

    id: int
    status: dict


class Stats(NamedTuple):
    """Worker to manager: the worker's own figures (memory, processes), sent periodically."""

    values: dict


class Cancel(NamedTuple):
    """Client to server, or manager to the worker holding the task: drop task ``id`` if it has not started yet."""

    id: int


class Bye(NamedTuple):
    """The sender is going away, or closing this link; ``reason`` says why.

    Attributes:
        reason: Why, for people.
        error: The name of the :mod:`argon.errors` class the receiver should raise for
            what it still waits for on this link: ``ShuttingDown`` from a stopping
            server, ``ProtocolError`` when the sender closes the link over bad input
            (empty: just leaving).
    """

    reason: str = ""
    error: str = ""


class NotCancelled(NamedTuple):
    """Answer to :class:`Cancel`: task ``id`` could not be dropped (it has started, or is unknown)."""

    id: int


class Handback(NamedTuple):
    """Worker to manager: tasks it was sent and will never run; the manager sends them elsewhere.

    Sent when the manager asks for them back (:class:`Reclaim`; possibly with no ids: all
    had started), unasked when the worker sees its waiting tasks would wait behind long
    ones, when it drains, and for the one task a :class:`Cancel` from the manager dropped.

    Attributes:
        ids: The manager's ids of the tasks, none of which has started, oldest first.
        reason: Why, for the logs.
    """

    ids: list[int]
    reason: str = ""


Message = (
    Hello
    | Task
    | Result
    | Failure
    | Register
    | Ping
    | StatusRequest
    | StatusReply
    | Stats
    | Cancel
    | Bye
    | NotCancelled
    | Handback
    | Credit
    | Reclaim
    | Batch
)

#: Wire kind of each message type, and the type of each field (checked on decode).
#: Kind 6 (``Ready``, protocol version 1) is retired: :class:`Credit` replaced it.
_SPEC: dict[type, tuple[int, tuple[frozenset[Any], ...]]] = {
    Hello: (1, (_INT, _STR, _STR, _STR, _STR, _STR, _NUMBER, _INT, _INT, _STR)),
    Task: (2, (_INT, _BYTES, _BYTES, _OPT_NUMBER)),
    Result: (3, (_INT, _BYTES)),
    Failure: (4, (_INT, _STR, _STR, _OPT_BYTES, _STR)),
    Register: (5, (_STR, _STR, _INT, _INT, _INT, _INT)),
    Ping: (7, ()),
    StatusRequest: (8, (_INT,)),
    StatusReply: (9, (_INT, _DICT)),
    Stats: (10, (_DICT,)),
    Cancel: (11, (_INT,)),
    Bye: (12, (_STR, _STR)),
    Handback: (13, (_LIST, _STR)),
    Credit: (20, (_INT, _INT)),
    Reclaim: (21, (_INT,)),
    Batch: (22, (_LIST,)),
    NotCancelled: (30, (_INT,)),
}
BATCH_KIND = 22
_KIND = {cls: kind for cls, (kind, _) in _SPEC.items()}
_BY_KIND: dict[int, tuple[type, tuple[frozenset[Any], ...], int]] = {
    kind: (cls, types, len(types) - len(cls._field_defaults))  # type: ignore[attr-defined]
    for cls, (kind, types) in _SPEC.items()
}


#: Where (index in ``[kind, *fields]``) each message kind carries payload bytes.
_PAYLOADS = {Task: (2, 3), Result: (2,), Failure: (4,)}
_unpackb = msgpack.unpackb
_packb = msgpack.packb
_new_tuple = tuple.__new__
#: Kinds with a list field whose items need a check of their own.
_LISTS = frozenset({Handback, Batch})


def encode(msg: Message) -> bytes:
    """Encode a message as a frame body (no header).

    Args:
        msg: Any message defined in this module.

    Returns:
        The msgpack body.
    """
    if type(msg) is Batch:
        return _packb([BATCH_KIND, [[_KIND[type(item)], *item] for item in msg.messages]])
    return _packb([_KIND[type(msg)], *msg])


def batch_body(bodies: list[bytes]) -> bytes:
    """The body of a :class:`Batch` of messages already encoded by :func:`encode`.

    The encoded bodies are msgpack arrays themselves, so they are joined as they are,
    behind the headers of ``[BATCH_KIND, [...]]``: nothing is encoded twice.
    """
    return b"\x92\x16" + _array_header(len(bodies)) + b"".join(bodies)


def _array_header(count: int) -> bytes:
    """The msgpack header of an array of ``count`` elements."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 0x10000:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def decode(body: Buffer, max_items: int = defaults.MAX_ITEMS) -> Message:
    """Decode and validate a frame body.

    Args:
        body: The complete body of one frame (its length already checked).
        max_items: Most elements any array or map in it may have.

    Returns:
        The message (a :class:`Batch` holds messages checked the same way).

    Raises:
        ProtocolError: The body is not valid msgpack, not a known message, or a field
            has the wrong type.
    """
    try:
        # Bound every container by what the frame could really hold (an item takes at least
        # a byte, a map entry two) as well as by max_items: msgpack reserves room for a
        # claimed length before it finds the data missing, so a short frame must not be
        # able to claim much. Strings and bins are bounded by the frame length already.
        size = len(body)
        obj = _unpackb(body, max_array_len=min(max_items, size), max_map_len=min(max_items, size // 2))
    except Exception as exc:  # msgpack raises many unrelated types on bad input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    msg = _message(obj)
    if type(msg) is Batch:
        return Batch([_message(item, nested=True) for item in msg.messages])
    return msg


def _message(obj: Any, nested: bool = False) -> Message:
    """Check a decoded ``[kind, field, ...]`` array and build its message."""
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ProtocolError("frame is not a message array")
    spec = _BY_KIND.get(obj[0])
    if spec is None:
        raise ProtocolError(f"unknown message kind {obj[0]!r}")
    cls, types, required = spec
    fields = obj[1 : 1 + len(types)]  # later versions may append fields: ignore them
    if len(fields) < required:
        raise ProtocolError(f"{cls.__name__} needs {required} fields, got {len(fields)}")
    for value, expected in zip(fields, types):  # noqa: B905 - fields may be fewer than types
        if type(value) not in expected:
            raise ProtocolError(f"{cls.__name__}: bad field {value!r:.40}")
    if cls in _LISTS:
        if nested and cls is Batch:
            raise ProtocolError("a batch may not hold another batch")
        if cls is Handback and any(type(item) is not int for item in fields[0]):
            raise ProtocolError("Handback: ids must be integers")
    if len(fields) == len(types):
        return _new_tuple(cls, fields)  # type: ignore[no-any-return]  # all fields present: skip keyword handling
    return cls(*fields)  # type: ignore[no-any-return]


def encode_parts(msg: Message) -> list[bytes]:
    """Encode a message as buffers whose concatenation is :func:`encode`'s body.

    A large ``bytes`` field (a task's arguments, a result) becomes a buffer of its own,
    passed on without being copied, so a payload crosses a hop with as few copies as the
    sockets and pipes allow.
    """
    fields = [_KIND[type(msg)], *msg]
    payloads = _PAYLOADS.get(type(msg))
    if payloads is not None:
        for index in payloads:  # a plain loop: this runs for every task and result
            value = fields[index]
            if value is not None and len(value) >= BIG:
                return _split(fields)
    return [_packb(fields)]


def _split(fields: list[Any]) -> list[bytes]:
    """The buffers of a message with a large payload: each large ``bytes`` one of its own."""
    parts: list[bytes] = []
    small = bytearray(bytes([0x90 | len(fields)]))  # every message has fewer than 16 fields
    for value in fields:
        if type(value) is bytes and len(value) >= BIG:
            small += _bin_header(len(value))
            parts += (bytes(small), value)
            small = bytearray()
        else:
            small += _packb(value)
    if small:
        parts.append(bytes(small))
    return parts


def _bin_header(size: int) -> bytes:
    """The msgpack header of a ``bin`` of ``size`` bytes."""
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")
