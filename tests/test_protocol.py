"""The wire protocol: message encoding and validation, frame splitting, blocking frame reads."""

from __future__ import annotations

import io
import itertools
import socket
import struct
import time
import tracemalloc
from typing import Any

import gevent
import gevent.socket
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argon import defaults
from argon.connection import Connection
from argon.errors import ProtocolError
from argon.framing import HEADER, FrameBuffer, frame, read_frame
from argon.protocol import (
    Batch,
    Bye,
    Cancel,
    Credit,
    Failure,
    Handback,
    Hello,
    Message,
    Ping,
    Reclaim,
    Register,
    Result,
    Stats,
    StatusReply,
    StatusRequest,
    Task,
    batch_body,
    decode,
    encode,
)
from argon.reader import Reader
from argon.security import MAC_BYTES, FrameSigner, Session

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

MESSAGES = [
    Hello(1, "client"),
    Hello(1, "worker", "127.0.0.1:8000", "0.1.0", "3.11.7", "pickle+dill"),
    Task(1, b"func", b"args"),
    Task(2**40, b"", b"", 0.25),
    Task(3, b"\x00\xff" * 100, b"a", 7),
    Result(4, b"value"),
    Result(0, b""),
    Failure(5, "TaskError", "builtins.ValueError: bad"),
    Failure(6, "ProcessDied", "pool process 1 exited with code 3", b"payload", "Traceback ...\n"),
    Register("w-1", "127.0.0.1", 8001, 4, 2),
    Register("w-2", "::1", 65535, 1, 0, 12345),
    Credit(12, 4),
    Reclaim(3),
    Handback([7, 8, 9], "reclaimed"),
    Handback([]),
    Batch([Task(1, b"f", b"a"), Result(2, b"v"), Credit(3, 2), Ping()]),
    Ping(),
    StatusRequest(9),
    StatusReply(9, {"workers": [{"id": "w-1", "busy": 0}], "capacity": 2, "role": "manager"}),
    StatusReply(10, {}),
    Stats({"rss": 1 << 30, "load": 0.5, "pids": [1, 2]}),
    Cancel(11),
    Bye(),
    Bye("draining"),
    Bye("manager m is shutting down", "ShuttingDown"),
    Handback([1, 2, 3]),
]


def _raw(*items: object) -> bytes:
    """A frame body built by hand (what an arbitrary peer could send)."""
    return msgpack.packb(list(items))


# -- message encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{type(m).__name__}-{len(encode(m))}")
def test_every_message_round_trips(msg):
    decoded = decode(encode(msg))
    assert type(decoded) is type(msg)
    assert decoded == msg


def test_every_message_type_is_covered_and_has_a_distinct_kind():
    kinds = {}
    for msg in MESSAGES:
        kinds.setdefault(type(msg), msgpack.unpackb(encode(msg))[0])
    assert set(kinds) == {Hello, Task, Result, Failure, Register, Ping, StatusRequest, StatusReply, Stats,
                          Cancel, Bye, Handback, Credit, Reclaim, Batch}
    assert len(set(kinds.values())) == len(kinds)


def test_body_is_a_msgpack_array_of_kind_then_fields():
    assert msgpack.unpackb(encode(Result(7, b"v"))) == [3, 7, b"v"]
    assert msgpack.unpackb(encode(Ping())) == [7]


def test_decode_accepts_a_memoryview():
    body = encode(Task(1, b"f", b"a", 1.5))
    assert decode(memoryview(body)) == Task(1, b"f", b"a", 1.5)


def test_task_timeout_may_be_an_integer_or_none():
    assert decode(_raw(2, 1, b"f", b"a", 5)).timeout == 5
    assert decode(_raw(2, 1, b"f", b"a", None)).timeout is None


