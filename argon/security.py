r"""Keys, the connection handshake, and per-frame authentication.

Handshake (all lines end with ``\\n``; the server speaks first)::

    server: ARGON 1 open                        no key: go straight to the hello frames
    server: ARGON 1 refused <why>               this peer is not allowed; then close
    server: ARGON 1 refused busy: <why>         full (--max-connections); then close
    server: ARGON 1 refused shutting-down: <why>  the server is stopping; then close
    server: ARGON 1 hmac-sha256 <Ns hex>        a key is required
    client: ARGON 1 proof <Nc hex> <Pc hex>     Pc = HMAC(K, "argon-client" Ns Nc)
        or: ARGON 1 nokey                       the client holds no key; then close
    server: ARGON 1 ok <Ps hex>                 Ps = HMAC(K, "argon-server" Nc Ns)
        or: ARGON 1 refused <why>               then close

Both nonces are 32 fresh random bytes, so neither proof can be replayed on another
connection. Both sides then derive one key per direction from the nonces, and every
later frame carries ``HMAC(direction key, sequence number || body)``, checked before the
body is parsed: a replayed, reordered, dropped or altered frame fails the check.

TLS (optional) wraps the socket before the handshake; the key still authenticates the
peers inside it. This module never touches msgpack or pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl
import stat
import struct
from pathlib import Path
from typing import Protocol

import gevent.ssl

from argon.errors import AuthenticationError, ProtocolError, ServerBusy, ShuttingDown
from argon.framing import BIG, Buffer

KEY_BYTES = 32
MAC_BYTES = 32
NONCE_BYTES = 32
GREETING = b"ARGON 1 "
MAX_LINE = 512
_SEQ = struct.Struct("!Q")

#: Refusal codes: ``ARGON 1 refused <code>: <why>`` raises the matching error on the client,
#: which then knows the refusal is not about its key (a plain refusal is).
BUSY = "busy"
SHUTTING_DOWN = "shutting-down"
_REFUSALS: dict[str, type[Exception]] = {BUSY: ServerBusy, SHUTTING_DOWN: ShuttingDown}


class Stream(Protocol):
    """The socket methods the handshake needs."""

    def sendall(self, data: bytes, /) -> None: ...  # noqa: D102
    def recv(self, size: int, /) -> bytes: ...  # noqa: D102


def generate_key() -> bytes:
    """Return a new random key."""
    return os.urandom(KEY_BYTES)


def write_key_file(path: str | os.PathLike[str]) -> Path:
    """Write a new key, as hex, to a file only its owner can read.

    Raises:
        FileExistsError: The file exists already (keys are never overwritten).
    """
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(generate_key().hex() + "\n")
    return target


def load_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by :func:`write_key_file` (or any hex or raw secret).

    Raises:
        AuthenticationError: The file is readable or writable by group or others, or
            too short to be a key.
    """
    target = Path(path)
    try:
        mode = target.stat().st_mode
        data = target.read_bytes()
    except OSError as exc:
        raise AuthenticationError(f"cannot read key file {target}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthenticationError(
            f"key file {target} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
            f" run: chmod 600 {target}"
        )
    return parse_key(data, str(target))


def parse_key(data: bytes | str, origin: str = "key") -> bytes:
    """Turn a key given as hex text or raw bytes into the bytes HMAC uses.

    Raises:
        AuthenticationError: The key is shorter than 16 bytes.
    """
    text = data.strip() if isinstance(data, bytes) else data.strip().encode()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = text
    if len(key) < 16:
        raise AuthenticationError(f"{origin} is too short: a key needs at least 16 bytes")
    return key


