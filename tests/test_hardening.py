"""Bad input closes one connection, never the server, and loses nothing in flight."""

from __future__ import annotations

import os
import socket
import struct
import time

import gevent
import gevent.socket

from argon.protocol import Bye, Hello, decode, encode, frame

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
