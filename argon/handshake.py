"""Building a connection: dialing or accepting, TLS, the key handshake and the hellos.

:func:`connect` (clients and workers) and :func:`accept` (servers) turn a socket into a
:class:`~argon.connection.Connection`: TLS (optional), the handshake of
:mod:`argon.security`, then an exchange of :class:`~argon.protocol.Hello` messages that
checks both sides speak the same protocol and Python versions.
"""

from __future__ import annotations

import _socket as _csocket
import contextlib
import socket as _stdsocket
import ssl as _stdssl
import sys
from typing import Any

import gevent
import gevent.socket

from argon import defaults
from argon._version import __version__
from argon.connection import Connection
from argon.errors import TASK_ERRORS, ArgonError, AuthenticationError, ConnectionLost, ProtocolError
from argon.protocol import VERSION, Bye, Hello, Message
from argon.security import client_handshake, refuse, server_handshake

#: The Python version announced in this side's hello.
PYTHON = ".".join(map(str, sys.version_info[:3]))
#: How tasks and results are serialized, announced in the hello.
SERIALIZER = "pickle+dill"


def _dial(host: str, port: int) -> Any:
    """Connect a gevent socket to ``host:port``.

    A numeric address is resolved by the C library directly: gevent's resolver would start
    a thread pool, and a process with threads should not fork (the pool forks to start
    its processes). Names go through gevent's resolver, so they do not block the hub.
    """
    try:
        infos = _csocket.getaddrinfo(host, port, 0, _stdsocket.SOCK_STREAM, 0, _stdsocket.AI_NUMERICHOST)
    except _csocket.gaierror:
        return gevent.socket.create_connection((host, port))
    family, kind, proto, _, address = infos[0]
    sock = gevent.socket.socket(family, kind, proto)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _tune(sock: Any) -> None:
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(_stdsocket, name):
            sock.setsockopt(_stdsocket.IPPROTO_TCP, getattr(_stdsocket, name), value)



def _hello(
    role: str, name: str, heartbeat: float, max_frame: int, max_items: int = defaults.MAX_ITEMS, dashboard: str = ""
) -> Hello:
    batch = min(defaults.BATCH_MESSAGES, max_items)  # a batch is one array: max_items bounds it
    return Hello(VERSION, role, name, __version__, PYTHON, SERIALIZER, heartbeat, max_frame, batch, dashboard)


def _check_hello(msg: Message, peer: str) -> Hello:
    """``msg`` if it is a hello this side can work with.

    Raises:
        ProtocolError: It is not a hello, or names another protocol version or another
            Python major.minor (pickled tasks, results and exceptions do not cross Python
            versions reliably), or an unusable frame limit. The message names both sides'
            versions.
    """
    if type(msg) is not Hello:
        raise ProtocolError(f"{peer} sent {type(msg).__name__} before hello")
    if msg.version != VERSION:
        raise ProtocolError(
            f"{peer} speaks protocol version {msg.version} (Argon {msg.argon or '?'});"
            f" this side speaks {VERSION} (Argon {__version__})"
        )
    # An empty field means "not announced" (a raw tool's hello); anything else must match.
    if msg.python and msg.python.split(".")[:2] != PYTHON.split(".")[:2]:
        raise ProtocolError(
            f"{peer} runs Python {msg.python[:20]}; this side runs Python {PYTHON}: every peer"
            " must run the same Python major.minor version"
        )
    if 0 < msg.max_frame < defaults.MIN_FRAME:
        raise ProtocolError(
            f"{peer} announces a frame limit of {msg.max_frame} bytes; at least {defaults.MIN_FRAME} is needed"
        )
    return msg


