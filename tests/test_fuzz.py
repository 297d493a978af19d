"""Property-based fuzzing of the frame decoder and of a live manager.

Hypothesis builds random and mutated byte streams. The first test feeds them to a
:class:`~argon.connection.Connection` in this process; the others send each example on
its own raw connection to ONE manager (with one worker) started for the test: before the
handshake, after the hello (no key), and after a real key handshake (mutations signed with
the session key so they reach msgpack, and frames whose MAC is wrong).

For every example the manager and the worker stay alive, the fuzzing connection is either
closed by the server or still answers a status request, and nothing hangs (every read
has a deadline). Whether the server must close the connection is predicted from
:mod:`argon.framing` and :mod:`argon.protocol` alone (frame lengths, MACs, decoding,
which messages a client may send), so a valid stream that gets closed, or an invalid one
that is kept open, fails too. A well-behaved client keeps tasks in flight throughout
(some deferred before the fuzzing starts) and must get every result; at the end, every
connection the server closed on its own appears in the manager's log with its peer
address and a reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.subprocess
import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argon import Client, TaskTimeout, defaults
from argon.connection import Connection
from argon.errors import ArgonError, ProtocolError
from argon.framing import HEADER, FrameBuffer, frame
from argon.handshake import PYTHON
from argon.protocol import (
    VERSION,
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
    decode,
    encode,
)
from argon.security import MAC_BYTES, MAX_LINE, FrameSigner, Session, client_handshake, load_key_file

from conftest import ArgonProcess, Network, make_key, wait_for

MAX_FRAME = defaults.MAX_FRAME
IO_TIMEOUT = 5.0  # no read may block longer than this: a server that neither answers nor closes is hung
CLOSE_TIMEOUT = defaults.HANDSHAKE_TIMEOUT + 3.0
RECV = 256 * 1024

LIVE = settings(
    max_examples=150,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# -- what to send ---------------------------------------------------------------------------------

#: Valid messages to start from: what a client may send, and what it may not.
TEMPLATES: list[Message] = [
    Task(1, b"fuzz: not a pickle", b"fuzz args"),
    Task(2, b"\x80\x05N.", b"", 0.5),
    StatusRequest(3),
    Cancel(1),
    Ping(),
    Bye("fuzz"),
    Hello(VERSION, "client", "fuzz"),
    Register("fuzz", "127.0.0.1", 1, 2, 2, 3),
    Credit(2, 1),
    Reclaim(1),
    Handback([1], "fuzz"),
    Batch([Task(4, b"fuzz: batched", b""), StatusRequest(5), Ping()]),
    Batch([Task(6, b"fuzz", b""), Result(1, b"value")]),
    Result(1, b"value"),
    Failure(1, "TaskError", "message"),
    Stats({"rss": 1}),
    StatusReply(3, {"workers": []}),
]
HELLO = TEMPLATES.index(Hello(VERSION, "client", "fuzz"))
#: What a client may send a server once the hellos are done; Bye closes the connection.
CLIENT_MAY_SEND = (Task, StatusRequest, Cancel, Ping, Bye)

#: Mutations: (operation, position, value); positions wrap around the data's length.
MUTATIONS = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=4
)
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), inner,
                                                                 max_size=3),
    max_leaves=8,
)
TEMPLATE = st.integers(0, len(TEMPLATES) - 1)
#: Well-typed messages with extreme values (where a server's logic, not its decoder, is tested).
EDGE_INTS = st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]) | st.integers(-(2**63), 2**64 - 1)
EDGE_NUMBERS = st.none() | st.floats() | EDGE_INTS
WELL_TYPED = st.one_of(
    st.tuples(EDGE_INTS, st.binary(max_size=32), st.binary(max_size=32), EDGE_NUMBERS).map(lambda f: Task(*f)),
    EDGE_INTS.map(StatusRequest),
    EDGE_INTS.map(Cancel),
    st.text(max_size=20).map(Bye),
    st.just(Ping()),
)
WELL_TYPED_HELLO = st.tuples(
    st.just(VERSION) | EDGE_INTS, st.sampled_from(["client", "manager", "", "clientx"]), st.text(max_size=20),
    st.text(max_size=8), st.text(max_size=8), st.text(max_size=12), st.floats(0.1, 1e9) | EDGE_INTS.filter(bool),
).map(lambda fields: Hello(*fields))


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Flip a bit, insert, delete, truncate, overwrite, or insert four bytes."""
    buf = bytearray(data)
    for op, pos, value in ops:
        size = len(buf)
        if op == 0 and size:
            buf[pos % size] ^= 1 << (value % 8)
        elif op == 1:
            buf.insert(pos % (size + 1), value & 0xFF)
        elif op == 2 and size:
            del buf[pos % size]
        elif op == 3:
            del buf[pos % (size + 1) :]
        elif op == 4 and size:
            buf[pos % size] = value & 0xFF
        elif op == 5:
            at = pos % (size + 1)
            buf[at:at] = value.to_bytes(4, "big")
    return bytes(buf)


