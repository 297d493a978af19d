"""Bad input closes one connection, never the server, and loses nothing in flight."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import struct
import sys
import time

import gevent
import gevent.queue
import gevent.socket
import psutil
import pytest
from gevent.server import StreamServer

from argon import (
    ArgonError,
    AuthenticationError,
    Client,
    ConnectionLost,
    NoWorkers,
    ProcessDied,
    ProtocolError,
    ServerBusy,
    ShuttingDown,
    defaults,
    handshake,
)
from argon.backoff import Backoff
from argon.connection import Connection
from argon.errors import MessageTooLarge
from argon.framing import frame
from argon.manager import Manager
from argon.protocol import (
    VERSION,
    Bye,
    Cancel,
    Credit,
    Failure,
    Handback,
    Hello,
    NotCancelled,
    Ping,
    Register,
    Result,
    Stats,
    Task,
    decode,
    encode,
)
from argon.security import load_key_file, server_handshake
from argon.serialize import FunctionCache, dumps, dumps_function
from argon.server import ServerConfig
from argon.status import render
from argon.worker import Worker, WorkerConfig

from conftest import make_key, wait_for


def _raw(server, greet=True):
    sock = gevent.socket.create_connection((server.host, server.port), timeout=10)
    if greet:
        line = b""
        while not line.endswith(b"\n"):
            line += sock.recv(1)
        assert line == b"ARGON 1 open\n"
    return sock


def _hello(sock):
    sock.sendall(frame(encode(Hello(VERSION, "client", "raw test"))))
    header = sock.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack("!I", header)
    reply = decode(sock.recv(size, socket.MSG_WAITALL))
    assert type(reply) is Hello and reply.role == "manager"


def _closed_by_server(sock, timeout=10.0):
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
    return False


def test_garbage_and_huge_length_prefix_leave_the_manager_serving(net):
    manager, _, client = net.cluster(processes=2)
    in_flight = [client.defer(lambda i: (time.sleep(0.3), i)[1], [i]) for i in range(6)]

    # Garbage instead of the handshake.
    garbage = _raw(manager, greet=False)
    garbage.sendall(os.urandom(4096))
    assert _closed_by_server(garbage)

    # Garbage after the greeting, where the hello frame belongs.
    after_greeting = _raw(manager)
    after_greeting.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    assert _closed_by_server(after_greeting)

    # A frame header claiming 4 GB, after a valid hello: refused on the header alone.
    huge = _raw(manager)
    _hello(huge)
    huge.sendall(struct.pack("!I", 0xFFFFFFFF) + b"x" * 16)
    assert _closed_by_server(huge)

    # A well-framed message that is not valid msgpack.
    bogus = _raw(manager)
    _hello(bogus)
    bogus.sendall(frame(b"\xc1" * 32))
    assert _closed_by_server(bogus)

    assert [d() for d in in_flight] == list(range(6))  # nothing in flight was lost
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    other = net.client(manager)
    assert other.queue(lambda: "still serving") == "still serving"
    assert manager.alive()
    wait_for(lambda: "4294967295 bytes exceeds" in manager.log(), 5, what="the oversized frame to be logged")
    log = manager.log()
    assert "protocol error" in log


def test_half_sent_frame_then_disconnect(net):
    manager, _, client = net.cluster()
    sock = _raw(manager)
    _hello(sock)
    sock.sendall(struct.pack("!I", 1000) + b"partial")
    sock.close()
    assert client.queue(lambda: 42) == 42
    gevent.sleep(0)
    assert manager.alive()


def test_protocol_version_mismatch_is_refused_with_its_reason(net):
    manager, _, client = net.cluster()
    sock = _raw(manager)
    sock.sendall(frame(encode(Hello(99, "client", "from the future"))))
    (size,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
    reply = decode(sock.recv(size, socket.MSG_WAITALL))
    assert type(reply) is Bye
    assert "protocol version 99" in reply.reason
    assert _closed_by_server(sock)
    assert client.queue(lambda: "unaffected") == "unaffected"


# -- issue 10: refusals, versions, connection floods ------------------------------------------


def _fake_server(answer):
    """An in-process server that runs the keyless handshake, reads the hello, then calls ``answer``."""

    def handle(sock, address):
        with contextlib.suppress(OSError):
            conn = Connection(sock, f"{address[0]}:{address[1]}", server_handshake(sock, None))
            conn.recv_message()
            answer(conn)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


def test_a_python_version_mismatch_is_refused_naming_both_versions(net, monkeypatch):
    manager, _, client = net.cluster()
    sock = _raw(manager)
    sock.sendall(frame(encode(Hello(VERSION, "client", "elsewhere", "0.1.0", "3.99.1"))))
    (size,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
    reply = decode(sock.recv(size, socket.MSG_WAITALL))
    mine = ".".join(map(str, sys.version_info[:3]))
    assert type(reply) is Bye and reply.error == "ProtocolError"
    assert "Python 3.99.1" in reply.reason and f"Python {mine}" in reply.reason
    assert _closed_by_server(sock)

    # A client on "another" Python is refused at connect, and its error names both versions.
    monkeypatch.setattr(handshake, "PYTHON", "3.99.1")
    with pytest.raises(ProtocolError, match=rf"runs Python 3\.99\.1; this side runs Python {re.escape(mine)}"):
        Client(manager.host, manager.port, retries=0)
    monkeypatch.undo()
    assert client.queue(lambda: "unaffected") == "unaffected"
    wait_for(lambda: "runs Python 3.99.1" in manager.log(), 5, what="the refusal to be logged")


def test_a_peer_on_another_patch_release_of_the_same_python_is_accepted(net, monkeypatch):
    manager, _, _ = net.cluster()
    major, minor, micro = sys.version_info[:3]
    monkeypatch.setattr(handshake, "PYTHON", f"{major}.{minor}.{micro + 1}")  # what this client announces
    with Client(manager.host, manager.port, retries=0) as other:
        assert other.queue(lambda: "same major.minor") == "same major.minor"
    assert "runs Python" not in manager.log()


@pytest.mark.timeout(60)
def test_a_server_that_answers_the_key_proof_with_nonsense_fails_the_dial_and_is_dialled_again(net, tmp_path):
    key_file = make_key(tmp_path / "argon.key")
    dials = []

    def handle(sock, address):  # asks for the proof, then answers it with an empty line
        dials.append(address)
        with contextlib.suppress(OSError):
            sock.sendall(b"ARGON 1 hmac-sha256 " + os.urandom(32).hex().encode() + b"\n")
            sock.recv(4096)
            sock.sendall(b"ARGON 1 \n")
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        with pytest.raises(AuthenticationError, match="could not prove"):
            handshake.connect("127.0.0.1", server.server_port, role="client", key=load_key_file(key_file))
        worker = net.worker(None, "--manager", f"127.0.0.1:{server.server_port}", "--key", str(key_file),
                            processes=1, wait=False)
        wait_for(lambda: len(dials) >= 3, 30, what="the worker to dial again and again")
        assert worker.alive() and "Traceback" not in worker.log()
        with pytest.raises(AuthenticationError, match="could not prove"):
            Client("127.0.0.1", server.server_port, key_file=str(key_file))
    finally:
        server.stop()


def test_a_status_too_large_for_the_client_fails_that_request_not_the_connection(net):
    manager, _, _ = net.cluster(workers=3, processes=1)
    small = net.client(manager, max_frame=1024)  # the smallest limit a peer may announce
    with pytest.raises(MessageTooLarge, match="exceeds the 1024 byte limit"):
        small.status()
    assert small.queue(pow, [2, 5]) == 32  # the same connection goes on
    assert "closing connection" not in manager.log()


@pytest.mark.timeout(60)
def test_a_task_whose_connection_drops_again_and_again_fails_after_five_resends():
    received = []

    def flaky(sock, address):  # a "manager" that takes each task and hangs up
        with contextlib.suppress(OSError, ArgonError):
            conn = handshake.accept(sock, address, role="manager", name="flaky", key=None, allowed=True)
            received.append(conn.recv_message())
        sock.close()

    server = StreamServer(("127.0.0.1", 0), flaky)
    server.start()
    try:
        with Client("127.0.0.1", server.server_port) as client:
            deferred = client.defer(pow, [2, 3])
            with pytest.raises(ConnectionLost, match="the connection dropped 6 times while this task was in flight"):
                deferred(timeout=45)
        tasks = [msg for msg in received if isinstance(msg, Task)]
        assert len(tasks) == 1 + defaults.MAX_RESENDS and len({t.id for t in tasks}) == 1  # the same task each time
    finally:
        server.stop()


def test_a_client_refuses_a_server_of_another_python_or_protocol():
    mine = ".".join(map(str, sys.version_info[:3]))
    other_python = _fake_server(lambda conn: conn.send_now(Hello(VERSION, "manager", "old", "0.1.0", "2.7.18")))
    other_protocol = _fake_server(lambda conn: conn.send_now(Hello(VERSION + 1, "manager", "new", "9.0.0", mine)))
    try:
        with pytest.raises(ProtocolError, match=rf"runs Python 2\.7\.18; this side runs Python {re.escape(mine)}"):
            handshake.connect("127.0.0.1", other_python.server_port, role="client")
        with pytest.raises(ProtocolError, match=rf"protocol version {VERSION + 1} \(Argon 9\.0\.0\); this side speaks"
                                                 rf" {VERSION}"):
            handshake.connect("127.0.0.1", other_protocol.server_port, role="client")
    finally:
        other_python.stop()
        other_protocol.stop()


def test_refusals_raise_server_busy_and_shutting_down_not_authentication_errors():
    stopping = _fake_server(lambda conn: conn.send_now(Bye("manager m is shutting down", "ShuttingDown")))
    try:
        with pytest.raises(ShuttingDown, match="shutting down") as info:
            handshake.connect("127.0.0.1", stopping.server_port, role="client")
        assert isinstance(info.value, ConnectionLost) and not isinstance(info.value, AuthenticationError)
    finally:
        stopping.stop()
    # The server's own refusal lines, straight from a real Manager in this process.
    with Manager(ServerConfig(port=0, max_connections=1, grace=0)) as manager:
        first = handshake.connect(*manager.address, role="client")
        with pytest.raises(ServerBusy, match=r"too many connections \(1\)"):
            handshake.connect(*manager.address, role="client")
        first.close()
        wait_for(lambda: not manager._connections, 5, what="the first connection to go")
        manager.stopping = True  # the moment between deciding to stop and closing the listener
        try:
            with pytest.raises(ShuttingDown, match="is shutting down"):
                handshake.connect(*manager.address, role="client")
        finally:
            manager.stopping = False  # so that leaving the block stops it for real


def test_a_stopping_server_tells_connected_peers_shutting_down(net):
    manager = net.manager()
    conn = handshake.connect(manager.host, manager.port, role="client")
    manager.signal(signal.SIGTERM)
    with gevent.Timeout(10):
        bye = conn.recv_message()
    assert type(bye) is Bye and bye.error == "ShuttingDown" and "shutting down" in bye.reason
    conn.close()
    assert manager.wait() == 0


# -- one life cycle: stop() says goodbye, drains, closes; servers are context managers ----------


def _sleep_task(task_id: int, seconds: float) -> Task:
    return Task(task_id, dumps_function(time.sleep), dumps(((seconds,), {})), None)


def _until_closed(conn: Connection, timeout: float = 20.0) -> list:
    """Every message (but heartbeats) ``conn`` receives until the server closes it."""
    seen = []
    late = AssertionError(f"the server did not close the connection; so far {seen}")
    with gevent.Timeout(timeout, late), contextlib.suppress(OSError):  # OSError: the server closed it, the end
        while True:
            msg = conn.recv_message()
            if type(msg) is not Ping:
                seen.append(msg)
    return seen


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(60)
def test_stop_says_goodbye_then_drains_then_closes(caplog):
    caplog.set_level(logging.INFO, logger="argon")
    with Worker(WorkerConfig(port=0, processes=1, grace=30)) as worker:
        conn = handshake.connect(*worker.address, role="client")
        conn.send_now(_sleep_task(1, 0.5))
        wait_for(lambda: worker.pool.running == 1, 10, what="the task to start")
        stopping = gevent.spawn(worker.stop)
        again = gevent.spawn(worker.stop, 0)  # a second stop (a second caller) waits for the first
        seen = _until_closed(conn)
        # Goodbye first (new tasks go elsewhere), then the running task's result (the drain
        # let it finish, well within the grace), and only then the end of the connection.
        assert [type(m) for m in seen] == [Bye, Result], seen
        assert seen[0].error == "ShuttingDown" and seen[1].id == 1
        gevent.joinall([stopping, again], timeout=10)
        assert stopping.successful() and again.successful()
        assert worker.wait_stopped(0) and _refused(worker.address)
        assert worker.pool.running == 0 and not worker.pool.processes()  # pool processes stopped
    messages = [record.getMessage() for record in caplog.records]
    assert sum(" draining (grace " in m for m in messages) == 1, messages  # one drain, not three
    assert sum(m.endswith(" stopped") and m.startswith("worker ") for m in messages) == 1, messages


@pytest.mark.timeout(60)
def test_a_managers_stop_lets_its_workers_finish_before_it_closes():
    with (
        Manager(ServerConfig(port=0, grace=30)) as manager,
        Worker(WorkerConfig(port=0, processes=1, managers=[manager.address], heartbeat=0.2)),
    ):
        wait_for(lambda: manager.status()["capacity"] == 1, 10, what="the worker to register")
        conn = handshake.connect(*manager.address, role="client")
        conn.send_now(_sleep_task(7, 0.5))
        wait_for(lambda: manager.status()["busy"] == 1, 10, what="the task to start")
        gevent.spawn(manager.stop)
        seen = _until_closed(conn)
        assert [type(m) for m in seen] == [Bye, Result], seen
        assert seen[1].id == 7 and manager.completed == 1


@pytest.mark.timeout(60)
def test_a_server_as_context_manager_frees_its_port_and_stops_once():
    with Manager(ServerConfig(port=0)) as manager:
        address = manager.address
        with Client(*address, retries=0) as client:
            assert client.status()["role"] == "manager"
    assert manager.stopping and manager.wait_stopped(0)
    assert _refused(address)
    manager.stop()  # again: harmless, and at once
    manager.stop(0)
    with Manager(ServerConfig(port=address[1])) as again:  # the port is free for a successor
        assert again.address == address
    never_started = Worker(WorkerConfig(port=0, processes=1))
    never_started.stop()  # stopping a server that never started only marks it stopped
    assert never_started.wait_stopped(0)


@pytest.mark.timeout(90)
def test_a_flood_of_idle_sockets_neither_locks_out_clients_nor_exhausts_descriptors(net):
    limit = 8
    manager = net.manager("--max-connections", str(limit), "--handshake-timeout", "2")
    net.worker(manager, processes=1)
    watcher = net.client(manager)
    net.wait_workers(watcher, 1)
    watcher.close()  # the flood gets every slot but what it sheds
    server = psutil.Process(manager.pid)
    baseline = server.num_fds()
    peak = [baseline]
    sampling = gevent.spawn(lambda: [peak.append(server.num_fds()) or gevent.sleep(0.01) for _ in range(3000)])
    flood = []
    try:
        for _ in range(1000):  # bounded: 1,000 idle sockets on loopback, held open
            flood.append(gevent.socket.create_connection((manager.host, manager.port), timeout=10))
        started = time.monotonic()
        client = None
        while client is None and time.monotonic() - started < 10:
            with contextlib.suppress(ConnectionLost):
                client = Client(manager.host, manager.port, retries=0)
        assert client is not None, "no real client got through the flood"
        with client:
            assert client.queue(lambda: "served") == "served"
        served = time.monotonic() - started
        assert served < 5, f"a real client needed {served:.1f}s to be served"
        # Every idle socket is closed by the server: shed, or at the handshake deadline.
        wait_for(lambda: all(_eof(sock) for sock in flood), 10, 0.1, "every idle socket to be closed")
    finally:
        sampling.kill()
        for sock in flood:
            sock.close()
    bound = baseline + limit + defaults.ACCEPT_SLACK + 8
    assert max(peak) <= bound, f"{max(peak)} descriptors at peak (baseline {baseline})"
    log = manager.log()
    assert "shed 127.0.0.1:" in log and "oldest connection still in its handshake" in log
    assert log.count("shed 127.0.0.1:") <= 3, "shedding must be logged at a limited rate"
    assert manager.alive()


def _eof(sock):
    """True if the server has closed ``sock`` (the greeting may still be unread)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


