"""A whole Argon network on this machine: its manager (or managers) and workers, on loopback.

:class:`LocalCluster` starts real ``argon manager`` and ``argon worker`` processes on free
ports (with several managers, every worker serves them all), waits until every worker
has registered with every manager, and stops them all on exit. The
processes get exactly the options the cluster passes them: none of the caller's
``ARGON_*`` settings (the rest of the environment passes through, so tasks import what
the caller can). They are told to exit if the program that started them dies.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Any

import gevent
import gevent.subprocess

from argon import defaults
from argon.client import Client
from argon.errors import ArgonError
from argon.osutil import child_env, kill_group
from argon.testing import read_ready

START_TIMEOUT = 60.0
#: Seconds ``close`` allows beyond the grace: a drained worker still says goodbye and stops its pool.
CLOSE_MARGIN = defaults.DRAIN_ACK_TIMEOUT + 3.0
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _dialed(host: str, port: int) -> str:
    """``host:port`` to dial a server listening on ``host`` (a wildcard: on loopback; IPv6 in brackets)."""
    host = _WILDCARDS.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalCluster:
    """Start a manager (or ``managers``) and ``nodes`` workers on this machine; use as a context manager.

    Args:
        nodes: Worker processes (nodes) to start; each serves every manager.
        workers: Pool processes per node, as ``--workers`` (default: one per CPU).
        key_file: A key file every process and :meth:`client` will use.
        queue_size: The manager's ``--queue-size``.
        max_requests: Each node's ``--max-requests``.
        host: The address every process listens on (``--host``; default 127.0.0.1).
        port: The (first) manager's port (``--port``; default 0, a free one); other
            managers take free ports.
        grace: Every process's ``--grace``; :meth:`close` waits at most this long (plus a
            few seconds) for running tasks before it kills what is left (default 30).
        manager_options: Command-line options for the manager only, such as
            ``metrics_port=9100``, ``worker_wait=5`` or ``tls_cert=..., tls_key=...``.
        worker_options: Command-line options for the worker nodes only (``tls_ca=...``).
        managers: Managers to start (more than one: no single point of failure);
            :attr:`address` lists them all.
        dashboard_port: Serve the first manager's live dashboard on this port, the others'
            on free ones (0: free ports for all); their addresses are then in ``dashboards``.
        options: Command-line options for every process, such as ``heartbeat=0.5`` for
            ``--heartbeat 0.5``; ``True`` gives a flag (``insecure=True``, ``verbose=True``).

    Example::

        with LocalCluster(nodes=2, workers=2) as cluster, cluster.client() as client:
            assert client.queue(pow, [2, 10]) == 1024
    """

    def __init__(
        self,
        nodes: int = 1,
        workers: int | None = None,
        *,
        key_file: str | None = None,
        queue_size: int | None = None,
        max_requests: int | None = None,
        host: str = defaults.HOST,
        port: int = 0,
        grace: float | None = None,
        manager_options: dict[str, Any] | None = None,
        worker_options: dict[str, Any] | None = None,
        managers: int = 1,
        dashboard_port: int | None = None,
        **options: Any,
    ) -> None:
        if managers < 1:
            raise ValueError(f"a local cluster needs at least one manager, not {managers}")
        if managers > 1 and (manager_options or {}).get("metrics_port"):
            raise ValueError("several managers cannot share one metrics port: give metrics_port=0 (free ports)")
        self.nodes = nodes
        self.managers = managers
        #: Every manager's ``(host, port)`` as it listens, once started.
        self.manager_addresses: list[tuple[str, int]] = []
        self.workers = workers
        self.key_file = key_file
        self.grace = defaults.GRACE if grace is None else grace
        self.options = {**options, "host": host, "key": key_file, "grace": grace}
        self.manager_options = {**(manager_options or {}), "queue_size": queue_size}
        self.dashboard_port = dashboard_port
        self.worker_options = {**(worker_options or {}), "workers": workers, "max_requests": max_requests}
        self.host = host
        self.port = port
        self.processes: list[gevent.subprocess.Popen] = []
        self.dashboards: list[str] = []  # each manager's dashboard URL, with dashboard_port

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.address} nodes={self.nodes} processes={len(self.processes)}>"

    @property
    def dashboard(self) -> str | None:
        """The (first) manager's dashboard URL, if it has one (see ``dashboard_port``)."""
        return self.dashboards[0] if self.dashboards else None

    @property
    def address(self) -> str:
        """The managers' ``host:port``, comma-separated if several: what a client takes.

        A wildcard listening address is dialed on loopback.
        """
        return ",".join(_dialed(host, port) for host, port in self.manager_addresses or [(self.host, self.port)])

    def start(self) -> None:
        """Start the managers, then all nodes at once, and wait until every node has registered with each."""
        self.manager_addresses = []
        self.dashboards = []
        try:
            launched = [
                self._launch("manager", {**self.manager_options, "port": self.port if not i else 0,
                                         "dashboard_port": self._dashboard_port(i)})
                for i in range(self.managers)
            ]
            for manager in launched:
                printed: list[str] = []
                _, host, port = read_ready(manager.stdout, START_TIMEOUT, "'argon manager'", printed)
                self.manager_addresses.append((host, port))
                self.dashboards += [line.split()[-1] for line in printed if " dashboard on " in line]
            self.host, self.port = self.manager_addresses[0]
            nodes = [
                self._launch("worker", {**self.worker_options, "manager": self.address, "port": 0})
                for _ in range(self.nodes)
            ]
            for node in nodes:
                read_ready(node.stdout, START_TIMEOUT, "'argon worker'")
            deadline = time.monotonic() + START_TIMEOUT
            for address in self.address.split(","):
                with self._client(address) as client:
                    while len(client.status()["workers"]) < self.nodes:
                        if time.monotonic() > deadline:
                            raise ArgonError(f"workers did not register with the manager at {address}")
                        gevent.sleep(0.02)
        except (ArgonError, RuntimeError, TimeoutError) as exc:
            self.close()
            raise ArgonError(f"the local network did not start: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _dashboard_port(self, index: int) -> int | None:
        """The first manager's dashboard goes on ``dashboard_port``, the others' on free ports."""
        if self.dashboard_port is None:
            return None
        return self.dashboard_port if index == 0 else 0

    def _launch(self, role: str, own: dict[str, Any]) -> gevent.subprocess.Popen:
        """Start ``argon ROLE`` with this cluster's options and ``own``, in its own session."""
        args = [role]
        for name, value in {**self.options, **own}.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not None and value is not False:  # (0 is a value: --port 0)
                args += [flag, str(value)]
        process = gevent.subprocess.Popen(
            [sys.executable, "-m", "argon", *args],
            stdout=gevent.subprocess.PIPE,
            env=child_env(ARGON_DIE_WITH_PARENT="1"),
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def client(self, **options: Any) -> Client:
        """A new :class:`~argon.client.Client` connected to this cluster's managers (all of them)."""
        return self._client(self.address, **options)

    def _client(self, address: str, **options: Any) -> Client:
        """A client of ``address`` (one or several managers), with this cluster's key and TLS."""
        if self.key_file and "key" not in options:
            options.setdefault("key_file", self.key_file)
        authority = self.worker_options.get("tls_ca") or self.manager_options.get("tls_cert")
        if authority:
            options.setdefault("tls", str(authority))
        return Client(address, **options)

    def close(self) -> None:
        """Stop every process at once and wait until they are gone.

        Each gets SIGTERM together (workers drain, the manager sees them leave); whatever
        still runs after the grace plus a few seconds is killed with its whole process
        group, pool processes included. Never waits longer than that.
        """
        processes, self.processes = self.processes, []
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + CLOSE_MARGIN
        for process in processes:
            with contextlib.suppress(gevent.subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            kill_group(process.pid)  # what outlived the grace, and any pool process left behind
            with contextlib.suppress(gevent.subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