@pytest.mark.parametrize(
    "body",
    [
        b"",  # nothing at all
        b"\xc1",  # the one byte msgpack never uses
        b"\x93\x02\x01",  # array of 3 that ends after 2 items
        b"\xda\x00\x10abc",  # str16 claiming 16 bytes, 3 present
        _raw(7) + b"\x00",  # a valid message followed by extra bytes
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"\x92\x09\x81\x01\x02",  # [9, {1: 2}]: a map key that is not a string
        b"\x92\x09\x81\x90\x02",  # [9, {[]: 2}]: an unhashable map key
        b"\x91" * 5000,  # nesting deeper than msgpack's stack
        b"\xd4\x01\x00",  # a bare ext type
        b"\xd6\xff\xff\xff\xff\xff",  # a malformed timestamp ext
    ],
    ids=["empty", "c1", "short-array", "short-str", "extra-data", "bad-utf8", "int-key", "list-key", "deep",
         "ext", "bad-timestamp"],
)
def test_decode_rejects_non_msgpack_bytes(body):
    with pytest.raises(ProtocolError):
        decode(body)


@pytest.mark.parametrize(
    "value",
    [7, "hello", b"bytes", 1.5, None, True, {"kind": 7}, [], msgpack.ExtType(1, b"x")],
    ids=lambda v: type(v).__name__,
)
def test_decode_rejects_bodies_that_are_not_a_message_array(value):
    with pytest.raises(ProtocolError, match="not a message array"):
        decode(msgpack.packb(value))


@pytest.mark.parametrize("head", ["7", b"\x07", 7.0, None, True, False, [7], {"k": 7}], ids=repr)
def test_decode_rejects_a_kind_that_is_not_an_integer(head):
    with pytest.raises(ProtocolError, match="not a message array"):
        decode(_raw(head, 1))


@pytest.mark.parametrize("kind", [0, -1, 64, 99, 2**32, 2**64 - 1])
def test_decode_rejects_unknown_kinds(kind):
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(_raw(kind, 1, b"x", b"y"))


@pytest.mark.parametrize(
    "items",
    [
        (1,),  # Hello without version or role
        (1, 1),  # Hello without role
        (2, 1, b"f"),  # Task without args
        (2,),
        (3, 1),  # Result without value
        (4, 1, "TaskError"),  # Failure without message
        (5, "w", "h", 1, 2),  # Register without free
        (20, 1),  # Credit without processes
        (21,),  # Reclaim without limit
        (13,),  # Handback without ids
        (22,),  # Batch without messages
        (8,),  # StatusRequest without id
        (9, 1),  # StatusReply without status
        (10,),  # Stats without values
        (11,),  # Cancel without id
    ],
    ids=repr,
)
def test_decode_rejects_missing_required_fields(items):
    with pytest.raises(ProtocolError, match="needs"):
        decode(_raw(*items))


@pytest.mark.parametrize(
    "items",
    [
        (1, "1", "client"),  # Hello.version: str for int
        (1, 1, b"client"),  # Hello.role: bytes for str
        (1, 1, "client", 5),  # Hello.name: int for str
        (2, "1", b"f", b"a"),  # Task.id: str for int
        (2, 1.0, b"f", b"a"),  # Task.id: float for int
        (2, 1, "f", b"a"),  # Task.func: str for bytes
        (2, 1, b"f", None),  # Task.args: None for bytes
        (2, 1, b"f", b"a", "1"),  # Task.timeout: str for float
        (2, 1, b"f", b"a", [1]),  # Task.timeout: list for float
        (3, 1, [1, 2]),  # Result.value: list for bytes
        (4, 1, "TaskError", "m", "payload"),  # Failure.payload: str for bytes
        (4, 1, "TaskError", "m", None, None),  # Failure.traceback: None for str
        (5, "w", "h", "80", 1, 1),  # Register.port: str for int
        (20, 1.5, 1),  # Credit.window: float for int
        (21, None),  # Reclaim.limit
        (13, 5),  # Handback.ids: int for list
        (22, {}),  # Batch.messages: map for list
        (9, 1, [("a", 1)]),  # StatusReply.status: list for dict
        (10, "values"),  # Stats.values: str for dict
        (11, b"\x01"),  # Cancel.id: bytes for int
        (12, 0),  # Bye.reason: int for str
    ],
    ids=repr,
)
def test_decode_rejects_wrong_field_types(items):
    with pytest.raises(ProtocolError, match="bad field"):
        decode(_raw(*items))