# -- issue 10: a peer's claims, no workers, drain hand-back ----------------------------------


def _next_message(conn, kinds, timeout=10.0):
    """The next message of one of ``kinds`` on a raw connection (heartbeats and stats skipped)."""
    with gevent.Timeout(timeout, AssertionError(f"no {kinds} within {timeout}s")):
        while True:
            msg = conn.recv_message()
            if isinstance(msg, kinds):
                return msg


def _closed_cleanly(conn, timeout=10.0):
    """True once the peer has closed ``conn`` with an orderly end of stream (not a reset)."""
    with gevent.Timeout(timeout, AssertionError("the link was not closed")):
        try:
            while True:
                conn.recv_message()
        except ConnectionResetError as exc:
            return exc.errno is None  # our own "closed the connection", not ECONNRESET


def _fake_worker(manager, capacity, free=None, name="fake"):
    conn = handshake.connect(manager.host, manager.port, role="worker", name=name)
    conn.send_now(Register(name, "127.0.0.1", 1, capacity, capacity if free is None else free, 4242))
    return conn


def test_a_worker_claiming_more_free_processes_than_it_has_is_disconnected(net):
    manager = net.manager()
    client = net.client(manager)
    fake = _fake_worker(manager, capacity=2)
    net.wait_workers(client, 1)
    deferreds = [client.defer(lambda i: i * 10, [i]) for i in range(3)]
    got = [_next_message(fake, Task), _next_message(fake, Task)]  # both processes busy; one task queued
    status = client.status()
    assert (status["busy"], status["capacity"], status["queued"]) == (2, 2, 1)
    fake.send_now(Credit(1_000_000, 1_000_000))  # "a million free processes"
    bye = _next_message(fake, Bye)
    assert bye.error == "ProtocolError" and "credit for 1000000 processes; the worker has 2" in bye.reason
    assert _closed_cleanly(fake)
    net.worker(manager, processes=1)
    assert [d(timeout=30) for d in deferreds] == [0, 10, 20]  # the fake's two tasks ran elsewhere
    status = client.status()
    assert [w["id"] for w in status["workers"]] != ["fake"] and status["redelivered"] == 2
    assert all(w["busy"] <= w["capacity"] for w in status["workers"])
    wait_for(lambda: "credit for 1000000 processes" in manager.log(), 5, what="the reason to be logged")
    assert len({t.id for t in got}) == 2