def _pieces(keyed: bool) -> st.SearchStrategy[tuple[Any, ...]]:
    kinds = [
        st.tuples(st.just("msg"), TEMPLATE),
        st.tuples(st.just("weird"), WELL_TYPED),
        st.tuples(st.just("body"), st.binary(max_size=64)),
        st.tuples(st.just("mutbody"), TEMPLATE, MUTATIONS),
        st.tuples(st.just("typed"), st.integers(0, 24) | MSGPACK_VALUES, st.lists(MSGPACK_VALUES, max_size=8)),
        st.tuples(st.just("swap"), TEMPLATE, st.integers(0, 7), MSGPACK_VALUES),
        st.tuples(st.just("mutframe"), TEMPLATE, MUTATIONS),
        st.tuples(st.just("raw"), st.binary(max_size=64)),
        st.tuples(st.just("huge"), st.integers(MAX_FRAME + 1, 2**32 - 1) | st.integers(1, MAX_FRAME),
                  st.binary(max_size=16)),
    ]
    if keyed:
        kinds.append(
            st.tuples(st.just("badmac"), TEMPLATE, st.sampled_from(["flip", "replay", "wrongkey", "short", "bare"]),
                      st.binary(min_size=32, max_size=32))
        )
    return st.one_of(kinds)


#: A stream: a few pieces, each rendered to bytes (signed where the piece is a body).
STREAM = st.lists(_pieces(keyed=False), min_size=1, max_size=4)
KEYED_STREAM = st.lists(_pieces(keyed=True), min_size=1, max_size=4)
#: A hello, as sent or mutated.
HELLO_PIECE = st.one_of(
    st.tuples(st.just("msg"), st.just(HELLO)),
    st.tuples(st.just("mutbody"), st.just(HELLO), MUTATIONS),
    st.tuples(st.just("weird"), WELL_TYPED_HELLO),
)
#: A stream for a connection that has not sent its hello yet: mostly built around a Hello.
HELLO_FIRST = st.lists(HELLO_PIECE | _pieces(keyed=False), min_size=1, max_size=4)


def _signed(body: bytes, signer: FrameSigner | None) -> bytes:
    return frame(body, signer.sign(body) if signer is not None else b"")