@pytest.mark.parametrize(
    "items",
    [
        (1, True, "client"),  # Hello.version
        (2, True, b"f", b"a"),  # Task.id
        (2, 1, b"f", b"a", True),  # Task.timeout (a float field that accepts ints)
        (2, 1, b"f", b"a", False),
        (3, False, b"v"),  # Result.id
        (5, "w", "h", True, 1, 1),  # Register.port
        (5, "w", "h", 80, 1, 1, True),  # Register.pid (optional)
        (20, 1, True),  # Credit.processes
        (8, False),  # StatusRequest.id
        (11, True),  # Cancel.id
    ],
    ids=repr,
)
def test_decode_rejects_bool_where_a_number_is_expected(items):
    with pytest.raises(ProtocolError, match="bad field"):
        decode(_raw(*items))


def test_kind_6_of_protocol_1_is_retired():
    with pytest.raises(ProtocolError, match="unknown message kind 6"):
        decode(_raw(6, 1))  # Ready: a worker of protocol 1 is refused at hello anyway


def test_a_batch_body_joins_encoded_messages_without_encoding_them_again():
    messages = [Task(i, b"f" * i, b"a") for i in range(1, 40)] + [Handback([1, 2]), Ping()]
    body = batch_body([encode(msg) for msg in messages])
    assert body == encode(Batch(messages))
    assert decode(body) == Batch(messages)


@pytest.mark.parametrize(
    "items",
    [
        (22, [[22, [[7]]]]),  # a batch inside a batch
        (22, [[7], "ping"]),  # an item that is not a message
        (22, [[7], [99]]),  # an item of an unknown kind
        (22, [[2, 1, b"f"]]),  # an item missing a field
        (13, [1, "2"]),  # Handback: an id that is not an int
        (13, [1, True]),
    ],
    ids=repr,
)
def test_decode_rejects_a_bad_batch_or_bad_returned_ids(items):
    with pytest.raises(ProtocolError):
        decode(_raw(*items))


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{type(m).__name__}-{len(encode(m))}")
def test_extra_trailing_fields_from_a_newer_peer_are_ignored(msg):
    items = [*msgpack.unpackb(encode(msg)), "new field", {"x": [1, 2]}, 3]
    assert decode(msgpack.packb(items)) == msg


@pytest.mark.parametrize("msg", [Ping(), Cancel(5), Result(1, b"v")], ids=lambda m: type(m).__name__)
def test_extra_fields_are_ignored_whatever_their_type(msg):
    for extra in (b"\xff", None, 1.5, True, [1], {"k": "v"}):
        assert decode(msgpack.packb([*msgpack.unpackb(encode(msg)), extra])) == msg


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ((1, 1, "client"), Hello(1, "client", "", "", "", "")),
        ((1, 1, "client", "me"), Hello(1, "client", "me", "", "", "")),
        ((2, 1, b"f", b"a"), Task(1, b"f", b"a", None)),
        ((4, 1, "TaskError", "boom"), Failure(1, "TaskError", "boom", None, "")),
        ((4, 1, "TaskError", "boom", b"p"), Failure(1, "TaskError", "boom", b"p", "")),
        ((5, "w", "h", 80, 4, 4), Register("w", "h", 80, 4, 4, 0)),
        ((12,), Bye("", "")),
        ((12, "leaving"), Bye("leaving", "")),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_missing_optional_fields_take_their_defaults(items, expected):
    decoded = decode(_raw(*items))
    assert decoded == expected
    assert tuple(decoded) == tuple(expected)


# -- frames -------------------------------------------------------------------------------------


def test_frame_is_length_then_mac_then_body():
    assert frame(b"body") == b"\x00\x00\x00\x04body"
    assert frame(b"body", b"MAC") == b"\x00\x00\x00\x07MACbody"
    assert frame(b"") == b"\x00\x00\x00\x00"