@pytest.mark.parametrize(
    ("register", "stats", "reason"),
    [
        (Register("huge", "127.0.0.1", 1, 10**9, 10**9), None, "bad registration: capacity 1000000000"),
        (Register("liar", "127.0.0.1", 1, 1, 5), None, "free 5"),
        (Register("neg", "127.0.0.1", -1, 1, 1), None, "port -1"),
        (Register("ok", "127.0.0.1", 1, 1, 1), {"rss": -5}, "rss is -5"),
        (Register("ok", "127.0.0.1", 1, 1, 1), {"processes": [{}, {}, {}]}, "process rows"),
        (Register("ok", "127.0.0.1", 1, 1, 1), {"dashboards": ["javascript:alert(1)//:1/"]}, "dashboards"),
        (Register("ok", "127.0.0.1", 1, 1, 1), {"dashboards": ["http://a.example:1/"] * 17}, "dashboards"),
        (Register("ok", "127.0.0.1", 1, 1, 1), {"dashboards": "http://a.example:1/"}, "dashboards"),
    ],
    ids=["capacity", "free", "port", "negative-rss", "too-many-processes", "script-dashboard", "many-dashboards",
         "dashboards-not-a-list"],
)
def test_absurd_registrations_and_stats_close_the_link_with_a_reason(net, register, stats, reason):
    manager = net.manager()
    client = net.client(manager)
    fake = handshake.connect(manager.host, manager.port, role="worker")
    fake.send_now(register)
    if stats is not None:
        fake.send_now(Stats(stats))
    bye = _next_message(fake, Bye)
    assert bye.error == "ProtocolError" and reason in bye.reason
    assert _closed_cleanly(fake)
    assert client.status()["workers"] == []
    wait_for(lambda: reason in manager.log(), 5, what="the reason to be logged")
    assert manager.alive()