def render(piece: tuple[Any, ...], signer: FrameSigner | None) -> bytes:
    """The bytes of one piece; bodies are signed (advancing ``signer``) so they reach the decoder."""
    what = piece[0]
    if what == "msg":
        return _signed(encode(TEMPLATES[piece[1]]), signer)
    if what == "weird":
        return _signed(encode(piece[1]), signer)
    if what == "body":
        return _signed(piece[1], signer)
    if what == "mutbody":
        return _signed(mutate(encode(TEMPLATES[piece[1]]), piece[2]), signer)
    if what == "typed":
        return _signed(msgpack.packb([piece[1], *piece[2]]), signer)
    if what == "swap":
        template = TEMPLATES[piece[1]]
        fields = [*template] or [None]
        fields[piece[2] % len(fields)] = piece[3]
        return _signed(msgpack.packb([encode_kind(template), *fields]), signer)
    if what == "mutframe":
        return mutate(_signed(encode(TEMPLATES[piece[1]]), signer), piece[2])
    if what == "raw":
        return piece[1]
    if what == "huge":
        return HEADER.pack(piece[1]) + piece[2]
    assert what == "badmac" and signer is not None
    body, how, noise = encode(TEMPLATES[piece[1]]), piece[2], piece[3]
    if how == "flip":
        mac = bytearray(signer.sign(body))
        mac[noise[0] % MAC_BYTES] ^= 1 << (noise[1] % 8)
        return frame(body, bytes(mac))
    if how == "replay":  # a MAC that was valid for another position in the stream
        other = copy.copy(signer)
        other.seq += -1 if other.seq else 1 + noise[0]
        return frame(body, other.sign(body))
    if how == "wrongkey":
        return frame(body, FrameSigner(noise).sign(body))
    if how == "short":
        return frame(noise[: noise[0] % MAC_BYTES])
    return frame(body)  # bare: no MAC at all


def encode_kind(msg: Message) -> int:
    """The wire kind of a message (the first element of its body)."""
    return msgpack.unpackb(encode(msg))[0]


def render_all(pieces: list[tuple[Any, ...]], signer: FrameSigner | None) -> bytes:
    return b"".join(render(piece, signer) for piece in pieces)


# -- what the server must do with it ------------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
    """What a server reading a stream will do, derived from argon.framing and argon.protocol alone.

    Attributes:
        close: True if the server must close the connection, False if it must keep it,
            None if either is right (a task id reused while the first task may have ended,
            or a hello announcing a frame limit the server's replies may not fit in).
        bye: The close is the client's own goodbye (so the server need not log a reason).
        partial: The stream ends inside a frame (or before the hello): the server waits.
        verified: Frames the server's MAC check accepts (the next sequence number to sign).
        messages: The messages the server decodes, in order (pings included).
        status_ids: Ids of the status requests in the stream.
    """

    close: bool | None = False
    bye: bool = False
    partial: bool = False
    verified: int = 0
    messages: list[Message] = dataclasses.field(default_factory=list)
    status_ids: set[int] = dataclasses.field(default_factory=set)


def same_python(hello: Hello) -> bool:
    """Whether a server accepts the hello's Python version: empty (not announced), or our major.minor."""
    return not hello.python or hello.python.split(".")[:2] == PYTHON.split(".")[:2]


def predict(data: bytes, checker: FrameSigner | None, *, client_rules: bool = True,
            expect_hello: bool = False) -> Prediction:
    """Predict what a server does with ``data``.

    Args:
        data: The bytes sent.
        checker: A copy of the signer the bytes were signed with, at the sequence number
            the server expects next (None without a key); it is advanced.
        client_rules: Apply a manager's rules for client connections (which kinds a client
            may send, Bye closes, a task id may not be reused); else accept any message.
        expect_hello: The first frame must be a client's Hello.
    """
    out = Prediction()
    pos = 0
    task_ids: set[int] = set()
    hello_pending = expect_hello
    while len(data) - pos >= 4:
        (size,) = HEADER.unpack_from(data, pos)
        if size > MAX_FRAME:
            out.close = True
            return out
        if len(data) - pos - 4 < size:
            break
        body = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        try:
            if checker is not None:
                body = checker.verify(body)
            out.verified += 1
            msg = decode(body)
        except ProtocolError:
            out.close = True
            return out
        kind = type(msg)
        out.messages += msg.messages if kind is Batch else [msg]
        if hello_pending:
            if kind is Hello and not same_python(msg):
                out.close = out.bye = True  # refused at the hello, naming both versions
                return out
            if kind is not Hello or msg.version != VERSION or msg.role != "client":
                # A worker's hello would make this a worker link: not something these streams aim at.
                out.close = None if kind is Hello and msg.version == VERSION and msg.role == "worker" else True
                out.bye = out.close is None
                return out
            hello_pending = False
            if 0 < msg.max_frame < 1 << 20:
                out.close = None  # the server may have nothing it can send within that limit
        elif client_rules:
            for item in msg.messages if kind is Batch else [msg]:  # a batch: as if each came alone
                if type(item) not in CLIENT_MAY_SEND:
                    out.close = True
                    return out
                if type(item) is Bye:
                    out.close = out.bye = True
                    return out
                if type(item) is Task:
                    if item.id in task_ids:
                        out.close = None
                    task_ids.add(item.id)
                elif type(item) is StatusRequest:
                    out.status_ids.add(item.id)
    out.partial = pos < len(data) or hello_pending
    return out


