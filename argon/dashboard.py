"""The live dashboard (``--dashboard-port``): a web page at ``/`` and its facts at ``/api/status``.

The page (``dashboard.html``, one file with inline CSS, JavaScript and SVG charts, nothing
fetched from elsewhere) polls ``/api/status`` once a second. That JSON is the server's
``status()`` plus what only the dashboard keeps (:mod:`argon.history`): wait and run time
percentiles and departed workers from the server's :class:`~argon.history.Recorder`, a
five-minute :class:`~argon.history.History` of its counters sampled every second (so a
page opened now already has history), and each worker's tasks/s from the same samples.

Everything runs in the server's own gevent hub, served by gevent's WSGI server. Requests
are few and cheap: a page costs the server one small response a second and nothing in
between (no long-lived requests). Every HTTP connection has a deadline and their number is capped, so a slow or
idle client cannot hold the server; the peer rules are the server's own.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import gevent
import gevent.pool
import gevent.pywsgi

from argon import defaults
from argon.history import BULKY, History, Recorder
from argon.security import is_loopback

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("dashboard.html")

StartResponse = Callable[..., Any]


class Watched(Protocol):
    """What the dashboard needs of a server (a manager or a worker)."""

    @property
    def config(self) -> Any:  # noqa: D102 - key, insecure, tls, handshake_timeout
        ...

    @property
    def recorder(self) -> Recorder:  # noqa: D102
        ...

    def status(self) -> dict[str, Any]:  # noqa: D102
        ...

    def oldest_arrival(self) -> float | None:  # noqa: D102 - monotonic arrival of the oldest queued task
        ...

    dashboard_url: str  # where this dashboard is served, announced to peers


def _plain(value: Any) -> Any:
    """``json.dumps`` fallback: status records become dicts, anything else its text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def peers(workers: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The other managers' dashboards, as this manager's workers reported them (sorted, each once).

    A worker serving several managers tells each one where the others serve their
    dashboards (see :attr:`~argon.status.WorkerStats.dashboards`).
    """
    urls = sorted({url for row in workers for url in row.get("dashboards", ())})
    return [{"name": url.split("://", 1)[1].rstrip("/"), "url": url} for url in urls]


class Dashboard:
    """The WSGI application: ``/`` (the page) and ``/api/status`` (its facts), read-only."""

    def __init__(self, server: Watched, page: bytes | None = None) -> None:
        self.server = server
        self.history = History()
        self.page = PAGE.read_bytes() if page is None else page
        self.policy = content_policy(self.page.decode())
        self._slow: tuple[int, bytes] = (-1, b"")

    def sample(self) -> None:
        """Take one history sample (called every second)."""
        status = dict(self.server.status())
        self.history.add(status, round(self.server.recorder.busy_average(status["busy"], status["capacity"]), 2))

    def figures(self) -> dict[str, Any]:
        """``status()`` now, with worker rates and states, departed workers and the queue's age."""
        server = self.server
        status = dict(server.status())
        config = server.config
        oldest = server.oldest_arrival()
        workers = []
        registered = {row["id"] for row in status["workers"]}
        for row in status["workers"]:
            row = {k: v for k, v in row.items() if k not in BULKY}
            row["rate"] = self.history.rate(str(row["id"]))
            row["state"] = "draining" if row.get("draining") else "ok"
            workers.append(row)
        return {
            **status,
            "workers": workers,
            "departed": [row for row in server.recorder.departed_since() if row["id"] not in registered],
            "oldest_queued": round(time.monotonic() - oldest, 3) if oldest is not None else None,
            "security": {"key": config.key is not None, "tls": config.tls is not None, "insecure": config.insecure},
            "peers": peers(status["workers"]),
            "time": round(time.time(), 3),
        }

    def _per_sample(self) -> bytes:
        """The timings and the history as JSON members, built at most once per history sample.

        They are the costly part of a response (sorting thousands of task times, encoding
        five minutes of samples) and change that slowly, so every poll within a second
        shares one build, however many pages are open.
        """
        taken, fragment = self._slow
        if taken != self.history.taken:
            slow = {
                "timings": self.server.recorder.timings(),
                "history": {"interval": defaults.DASHBOARD_INTERVAL, **self.history.columns()},
            }
            fragment = json.dumps(slow, separators=(",", ":"))[1:-1].encode()  # without its braces
            self._slow = (self.history.taken, fragment)
        return fragment

    def status_json(self) -> bytes:
        """What ``/api/status`` returns: :meth:`figures` plus ``timings`` and ``history``, as JSON."""
        fresh = json.dumps(self.figures(), separators=(",", ":"), default=_plain).encode()
        return fresh[:-1] + b"," + self._per_sample() + b"}"

    def refusal(self, environ: dict[str, Any]) -> str | None:
        """Why this request is refused under the server's peer rules, or None to serve it.

        Without a key (and without ``--insecure``) only loopback peers are served, and only
        when they asked for a loopback name: a web page elsewhere cannot read this one by
        pointing a name of its own at 127.0.0.1 (DNS rebinding).
        """
        config = self.server.config
        if config.key is not None or config.insecure:
            return None
        peer = environ.get("REMOTE_ADDR", "")
        if not is_loopback(peer):
            return (
                f"{peer} is not a loopback address: without a key this dashboard serves this"
                " machine only (start the server with --key FILE or --insecure to open it)"
            )
        host = str(environ.get("HTTP_HOST", ""))
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        if name != "localhost" and not is_loopback(name):
            return f"the Host header {host!r} does not name a loopback address"
        return None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        """Serve one request."""
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        why = self.refusal(environ)
        if why is not None:
            log.warning("dashboard: refusing %s: %s", environ.get("REMOTE_ADDR"), why)
            return _respond(start_response, "403 Forbidden", why.encode(), "text/plain", method)
        if path not in ("/", "/api/status"):
            return _respond(start_response, "404 Not Found", b"not found\n", "text/plain", method)
        if method not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"read-only\n", "text/plain", method,
                            [("Allow", "GET, HEAD")])
        if path == "/":
            return _respond(start_response, "200 OK", self.page, "text/html", method,
                            [("Content-Security-Policy", self.policy)])
        return _respond(start_response, "200 OK", self.status_json(), "application/json", method)


