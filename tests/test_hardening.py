"""Bad input closes one connection, never the server, and loses nothing in flight."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import sys
import time

import gevent
import gevent.socket
import psutil
import pytest
from gevent.server import StreamServer

from argon import (
    AuthenticationError,
    Client,
    ConnectionLost,
    ProtocolError,
    ServerBusy,
    ShuttingDown,
    connection,
    defaults,
)
from argon.connection import Connection
from argon.manager import Manager
from argon.protocol import VERSION, Bye, Hello, decode, encode, frame
from argon.security import server_handshake
from argon.server import ServerConfig

from conftest import wait_for


def _raw(server, greet=True):
    sock = gevent.socket.create_connection((server.host, server.port), timeout=10)
    if greet:
        line = b""
        while not line.endswith(b"\n"):
            line += sock.recv(1)
        assert line == b"ARGON 1 open\n"
    return sock


def _hello(sock):
    sock.sendall(frame(encode(Hello(1, "client", "raw test"))))
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
    monkeypatch.setattr(connection, "PYTHON", "3.99.1")
    with pytest.raises(ProtocolError, match=rf"runs Python 3\.99\.1; this side runs Python {re.escape(mine)}"):
        Client(manager.host, manager.port, retries=0)
    monkeypatch.undo()
    assert client.queue(lambda: "unaffected") == "unaffected"
    wait_for(lambda: "runs Python 3.99.1" in manager.log(), 5, what="the refusal to be logged")


def test_a_client_refuses_a_server_of_another_python_or_protocol():
    mine = ".".join(map(str, sys.version_info[:3]))
    other_python = _fake_server(lambda conn: conn.send_now(Hello(VERSION, "manager", "old", "0.1.0", "2.7.18")))
    other_protocol = _fake_server(lambda conn: conn.send_now(Hello(VERSION + 1, "manager", "new", "9.0.0", mine)))
    try:
        with pytest.raises(ProtocolError, match=rf"runs Python 2\.7\.18; this side runs Python {re.escape(mine)}"):
            connection.connect("127.0.0.1", other_python.server_port, role="client")
        with pytest.raises(ProtocolError, match=rf"protocol version {VERSION + 1} \(Argon 9\.0\.0\); this side speaks"
                                                 rf" {VERSION}"):
            connection.connect("127.0.0.1", other_protocol.server_port, role="client")
    finally:
        other_python.stop()
        other_protocol.stop()


def test_refusals_raise_server_busy_and_shutting_down_not_authentication_errors():
    stopping = _fake_server(lambda conn: conn.send_now(Bye("manager m is shutting down", "ShuttingDown")))
    try:
        with pytest.raises(ShuttingDown, match="shutting down") as info:
            connection.connect("127.0.0.1", stopping.server_port, role="client")
        assert isinstance(info.value, ConnectionLost) and not isinstance(info.value, AuthenticationError)
    finally:
        stopping.stop()
    # The server's own refusal lines, straight from a real Manager in this process.
    manager = Manager(ServerConfig(port=0, max_connections=1))
    manager.start()
    try:
        first = connection.connect(*manager.address, role="client")
        with pytest.raises(ServerBusy, match=r"too many connections \(1\)"):
            connection.connect(*manager.address, role="client")
        first.close()
        wait_for(lambda: not manager._connections, 5, what="the first connection to go")
        manager.stopping = True  # the moment between deciding to stop and closing the listener
        with pytest.raises(ShuttingDown, match="is shutting down"):
            connection.connect(*manager.address, role="client")
    finally:
        manager.stopping = False
        manager.shutdown(grace=0)


def test_a_stopping_server_tells_connected_peers_shutting_down(net):
    manager = net.manager()
    conn = connection.connect(manager.host, manager.port, role="client")
    manager.signal(signal.SIGTERM)
    with gevent.Timeout(10):
        bye = conn.recv_message()
    assert type(bye) is Bye and bye.error == "ShuttingDown" and "shutting down" in bye.reason
    conn.close()
    assert manager.wait() == 0


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
