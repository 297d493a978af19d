"""Fixtures that start real ``bin/argon`` processes on loopback and always clean them up.

Every process runs in its own session, so teardown can kill its whole process group
(pool processes included). Ports are picked by the servers (``--port 0``) and read
back from the ``ARGON READY`` line each server prints once it is ready (see
:mod:`argon.testing`, which the benchmarks share). Waits are conditions with
deadlines, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.subprocess
import pytest

from argon import Client, testing
from argon.testing import kill_group, read_ready, wait_for

__all__ = ["ARGON", "REPO", "ArgonProcess", "Network", "child_env", "kill_group", "wait_for"]

REPO = Path(__file__).resolve().parents[1]
ARGON = REPO / "bin" / "argon"
_counter = itertools.count(1)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for argon processes: no ARGON_* settings, this repository importable."""
    return testing.child_env(PYTHONPATH=str(REPO), **extra)


class ArgonProcess:
    """One ``bin/argon`` process, started in its own session."""

    def __init__(self, role: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 port: int = 0, wait: bool = True) -> None:
        self.role = role
        self.args = args
        self.log_path = log_dir / f"{role}-{next(_counter)}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.popen = gevent.subprocess.Popen(
            [sys.executable, str(ARGON), role, "--port", str(port), "--verbose", *args],
            stdout=gevent.subprocess.PIPE, stderr=self._log, env=env or child_env(),
            start_new_session=True, cwd=str(log_dir),
        )
        self.pid = self.popen.pid
        self.host = "127.0.0.1"
        self.port = port
        self.printed: list[str] = []  # what it printed on stdout before its ready line
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Read the ``ARGON READY`` line; fail with the process's log if it never comes."""
        try:
            _, self.host, self.port = read_ready(self.popen.stdout, timeout, self.role, self.printed)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and return its status."""
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (pool processes too) and reap."""
        kill_group(self.pid)
        with contextlib.suppress(gevent.subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        for pipe in (self.popen.stdout,):
            if pipe is not None:
                pipe.close()
        self._log.close()


class Network:
    """Starts managers, workers and clients for one test, and stops them all afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[ArgonProcess] = []
        self.clients: list[Client] = []

    def start(self, role: str, *args: str, env: dict[str, str] | None = None, port: int = 0,
              wait: bool = True) -> ArgonProcess:
        process = ArgonProcess(role, list(args), self.log_dir, env, port, wait)
        self.processes.append(process)
        return process

    def manager(self, *args: str, **kw: Any) -> ArgonProcess:
        return self.start("manager", *args, **kw)

    def worker(self, manager: ArgonProcess | None = None, *args: str, processes: int = 2, **kw: Any) -> ArgonProcess:
        extra = ["--manager", manager.address] if manager is not None else []
        if processes:
            extra += ["--workers", str(processes)]
        return self.start("worker", *extra, *args, **kw)

    def client(self, server: ArgonProcess, **kw: Any) -> Client:
        client = Client(server.host, server.port, **kw)
        self.clients.append(client)
        return client

    def wait_workers(self, client: Client, count: int, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the manager reports ``count`` registered workers; return its status."""
        return wait_for(lambda: (s := client.status()) and len(s["workers"]) == count and s,
                        timeout, 0.05, f"{count} registered workers")

    def cluster(self, workers: int = 1, processes: int = 2, manager_args: tuple[str, ...] = (),
                **client_kw: Any) -> tuple[ArgonProcess, list[ArgonProcess], Client]:
        """A manager, ``workers`` workers of ``processes`` processes each, and a client."""
        manager = self.manager(*manager_args)
        nodes = [self.worker(manager, processes=processes) for _ in range(workers)]
        client = self.client(manager, **client_kw)
        self.wait_workers(client, workers)
        return manager, nodes, client

    def logs(self) -> str:
        return "\n".join(f"--- {p.role} {p.pid} ---\n{p.log()}" for p in self.processes)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for process in self.processes:
            process.kill()


def make_key(path: Path) -> Path:
    """Write a new key to ``path`` with ``argon keygen`` (as a user would) and return the path."""
    made = gevent.subprocess.run([sys.executable, str(ARGON), "keygen", str(path)], env=child_env(),
                                 capture_output=True, timeout=30, check=False)
    assert made.returncode == 0, made.stderr.decode()
    return path


@pytest.fixture
def net(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Network]:
    """A :class:`Network` whose processes are killed when the test ends."""
    network = Network(tmp_path)
    try:
        yield network
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(network.logs())
        network.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="module")
def shared_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A manager with one 2-process worker, shared by one test module: its ``host:port``."""
    network = Network(tmp_path_factory.mktemp("shared"))
    try:
        manager = network.manager()
        network.worker(manager, processes=2)
        with Client(manager.address) as client:
            network.wait_workers(client, 1)
        yield manager.address
    finally:
        network.close()
