"""Argon: a distributed task-processing network for Python.

Usage:
  argon manager [options]
  argon worker [options] [--manager HOST:PORT] [--workers N] [--max-requests N]
  argon keygen FILE
  argon -h | --help
  argon --version

Commands:
  manager               Route tasks from clients to registered workers.
  worker                Run tasks in a pool of processes, for a manager (--manager)
                        or for clients directly.
  keygen FILE           Write a new random key to FILE, readable only by its owner.

Options:
  --host HOST           Address to listen on (default: 127.0.0.1).
  --port PORT           Port to listen on; 0 picks a free one
                        (default: 8000 for a manager, 8001 for a worker).
  --queue-size N        At most N tasks wait for a free process; beyond that new
                        tasks are rejected at once (default: unbounded).
  --key FILE            Shared key file (see keygen); every peer must hold the same.
  --insecure            Admit peers from any address without a key.
  --manager HOST:PORT   Manager to take tasks from (default: none; serve clients).
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
  -v --verbose          Log progress (level INFO).
  --debug               Log everything (level DEBUG).
  -h --help             Show this help.
  --version             Show the version.

Every option may also be set with an environment variable: ARGON_ and the option's
name in capitals, dashes as underscores (ARGON_QUEUE_SIZE=100). The command line wins.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import ssl
import sys
from typing import Any

import gevent
from docopt import DocoptExit, docopt

from argon import defaults
from argon._version import __version__
from argon.errors import ArgonError
from argon.manager import Manager
from argon.osutil import die_with_parent
from argon.security import client_tls, load_key_file, server_tls, write_key_file
from argon.server import Server, ServerConfig
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
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
)
_FLAGS = ("--insecure", "--verbose", "--debug")


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


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--manager expects HOST:PORT, got {text!r}")
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
        ("--heartbeat", "heartbeat", float, 0.05),
        ("--grace", "grace", float, 0),
        ("--max-frame", "max_frame", int, 1024),
        ("--max-items", "max_items", int, 16),
        ("--max-connections", "max_connections", int, 1),
        ("--handshake-timeout", "handshake_timeout", float, 0.1),
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
        manager=_address(args["--manager"]) if args["--manager"] else None,
        workers=_number(args, "--workers", int, 1),
        max_requests=_number(args, "--max-requests", int, 1),
        manager_tls=client_tls(args["--tls-ca"]) if args["--tls-ca"] else None,
    )


def _usage_problem(argv: list[str]) -> str:
    """Say in a few words what is wrong with a command line docopt refused."""
    known = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", __doc__ or ""))
    unknown = [arg.split("=", 1)[0] for arg in argv if arg.startswith("-") and arg.split("=", 1)[0] not in known]
    if unknown:
        return f"unknown option {unknown[0]}"
    if not argv:
        return "missing command (manager, worker or keygen)"
    if argv[0] not in ("manager", "worker", "keygen"):
        return f"unknown command {argv[0]!r}"
    return f"invalid arguments for 'argon {argv[0]}': {' '.join(argv[1:]) or '(none)'}"


def _configure_logging(args: dict[str, Any]) -> None:
    level = logging.DEBUG if args["--debug"] else logging.INFO if args["--verbose"] else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )


def _install_signals(server: Server, shutdown: Any) -> None:
    """First SIGTERM/SIGINT: drain. Second: exit at once."""
    state = {"stopping": False}

    def on_signal() -> None:
        if state["stopping"]:
            log.warning("second signal: exiting now")
            if isinstance(server, Worker):
                server.pool.close()
            os._exit(1)
        state["stopping"] = True
        gevent.spawn(shutdown)

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
    _configure_logging(args)
    if args["keygen"]:
        try:
            path = write_key_file(args["FILE"])
        except OSError as exc:
            print(f"argon keygen: cannot write {args['FILE']}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote a new key to {path} (mode 0600); pass it to every peer with --key {path}")
        return 0
    try:
        config = build_config(args)
    except (UsageError, ArgonError) as exc:
        print(f"argon: {exc}", file=sys.stderr)
        return 2
    server: Manager | Worker = Manager(config) if args["manager"] else Worker(config)  # type: ignore[arg-type]
    try:
        server.start()
    except OSError as exc:
        print(f"argon {server.role}: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
        if isinstance(server, Worker):
            server.pool.close()
        return 1
    _install_signals(server, server.shutdown)
    print(f"argon {server.role} listening on {server.name}", flush=True)
    server.serve_forever()
    return 0


def run() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
