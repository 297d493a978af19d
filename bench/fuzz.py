"""Fuzz a live manager with mutated frames; count crashes, lost tasks and frames per second.

Usage:
  python bench/fuzz.py [--frames N] [--key] [--seed N] [--connections N] [--max-seconds S]
                       [--keep-logs] [--json FILE]
  python bench/fuzz.py --flood N [--max-connections M] [--key] [--keep-logs] [--json FILE]

Not a unit test: a soak of the promise that malformed, oversized or unauthenticated input
closes that one connection with a logged reason while the server and every other
connection go on. It starts a manager and one worker (2 pool processes) with ``bin/argon``
on 127.0.0.1 ``--port 0``, each in its own session (their process groups are killed at
the end, whatever happens); with ``--key`` both get a key made by ``argon keygen``.
Then ``--connections`` greenlets send ``--frames`` fuzz frames in all (100,000 by
default), each on raw connections it reopens whenever the server closes one:

* one connection in ten gets garbage before authentication (random bytes, with or
  without reading the greeting first, or a mutated hello; with a key, broken handshake
  lines), then is half-closed;
* the others complete the handshake (with a key: the real HMAC handshake, then every
  frame signed with the session key, so mutations of the body reach msgpack) and a valid
  hello, then send up to 40 frames: valid client messages, mutated message bodies, random
  bodies, messages with fields of the wrong type, mutated whole frames (length header and
  MAC included), huge length claims, raw garbage, and with a key frames whose MAC is wrong.

Each connection tracks what the server must make of the bytes sent so far (the rules of
``argon.framing`` and ``argon.protocol``): after input the server must refuse, the
script waits for the server to close the connection; one it keeps open past the
handshake timeout counts as *hung*.
Meanwhile a real ``argon.Client`` keeps 16 trivial tasks in flight and checks every
result. At the end the script prints frames sent, frames/s, connections opened and
closed by the server, server crashes (manager or worker exited), client task failures,
hung connections, error tracebacks in the servers' logs, and the manager's RSS before
and after. It exits 1 if any of crashes, task failures, hung connections or tracebacks
is not zero. Traffic goes to 127.0.0.1 only; the fuzzing stops after ``--max-seconds``.

``--flood N`` measures a connection flood instead: a manager started with
``--max-connections M`` (default 64) and one worker, then ``N`` idle sockets opened as fast
as this process can and held open (they read nothing and send nothing). While they are
held, and again while a second flood of ``N`` more sockets is being opened, real clients
connect (retrying on ``ConnectionLost``) and run one task each. It prints the sockets
opened, the manager's file descriptors (psutil ``num_fds``, sampled every 10 ms) before and
at peak, and how long each real client took from its first attempt to its task's result.
It exits 1 if a client was not served within 10 s or the descriptors exceeded
``M`` + ``ACCEPT_SLACK`` + 32 over the baseline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent
import gevent.event
import gevent.socket
import gevent.subprocess
import msgpack
import psutil

from argon import ArgonError, Client, defaults
from argon.errors import ProtocolError
from argon.framing import HEADER, frame
from argon.handshake import PYTHON
from argon.protocol import (
    VERSION,
    Batch,
    Bye,
    Cancel,
    Credit,
    Failure,
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
from argon.security import MAC_BYTES, FrameSigner, client_handshake, load_key_file
from bench import common

REPO = Path(__file__).resolve().parents[1]
ARGON = REPO / "bin" / "argon"
HOST = "127.0.0.1"
MAX_FRAME = defaults.MAX_FRAME
IO_TIMEOUT = 5.0
#: How long the server may take to close a connection it must close (its handshake timeout, plus slack).
CLOSE_TIMEOUT = defaults.HANDSHAKE_TIMEOUT + 5.0
PREAUTH_SHARE = 0.1
MAX_FRAMES_PER_CONNECTION = 40
IN_FLIGHT = 16
RECV = 256 * 1024
CLOSE_LINE = re.compile(r"closing connection from|handshake with \S+ failed|refusing ")
CLIENT_MAY_SEND = (Task, StatusRequest, Cancel, Ping, Bye)


# -- processes --------------------------------------------------------------------------------------


# -- what to send -----------------------------------------------------------------------------------

#: Messages a client may not send (still valid messages: mutating them gives near misses).
FOREIGN: list[Message] = [
    Hello(VERSION, "client", "fuzz"),
    Register("fuzz", HOST, 1, 2, 2, 3),
    Credit(2, 1),
    Reclaim(1),
    Batch([Result(1, b"value"), Ping()]),
    Result(1, b"value"),
    Failure(1, "TaskError", "message"),
    Stats({"rss": 1}),
    StatusReply(3, {"workers": []}),
    Bye("fuzz"),
]


def benign(rng: random.Random) -> Message:
    """A valid message a client may send; its task payloads are opaque junk (a worker fails them)."""
    pick = rng.randrange(4)
    ident = rng.randrange(1 << 40)
    if pick == 0:
        return Task(ident, b"fuzz: not a pickle", rng.randbytes(rng.randrange(16)), rng.choice([None, 0.5, 30]))
    if pick == 1:
        return StatusRequest(ident)
    if pick == 2:
        return Cancel(ident)
    return Ping()


def template(rng: random.Random) -> Message:
    return benign(rng) if rng.random() < 0.6 else rng.choice(FOREIGN)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three of: flip a bit, insert, delete, truncate, overwrite, insert four bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        size = len(buf)
        op = rng.randrange(6)
        if op == 0 and size:
            buf[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf.insert(rng.randint(0, size), rng.randrange(256))
        elif op == 2 and size:
            del buf[rng.randrange(size)]
        elif op == 3:
            del buf[rng.randint(0, size) :]
        elif op == 4 and size:
            buf[rng.randrange(size)] = rng.randrange(256)
        elif op == 5:
            at = rng.randint(0, size)
            buf[at:at] = rng.randbytes(4)
    return bytes(buf)


def value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-encodable value."""
    pick = rng.randrange(9 if depth < 2 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.0, -1.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), rng.random()])
    if pick == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if pick == 5:
        return rng.randbytes(rng.randrange(24))
    if pick == 6:
        return rng.randrange(1 << 40)
    if pick == 7:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["rss", "workers", "a", 1]): value(rng, depth + 1) for _ in range(rng.randrange(4))}