def _respond(
    start_response: StartResponse,
    status: str,
    body: bytes,
    kind: str,
    method: str,
    extra: list[tuple[str, str]] | None = None,
) -> Iterator[bytes]:
    headers = [
        ("Content-Type", f"{kind}; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        *(extra or []),
    ]
    headers.append(("Content-Length", str(len(body))))  # for HEAD too: the length a GET would get
    start_response(status, headers)
    return iter([b""] if method == "HEAD" else [body])


def content_policy(page: str) -> str:
    """A Content-Security-Policy that allows only the page's own inline script and style.

    Hashes rather than ``'unsafe-inline'``: a worker's name that somehow reached the page
    as markup still could not run a script.
    """

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')};"
        " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class HeadersTooLarge(ValueError):
    """A request's headers exceed ``DASHBOARD_MAX_HEADERS`` bytes."""


_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _Handler(gevent.pywsgi.WSGIHandler):
    """One HTTP connection: each request (and each wait for the next) has a deadline."""

    server: DashboardServer

    def MessageClass(self, rfile: Any, *args: Any) -> Any:  # noqa: N802 - pywsgi's name
        """Read the request headers, refusing more than ``DASHBOARD_MAX_HEADERS`` bytes of them."""
        limit = defaults.DASHBOARD_MAX_HEADERS
        head = bytearray()
        while True:
            line = rfile.readline(limit + 1 - len(head))
            head += line
            if len(head) > limit:
                raise HeadersTooLarge(f"request headers larger than {limit} bytes")
            if line in (b"\r\n", b"\n", b""):
                return gevent.pywsgi.headers_factory(io.BytesIO(bytes(head)), *args)

    def _handle_client_error(self, ex: Exception) -> Any:
        if isinstance(ex, HeadersTooLarge):
            log.info("dashboard: refusing a request from %s: %s", self.client_address[0], ex)
            return ("431", _TOO_LARGE)
        return super()._handle_client_error(ex)

    def handle_one_request(self) -> Any:
        """Serve one request, or close the connection when it takes too long."""
        with gevent.Timeout(self.server.request_timeout, False):
            result = super().handle_one_request()
            if isinstance(result, tuple):  # a refused request: answer, then close gently
                self._answer_and_drain(result[1])
                return None
            return result
        return None  # too slow, or idle too long between requests: close

    def _answer_and_drain(self, response: bytes) -> None:
        """Send an error response, then read (a bounded amount of) what the client still sends.

        Closing a socket with unread input resets the connection, and the client may then
        lose the response: it would see a reset instead of, say, 431.
        """
        sock = self.socket
        try:
            sock.sendall(response)
            sock.shutdown(socket.SHUT_WR)
            left = 64 * defaults.DASHBOARD_MAX_HEADERS
            while left > 0 and (chunk := sock.recv(min(left, 65536))):
                left -= len(chunk)
        except OSError:
            pass  # the client went first


class DashboardServer(gevent.pywsgi.WSGIServer):
    """gevent's WSGI server with deadlines, a connection cap and the server's TLS."""

    def __init__(self, address: tuple[str, int], app: Dashboard, tls: ssl.SSLContext | None,
                 request_timeout: float) -> None:
        super().__init__(
            address,
            app,
            handler_class=_Handler,
            spawn=gevent.pool.Pool(defaults.DASHBOARD_CONNECTIONS),
            log=None,
            error_log=gevent.pywsgi.LoggingLogAdapter(log, logging.INFO),
            # Naming the host ourselves spares pywsgi a getfqdn(), which would start
            # gevent's resolver threads in a process that forks.
            environ={"SERVER_NAME": address[0], "wsgi.url_scheme": "https" if tls else "http"},
        )
        self.tls = tls
        self.request_timeout = request_timeout
        self.dashboard = app
        self._sampler: gevent.Greenlet | None = None

    def start(self) -> None:
        """Listen, and start sampling the server's counters every second."""
        super().start()
        self._sampler = gevent.spawn(self._sample)

    def _sample(self) -> None:
        while True:
            try:
                self.dashboard.sample()
            except Exception:  # a bad sample must not end the history
                log.exception("dashboard: cannot sample the server's status")
            gevent.sleep(defaults.DASHBOARD_INTERVAL)

    def stop(self, timeout: float | None = None) -> None:
        """Stop sampling and serving."""
        if self._sampler is not None:
            self._sampler.kill(block=False)
        super().stop(timeout)

    def handle(self, sock: Any, address: tuple[Any, ...]) -> None:
        """Serve one connection: no single read or write may wait past the deadline."""
        sock.settimeout(self.request_timeout)
        if self.tls is not None:
            try:
                with gevent.Timeout(self.request_timeout):
                    sock = self.tls.wrap_socket(sock, server_side=True)
            except (OSError, gevent.Timeout) as exc:
                log.info("dashboard: TLS handshake with %s failed: %s", address[0], exc)
                sock.close()
                return
        super().handle(sock, address)

    @property
    def url(self) -> str:
        """Where the page is served."""
        host = self.address[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.server_port}/"


def serve_dashboard(server: Watched, host: str, port: int) -> DashboardServer:
    """Start serving ``server``'s dashboard on ``host:port`` (port 0: any) and return the HTTP server.

    Raises:
        OSError: The port cannot be bound.
    """
    config = server.config
    http = DashboardServer((host, port), Dashboard(server), config.tls, config.handshake_timeout)
    http.start()
    server.dashboard_url = http.url
    return http