BODIES = [b"", b"a", b"hello world", bytes(range(256)) * 4, encode(Task(1, b"f" * 300, b"a")), b"\x00\x00\x00\x05"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64, 1 << 20])
def test_frame_buffer_splits_any_chunking_into_the_same_frames(chunk):
    stream = b"".join(frame(body) for body in BODIES)
    buffer = FrameBuffer(max_frame=4096)
    received = []
    for start in range(0, len(stream), chunk):
        received += buffer.feed(stream[start : start + chunk])
    assert received == BODIES


def test_frame_buffer_returns_nothing_until_a_frame_is_complete():
    buffer = FrameBuffer(max_frame=100)
    data = frame(b"abc")
    for i in range(len(data) - 1):
        assert buffer.feed(data[i : i + 1]) == []
    assert buffer.feed(data[-1:]) == [b"abc"]
    assert buffer.feed(b"") == []


def test_frame_buffer_returns_every_frame_completed_by_one_feed():
    buffer = FrameBuffer(max_frame=100)
    assert buffer.feed(frame(b"a") + frame(b"bb") + frame(b"ccc")[:5]) == [b"a", b"bb"]
    assert buffer.feed(frame(b"ccc")[5:] + frame(b"")) == [b"ccc", b""]


def test_frame_buffer_accepts_a_frame_of_exactly_the_limit():
    buffer = FrameBuffer(max_frame=10)
    assert buffer.feed(frame(b"x" * 10)) == [b"x" * 10]


def test_frame_buffer_refuses_an_oversized_header_as_soon_as_it_arrives():
    buffer = FrameBuffer(max_frame=10)
    header = HEADER.pack(11)
    for byte in header[:3]:
        assert buffer.feed(bytes([byte])) == []
    with pytest.raises(ProtocolError, match="exceeds the 10 byte limit"):
        buffer.feed(header[3:])  # the 4th byte: no byte of the body has been sent


def test_frame_buffer_refuses_a_huge_claim_without_waiting_for_the_body():
    buffer = FrameBuffer(max_frame=1 << 20)
    with pytest.raises(ProtocolError, match="4294967295 bytes"):
        buffer.feed(HEADER.pack(2**32 - 1))


def test_frame_buffer_refuses_an_oversized_frame_after_good_ones():
    buffer = FrameBuffer(max_frame=10)
    assert buffer.feed(frame(b"ok")) == [b"ok"]
    with pytest.raises(ProtocolError):
        buffer.feed(frame(b"y" * 11))


def test_frame_buffer_returns_the_good_frames_that_came_with_an_oversized_one():
    buffer = FrameBuffer(max_frame=10)
    assert buffer.feed(frame(b"ok") + frame(b"fine") + frame(b"y" * 11)) == [b"ok", b"fine"]
    assert buffer.error is not None and "10 byte limit" in str(buffer.error)
    with pytest.raises(ProtocolError):
        buffer.feed(b"")


# -- the reader of a connection: frames from a socket, in process ------------------------------


class _ReaderRig:
    """A :class:`Reader` on one end of a socket pair, with stand-in connection callbacks.

    ``hub=True`` reads from the hub (a plain socket); False reads in a greenlet, as for TLS.
    """

    def __init__(self, hub: bool, key: bytes | None = None, max_frame: int = 1024) -> None:
        self.ours, theirs = gevent.socket.socketpair()
        self.got: list[Message] = []
        self.closed: list[str] = []
        self.errors: list[ProtocolError] = []
        self.reader = Reader(
            theirs, theirs._sock if hub else None, "peer", FrameSigner(key) if key else None, b"", max_frame,
            defaults.MAX_ITEMS, self._close, self.errors.append,
        )
        self._theirs = theirs

    def _close(self, reason: str) -> None:
        self.closed.append(reason)
        self.reader.close()

    def run(self, *chunks: bytes, handler: Any = None) -> None:
        """Send each chunk once the last was read, hang up, and read until the reader stops."""
        running = gevent.spawn(self.reader.run, handler or self.got.append)
        deadline = time.monotonic() + 5
        for chunk in chunks:
            last = self.reader.last_recv
            self.ours.sendall(chunk)
            while self.reader.last_recv == last and not running.dead and time.monotonic() < deadline:
                gevent.sleep(0.005)
        self.ours.shutdown(socket.SHUT_WR)
        while not running.dead and not self.errors and time.monotonic() < deadline:
            gevent.sleep(0.005)
        running.kill()
        self.ours.close()
        self._theirs.close()