def connect(
    host: str,
    port: int,
    *,
    role: str,
    name: str = "",
    key: bytes | None = None,
    timeout: float = defaults.CONNECT_TIMEOUT,
    max_frame: int = defaults.MAX_FRAME,
    tls: _stdssl.SSLContext | None = None,
    heartbeat: float = defaults.HEARTBEAT,
) -> Connection:
    """Dial a server, run the handshake and exchange hellos.

    Args:
        host: Server address.
        port: Server port.
        role: This side's role (``client`` or ``worker``).
        name: This side's name, shown in the server's logs and status.
        key: The shared key, or None.
        timeout: Bound on connecting plus the whole handshake.
        max_frame: Largest frame accepted from the server.
        tls: A client-side SSL context to wrap the socket in, or None.
        heartbeat: This side's heartbeat interval (see :meth:`Connection.serve`).

    Raises:
        ConnectionLost: The server could not be reached or hung up during the handshake.
        ServerBusy: The server is full (``--max-connections``); try again later.
        ShuttingDown: The server is stopping.
        AuthenticationError: See :func:`argon.security.client_handshake`.
        ProtocolError: The server is not a compatible Argon peer (another protocol or
            Python version: the message names both).
    """
    server = f"{host}:{port}"
    sock = None
    try:
        with gevent.Timeout(timeout, ConnectionLost(f"handshake with {server} timed out after {timeout}s")):
            sock = _dial(host, port)
            _tune(sock)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            session = client_handshake(sock, key, server)
            conn = Connection(sock, server, session, max_frame, heartbeat)
            conn.send_now(_hello(role, name, heartbeat, max_frame))
            reply = conn.recv_message()
            if isinstance(reply, Bye):
                kind = TASK_ERRORS.get(reply.error)
                if kind is None or not issubclass(kind, (ProtocolError, ConnectionLost)):
                    kind = ProtocolError
                raise kind(f"{server} refused the connection: {reply.reason}")
            conn.hello = _check_hello(reply, server)
            return conn
    except OSError as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, ArgonError):  # ConnectionLost and its kind are OSErrors too
            raise
        raise ConnectionLost(f"cannot connect to {server}: {exc.strerror or exc}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def accept(
    sock: Any,
    address: tuple[Any, ...],
    *,
    role: str,
    name: str,
    key: bytes | None,
    allowed: bool,
    timeout: float = defaults.HANDSHAKE_TIMEOUT,
    max_frame: int = defaults.MAX_FRAME,
    tls: _stdssl.SSLContext | None = None,
    heartbeat: float = defaults.HEARTBEAT,
    max_items: int = defaults.MAX_ITEMS,
    dashboard: str = "",
) -> Connection:
    """Run the server side of a new connection's handshake.

    Args:
        sock: The accepted socket.
        address: The peer's address.
        role: This server's role (``manager`` or ``worker``).
        name: This server's name.
        key: The shared key, or None.
        allowed: False to refuse the peer (protected mode) with a one-line reason.
        timeout: Bound on the whole handshake.
        max_frame: Largest frame accepted from the peer.
        tls: A server-side SSL context, or None.
        heartbeat: This side's heartbeat interval (see :meth:`Connection.serve`).
        max_items: Most elements in any array or map of a message from the peer.
        dashboard: This server's dashboard URL, announced in its hello (empty: none).

    Raises:
        ArgonError: The peer failed the handshake (the caller logs it; ``sock`` is
            closed); a peer that hung up gives :class:`ConnectionLost`.
    """
    peer = f"{address[0]}:{address[1]}"
    try:
        with gevent.Timeout(timeout, ProtocolError(f"handshake not finished within {timeout}s")):
            _tune(sock)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_side=True)
            if not allowed:
                refuse(
                    sock,
                    f"{peer} is not a loopback address and this server has no key. Create one"
                    " with 'argon keygen FILE' and start every peer with --key FILE"
                    " (or start the server with --insecure)",
                )
                raise AuthenticationError("refused a non-loopback peer: this server has no key")
            session = server_handshake(sock, key)
            conn = Connection(sock, peer, session, max_frame, heartbeat, max_items)
            conn.guard = True
            try:
                conn.hello = _check_hello(conn.recv_message(), peer)
            except ProtocolError as exc:
                with contextlib.suppress(OSError):
                    conn.send_now(Bye(str(exc), ProtocolError.__name__))  # say why, so the peer's error can too
                raise
            conn.send_now(_hello(role, name, heartbeat, max_frame, max_items, dashboard))
            return conn
    except BaseException as exc:
        # Also when this greenlet is killed (a server sheds an unfinished handshake): the
        # descriptor must go at once, and a TLS wrapper owns it instead of ``sock``.
        with contextlib.suppress(OSError):
            sock.close()
        if isinstance(exc, OSError):
            raise ConnectionLost(f"{peer} dropped during the handshake: {exc}") from None
        raise
