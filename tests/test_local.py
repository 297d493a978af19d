"""LocalCluster and ``argon local``: exact configuration, clean environment, prompt close, ready lines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import gevent
import gevent.subprocess
import psutil
import pytest

from argon import LocalCluster
from argon.osutil import parse_ready, ready_line
from argon.testing import child_env as clean_env
from argon.testing import kill_group, read_ready

from conftest import ARGON, child_env, wait_for


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
    return left


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def test_ready_lines_are_machine_readable():
    assert ready_line("manager", "127.0.0.1:8000") == "ARGON READY manager 127.0.0.1:8000"
    assert parse_ready(b"ARGON READY worker 10.0.0.2:8001\n") == ("worker", "10.0.0.2", 8001)
    assert parse_ready("ARGON READY manager [::1]:8000") == ("manager", "::1", 8000)
    assert parse_ready("argon manager listening on 127.0.0.1:8000") is None


def test_servers_print_their_ready_line_last(net):
    manager = net.manager("--metrics-port", "0")
    assert any(line.startswith("argon manager listening on") for line in manager.printed)
    assert any("metrics on http://" in line for line in manager.printed)  # printed before it: up already
    assert manager.port > 0


def test_child_env_drops_argon_settings_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("ARGON_KEY", "/nonexistent")
    monkeypatch.setenv("H10_PASSES_THROUGH", "yes")
    env = clean_env(EXTRA="1")
    assert "ARGON_KEY" not in env and env["H10_PASSES_THROUGH"] == "yes" and env["EXTRA"] == "1"


@pytest.mark.timeout(90)
def test_local_cluster_nodes_ignore_the_callers_argon_settings(monkeypatch, tmp_path):
    key = tmp_path / "argon.key"
    subprocess.run([sys.executable, str(ARGON), "keygen", str(key)], check=True, env=child_env(),
                   capture_output=True)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))  # a metrics port every node would try to bind, were it leaked
    held.listen()
    monkeypatch.setenv("ARGON_KEY", str(key))
    monkeypatch.setenv("ARGON_METRICS_PORT", str(held.getsockname()[1]))
    monkeypatch.setenv("ARGON_QUEUE_SIZE", "0")
    monkeypatch.setenv("H10_PASSES_THROUGH", "yes")
    try:
        with LocalCluster(nodes=2, workers=1) as cluster, cluster.client() as client:  # keyless
            seen = client.queue(lambda: (os.environ.get("H10_PASSES_THROUGH"), os.environ.get("ARGON_KEY")))
            assert seen == ("yes", None)
            assert client.status()["queue_size"] is None
    finally:
        held.close()


@pytest.mark.timeout(90)
def test_local_cluster_closes_every_node_at_once_within_its_grace():
    before = _descendants()
    grace = 3.0
    cluster = LocalCluster(nodes=4, workers=1, grace=grace)
    cluster.start()
    started = _descendants() - before
    try:
        with cluster.client() as client:
            long = [client.defer(time.sleep, [120]) for _ in range(4)]  # one per node
            wait_for(lambda: client.status()["busy"] == 4, 30, what="every node to be busy")
            began = time.monotonic()
            cluster.close()
            took = time.monotonic() - began
        # One node after another would take 4 x grace; the old SIGKILL raced a 30 s grace.
        assert took < grace + 5, f"close took {took:.1f}s"
        assert not _alive(started), "a process outlived LocalCluster.close"
        assert not any(d.done() and d.exception() is None for d in long)
    finally:
        cluster.close()
        for pid in _alive(started):
            kill_group(pid)


@pytest.mark.timeout(90)
def test_argon_local_honours_port_host_and_manager_options(tmp_path):
    host = "127.0.0.2"
    port, metrics = _free_port(host), _free_port(host)
    proc = gevent.subprocess.Popen(
        [sys.executable, str(ARGON), "local", "--host", host, "--port", str(port), "--metrics-port", str(metrics),
         "--worker-wait", "7", "--grace", "1", "--heartbeat", "0.5", "--workers", "1", "--nodes", "2", "--verbose"],
        stdout=gevent.subprocess.PIPE, stderr=open(tmp_path / "local.log", "wb"),  # noqa: SIM115
        env=child_env(), start_new_session=True,
    )
    try:
        role, got_host, got_port = read_ready(proc.stdout, 60, "argon local")
        assert (role, got_host, got_port) == ("local", host, port)
        from argon import Client

        with Client(host, port) as client:
            status = client.status()
        assert len(status["workers"]) == 2 and status["worker_wait"] == 7
        assert all(w["host"] == host for w in status["workers"])
        text = urllib.request.urlopen(f"http://{host}:{metrics}/metrics", timeout=10).read().decode()
        assert "argon_" in text
        nodes = [p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline()]
        assert len(nodes) == 2
        for node in nodes:  # every node got the common options, none of the manager's
            line = " ".join(node.cmdline())
            assert "--grace 1" in line and "--heartbeat 0.5" in line and "--verbose" in line
            assert "--metrics-port" not in line and "--worker-wait" not in line
        family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: not _alive(family), 30, what="the local network to exit")
        assert "registered with manager" in (tmp_path / "local.log").read_text()  # --verbose reached the nodes
    finally:
        kill_group(proc.pid)
        proc.wait()
        proc.stdout.close()


def test_argon_local_refuses_options_it_cannot_use():
    done = subprocess.run([sys.executable, str(ARGON), "local", "--manager", "127.0.0.1:1"], capture_output=True,
                          text=True, env=child_env(), timeout=60)
    assert done.returncode == 2 and "invalid arguments for 'argon local': --manager" in done.stderr