# -- talking to a live server -----------------------------------------------------------------------


class Raw:
    """A raw connection to a server, for sending it whatever an example holds."""

    def __init__(self, server: ArgonProcess, key: bytes | None = None, *, handshake: bool = True,
                 hello: bool = True) -> None:
        self.sock = gevent.socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.signer: FrameSigner | None = None
        self.checker: FrameSigner | None = None
        self.frames = FrameBuffer(MAX_FRAME)
        self.backlog: list[bytes] = []
        self.pending: list[Message] = []  # the rest of a batch read
        self.shut = False
        if handshake:
            session = client_handshake(self.sock, key, server.address)
            self.signer, self.checker = session.send, session.recv
            self.backlog = self.frames.feed(session.rest)
        if hello:
            self.send(Hello(VERSION, "client", "fuzz"))
            reply = self.read()
            assert type(reply) is Hello and reply.role == "manager", reply

    def send(self, msg: Message) -> None:
        self.sock.sendall(_signed(encode(msg), self.signer))

    def read_greeting(self) -> bytes:
        line = b""
        while not line.endswith(b"\n") and len(line) < 1024:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            line += chunk
        return line

    def read(self) -> Message | None:
        """The server's next message (a batch's one by one); None once it has closed the connection."""
        if self.pending:
            return self.pending.pop(0)
        while not self.backlog:
            try:
                data = self.sock.recv(RECV)
            except TimeoutError:
                raise AssertionError(f"the server neither answered nor closed within {IO_TIMEOUT}s") from None
            except OSError:
                return None
            if not data:
                return None
            self.backlog = self.frames.feed(data)
        body = self.backlog.pop(0)
        msg = decode(self.checker.verify(body) if self.checker is not None else body)
        if type(msg) is Batch:
            self.pending = list(msg.messages)
            return self.read()
        return msg

    def probe(self, probe_id: int) -> bool:
        """Send a status request: True if it is answered, False if the server closed instead."""
        try:
            self.send(StatusRequest(probe_id))
        except OSError:
            return False
        while (msg := self.read()) is not None:
            if type(msg) is StatusReply and msg.id == probe_id:
                return True
        return False

    def wait_closed(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Read and drop everything until the server closes; False if it has not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(RECV):
                    return True
            except TimeoutError:
                break
            except OSError:
                return True
        return False

    def shutdown(self) -> None:
        """Half-close: the server sees the end of the stream."""
        self.shut = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class Steady:
    """A well-behaved client's work: tasks deferred up front, and more queued all along."""

    def __init__(self, client: Client, up_front: int = 30) -> None:
        self.client = client
        slow = lambda i: (time.sleep(0.05), i * 7)[1]  # noqa: E731 - sent as a task
        self.up_front = [(i, client.defer(slow, [i])) for i in range(up_front)]
        self.done = 0
        self.errors: list[str] = []
        self._stop = False
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        inc = lambda j: j + 1  # noqa: E731 - sent as a task
        start = 0
        while not self._stop:
            batch = [(j, self.client.defer(inc, [j])) for j in range(start, start + 4)]
            start += 4
            for j, deferred in batch:
                try:
                    value = deferred(timeout=60)
                except Exception as exc:
                    self.errors.append(f"task {j}: {type(exc).__name__}: {exc}")
                    continue
                if value == j + 1:
                    self.done += 1
                else:
                    self.errors.append(f"task {j}: got {value!r}")

    def stop(self) -> None:
        """Stop queuing at once (teardown after a failure)."""
        self._stop = True
        self._greenlet.kill(timeout=10)

    def finish(self) -> None:
        """Stop queuing; every task, up front or steady, must have its right result."""
        self._stop = True
        self._greenlet.join(timeout=90)
        assert self._greenlet.dead, "the well-behaved client's tasks did not finish"
        assert [d(timeout=60) for _, d in self.up_front] == [i * 7 for i, _ in self.up_front]
        assert not self.errors, self.errors[:5]
        assert self.done > 0


class Rig:
    """One manager, one worker and a busy well-behaved client, shared by a test's examples."""

    def __init__(self, net: Network, key_file: Path | None = None) -> None:
        args = ("--key", str(key_file)) if key_file is not None else ()
        self.key = load_key_file(key_file) if key_file is not None else None
        self.manager = net.manager(*args)
        self.worker = net.worker(self.manager, *args, processes=2)
        self.client = net.client(self.manager, key_file=key_file)
        self.workers = [w["id"] for w in net.wait_workers(self.client, 1)["workers"]]
        self.steady = Steady(self.client)
        self.ledger: list[tuple[int, bool, bool]] = []  # (port, closed by the server, must be logged)
        self._probe = 1 << 40

    def alive(self) -> None:
        assert self.manager.alive(), f"the manager died:\n{self.manager.log()}"
        assert self.worker.alive(), f"the worker died:\n{self.worker.log()}"

    def next_probe(self, avoid: set[int]) -> int:
        self._probe += 1
        while self._probe in avoid:
            self._probe += 1
        return self._probe

    def exchange(self, raw: Raw, data: bytes, pred: Prediction, start_seq: int) -> None:
        """Send ``data``, check the server does what ``pred`` says, and record the outcome."""
        with contextlib.suppress(OSError):  # closed already: the reads below see it
            raw.sock.sendall(data)
        if pred.partial and pred.close is not True:
            raw.shutdown()  # the server would wait for the rest of the frame: end the stream
            assert raw.wait_closed(), "the server kept a connection its peer had half-closed"
            closed = True
        else:
            if raw.signer is not None:
                raw.signer.seq = start_seq + pred.verified
            usable = raw.probe(self.next_probe(pred.status_ids))
            closed = not usable
            self.alive()
            if pred.close is True:
                assert closed, "the server kept a connection after invalid input"
            elif pred.close is False:
                assert usable, "the server closed a connection whose input was valid"
        raw.close()
        self.ledger.append((raw.port, closed, closed and not raw.shut and not pred.bye))
        self.alive()

    def finish(self) -> None:
        """The client got everything; the server is whole; every close it made is logged."""
        self.steady.finish()
        self.alive()
        status = self.client.status()
        assert [w["id"] for w in status["workers"]] == self.workers  # the worker link never dropped
        assert self.client.queue(lambda: "still serving") == "still serving"
        must_log = [port for port, _, logged in self.ledger if logged]
        assert must_log, "no example made the server close a connection"

        def missing() -> list[int]:
            text = self.manager.log()
            return [p for p in must_log if not re.search(
                rf"(closing connection from|handshake with|refusing) 127\.0\.0\.1:{p}(?: failed)?: \S", text)]

        wait_for(lambda: not missing(), 10, what="every close to be logged with a reason")
        log = self.manager.log()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]
        assert "Traceback" not in self.worker.log(), self.worker.log()[-3000:]


