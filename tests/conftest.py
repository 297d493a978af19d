"""Fixtures that start real ``bin/argon`` processes on loopback and always clean them up.

Every process runs in its own session, so teardown can kill its whole process group
(pool processes included). Ports are picked by the servers (``--port 0``) and read
back from the line each server prints once it is ready. Waits are conditions with
deadlines, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.subprocess
import pytest

from argon import Client

REPO = Path(__file__).resolve().parents[1]
ARGON = REPO / "bin" / "argon"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
_counter = itertools.count(1)


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        gevent.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for argon processes: only the repository is importable (not tests/)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGON_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


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
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Read the 'listening on' line; fail with the process's log if it never comes."""
        with gevent.Timeout(timeout, AssertionError(f"{self.role} did not start:\n{self.log()}")):
            line = self.popen.stdout.readline().decode()
        match = LISTENING.search(line)
        assert match, f"{self.role} printed {line!r} instead of its address:\n{self.log()}"
        self.host, self.port = match.group(1), int(match.group(2))

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
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
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
