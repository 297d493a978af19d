"""Keys, mutual authentication, per-frame MACs, TLS and limits, against live servers."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys

import gevent
import gevent.socket
import msgpack
import pytest

from argon import AuthenticationError, Client, ConnectionLost, MessageTooLarge, ProtocolError, ServerBusy
from argon.framing import frame
from argon.protocol import VERSION, Hello, StatusReply, StatusRequest, decode, encode
from argon.security import MAC_BYTES, client_handshake, client_tls, load_key_file, parse_key, server_tls

from conftest import ARGON, child_env, wait_for


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "argon.key"
    subprocess.run([sys.executable, str(ARGON), "keygen", str(path)], check=True, env=child_env(),
                   capture_output=True)
    return path


@pytest.fixture
def other_key(tmp_path):
    path = tmp_path / "other.key"
    subprocess.run([sys.executable, str(ARGON), "keygen", str(path)], check=True, env=child_env(),
                   capture_output=True)
    return path


def test_good_key_works_end_to_end(net, key):
    manager = net.manager("--key", str(key))
    net.worker(manager, "--key", str(key))
    client = net.client(manager, key_file=str(key))
    net.wait_workers(client, 1)
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    hex_key = key.read_text().strip()
    assert net.client(manager, key=hex_key).queue(lambda: "by value") == "by value"


def test_client_without_a_key(net, key):
    manager = net.manager("--key", str(key))
    with pytest.raises(AuthenticationError, match="requires a key but this side has none"):
        Client(manager.host, manager.port)
    wait_for(lambda: "no key but this server requires one" in manager.log(), what="the refusal to be logged")


def test_client_with_the_wrong_key(net, key, other_key):
    manager = net.manager("--key", str(key))
    with pytest.raises(AuthenticationError, match="refused this side's key"):
        Client(manager.host, manager.port, key_file=str(other_key))
    wait_for(lambda: "key differs" in manager.log(), what="the refusal to be logged")


def test_key_only_on_the_client(net, key):
    manager = net.manager()
    with pytest.raises(AuthenticationError, match="has no key but this side was given one"):
        Client(manager.host, manager.port, key_file=str(key))


def test_worker_with_the_wrong_key_is_refused_and_keeps_trying(net, key, other_key):
    manager = net.manager("--key", str(key))
    worker = net.worker(manager, "--key", str(other_key))
    client = net.client(manager, key_file=str(key))
    wait_for(lambda: manager.log().count("key differs") >= 3, what="repeated attempts by the worker")
    assert "refused this side's key" in worker.log()
    assert client.status()["workers"] == []
    assert worker.alive()


def test_worker_without_a_key_cannot_join_a_keyed_manager(net, key):
    manager = net.manager("--key", str(key))
    worker = net.worker(manager)
    wait_for(lambda: "requires a key" in worker.log(), what="the worker's error")
    assert net.client(manager, key_file=str(key)).status()["workers"] == []


def test_loose_key_file_permissions_are_refused(net, key, tmp_path):
    os.chmod(key, 0o644)
    with pytest.raises(AuthenticationError, match="chmod 600"):
        load_key_file(key)
    with pytest.raises(AuthenticationError, match="accessible by group or others"):
        Client("127.0.0.1", 1, key_file=str(key))
    result = subprocess.run([sys.executable, str(ARGON), "manager", "--port", "0", "--key", str(key)],
                            capture_output=True, text=True, env=child_env(), timeout=30)
    assert result.returncode == 2
    assert "accessible by group or others" in result.stderr


def _authenticated(server, key_path):
    """A raw socket past the key handshake, with the session's frame signers."""
    sock = gevent.socket.create_connection((server.host, server.port), timeout=10)
    session = client_handshake(sock, load_key_file(key_path), server.address)
    body = encode(Hello(VERSION, "client", "raw"))
    sock.sendall(frame(body, session.send.sign(body)))
    (size,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
    reply = decode(session.recv.verify(sock.recv(size, socket.MSG_WAITALL)))
    assert type(reply) is Hello
    return sock, session


def _closed(sock, timeout=10.0):
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b"" or sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_replayed_and_altered_frames_close_the_connection(net, key):
    manager = net.manager("--key", str(key))
    sock, session = _authenticated(manager, key)
    body = encode(StatusRequest(1))
    signed = frame(body, session.send.sign(body))
    sock.sendall(signed)
    (size,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
    assert type(decode(session.recv.verify(sock.recv(size, socket.MSG_WAITALL)))) is StatusReply
    sock.sendall(signed)  # the same bytes again: its sequence number is stale
    assert _closed(sock)

    sock, session = _authenticated(manager, key)
    body = encode(StatusRequest(2))
    tampered = bytearray(frame(body, session.send.sign(body)))
    tampered[4 + MAC_BYTES + 1] ^= 0x01  # flip one bit of the body
    sock.sendall(bytes(tampered))
    assert _closed(sock)

    wait_for(lambda: manager.log().count("failed authentication") >= 2, what="both rejections to be logged")
    assert net.client(manager, key_file=str(key)).status()["role"] == "manager"


def test_manager_never_deserializes_task_payloads(net, tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        """Runs a command when unpickled: the manager must only ever forward it."""

        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    manager = net.manager()
    client = net.client(manager)
    deferred = client.defer(Trap())
    wait_for(lambda: client.status()["queued"] == 1, what="the task to wait in the manager")
    assert not marker.exists()  # the manager held the payload without unpickling it

    net.worker(manager, processes=1)
    with pytest.raises(TypeError, match="not callable"):
        deferred(timeout=30)  # the pool process did unpickle it: os.system returned an int
    assert marker.exists()

    # Structurally too: the code a manager process runs never loads the deserializer.
    probe = subprocess.run([sys.executable, "-c", "import sys, argon.cli, argon.manager; "
                            "print(sorted(m for m in ('dill', 'argon.serialize') if m in sys.modules))"],
                           capture_output=True, text=True, env=child_env(), timeout=30)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, private = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(private),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=argon-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, private


def test_short_keys_are_refused(tmp_path):
    with pytest.raises(AuthenticationError, match="too short: a key needs at least 16 bytes"):
        Client("127.0.0.1", 1, key="00" * 15)
    short = tmp_path / "short.key"
    short.write_text("ab" * 15 + "\n")
    short.chmod(0o600)
    with pytest.raises(AuthenticationError, match="too short"):
        load_key_file(short)
    assert len(parse_key("ab" * 16)) == 16  # 16 bytes is enough


def test_tls_contexts_refuse_versions_before_1_2(certificate):
    cert, private = certificate
    for context in (server_tls(cert, private), client_tls(cert), client_tls(verify=False)):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2


def test_tls_round_trip_with_a_key(net, key, certificate):
    cert, private = certificate
    tls = ("--tls-cert", str(cert), "--tls-key", str(private))
    manager = net.manager("--key", str(key), *tls)
    net.worker(manager, "--key", str(key), "--tls-ca", str(cert))
    client = net.client(manager, key_file=str(key), tls=str(cert))
    net.wait_workers(client, 1)
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    blob = os.urandom(1 << 20)
    assert client.queue(lambda b: b[::-1], [blob]) == blob[::-1]
    with pytest.raises(AuthenticationError, match="refused this side's key"):
        Client(manager.host, manager.port, key=os.urandom(32).hex(), tls=str(cert))


def test_standard_library_tls_context_is_refused_clearly(certificate):
    cert, _ = certificate
    context = ssl.create_default_context(cafile=str(cert))  # it would block the gevent hub
    with pytest.raises(TypeError, match=r"gevent\.ssl\.SSLContext"):
        Client("127.0.0.1", 1, tls=context)


def test_plain_client_cannot_talk_to_a_tls_server(net, certificate):
    cert, private = certificate
    manager = net.manager("--tls-cert", str(cert), "--tls-key", str(private))
    with pytest.raises((ProtocolError, AuthenticationError, ConnectionError)):
        Client(manager.host, manager.port, connect_timeout=2)
    assert net.client(manager, tls=str(cert)).status()["role"] == "manager"


def test_connection_cap_refuses_extra_peers_with_a_reason(net):
    manager = net.manager("--max-connections", "2")
    first = net.client(manager)
    second = net.client(manager)
    with pytest.raises(ServerBusy, match="too many connections") as refused:
        Client(manager.host, manager.port)
    assert isinstance(refused.value, ConnectionLost) and not isinstance(refused.value, AuthenticationError)
    assert first.status()["clients"] == 2
    second.close()
    wait_for(lambda: first.status()["clients"] == 1, what="the second client to leave")
    assert net.client(manager).status()["clients"] == 2


def test_handshake_deadline_closes_idle_connections(net):
    manager = net.manager("--handshake-timeout", "0.5")
    idle = gevent.socket.create_connection((manager.host, manager.port), timeout=10)
    assert idle.recv(64).startswith(b"ARGON 1 open")
    assert _closed(idle, timeout=10)  # never sent its hello: dropped at the deadline
    wait_for(lambda: "handshake not finished within 0.5s" in manager.log(), what="the reason to be logged")


def test_item_limit_closes_only_that_connection(net):
    manager = net.manager("--max-items", "16")
    client = net.client(manager)
    sock = gevent.socket.create_connection((manager.host, manager.port), timeout=10)
    assert sock.recv(64) == b"ARGON 1 open\n"
    sock.sendall(frame(encode(Hello(VERSION, "client", "raw"))))
    (size,) = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))
    sock.recv(size, socket.MSG_WAITALL)
    sock.sendall(frame(msgpack.packb([7, list(range(17))])))  # a ping carrying 17 items
    assert _closed(sock)
    assert client.status()["clients"] == 1


def test_oversized_task_fails_clearly_and_loses_nothing(net):
    manager = net.manager("--max-frame", "65536")
    net.worker(manager, "--max-frame", "65536", processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)
    with pytest.raises(MessageTooLarge, match="65536 byte limit"):
        client.queue(len, [b"x" * 100_000])
    with pytest.raises(MessageTooLarge, match=r"result of \d+ bytes exceeds"):
        client.queue(lambda: b"y" * 100_000)
    assert client.queue(len, [b"x" * 1000]) == 1000
    assert client.status()["clients"] == 1  # the connection survived both


def test_an_oversized_task_on_a_keyed_link_leaves_the_link_working(net, key):
    # A refused message must use up no MAC sequence number, or every later frame would fail.
    manager = net.manager("--key", str(key), "--max-frame", "65536")
    net.worker(manager, "--key", str(key), "--max-frame", "65536", processes=1)
    client = net.client(manager, key_file=str(key))
    net.wait_workers(client, 1)
    with pytest.raises(MessageTooLarge):
        client.queue(len, [b"x" * 100_000])
    with pytest.raises(MessageTooLarge):
        client.queue(lambda: b"y" * 100_000)  # refused by the worker, towards the manager
    assert client.queue(len, [b"x" * 1000]) == 1000
    assert client.status()["clients"] == 1
    assert "failed authentication" not in manager.log()