@pytest.fixture(params=[True, False], ids=["hub", "greenlet"])
def hub(request):
    return request.param


def test_reader_hands_on_every_message_of_batches_but_heartbeats(hub):
    rig = _ReaderRig(hub)
    batch = batch_body([encode(Result(2, b"r")), encode(Ping()), encode(Credit(3, 1))])
    rig.run(frame(encode(Task(1, b"f", b"a"))) + frame(encode(Ping())) + frame(batch))
    assert rig.got == [Task(1, b"f", b"a"), Result(2, b"r"), Credit(3, 1)]
    assert rig.closed == ["closed by peer"] and not rig.errors
    assert rig.reader.last_recv > 0


def test_reader_stops_at_an_oversized_frame_after_handing_on_the_good_ones(hub):
    rig = _ReaderRig(hub, max_frame=64)
    rig.run(frame(encode(Result(1, b"ok"))), frame(encode(Result(2, b"x" * 100))) + frame(encode(Result(3, b"no"))))
    assert rig.got == [Result(1, b"ok")]
    assert len(rig.errors) == 1 and "64" in str(rig.errors[0])


def test_reader_hands_on_the_good_frames_read_together_with_an_oversized_one(hub):
    rig = _ReaderRig(hub, max_frame=64)
    rig.run(frame(encode(Result(1, b"ok"))) + frame(encode(Result(2, b"x" * 100))) + frame(encode(Result(3, b"no"))))
    assert rig.got == [Result(1, b"ok")]
    assert len(rig.errors) == 1 and "64" in str(rig.errors[0])


@pytest.mark.parametrize("bad", [b"\xc1", encode(Result(1, b"ok"))[:-1], msgpack.packb([99, 1])], ids=repr)
def test_reader_reports_an_undecodable_message(hub, bad):
    rig = _ReaderRig(hub)
    rig.run(frame(bad) + frame(encode(Result(2, b"never"))))
    assert rig.got == [] and len(rig.errors) == 1


def test_reader_on_a_keyed_link_refuses_a_frame_with_a_bad_mac(hub):
    key = b"k" * 32
    rig = _ReaderRig(hub, key=key)
    good, bad = encode(Result(1, b"ok")), encode(Result(2, b"forged"))
    rig.run(frame(good, FrameSigner(key).sign(good)), frame(bad, b"\0" * MAC_BYTES))
    assert rig.got == [Result(1, b"ok")] and len(rig.errors) == 1


def test_reader_hands_on_the_good_frames_read_together_with_one_with_a_bad_mac(hub):
    key = b"k" * 32
    rig = _ReaderRig(hub, key=key)
    signer = FrameSigner(key)
    good = [encode(Result(1, b"a")), encode(Result(2, b"b"))]
    signed = b"".join(frame(body, signer.sign(body)) for body in good)
    rig.run(signed + frame(encode(Result(3, b"forged")), b"\0" * MAC_BYTES) + frame(encode(Result(4, b"never"))))
    assert rig.got == [Result(1, b"a"), Result(2, b"b")] and len(rig.errors) == 1


def test_reader_closes_when_the_handler_fails_and_hands_on_nothing_more(hub):
    rig = _ReaderRig(hub)
    seen = []

    def handler(msg):
        seen.append(msg)
        raise RuntimeError("bug in the handler")

    rig.run(frame(batch_body([encode(Result(1, b"a")), encode(Result(2, b"b"))])) + frame(encode(Result(3, b"c"))),
            handler=handler)
    assert seen == [Result(1, b"a")] and rig.closed == ["internal error"]


