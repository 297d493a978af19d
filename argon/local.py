"""A whole Argon network on this machine: one manager and its workers, on loopback.

:class:`LocalCluster` starts real ``argon manager`` and ``argon worker`` processes on free
ports, waits until every worker has registered, and stops them all on exit. The
processes are told to exit if the program that started them dies.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any

import gevent
import gevent.subprocess

from argon.client import Client
from argon.errors import ArgonError

_LISTENING = re.compile(rb"listening on (\S+):(\d+)")
START_TIMEOUT = 60.0


class LocalCluster:
    """Start a manager and ``nodes`` workers on loopback; use as a context manager.

    Args:
        nodes: Worker processes (nodes) to start.
        workers: Pool processes per node, as ``--workers`` (default: one per CPU).
        key_file: A key file every process and :meth:`client` will use.
        queue_size: The manager's ``--queue-size``.
        max_requests: Each node's ``--max-requests``.
        options: More command-line options for every process, such as
            ``heartbeat=0.5`` for ``--heartbeat 0.5``.

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
        **options: Any,
    ) -> None:
        self.nodes = nodes
        self.workers = workers
        self.key_file = key_file
        self.queue_size = queue_size
        self.max_requests = max_requests
        self.options = options
        self.host = "127.0.0.1"
        self.port = 0
        self.processes: list[gevent.subprocess.Popen] = []

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The manager's ``host:port``."""
        return f"{self.host}:{self.port}"

    def _common(self) -> list[str]:
        args = ["--host", self.host]
        if self.key_file:
            args += ["--key", str(self.key_file)]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        return args

    def _launch(self, args: list[str]) -> gevent.subprocess.Popen:
        env = dict(os.environ, ARGON_DIE_WITH_PARENT="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = gevent.subprocess.Popen(
            [sys.executable, "-m", "argon", *args, "--port", "0"],
            stdout=gevent.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    @staticmethod
    def _address(process: gevent.subprocess.Popen, role: str) -> tuple[str, int]:
        """Wait for the line a server prints once it listens; return its address."""
        with gevent.Timeout(START_TIMEOUT, ArgonError(f"'argon {role}' did not start")):
            line = process.stdout.readline()
        match = _LISTENING.search(line)
        if match is None:
            raise ArgonError(f"'argon {role}' failed to start (exit status {process.poll()})")
        return match.group(1).decode(), int(match.group(2))

    def start(self) -> None:
        """Start the manager, then all nodes at once, and wait until every node has registered."""
        try:
            manager = ["manager", *self._common()]
            if self.queue_size is not None:
                manager += ["--queue-size", str(self.queue_size)]
            self.host, self.port = self._address(self._launch(manager), "manager")
            node = ["worker", *self._common(), "--manager", self.address]
            if self.workers:
                node += ["--workers", str(self.workers)]
            if self.max_requests:
                node += ["--max-requests", str(self.max_requests)]
            for process in [self._launch(node) for _ in range(self.nodes)]:
                self._address(process, "worker")
            with self.client() as client:
                deadline = time.monotonic() + START_TIMEOUT
                while len(client.status()["workers"]) < self.nodes:
                    if time.monotonic() > deadline:
                        raise ArgonError("workers did not register with the manager")
                    gevent.sleep(0.02)
        except BaseException:
            self.close()
            raise

    def client(self, **options: Any) -> Client:
        """A new :class:`~argon.client.Client` connected to this cluster's manager."""
        if self.key_file and "key" not in options:
            options.setdefault("key_file", self.key_file)
        return Client(self.host, self.port, **options)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers, then the manager (SIGTERM; SIGKILL after ``timeout``)."""
        for process in reversed(self.processes):  # workers first, so they leave cleanly
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except gevent.subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self.processes = []
