"""Argon: a distributed task-processing network for Python.

Usage:
  argon manager [options]
  argon worker [options] [--manager HOST:PORT] [--workers N] [--max-requests N]
  argon local [options] [--nodes N] [--workers N] [--managers N]
  argon status HOST:PORT [options] [--json] [--watch SECONDS]
  argon keygen FILE
  argon -h | --help
  argon --version

Commands:
  manager               Route tasks from clients to registered workers.
  worker                Run tasks in a pool of processes, for a manager (--manager)
                        or for clients directly.
  local                 Run a manager (or --managers N) and --nodes workers on this
                        machine (loopback, free ports) until interrupted.
  status HOST:PORT      Show a manager's (or worker's) workers, load and counters.
  keygen FILE           Write a new random key to FILE, readable only by its owner.

Options:
  --host HOST           Address to listen on (default: 127.0.0.1).
  --port PORT           Port to listen on; 0 picks a free one
                        (default: 8000 for a manager, 8001 for a worker).
  --queue-size N        At most N tasks wait for a free process; beyond that new
                        tasks are rejected at once (default: unbounded).
  --key FILE            Shared key file (see keygen); every peer must hold the same.
  --insecure            Admit peers from any address without a key.
  --manager HOST:PORT   Manager to take tasks from; several, comma-separated
                        (h1:p1,h2:p2), are served at once (default: none;
                        serve clients).
  --workers N           Pool processes (default: the CPUs this process may use).
  --max-requests N      Replace a pool process after it has run N tasks
                        (default: never).
  --heartbeat SECONDS   Heartbeat interval; a worker or manager silent for four
                        intervals is dropped (default: 1.0).
  --grace SECONDS       On SIGTERM or SIGINT, how long to finish running tasks
                        before exiting anyway (default: 30).
  --tls-cert FILE       Serve TLS with this PEM certificate (with --tls-key).
  --tls-key FILE        The PEM private key of --tls-cert.
  --tls-ca FILE         Worker: dial the manager over TLS, trusting this PEM
                        authority or self-signed certificate.
  --max-frame BYTES     Largest message accepted (default: 67108864).
  --max-items N         Most elements in any list or map of a message
                        (default: 100000).
  --max-connections N   Connections a server holds at once (default: 1024).
  --handshake-timeout SECONDS
                        Close a connection that has not finished the handshake
                        (key proof and hello) in this time (default: 5).
  --worker-wait SECONDS
                        Manager: fail queued tasks with NoWorkers once no worker
                        has been registered for this long (default: 60).
  --metrics-port PORT   Serve Prometheus metrics on this port at /metrics
                        (on --host; 0 picks one; default: off).
  --dashboard-port PORT
                        Serve a live web dashboard on this port: a page at /,
                        its figures as JSON at /api/status (on --host, same peer
                        rules as the server; 0 picks one; default: off).
  --nodes N             local: worker nodes to start (default: 1).
  --managers N          local: managers to start; every node serves them all
                        (default: 1).
  --json                status: print JSON for scripts.
  --watch SECONDS       status: refresh every SECONDS until interrupted.
  --log-format FORMAT   text or json: one line per event (default: text).
  -v --verbose          Log progress (level INFO).
  --debug               Log everything (level DEBUG).
  -h --help             Show this help.
  --version             Show the version.

Every option may also be set with an environment variable: ARGON_ and the option's
name in capitals, dashes as underscores (ARGON_QUEUE_SIZE=100). The command line wins.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import ssl
import sys
from typing import Any

import gevent
import gevent.event
from docopt import DocoptExit, docopt

import argon
from argon import defaults
from argon._version import __version__
from argon.dashboard import serve_dashboard
from argon.errors import ArgonError
from argon.manager import Manager
from argon.metrics import LatencyHistogram, serve_metrics
from argon.osutil import die_with_parent, ready_line
from argon.security import client_tls, load_key_file, server_tls, write_key_file
from argon.server import Server, ServerConfig
from argon.status import combine, render, render_network
from argon.worker import Worker, WorkerConfig

log = logging.getLogger("argon")

_OPTIONS = (
    "--host",
    "--port",
    "--queue-size",
    "--key",
    "--manager",
    "--workers",
    "--max-requests",
    "--heartbeat",
    "--grace",
    "--max-frame",
    "--max-items",
    "--max-connections",
    "--handshake-timeout",
    "--worker-wait",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
    "--metrics-port",
    "--dashboard-port",
    "--nodes",
    "--managers",
    "--watch",
    "--log-format",
)
_FLAGS = ("--insecure", "--verbose", "--debug", "--json")


_COMMANDS = ("manager", "worker", "local", "status", "keygen")


class UsageError(Exception):
    """A bad option value; reported as one line, exit status 2."""


def _apply_environment(args: dict[str, Any], environ: dict[str, str]) -> None:
    """Fill options the command line left unset from ``ARGON_*`` variables."""
    for option in _OPTIONS + _FLAGS:
        name = "ARGON_" + option[2:].upper().replace("-", "_")
        if name not in environ:
            continue
        if option in _FLAGS:
            args[option] = args[option] or environ[name].lower() in ("1", "true", "yes", "on")
        elif args.get(option) is None:
            args[option] = environ[name]


def _number(args: dict[str, Any], option: str, kind: type = int, minimum: float = 0) -> Any:
    text = args.get(option)
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{option} expects a number, got {text!r}") from None
    if value < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {text!r}")
    return value


def _address(text: str, what: str = "--manager") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{what} expects HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _server_tls(args: dict[str, Any]) -> ssl.SSLContext | None:
    cert, key = args["--tls-cert"], args["--tls-key"]
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together")
    return server_tls(cert, key) if cert else None


def build_config(args: dict[str, Any]) -> ServerConfig:
    """Turn parsed options into a manager's or worker's config.

    Raises:
        UsageError: An option has a bad value.
        AuthenticationError: The key file cannot be used.
    """
    common: dict[str, Any] = {
        "host": args["--host"] or defaults.HOST,
        "port": _number(args, "--port"),
        "queue_size": _number(args, "--queue-size"),
        "key": load_key_file(args["--key"]) if args["--key"] else None,
        "insecure": bool(args["--insecure"]),
        "tls": _server_tls(args),
    }
    for option, field, kind, minimum in (
        ("--heartbeat", "heartbeat", float, defaults.MIN_HEARTBEAT),
        ("--grace", "grace", float, 0),
        ("--max-frame", "max_frame", int, 1024),
        ("--max-items", "max_items", int, 16),
        ("--max-connections", "max_connections", int, 1),
        ("--handshake-timeout", "handshake_timeout", float, 0.1),
        ("--worker-wait", "worker_wait", float, 0),
    ):
        value = _number(args, option, kind, minimum)
        if value is not None:
            common[field] = value
    if args["manager"]:
        if common["port"] is None:
            common["port"] = defaults.MANAGER_PORT
        return ServerConfig(**common)
    if common["port"] is None:
        common["port"] = defaults.WORKER_PORT
    return WorkerConfig(
        **common,
        managers=[_address(part) for part in args["--manager"].split(",")] if args["--manager"] else [],
        processes=_workers(args),
        max_requests=_number(args, "--max-requests", int, 1),
        manager_tls=client_tls(args["--tls-ca"]) if args["--tls-ca"] else None,
    )


def _workers(args: dict[str, Any]) -> int | None:
    workers: int | None = _number(args, "--workers", int, 1)
    if workers is not None and workers > defaults.MAX_CAPACITY:
        raise UsageError(f"--workers must be at most {defaults.MAX_CAPACITY}, got {workers}")
    return workers


def _usage_problem(argv: list[str]) -> str:
    """Say in a few words what is wrong with a command line docopt refused."""
    known = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", __doc__ or ""))
    unknown = [arg.split("=", 1)[0] for arg in argv if arg.startswith("-") and arg.split("=", 1)[0] not in known]
    if unknown:
        return f"unknown option {unknown[0]}"
    if not argv:
        return f"missing command ({', '.join(_COMMANDS)})"
    if argv[0] not in _COMMANDS:
        return f"unknown command {argv[0]!r}"
    return f"invalid arguments for 'argon {argv[0]}': {' '.join(argv[1:]) or '(none)'}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, process and message."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "component": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(args: dict[str, Any]) -> None:
    level = logging.DEBUG if args["--debug"] else logging.INFO if args["--verbose"] else logging.WARNING
    style = (args["--log-format"] or "text").lower()
    if style not in ("text", "json"):
        raise UsageError(f"--log-format is text or json, not {style!r}")
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    handler.setFormatter(JsonFormatter() if style == "json" else text)
    logging.basicConfig(level=level, handlers=[handler])


def _install_signals(server: Server) -> None:
    """First SIGTERM/SIGINT: stop (drain). Second: exit at once."""
    state = {"stopping": False}

    def on_signal() -> None:
        if state["stopping"]:
            log.warning("second signal: exiting now")
            server.abort()
            os._exit(1)
        state["stopping"] = True
        gevent.spawn(server.stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal)


def main(argv: list[str] | None = None) -> int:
    """Run the ``argon`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(__doc__, argv, version=f"argon {__version__}")
    except DocoptExit:
        print(f"argon: {_usage_problem(argv)}; run 'argon --help' for usage", file=sys.stderr)
        return 2
    _apply_environment(args, dict(os.environ))
    if os.environ.get("ARGON_DIE_WITH_PARENT"):  # set by LocalCluster: drain when our parent dies
        die_with_parent(os.getppid(), signal.SIGTERM)
    try:
        _configure_logging(args)
        if args["keygen"]:
            return _keygen(args["FILE"])
        if args["status"]:
            return _status(args)
        if args["local"]:
            return _local(args)
        return _serve(args)
    except (UsageError, ArgonError) as exc:
        print(f"argon: {exc}", file=sys.stderr)
        return 2


def _keygen(path: str) -> int:
    try:
        written = write_key_file(path)
    except OSError as exc:
        print(f"argon keygen: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote a new key to {written} (mode 0600); pass it to every peer with --key {written}")
    return 0


def _serve(args: dict[str, Any]) -> int:
    """``argon manager`` and ``argon worker``: run a server until a signal stops it."""
    config = build_config(args)
    metrics_port = _number(args, "--metrics-port")
    dashboard_port = _number(args, "--dashboard-port")
    latency = LatencyHistogram() if metrics_port is not None else None
    server: Manager | Worker = (
        Manager(config, latency=latency) if args["manager"] else Worker(config, latency=latency)  # type: ignore[arg-type]
    )
    try:
        with server:  # stopped (drained) on the way out, whatever happens
            metrics = serve_metrics(server, config.host, metrics_port) if metrics_port is not None else None
            dashboard = serve_dashboard(server, config.host, dashboard_port) if dashboard_port is not None else None
            _install_signals(server)
            print(f"argon {server.role} listening on {server.name}", flush=True)
            if metrics is not None:
                print(f"argon {server.role} metrics on http://{config.host}:{metrics.server_port}/metrics", flush=True)
            if dashboard is not None:
                print(f"argon {server.role} dashboard on {dashboard.url}", flush=True)
            # What this process needs to serve exists now, and lives as long as it does: keep
            # the collector from walking it at every full collection (about 28,000 objects,
            # 7 ms each time; tens of ms under load), which would stall every task in flight.
            gc.freeze()
            print(ready_line(server.role, server.name), flush=True)  # last: everything above is up
            server.wait_stopped()
    except ArgonError as exc:  # a pool that would not start
        print(f"argon {server.role}: cannot start: {exc}", file=sys.stderr)
        return 1
    except (OSError, ImportError) as exc:
        why = getattr(exc, "strerror", None) or exc
        print(f"argon {server.role}: cannot start on {config.host}: {why}", file=sys.stderr)
        return 1
    if server.failure:
        print(f"argon {server.role}: stopped: {server.failure}", file=sys.stderr)
        return 1
    return 0


def _status(args: dict[str, Any]) -> int:
    """``argon status``: one table (or JSON), or a refreshing one with --watch.

    Given several managers (``h1:p1,h2:p2``) it shows each one, and network totals; a
    manager that does not answer is shown as down.
    """
    addresses = [_address(part, "status") for part in args["HOST:PORT"].split(",")]
    watch = _number(args, "--watch", float, 0.1)
    tls = client_tls(args["--tls-ca"]) if args["--tls-ca"] else None
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    clients: dict[tuple[str, int], argon.Client] = {}
    try:
        while not stop.is_set():
            if len(addresses) == 1:
                status = _one_status(clients, addresses[0], args["--key"], tls)
            else:
                status = combine([_ask(clients, address, args["--key"], tls) for address in addresses])
            if args["--json"]:
                text = json.dumps(status, indent=2, sort_keys=True)
            else:
                text = render(status) if len(addresses) == 1 else render_network(status)
            if watch:
                sys.stdout.write("\x1b[H\x1b[2J")  # cursor home, clear screen: refresh in place
            print(text, flush=True)
            if not watch:
                break
            stop.wait(watch)
    finally:
        for client in clients.values():
            client.close()
    return 0


def _one_status(
    clients: dict[tuple[str, int], Any], address: tuple[str, int], key_file: str | None, tls: Any
) -> dict[str, Any]:
    """One server's status (errors propagate: with one server there is nothing else to show)."""
    if address not in clients:
        clients[address] = argon.Client(*address, key_file=key_file, tls=tls, retries=0)
    return clients[address].status()  # type: ignore[no-any-return]


def _ask(
    clients: dict[tuple[str, int], Any], address: tuple[str, int], key_file: str | None, tls: Any
) -> tuple[str, dict[str, Any] | None, str]:
    """``(address, status, "")`` from one of several managers, or ``(address, None, why)``."""
    name = f"{address[0]}:{address[1]}"
    try:
        return name, _one_status(clients, address, key_file, tls), ""
    except argon.ArgonError as exc:
        client = clients.pop(address, None)
        if client is not None:
            client.close()
        return name, None, f"{type(exc).__name__}: {exc}"


#: ``argon local``: options for every process, for the manager only, and for the nodes only.
_LOCAL_COMMON = (  # (--grace goes to LocalCluster's grace=, --key to key_file=)
    "--heartbeat",
    "--max-frame",
    "--max-items",
    "--max-connections",
    "--handshake-timeout",
    "--log-format",
    "--insecure",
    "--verbose",
    "--debug",
)
_LOCAL_MANAGER = ("--metrics-port", "--tls-cert", "--tls-key", "--worker-wait")
_LOCAL_NODES = ("--tls-ca",)


def _local_options(args: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name[2:].replace("-", "_"): args[name] for name in names if args[name] is not None}


def _local(args: dict[str, Any]) -> int:
    """``argon local``: a manager and workers on loopback until SIGINT or SIGTERM."""
    build_config({**args, "manager": True})  # check every value the way manager/worker would
    nodes = _number(args, "--nodes", int, 1) or 1
    managers = _number(args, "--managers", int, 1) or 1
    if managers > 1 and _number(args, "--metrics-port"):
        raise UsageError("--managers N cannot share one --metrics-port: give 0 (each picks a free one)")
    workers = _workers(args)
    grace = _number(args, "--grace", float, 0)
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    manager_options = _local_options(args, _LOCAL_MANAGER)
    worker_options = _local_options(args, _LOCAL_NODES)
    if args["--tls-cert"] and not args["--tls-ca"]:
        worker_options["tls_ca"] = args["--tls-cert"]  # nodes trust the (self-signed) certificate
    cluster = argon.LocalCluster(
        nodes,
        workers,
        key_file=args["--key"],
        queue_size=_number(args, "--queue-size"),
        max_requests=_number(args, "--max-requests", int, 1),
        host=args["--host"] or defaults.HOST,
        port=_number(args, "--port") or 0,
        grace=grace,
        manager_options=manager_options,
        worker_options=worker_options,
        managers=managers,
        dashboard_port=_number(args, "--dashboard-port"),
        **_local_options(args, _LOCAL_COMMON),
    )
    with cluster:
        processes = f" of {workers} processes" if workers else ""
        who = "manager" if managers == 1 else f"{managers} managers"
        print(
            f"argon local: {who} listening on {cluster.address} with {nodes} worker node(s){processes};"
            " Ctrl-C to stop",
            flush=True,
        )
        for url in cluster.dashboards:  # one per manager
            print(f"argon local: dashboard on {url}", flush=True)
        for address in cluster.address.split(","):  # one ready line per manager, each HOST:PORT
            print(ready_line("local", address), flush=True)
        stop.wait()
    print("argon local: stopped", flush=True)
    return 0


def run() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