def resolve_key(key: bytes | str | None, key_file: str | os.PathLike[str] | None) -> bytes | None:
    """The key from either an explicit value or a key file (not both)."""
    if key is not None and key_file is not None:
        raise ValueError("give key or key_file, not both")
    if key_file is not None:
        return load_key_file(key_file)
    if key is not None:
        return parse_key(key)
    return None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def server_tls(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS context for a server presenting ``cert_file`` (PEM) with its private key.

    Raises:
        AuthenticationError: The certificate or key cannot be loaded.
    """
    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = gevent.ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise AuthenticationError(f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}") from None
    return context


def client_tls(ca_file: str | os.PathLike[str] | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A TLS context for dialing a server; it checks the server's certificate and name.

    Args:
        ca_file: PEM file of the authority (or the self-signed certificate) to trust;
            None trusts the system's default authorities.
        verify: False skips certificate checks (encryption without server identity: the
            shared key still authenticates the peer).

    Raises:
        AuthenticationError: The CA file cannot be loaded.
    """
    context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = gevent.ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = gevent.ssl.CERT_NONE
    elif ca_file is not None:
        try:
            context.load_verify_locations(str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise AuthenticationError(f"cannot load TLS authority {ca_file}: {exc}") from None
    else:
        context.load_default_certs()
    return context


def as_client_tls(tls: ssl.SSLContext | str | os.PathLike[str] | bool | None) -> ssl.SSLContext | None:
    """Turn a ``tls=`` argument (context, CA file, True for system CAs, or None) into a context."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return client_tls()
    if isinstance(tls, gevent.ssl.SSLContext):
        return tls
    if isinstance(tls, ssl.SSLContext):
        # The standard library's context makes blocking sockets that stall the hub.
        raise TypeError(
            "tls= needs a gevent.ssl.SSLContext (see argon.security.client_tls), the path of a"
            " PEM authority file, or True; a standard-library ssl.SSLContext blocks gevent"
        )
    return client_tls(tls)


class FrameSigner:
    """Signs or checks the frames of one direction of an authenticated connection."""

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        self.seq = 0

    def _mac(self, *parts: Buffer) -> bytes:
        mac = self._base.copy()
        mac.update(_SEQ.pack(self.seq))
        for part in parts:
            mac.update(part)
        self.seq += 1
        return mac.digest()

    def sign(self, *parts: bytes) -> bytes:
        """Return the MAC to send before the body made of ``parts``."""
        return self._mac(*parts)

    def verify(self, data: Buffer) -> Buffer:
        """Check a received ``mac || body`` and return the body.

        Raises:
            ProtocolError: The MAC does not match (altered, replayed or reordered frame).
        """
        if len(data) < MAC_BYTES:
            raise ProtocolError("frame too short to carry a MAC")
        body = data[MAC_BYTES:] if len(data) < BIG else memoryview(data)[MAC_BYTES:]
        if not hmac.compare_digest(self._mac(body), data[:MAC_BYTES]):
            raise ProtocolError(f"frame {self.seq - 1} failed authentication")
        return body


class Session:
    """The outcome of a handshake: frame signers (None when unauthenticated) and leftovers."""

    def __init__(self, send: FrameSigner | None, recv: FrameSigner | None, rest: bytes) -> None:
        self.send = send
        self.recv = recv
        self.rest = rest


def _proof(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.digest(key, label + first + second, "sha256")


def _session(key: bytes, ns: bytes, nc: bytes, server: bool) -> tuple[FrameSigner, FrameSigner]:
    base = _proof(key, b"argon-session", ns, nc)
    to_server = FrameSigner(hmac.digest(base, b"client-to-server", "sha256"))
    to_client = FrameSigner(hmac.digest(base, b"server-to-client", "sha256"))
    return (to_client, to_server) if server else (to_server, to_client)


def _read_line(sock: Stream, buffered: bytes = b"") -> tuple[bytes, bytes]:
    """Read one handshake line; return it (without prefix or newline) and any extra bytes."""
    data = buffered
    while b"\n" not in data:
        if len(data) > MAX_LINE:
            raise ProtocolError("handshake line too long")
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            raise ConnectionResetError("peer closed the connection during the handshake")
        data += chunk
    line, rest = data.split(b"\n", 1)
    if not line.startswith(GREETING):
        raise ProtocolError(f"not an Argon peer (it sent {line[:40]!r})")
    return line[len(GREETING) :], rest


def _send_line(sock: Stream, text: str) -> None:
    sock.sendall(GREETING + text.encode() + b"\n")


def refuse(sock: Stream, why: str, code: str = "") -> None:
    """Tell a peer, in one line, why it is being disconnected.

    Args:
        sock: The peer's socket.
        why: The reason, for people.
        code: :data:`BUSY` or :data:`SHUTTING_DOWN` when the refusal is not about the
            peer's credentials (its client then raises ``ServerBusy`` or ``ShuttingDown``
            instead of ``AuthenticationError``).
    """
    _send_line(sock, "refused " + (f"{code}: " if code else "") + " ".join(why.split()))


def _refused(server: str, line: bytes, what: str = "the connection") -> Exception:
    """The error a ``refused ...`` line from ``server`` means."""
    text = line[8:].decode(errors="replace")
    code, sep, _ = text.partition(": ")
    kind = _REFUSALS.get(code, AuthenticationError) if sep else AuthenticationError
    return kind(f"{server} refused {what}: {text}")


def server_handshake(sock: Stream, key: bytes | None) -> Session:
    """Run the server side of the handshake.

    Raises:
        AuthenticationError: The client lacks the key or proved a different one.
        ProtocolError: The client sent something that is not the handshake.
    """
    if key is None:
        _send_line(sock, "open")
        return Session(None, None, b"")
    ns = os.urandom(NONCE_BYTES)
    _send_line(sock, "hmac-sha256 " + ns.hex())
    line, rest = _read_line(sock)
    words = line.split()
    if words == [b"nokey"]:
        raise AuthenticationError("the client has no key but this server requires one")
    try:
        nc, proof = bytes.fromhex(words[1].decode()), bytes.fromhex(words[2].decode())
        if words[0] != b"proof" or len(nc) != NONCE_BYTES or len(words) != 3:
            raise ValueError
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ProtocolError("malformed handshake proof") from None
    if not hmac.compare_digest(proof, _proof(key, b"argon-client", ns, nc)):
        refuse(sock, "authentication failed: the client's key differs from the server's")
        raise AuthenticationError("the client's key differs from this server's")
    _send_line(sock, "ok " + _proof(key, b"argon-server", nc, ns).hex())
    send, recv = _session(key, ns, nc, server=True)
    return Session(send, recv, rest)


def client_handshake(sock: Stream, key: bytes | None, server: str) -> Session:
    """Run the client side of the handshake against ``server`` (named in errors).

    Raises:
        AuthenticationError: The server refused us, lacks a key we hold, requires one we
            lack, or could not prove it holds ours.
        ServerBusy: The server is full (``--max-connections``); try again later.
        ShuttingDown: The server is stopping.
        ProtocolError: The server is not speaking the Argon handshake.
    """
    line, rest = _read_line(sock)
    if line.startswith(b"refused"):
        raise _refused(server, line)
    if line == b"open":
        if key is not None:
            raise AuthenticationError(
                f"{server} has no key but this side was given one; start the server with --key FILE"
            )
        return Session(None, None, rest)
    words = line.split()
    if len(words) != 2 or words[0] != b"hmac-sha256":
        raise ProtocolError(f"unexpected handshake from {server}: {line[:60]!r}")
    if key is None:
        _send_line(sock, "nokey")
        raise AuthenticationError(f"{server} requires a key but this side has none; pass --key FILE (or key_file=...)")
    try:
        ns = bytes.fromhex(words[1].decode())
    except ValueError:
        raise ProtocolError(f"malformed nonce from {server}") from None
    nc = os.urandom(NONCE_BYTES)
    _send_line(sock, f"proof {nc.hex()} {_proof(key, b'argon-client', ns, nc).hex()}")
    line, rest = _read_line(sock, rest)
    if line.startswith(b"refused"):
        raise _refused(server, line, "this side's key")
    words = line.split()
    try:
        proof = bytes.fromhex(words[1].decode()) if len(words) == 2 and words[0] == b"ok" else b""
    except (ValueError, UnicodeDecodeError):
        proof = b""
    if not hmac.compare_digest(proof, _proof(key, b"argon-server", nc, ns)):
        raise AuthenticationError(f"{server} could not prove it holds the same key")
    send, recv = _session(key, ns, nc, server=False)
    return Session(send, recv, rest)