def test_tasks_fail_with_no_workers_after_the_worker_wait(net):
    manager = net.manager("--worker-wait", "1.5")
    client = net.client(manager)
    started = time.monotonic()
    with pytest.raises(NoWorkers, match=r"no worker for \d+s \(--worker-wait 1\.5\)"):
        client.queue(lambda: "never")
    assert 1.4 <= time.monotonic() - started < 10
    started = time.monotonic()
    with pytest.raises(NoWorkers):  # still none: new tasks fail at once
        client.queue(lambda: "never")
    assert time.monotonic() - started < 1.0
    assert client.status()["no_workers_for"] >= 1.5
    assert re.search(r"^no worker for [1-9]\d*s \(tasks fail after 1\.5s\)$", render(client.status()), re.M)
    worker = net.worker(manager, processes=1)
    net.wait_workers(client, 1)
    assert client.queue(lambda: "served") == "served"
    assert client.status()["no_workers_for"] is None
    assert "no worker for" not in render(client.status())
    running = client.defer(time.sleep, [30])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    worker.kill()  # the only worker is gone: its task and new ones wait --worker-wait again, then fail
    wait_for(lambda: client.status()["workers"] == [], what="the worker to be dropped")
    started = time.monotonic()
    with pytest.raises(NoWorkers):
        client.queue(lambda: "never")
    assert 0.5 <= time.monotonic() - started < 10
    with pytest.raises(NoWorkers):  # the task the lost worker was running went back to the queue
        running(timeout=10)
    wait_for(lambda: "failed 2 queued tasks: manager" in manager.log(), 5, what="the failure to be logged")