@pytest.fixture
def make_rig(net: Network) -> Iterator[Callable[..., Rig]]:
    """Makes :class:`Rig` instances; their client's steady work stops before the network does."""
    made: list[Rig] = []

    def make(key_file: Path | None = None) -> Rig:
        made.append(Rig(net, key_file))
        return made[-1]

    yield make
    for each in made:
        each.steady.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A key made by ``argon keygen``."""
    return make_key(tmp_path / "argon.key")


# -- the frame decoder, in process ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pieces=KEYED_STREAM, keyed=st.booleans())
def test_connection_decoder_delivers_valid_frames_and_closes_cleanly_on_the_rest(pieces, keyed):
    send_key, recv_key = b"s" * 32, b"r" * 32
    sender = FrameSigner(recv_key) if keyed else None
    pieces = [p for p in pieces if keyed or p[0] != "badmac"]
    data = render_all(pieces, sender)
    pred = predict(data, FrameSigner(recv_key) if keyed else None, client_rules=False)
    ours, theirs = gevent.socket.socketpair()
    session = Session(FrameSigner(send_key), FrameSigner(recv_key), b"") if keyed else Session(None, None, b"")
    conn = Connection(theirs, "fuzz-peer", session)
    got: list[Message] = []
    try:
        serving = gevent.spawn(conn.serve, got.append, 0)
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        reason = serving.get(timeout=IO_TIMEOUT)
    finally:
        ours.close()
        conn.close()
    # Compared in wire form: a message may carry a NaN (a Stats figure), which never equals itself.
    expected = [encode(m) for m in pred.messages if type(m) is not Ping]
    delivered = [encode(m) for m in got]
    assert delivered == expected[: len(delivered)]
    if pred.close:
        assert reason.startswith("protocol error: "), reason
    else:
        assert reason == "closed by peer"
        assert delivered == expected


# -- a live manager without a key ---------------------------------------------------------------------


def test_garbage_before_the_hello_closes_only_that_connection(make_rig):
    rig = make_rig()
    lingering = Raw(rig.manager, handshake=False, hello=False)  # half a frame, then silence
    lingering.sock.sendall(HEADER.pack(100) + b"partial")

    @LIVE
    @given(garbage=st.binary(max_size=300) | HELLO_FIRST, read_greeting=st.booleans(), stop=st.booleans())
    def example(garbage, read_greeting, stop):
        raw = Raw(rig.manager, handshake=False, hello=False)
        if read_greeting:
            assert raw.read_greeting() == b"ARGON 1 open\n"
        data = garbage if isinstance(garbage, bytes) else render_all(garbage, None)
        pred = predict(data, None, expect_hello=True)
        if not read_greeting:
            raw.sock.sendall(data)
            assert raw.read_greeting() == b"ARGON 1 open\n"  # the server greets before reading anything
            data = b""
        if stop:  # also end the stream, whatever it held
            pred.partial = True
        rig.exchange(raw, data, pred, 0)

    example()
    assert lingering.wait_closed(), "a connection stuck inside its first frame was never closed"
    rig.ledger.append((lingering.port, True, True))
    lingering.close()
    rig.finish()


def test_random_and_mutated_frames_after_the_hello_close_only_that_connection(make_rig):
    rig = make_rig()

    @LIVE
    @given(pieces=STREAM)
    def example(pieces):
        raw = Raw(rig.manager)
        data = render_all(pieces, None)
        rig.exchange(raw, data, predict(data, None), 0)

    example()
    closed = [c for _, c, _ in rig.ledger]
    assert any(closed) and not all(closed), "the examples should both close and keep connections"
    rig.finish()


# -- a live manager with a key ------------------------------------------------------------------------

PROOF_LINE = st.tuples(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)).map(
    lambda pair: b"ARGON 1 proof " + pair[0].hex().encode() + b" " + pair[1].hex().encode() + b"\n"
)
HANDSHAKE_GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.tuples(PROOF_LINE, MUTATIONS).map(lambda pair: mutate(*pair)),
    PROOF_LINE,
    st.just(b"ARGON 1 nokey\n"),
    st.just(b"ARGON 1 proof\n"),
    st.integers(513, 4096).map(lambda n: b"A" * n),
    st.text(max_size=80).map(lambda text: b"ARGON 1 " + text.encode() + b"\n"),
)


class _AppendToProof:
    """Hands client_handshake a socket whose first write (the proof line) carries extra bytes."""

    def __init__(self, sock: Any, extra: bytes) -> None:
        self.sock, self.extra = sock, extra

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data + self.extra)
        self.extra = b""

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)


def test_garbage_during_the_key_handshake_closes_only_that_connection(make_rig, key_file):
    rig = make_rig(key_file)

    @LIVE
    @given(garbage=HANDSHAKE_GARBAGE, mode=st.sampled_from(["first", "after-greeting", "after-proof"]),
           stop=st.booleans())
    def example(garbage, mode, stop):
        raw = Raw(rig.manager, handshake=False, hello=False)
        if mode == "after-proof":  # a valid proof line with garbage in the same segment
            try:
                session = client_handshake(_AppendToProof(raw.sock, garbage), rig.key, rig.manager.address)
            except (ArgonError, OSError) as exc:
                raise AssertionError(f"the server refused a valid proof: {exc!r}") from None
            # The garbage stands where the signed hello belongs: it cannot pass the MAC check.
            pred = predict(garbage, session.send, expect_hello=True)
            assert pred.close is not False or pred.partial
            closes_by_itself = not pred.partial
        else:
            if mode == "after-greeting":
                assert raw.read_greeting().startswith(b"ARGON 1 hmac-sha256 ")
            with contextlib.suppress(OSError):
                raw.sock.sendall(garbage)
            closes_by_itself = b"\n" in garbage or len(garbage) > MAX_LINE  # a whole (bad) line
        if stop or not closes_by_itself:
            raw.shutdown()  # else the server waits for the rest, until its handshake timeout
        assert raw.wait_closed(), "the server kept a connection that sent garbage during the handshake"
        raw.close()
        rig.ledger.append((raw.port, True, True))
        rig.alive()

    example()
    rig.finish()


def test_signed_mutations_and_bad_macs_after_the_key_handshake_close_only_that_connection(make_rig, key_file):
    rig = make_rig(key_file)

    @LIVE
    @given(pieces=KEYED_STREAM, hello=st.booleans(), first=HELLO_PIECE)
    def example(pieces, hello, first):
        raw = Raw(rig.manager, rig.key, hello=hello)
        assert raw.signer is not None
        if not hello:  # a hello of our own making (maybe mutated) comes first, alone
            start = raw.signer.seq
            data = render(first, raw.signer)
            checker = copy.copy(raw.signer)
            checker.seq = start
            pred = predict(data, checker, expect_hello=True)
            if pred.close is not False or pred.partial:
                rig.exchange(raw, data, pred, start)
                return
            raw.sock.sendall(data)
            reply = raw.read()
            assert type(reply) is Hello, reply
        start = raw.signer.seq
        data = render_all(pieces, raw.signer)
        checker = copy.copy(raw.signer)
        checker.seq = start
        rig.exchange(raw, data, predict(data, checker), start)

    example()
    closed = [c for _, c, _ in rig.ledger]
    assert any(closed) and not all(closed), "the examples should both close and keep connections"
    rig.finish()


# -- found by fuzzing ------------------------------------------------------------------------------------


def test_frames_that_arrive_with_the_hello_are_authenticated_too(net, key_file):
    manager = net.manager("--key", str(key_file))
    raw = Raw(manager, load_key_file(key_file), hello=False)
    assert raw.signer is not None
    hello = encode(Hello(VERSION, "client", "forger"))
    forged = encode(StatusRequest(7))
    raw.sock.sendall(frame(hello, raw.signer.sign(hello)) + frame(forged))  # one segment; the second has no MAC
    assert type(raw.read()) is Hello
    answered = False
    while (msg := raw.read()) is not None:
        if type(msg) is StatusReply and msg.id == 7:
            answered = True
            break
    raw.close()
    assert manager.alive()
    assert not answered, "the manager answered a frame that carried no MAC"
    wait_for(lambda: re.search(rf"closing connection from 127\.0\.0\.1:{raw.port}: protocol error", manager.log()),
             5, what="the unauthenticated frame to be logged")


def test_a_hello_with_a_tiny_max_frame_is_refused_without_a_traceback(net):
    manager, _, client = net.cluster()
    raw = Raw(manager, hello=False)
    raw.sock.sendall(bytes.fromhex(f"00000019 9901 {VERSION:02x} a6636c69656e74 a178 a0 a0 a0 cb0000000000000000 01"))
    # Hello(VERSION, "client", "x", max_frame=1): no frame the server sends would fit, so the
    # server refuses the connection at the hello, with a logged reason.
    assert raw.wait_closed()
    raw.close()
    wait_for(lambda: "announces a frame limit of 1 bytes" in manager.log(), 5, what="the refusal to be logged")
    assert manager.alive()
    assert client.queue(lambda: 7) == 7
    assert "Traceback" not in manager.log(), manager.log()[-1500:]


def test_a_task_timeout_never_fails_the_next_task_on_the_same_process(net):
    worker = net.worker(None, processes=1)
    hasty, innocent = net.client(worker), net.client(worker)
    rng = random.Random(7)
    nothing = lambda: None  # noqa: E731 - sent as a task
    same = lambda i: i  # noqa: E731 - sent as a task
    deadline = time.monotonic() + 10
    checked = 0
    while time.monotonic() < deadline:
        timed = [hasty.defer(nothing, time_limit=rng.uniform(0.0002, 0.003)) for _ in range(5)]
        plain = [innocent.defer(same, [i]) for i in range(5)]
        for deferred in timed:
            with contextlib.suppress(TaskTimeout):  # its own time limit: either outcome is right
                deferred(timeout=30)
        try:
            assert [d(timeout=30) for d in plain] == list(range(5))
        except TaskTimeout as exc:
            pytest.fail(f"after {checked} good tasks, a task without a time limit failed: {exc}")
        checked += 5
    assert worker.alive()


def test_a_hello_with_a_tiny_heartbeat_does_not_make_the_server_flood_pings(net):
    manager, _, client = net.cluster()
    for heartbeat in (-1.0, 1e-6):
        raw = Raw(manager, hello=False)
        raw.send(Hello(VERSION, "client", "fuzz", heartbeat=heartbeat))
        pings = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            msg = raw.read()
            if msg is None:
                break  # refusing such a hello is a fine answer
            pings += type(msg) is Ping
        raw.close()
        assert manager.alive()
        assert client.queue(lambda: 5) == 5
        assert pings <= 20, f"{pings} pings in one second for a hello announcing heartbeat={heartbeat}"



def test_a_client_that_never_reads_cannot_make_the_server_grow_without_bound(net):
    manager, _, client = net.cluster(processes=1)
    sock = gevent.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies pile up in the server, not in our buffer
    sock.settimeout(IO_TIMEOUT)
    sock.connect((manager.host, manager.port))
    assert sock.recv(64) == b"ARGON 1 open\n"
    sock.sendall(frame(encode(Hello(VERSION, "client", "never reads"))))
    server = psutil.Process(manager.pid)
    before = server.memory_info().rss
    batch = b"".join(frame(encode(StatusRequest(i))) for i in range(10_000))
    with contextlib.suppress(TimeoutError):  # a server that stops reading makes sendall time out: fine
        for _ in range(40):  # 400,000 status requests: 3.6 MB sent, nothing read
            sock.sendall(batch)
    limit = 32 << 20
    try:
        wait_for(lambda: server.memory_info().rss - before > limit, 15, 0.05, "the server's memory to grow")
        grown = server.memory_info().rss - before
    except AssertionError:
        grown = 0
    sock.close()
    assert manager.alive()
    assert client.queue(lambda: 6) == 6
    assert grown <= limit, f"the server grew by {grown >> 20} MiB for 3.6 MB of requests it could not answer"