def fuzz_frame(rng: random.Random, signer: FrameSigner | None) -> bytes:
    """One fuzz frame; bodies are signed with ``signer`` (advancing it) so they reach msgpack."""

    def signed(body: bytes) -> bytes:
        return frame(body, signer.sign(body) if signer is not None else b"")

    r = rng.random()
    if r < 0.25:
        return signed(encode(benign(rng)))
    if r < 0.52:
        return signed(mutate(rng, encode(template(rng))))
    if r < 0.60:
        return signed(rng.randbytes(rng.randrange(64)))
    if r < 0.72:
        kind = rng.randrange(14) if rng.random() < 0.8 else value(rng)
        return signed(msgpack.packb([kind, *(value(rng) for _ in range(rng.randrange(8)))]))
    if r < 0.84:
        return mutate(rng, signed(encode(template(rng))))
    if r < 0.88:
        return HEADER.pack(rng.randint(MAX_FRAME + 1, 2**32 - 1)) + rng.randbytes(rng.randrange(16))
    if r < 0.92 or signer is None:
        return rng.randbytes(rng.randint(1, 64))
    body = encode(template(rng))  # with a key: a frame whose MAC is wrong
    how = rng.randrange(5)
    if how == 0:
        mac = bytearray(signer.sign(body))
        mac[rng.randrange(MAC_BYTES)] ^= 1 << rng.randrange(8)
        return frame(body, bytes(mac))
    if how == 1:  # replayed: valid for another position in the stream
        other = copy.copy(signer)
        other.seq += -1 if other.seq and rng.random() < 0.5 else rng.randint(1, 5)
        return frame(body, other.sign(body))
    if how == 2:
        return frame(body, FrameSigner(rng.randbytes(32)).sign(body))
    if how == 3:
        return frame(rng.randbytes(rng.randrange(MAC_BYTES)))
    return frame(body)