def test_a_task_that_reaches_a_draining_worker_is_handed_back_and_runs_elsewhere(net):
    manager = net.manager()
    client = net.client(manager)
    fake = _fake_worker(manager, capacity=1)
    net.wait_workers(client, 1)
    deferred = client.defer(os.getpid)
    task = _next_message(fake, Task)
    real = net.worker(manager, processes=1)
    net.wait_workers(client, 2)
    fake.send_now(Bye("draining"))  # the task crossed this goodbye: hand it back
    ack = _next_message(fake, Bye)
    assert ack.error == "" and "routes nothing more" in ack.reason
    fake.send_now(Handback([task.id]))
    assert deferred(timeout=30) != os.getpid()  # it ran, on the real worker
    status = client.status()
    assert (status["handed_back"], status["redelivered"]) == (1, 0)
    fake.close()
    wait_for(lambda: "left after draining" in manager.log(), 5, what="the fake to leave")
    assert "lost" not in manager.log()
    assert real.alive()


class FakeManager:
    """A manager's side of one worker's link, driven by hand: what the worker sends, in order."""

    def __init__(self) -> None:
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.links: list[Connection] = []
        self.server = StreamServer(("127.0.0.1", 0), self._serve)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _serve(self, sock, address) -> None:
        conn = handshake.accept(sock, address, role="manager", name="fake", key=None, allowed=True)
        self.links.append(conn)
        with contextlib.suppress(OSError):
            while True:
                self.inbox.put(conn.recv_message())
        self.inbox.put(None)  # end of stream

    def next_of(self, kind):
        """The next message of this kind from the worker (those before it are skipped)."""
        with gevent.Timeout(10, AssertionError(f"no {kind.__name__} from the worker")):
            while not isinstance(msg := self.inbox.get(), kind):
                assert msg is not None, "the worker closed the link early"
            return msg