@pytest.mark.timeout(10)
def test_a_malformed_frame_closes_only_its_connection_and_tells_the_peer_why():
    pairs = [gevent.socket.socketpair() for _ in range(2)]
    conns = [Connection(theirs, f"peer-{n}", Session(None, None, b"")) for n, (_, theirs) in enumerate(pairs)]
    got: list[list[Message]] = [[], []]
    serving = [gevent.spawn(conn.serve, got[n].append, 0) for n, conn in enumerate(conns)]
    bad, good = pairs[0][0], pairs[1][0]
    try:
        bad.sendall(frame(encode(Result(1, b"ok"))) + frame(b"\xc1"))
        assert serving[0].get(timeout=5).startswith("protocol error: ")
        reply = read_frame(bad.makefile("rb"), defaults.MAX_FRAME)
        assert type(decode(reply)) is Bye and decode(reply).error == "ProtocolError"
        good.sendall(frame(encode(Result(2, b"still here"))))
        deadline = time.monotonic() + 5
        while not got[1] and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert got == [[Result(1, b"ok")], [Result(2, b"still here")]]
        assert conns[0].closed and not conns[1].closed
    finally:
        for conn in conns:
            conn.close()
        for ours, _ in pairs:
            ours.close()
        gevent.killall(serving)


class _CountingReader(io.BytesIO):
    """A BytesIO that records how many bytes were asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked = 0

    def read(self, size: int | None = -1) -> bytes:
        self.asked += size if size is not None and size >= 0 else 1 << 62
        return super().read(size)


def test_read_frame_returns_none_at_a_clean_end_of_stream():
    assert read_frame(io.BytesIO(b""), 100) is None


def test_read_frame_reads_consecutive_frames_then_none():
    stream = io.BytesIO(frame(b"one") + frame(b"") + frame(b"three", b"mac"))
    assert read_frame(stream, 100) == b"one"
    assert read_frame(stream, 100) == b""  # an empty frame is not the end of the stream
    assert read_frame(stream, 100) == b"macthree"
    assert read_frame(stream, 100) is None


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00", b"\x00\x00\x00"], ids=len)
def test_read_frame_raises_on_a_torn_header(data):
    with pytest.raises(ProtocolError, match="inside a frame header"):
        read_frame(io.BytesIO(data), 100)


@pytest.mark.parametrize("present", [0, 1, 9])
def test_read_frame_raises_on_a_torn_body(present):
    with pytest.raises(ProtocolError, match="inside a frame"):
        read_frame(io.BytesIO(HEADER.pack(10) + b"x" * present), 100)


def test_read_frame_refuses_an_oversized_frame_before_reading_its_body():
    stream = _CountingReader(HEADER.pack(1 << 30) + b"x" * 100)
    with pytest.raises(ProtocolError, match="exceeds"):
        read_frame(stream, 1 << 20)
    assert stream.asked == 4


def test_read_frame_reads_every_frame_until_the_end_of_stream():
    stream = io.BytesIO(b"".join(frame(body) for body in BODIES))
    assert list(iter(lambda: read_frame(stream, 4096), None)) == BODIES


# -- property-based -----------------------------------------------------------------------------


def _messages() -> st.SearchStrategy:
    # Every field given explicitly (fields added later keep their defaults): st.builds would
    # invent values for annotated fields this strategy does not know about.
    ints = st.integers(min_value=0, max_value=2**63)
    text = st.text(max_size=20)
    blobs = st.binary(max_size=64)
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | text | blobs,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=10,
    )
    status = st.dictionaries(text, values, max_size=5)

    def message(cls, *fields):
        return st.tuples(*fields).map(lambda args: cls(*args))

    return st.one_of(
        message(Hello, ints, text, text, text, text, text),
        message(Task, ints, blobs, blobs, st.none() | st.floats(allow_nan=False) | ints),
        message(Result, ints, blobs),
        message(Failure, ints, text, text, st.none() | blobs, text),
        message(Register, text, text, ints, ints, ints, ints),
        message(Credit, ints, ints),
        message(Reclaim, ints),
        message(Handback, st.lists(ints, max_size=5), text),
        st.just(Ping()),
        message(StatusRequest, ints),
        message(StatusReply, ints, status),
        message(Stats, status),
        message(Cancel, ints),
        message(Bye, text),
    )


@PROPERTY
@given(_messages())
def test_property_generated_messages_round_trip(msg):
    assert decode(encode(msg)) == msg


def _check_decoded(body: bytes) -> None:
    try:
        msg = decode(body)
    except ProtocolError:
        return
    # Whatever decode accepts is a well-formed message: encoding it again gives a body that
    # decodes to the same message.
    again = encode(msg)
    assert encode(decode(again)) == again


@PROPERTY
@given(st.binary(max_size=200))
def test_property_random_bytes_only_ever_raise_protocol_error(body):
    _check_decoded(body)


@PROPERTY
@given(st.sampled_from([encode(m) for m in MESSAGES]), st.binary(max_size=8), st.integers(0, 200))
def test_property_mutated_messages_only_ever_raise_protocol_error(body, noise, at):
    # Random bytes rarely look like msgpack arrays: splice noise into real messages too.
    at = min(at, len(body))
    _check_decoded(body[:at] + noise + body[at + len(noise) :])
    _check_decoded(body[:at])
    _check_decoded(body[:at] + noise + body[at:])


@PROPERTY
@given(st.lists(st.binary(max_size=300), max_size=12), st.lists(st.integers(0, 10_000), max_size=30),
       st.binary(max_size=4))
def test_property_chopped_frame_streams_reassemble_exactly(bodies, cuts, mac):
    stream = b"".join(frame(body, mac) for body in bodies)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    buffer = FrameBuffer(max_frame=304)
    received = []
    for start, end in itertools.pairwise(points):
        received += buffer.feed(stream[start:end])
    assert received == [mac + body for body in bodies]
    assert buffer.feed(b"") == []  # nothing left over


@PROPERTY
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_property_read_frame_reads_back_every_frame(bodies):
    stream = io.BytesIO(b"".join(frame(body) for body in bodies))
    assert list(iter(lambda: read_frame(stream, 300), None)) == bodies


_HUGE_HEADERS = {
    "array32": b"\xdd",
    "map32": b"\xdf",
    "str32": b"\xdb",
    "bin32": b"\xc6",
    "ext32": b"\xc9",
}


def _decode_cost(body: bytes) -> tuple[BaseException | None, int, float]:
    """Decode ``body``; return what it raised, the peak Python allocation and the time taken."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        decode(body)
        raised = None
    except BaseException as exc:
        raised = exc
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, peak, elapsed