def preauth_garbage(rng: random.Random, keyed: bool) -> bytes:
    """What a confused or hostile peer sends before authenticating."""
    r = rng.random()
    if r < 0.4:
        return rng.randbytes(rng.randint(0, 300))
    if keyed:
        proof = b"ARGON 1 proof " + rng.randbytes(32).hex().encode() + b" " + rng.randbytes(32).hex().encode() + b"\n"
        lines = [proof, b"ARGON 1 nokey\n", b"ARGON 1 proof\n", b"A" * rng.randint(513, 2000), b"ARGON 2 ok\n"]
        line = rng.choice(lines)
        return mutate(rng, line) if rng.random() < 0.5 else line
    hello = frame(encode(Hello(VERSION, rng.choice(["client", "manager", "x"]), "fuzz", heartbeat=rng.random())))
    return mutate(rng, hello) + (fuzz_frame(rng, None) if rng.random() < 0.5 else b"")


class Model:
    """What the server makes of the bytes sent on one connection, by argon.framing's and argon.protocol's rules."""

    def __init__(self, checker: FrameSigner | None, expect_hello: bool = False) -> None:
        self.checker = checker
        self.expect_hello = expect_hello
        self.buf = bytearray()
        self.task_ids: set[int] = set()
        self.verdict = "open"  # "close": the server must close; "maybe": it may (a task id reused)

    @property
    def pending(self) -> bool:
        """The stream ends inside a frame (or before the hello): the server waits for more."""
        return bool(self.buf) or self.expect_hello

    def feed(self, data: bytes) -> str:
        if self.verdict == "close":
            return self.verdict
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                self.verdict = "close"
                break
            if len(buf) - pos - 4 < size:
                break
            body = bytes(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
            self._check(body)
            if self.verdict == "close":
                break
        del buf[:pos]
        return self.verdict

    def _check(self, body: bytes) -> None:
        try:
            msg = decode(self.checker.verify(body) if self.checker is not None else body)
        except ProtocolError:
            self.verdict = "close"
            return
        kind = type(msg)
        if self.expect_hello:
            self.expect_hello = False
            if kind is not Hello or msg.version != VERSION or msg.role != "client":
                self.verdict = "close"
            elif msg.python and msg.python.split(".")[:2] != PYTHON.split(".")[:2]:
                self.verdict = "close"  # another Python major.minor: refused at the hello
            return
        for item in msg.messages if kind is Batch else [msg]:  # a batch: as if each came alone
            if type(item) not in CLIENT_MAY_SEND or type(item) is Bye:
                self.verdict = "close"
                return
            if type(item) is Task:
                if item.id in self.task_ids:
                    self.verdict = "maybe"
                self.task_ids.add(item.id)


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Counts:
    frames: int = 0
    connections: int = 0
    preauth_connections: int = 0
    closed_by_server: int = 0
    closed_after_half_close: int = 0
    closed_by_us: int = 0
    unexpected_closes: int = 0
    hung: int = 0
    setup_failures: int = 0
    tasks_ok: int = 0
    task_failures: int = 0
    examples: dict[str, str] = field(default_factory=dict)


class Link:
    """A raw connection whose incoming bytes a greenlet drains, noting when the server closes."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = gevent.socket.create_connection(address, timeout=IO_TIMEOUT)
        self.eof = gevent.event.Event()
        self.ours = False
        self._reader: gevent.Greenlet | None = None

    def start_draining(self) -> None:
        self._reader = gevent.spawn(self._drain)

    def _drain(self) -> None:
        while not self.ours:
            try:
                if not self.sock.recv(RECV):
                    break
            except TimeoutError:
                continue  # an idle link: no news is fine
            except OSError:
                break
        self.eof.set()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def close(self, reset: bool = False) -> None:
        self.ours = True
        if reset:  # end with a RST, as a crashed peer would (and leave no TIME_WAIT behind)
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self._reader is not None:
            self._reader.kill(block=False)
        self.sock.close()


class Fuzzer:
    """Everything one run shares: the target, the counts, when to stop."""

    def __init__(self, opts: argparse.Namespace, manager: common.Proc, key: bytes | None) -> None:
        self.opts = opts
        self.address = (manager.host, manager.port)
        self.key = key
        self.counts = Counts()
        self.deadline = time.monotonic() + opts.max_seconds
        self.stopped = False

    def running(self) -> bool:
        return not self.stopped and self.counts.frames < self.opts.frames and time.monotonic() < self.deadline

    def note(self, what: str, text: str) -> None:
        self.counts.examples.setdefault(what, text[:300])

    def expect_close(self, link: Link, half_close: bool, why: str) -> None:
        """The server must close ``link`` now (after our half-close, if ``half_close``)."""
        if half_close:
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_WR)
        if link.eof.wait(CLOSE_TIMEOUT):
            if half_close:
                self.counts.closed_after_half_close += 1
            else:
                self.counts.closed_by_server += 1
        else:
            self.counts.hung += 1
            self.note("hung", f"{why}; the server kept the connection {CLOSE_TIMEOUT}s")

    def run(self, index: int) -> None:
        rng = random.Random(f"{self.opts.seed}-{index}")
        while self.running():
            self.counts.connections += 1
            try:
                link = Link(self.address)
            except OSError as exc:
                self.counts.setup_failures += 1
                self.note("connect", repr(exc))
                gevent.sleep(0.01)
                continue
            try:
                if rng.random() < PREAUTH_SHARE:
                    self.preauth(rng, link)
                else:
                    self.session(rng, link)
            finally:
                link.close(reset=rng.random() < 0.5)

    def preauth(self, rng: random.Random, link: Link) -> None:
        self.counts.preauth_connections += 1
        garbage = preauth_garbage(rng, self.key is not None)
        if rng.random() < 0.5:  # read the greeting first
            with contextlib.suppress(OSError):
                link.sock.recv(200)
        link.start_draining()
        link.send(garbage)
        self.counts.frames += 1
        self.expect_close(link, True, f"pre-auth garbage {garbage[:60]!r}")

    def session(self, rng: random.Random, link: Link) -> None:
        try:
            session = client_handshake(link.sock, self.key, f"{self.address[0]}:{self.address[1]}")
            signer = session.send
            hello = encode(Hello(VERSION, "client", "fuzz"))
            link.sock.sendall(frame(hello, signer.sign(hello) if signer is not None else b""))
            self._read_hello(link, session)
        except (ArgonError, OSError) as exc:
            self.counts.setup_failures += 1
            self.note("setup", repr(exc))
            return
        link.start_draining()
        model = Model(copy.copy(signer))
        for _ in range(rng.randint(1, MAX_FRAMES_PER_CONNECTION)):
            if not self.running():
                break
            data = fuzz_frame(rng, signer)
            if not link.send(data):
                break
            self.counts.frames += 1
            verdict = model.feed(data)
            if verdict == "close":
                self.expect_close(link, False, f"after invalid frame {data[:60]!r}")
                return
            gevent.sleep(0)  # let the reader notice a close
            if link.eof.is_set():
                break
        if link.eof.is_set():
            if model.verdict == "open":
                self.counts.unexpected_closes += 1
                self.note("unexpected close", "the server closed a connection whose frames were all valid")
            else:
                self.counts.closed_by_server += 1
        elif model.pending:
            self.expect_close(link, True, "half-closed inside a frame")
        else:
            self.counts.closed_by_us += 1

    @staticmethod
    def _read_hello(link: Link, session: Any) -> None:
        data = session.rest
        while len(data) < 4 or len(data) < 4 + HEADER.unpack_from(data)[0]:
            chunk = link.sock.recv(RECV)
            if not chunk:
                raise ConnectionResetError("closed before its hello")
            data += chunk
        size = HEADER.unpack_from(data)[0]
        body = data[4 : 4 + size]
        if session.recv is not None:
            body = session.recv.verify(body)
        if type(decode(body)) is not Hello:
            raise ProtocolError("the server did not answer with a hello")


def steady(client: Client, fuzzer: Fuzzer, done: gevent.event.Event) -> None:
    """Keep IN_FLIGHT trivial tasks in flight until the fuzzing stops; check every result."""
    inc = lambda j: j + 1  # noqa: E731 - sent as a task
    window: collections.deque[tuple[int, Any]] = collections.deque()
    j = 0
    counts = fuzzer.counts
    while not done.is_set() or window:
        while not done.is_set() and len(window) < IN_FLIGHT:
            window.append((j, client.defer(inc, [j])))
            j += 1
        i, deferred = window.popleft()
        try:
            result = deferred(timeout=120)
        except Exception as exc:
            counts.task_failures += 1
            fuzzer.note("task failure", f"task {i}: {type(exc).__name__}: {exc}")
            continue
        if result == i + 1:
            counts.tasks_ok += 1
        else:
            counts.task_failures += 1
            fuzzer.note("task failure", f"task {i}: wrong result {result!r}")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, fuzz, stop everything; return the record."""
    log_dir = Path(tempfile.mkdtemp(prefix="argon-fuzz-"))
    servers: list[common.Proc] = []
    client: Client | None = None
    try:
        key_args: list[str] = []
        key = None
        if opts.key:
            key_file = log_dir / "argon.key"
            made = gevent.subprocess.run([sys.executable, str(ARGON), "keygen", str(key_file)],
                                         capture_output=True, timeout=60,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
            if made.returncode:
                raise RuntimeError(f"argon keygen failed: {made.stderr.decode(errors='replace')}")
            key_args = ["--key", str(key_file)]
            key = load_key_file(key_file)
        manager = common.argon_process("manager", key_args, log_dir)
        servers.append(manager)
        manager.wait_listening()
        worker = common.argon_process("worker", ["--manager", manager.address, "--workers", "2", *key_args], log_dir)
        servers.append(worker)
        worker.wait_listening()
        client = Client(manager.host, manager.port, key_file=key_args[1] if key_args else None)
        deadline = time.monotonic() + 60
        while not client.status()["workers"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never registered")
            gevent.sleep(0.05)
        warm = lambda i: i  # noqa: E731 - sent as a task
        assert [d(timeout=60) for d in [client.defer(warm, [i]) for i in range(200)]] == list(range(200))
        rss_before = manager.rss()

        fuzzer = Fuzzer(opts, manager, key)
        done = gevent.event.Event()
        worker_greenlets = [gevent.spawn(fuzzer.run, i) for i in range(opts.connections)]
        checker = gevent.spawn(steady, client, fuzzer, done)
        crashed: list[str] = []
        started = time.monotonic()
        while not all(g.dead for g in worker_greenlets):
            for server in servers:
                if not server.alive() and server.name not in crashed:
                    crashed.append(server.name)
                    fuzzer.note(f"{server.name} crash", f"exit status {server.popen.returncode}:"
                                f" {server.log()[-1500:]}")
            if crashed:
                fuzzer.stopped = True
            gevent.joinall(worker_greenlets, timeout=0.2)
        elapsed = time.monotonic() - started
        for greenlet in worker_greenlets:
            if greenlet.exception is not None:
                fuzzer.note("fuzzer error", repr(greenlet.exception))
        done.set()
        checker.join(timeout=180)
        if not checker.dead:
            checker.kill()
            fuzzer.counts.task_failures += 1
            fuzzer.note("task failure", "the checking client's tasks did not finish within 180 s")
        crashed += [s.name for s in servers if not s.alive() and s.name not in crashed]
        if not crashed:
            assert client.queue(lambda: "still serving", time_limit=60) == "still serving"
        manager_log, worker_log = manager.log(tail=None), worker.log(tail=None)
        counts = fuzzer.counts
        record = {
            "key": bool(opts.key),
            "seed": opts.seed,
            "frames": counts.frames,
            "seconds": round(elapsed, 1),
            "frames_per_s": round(counts.frames / elapsed) if elapsed else 0,
            "stopped_by_time_cap": counts.frames < opts.frames and not crashed,
            "crashes": len(crashed),
            "crashed": crashed,
            "rss_before": rss_before,
            "rss_after": manager.rss(),
            "worker_rss_after": worker.rss(),
            "closes_logged": len(CLOSE_LINE.findall(manager_log)),
            "tracebacks": manager_log.count("Traceback") + worker_log.count("Traceback"),
            **{k: v for k, v in asdict(counts).items() if k != "examples"},
            "examples": counts.examples,
        }
        if opts.keep_logs:
            record["logs"] = str(log_dir)
        return record
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        for server in servers:
            server.kill()
        if not opts.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


# -- connection flood ----------------------------------------------------------------------------


def _served(host: str, port: int, key_file: str | None, limit: float = 10.0) -> float | None:
    """Seconds a real client took to connect (retrying) and get one task's result; None past ``limit``."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            with Client(host, port, key_file=key_file, retries=0, connect_timeout=limit) as client:
                assert client.queue(lambda: "served", time_limit=limit) == "served"
            return time.monotonic() - started
        except ArgonError:  # shed in its handshake, or refused: a real client retries
            gevent.sleep(0.01)
    return None


def flood(opts: argparse.Namespace) -> dict[str, Any]:
    """Hold ``opts.flood`` idle sockets against a manager; time real clients; watch descriptors."""
    log_dir = Path(tempfile.mkdtemp(prefix="argon-flood-"))
    servers: list[common.Proc] = []
    held: list[socket.socket] = []
    try:
        key_args = ["--key", common.keygen(log_dir)] if opts.key else []
        key_file = key_args[1] if key_args else None
        manager = common.argon_process("manager", ["--max-connections", str(opts.max_connections), *key_args],
                                       log_dir)
        servers.append(manager)
        manager.wait_listening()
        worker = common.argon_process("worker", ["--manager", manager.address, "--workers", "1", *key_args], log_dir)
        servers.append(worker)
        worker.wait_listening()
        assert _served(manager.host, manager.port, key_file, 60) is not None, "no client served before the flood"
        server = psutil.Process(manager.pid)
        baseline = server.num_fds()
        peak = [baseline]

        def sample() -> None:
            while True:
                with contextlib.suppress(psutil.Error):
                    peak.append(server.num_fds())
                gevent.sleep(0.01)

        sampler = gevent.spawn(sample)

        def open_idle(count: int) -> float:
            started = time.monotonic()
            for _ in range(count):  # bounded by count
                held.append(gevent.socket.create_connection((manager.host, manager.port), timeout=IO_TIMEOUT))
            return time.monotonic() - started

        opening = open_idle(opts.flood)
        while_held = [_served(manager.host, manager.port, key_file) for _ in range(5)]
        flooder = gevent.spawn(open_idle, opts.flood)
        while_flooding = []
        while not flooder.dead and len(while_flooding) < 20:  # bounded: at most 20 clients
            while_flooding.append(_served(manager.host, manager.port, key_file))
        flooder.join(timeout=60)
        sampler.kill()
        log = manager.log(tail=None)
        times = [t for t in while_held + while_flooding if t is not None]
        return {
            "key": bool(opts.key),
            "max_connections": opts.max_connections,
            "sockets_opened": len(held),
            "seconds_to_open_first_flood": round(opening, 2),
            "fds_baseline": baseline,
            "fds_peak": max(peak),
            "fds_bound": baseline + opts.max_connections + defaults.ACCEPT_SLACK + 32,
            "served_while_held_s": [None if t is None else round(t, 3) for t in while_held],
            "served_while_flooding_s": [None if t is None else round(t, 3) for t in while_flooding],
            "served_max_s": round(max(times), 3) if times else None,
            "not_served": sum(t is None for t in while_held + while_flooding),
            "shed_log_lines": log.count("oldest connection still in its handshake"),
            "manager_alive": manager.alive(),
        }
    finally:
        for sock in held:
            sock.close()
        for proc in servers:
            proc.kill()
        if not opts.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


def flood_summary(record: dict[str, Any]) -> str:
    """The flood figures as a small table."""
    rows = [
        ("key", "yes" if record["key"] else "no"),
        ("manager --max-connections", record["max_connections"]),
        ("idle sockets opened", f"{record['sockets_opened']:,} (first {record['sockets_opened'] // 2:,} in"
                                f" {record['seconds_to_open_first_flood']} s)"),
        ("manager fds before / at peak", f"{record['fds_baseline']} / {record['fds_peak']}"
                                         f" (bound {record['fds_bound']})"),
        ("real client served, flood held (s)", record["served_while_held_s"]),
        ("real client served, while flooding (s)", record["served_while_flooding_s"]),
        ("slowest real client (s)", record["served_max_s"]),
        ("clients not served within 10 s", record["not_served"]),
        ("shedding log lines", record["shed_log_lines"]),
        ("manager still running", record["manager_alive"]),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def summary(record: dict[str, Any]) -> str:
    mib = 1 << 20
    rows = [
        ("key", "yes" if record["key"] else "no"),
        ("seed", record["seed"]),
        ("frames sent", f"{record['frames']:,}" + (" (time cap reached)" if record["stopped_by_time_cap"] else "")),
        ("frames/s", f"{record['frames_per_s']:,} ({record['seconds']} s)"),
        ("connections opened", f"{record['connections']:,} ({record['preauth_connections']:,} pre-auth)"),
        ("closed by the server on bad input", f"{record['closed_by_server']:,}"),
        ("closed by the server after half-close", f"{record['closed_after_half_close']:,}"),
        ("closed by the fuzzer (still usable)", f"{record['closed_by_us']:,}"),
        ("closes logged by the manager", f"{record['closes_logged']:,}"),
        ("valid connections closed", record["unexpected_closes"]),
        ("connections set up that failed", record["setup_failures"]),
        ("hung connections", record["hung"]),
        ("server crashes", f"{record['crashes']} {record['crashed'] or ''}".strip()),
        ("client tasks ok", f"{record['tasks_ok']:,}"),
        ("client task failures", record["task_failures"]),
        ("tracebacks in server logs", record["tracebacks"]),
        ("manager RSS before/after", f"{record['rss_before'] / mib:.1f} / {record['rss_after'] / mib:.1f} MiB"),
        ("worker RSS after", f"{record['worker_rss_after'] / mib:.1f} MiB"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"example {kind}: {text}" for kind, text in record["examples"].items()]
    if "logs" in record:
        lines.append(f"logs kept in {record['logs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, print the figures; 1 on a crash, a failed task, a hang or a traceback."""
    parser = argparse.ArgumentParser(description="Fuzz a live Argon manager with mutated frames.")
    parser.add_argument("--frames", type=int, default=100_000, help="fuzz frames to send (default 100000)")
    parser.add_argument("--key", action="store_true", help="run the servers with a key (argon keygen)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent fuzzing connections (default 8)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="hard cap on the fuzzing (default 300)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--flood", type=int, default=0, metavar="N",
                        help="measure a flood of N idle sockets instead of fuzzing")
    parser.add_argument("--max-connections", type=int, default=64, help="the manager's limit in --flood (default 64)")
    opts = parser.parse_args(argv)
    if opts.flood:
        result = common.interruptible(lambda: flood(opts))
        if result is None:
            return 130
        print(flood_summary(result))
        if opts.json is not None:
            opts.json.write_text(json.dumps(result, indent=2) + "\n")
        bad = result["not_served"] or result["fds_peak"] > result["fds_bound"] or not result["manager_alive"]
        return 1 if bad else 0
    if opts.seed is None:
        opts.seed = random.randrange(1 << 32)
    record = common.interruptible(lambda: run(opts))
    if record is None:
        return 130
    print(summary(record))
    if opts.json is not None:
        opts.json.write_text(json.dumps(record, indent=2) + "\n")
    failed = record["crashes"] or record["task_failures"] or record["hung"] or record["tracebacks"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