@pytest.fixture
def fake_manager():
    fake = FakeManager()
    yield fake
    fake.server.stop()


def test_a_draining_worker_hands_back_a_task_that_crossed_its_goodbye(net, fake_manager):
    worker = net.worker(None, "--manager", fake_manager.address, processes=1)
    fake_manager.next_of(Register)
    worker.signal(signal.SIGTERM)
    fake_manager.next_of(Bye)
    link = fake_manager.links[0]
    link.send_now(Task(77, b"never run", b"never run"))  # routed "in the same moment"
    assert fake_manager.next_of(Handback).ids == [77]
    link.send_now(Bye("routes nothing more"))  # what a manager answers to a goodbye
    with gevent.Timeout(10, AssertionError("the worker did not close its link")):
        while (msg := fake_manager.inbox.get()) is not None:
            assert not isinstance(msg, (Result, Failure)), msg
    assert worker.wait(10) == 0
    assert "handing 1 unstarted tasks back" in worker.log()


def test_a_worker_drops_a_cancelled_task_only_if_it_has_not_started(net, fake_manager):
    net.worker(None, "--manager", fake_manager.address, processes=1)
    fake_manager.next_of(Register)
    link = fake_manager.links[0]
    nap = FunctionCache().dumps(time.sleep)
    link.send_now(Task(1, nap, dumps(((1.0,), None))))  # takes the only process
    link.send_now(Task(2, nap, dumps(((0.0,), None))))  # waits behind it
    link.send_now(Cancel(2))
    assert fake_manager.next_of(Handback) == Handback([2], "cancelled")
    link.send_now(Cancel(1))
    assert fake_manager.next_of(NotCancelled) == NotCancelled(1)  # it has started: it runs to the end
    link.send_now(Cancel(5))
    assert fake_manager.next_of(NotCancelled) == NotCancelled(5)  # unknown
    assert fake_manager.next_of(Result).id == 1
    with contextlib.suppress(gevent.Timeout), gevent.Timeout(1.5):
        while (msg := fake_manager.inbox.get()) is not None:
            assert not (isinstance(msg, (Result, Failure)) and msg.id == 2), "the cancelled task ran"


@pytest.mark.timeout(60)
def test_a_worker_whose_pool_cannot_start_processes_says_so_and_stops(tmp_path):
    with Worker(WorkerConfig(port=0, processes=1, grace=1)) as worker, Client(*worker.address) as client:
        broken = tmp_path / "python"
        broken.write_text("#!/bin/sh\nexit 9\n")
        broken.chmod(0o755)
        worker.pool.python = str(broken)  # from now on no pool process can start
        worker.pool._restart = lambda: Backoff(0.01, attempts=1)  # keeps the test fast
        with pytest.raises(ProcessDied):
            client.queue(os._exit, [3])
        assert worker.wait_stopped(30)  # it stops by itself
    assert worker.failure is not None and "cannot start a pool process" in worker.failure