@pytest.mark.parametrize("kind", list(_HUGE_HEADERS))
def test_four_billion_element_claim_is_rejected_without_allocating(kind):
    raised, peak, elapsed = _decode_cost(_HUGE_HEADERS[kind] + b"\xff\xff\xff\xff")
    assert isinstance(raised, ProtocolError)
    assert peak < 64 * 1024
    assert elapsed < 0.5


@PROPERTY
@given(st.sampled_from(list(_HUGE_HEADERS.values())), st.integers(3_000_000_000, 2**32 - 1),
       st.sampled_from([b"", b"\x93\x02\x01", b"\x92\x09\x81\xa1k"]))
def test_property_huge_claims_are_rejected_quickly_without_allocating(code, size, prefix):
    raised, peak, elapsed = _decode_cost(prefix + code + struct.pack("!I", size))
    assert isinstance(raised, ProtocolError)
    assert peak < 64 * 1024
    assert elapsed < 0.5


def test_small_frame_cannot_claim_more_elements_than_it_has_bytes():
    body = (b"\xdd" + struct.pack("!I", defaults.MAX_ITEMS)) * 10
    raised, peak, _ = _decode_cost(body)
    assert isinstance(raised, ProtocolError)
    assert peak < 64 * 1024


def test_a_large_claimed_frame_costs_memory_only_as_its_bytes_arrive():
    """A header claiming 60 MB must not make the receiver reserve 60 MB up front."""
    buffer = FrameBuffer(64 << 20)
    tracemalloc.start()
    try:
        assert buffer.feed(HEADER.pack(60 << 20) + b"x" * 100) == []
        claimed_only = tracemalloc.get_traced_memory()[1]
        buffer.feed(b"y" * (4 << 20))
        partly = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert claimed_only < 256 * 1024
    assert partly < 12 << 20  # what arrived, plus chunk headroom: nowhere near 60 MB
