"""Everyday use: argon status, metrics, map/as_completed/cancel, LocalCluster, argon local, logs."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
import urllib.request

import gevent
import psutil
import pytest

from argon import LocalCluster, TaskCancelled
from argon.testing import read_ready

from conftest import ARGON, child_env, wait_for


def _make_tasks():
    def nap(value, seconds):
        time.sleep(seconds)
        return value

    return nap


nap = _make_tasks()


def argon(*args, timeout=60):
    return subprocess.run([sys.executable, str(ARGON), *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)


def test_status_table_and_json(net):
    manager, workers, client = net.cluster(workers=2, processes=2, manager_args=("--queue-size", "50"))
    assert [d() for d in [client.defer(lambda i: i, [i]) for i in range(10)]] == list(range(10))
    table = argon("status", manager.address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"manager {manager.address}")
    assert lines[1].split() == ["WORKER", "PROCS", "BUSY", "PREFETCHED", "DONE", "FAILED", "UPTIME", "MEMORY",
                                "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {w.address for w in workers}
    assert sum(int(row[4]) for row in rows.values()) == 10
    assert all(row[1] == "2" and row[3] == "0" and row[-1] == "ok" and row[-2].endswith("M") for row in rows.values())
    assert re.search(r"capacity 4 +busy 0 +prefetched 0 +queued 0/50 +completed 10 +failed 0 +rejected 0"
                     r" +[\d.]+ tasks/s", lines[-1])

    as_json = argon("status", manager.address, "--json")
    data = json.loads(as_json.stdout)
    assert data["completed"] == 10 and data["capacity"] == 4 and len(data["workers"]) == 2
    for row in data["workers"]:
        assert {"id", "host", "port", "capacity", "busy", "prefetched", "completed", "rss", "pool_rss",
                "processes"} <= set(row)


def test_status_watch_refreshes_in_place(net):
    manager, _, _ = net.cluster()
    watcher = gevent.subprocess.Popen([sys.executable, str(ARGON), "status", manager.address, "--watch", "0.2"],
                                      stdout=gevent.subprocess.PIPE, env=child_env(), start_new_session=True)
    output = b""
    try:
        with gevent.Timeout(30):
            while output.count(b"\x1b[H\x1b[2J") < 4:  # three complete refreshes
                output += watcher.stdout.read1(4096) if hasattr(watcher.stdout, "read1") else watcher.stdout.read(64)
    finally:
        os.killpg(watcher.pid, signal.SIGINT)
        assert watcher.wait(timeout=10) == 0
        watcher.stdout.close()
    frames = output.split(b"\x1b[H\x1b[2J")[1:]
    assert all(frame.startswith(f"manager {manager.address}".encode()) for frame in frames[:3])


def test_status_of_an_unreachable_server_fails_clearly():
    result = argon("status", "127.0.0.1:1")
    assert result.returncode == 2
    assert "cannot connect to 127.0.0.1:1" in result.stderr


def _scrape(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_prometheus_metrics_of_manager_and_worker(net):
    pytest.importorskip("prometheus_client")
    manager = net.manager("--metrics-port", "0", "--queue-size", "0")
    manager_metrics = next(line for line in manager.printed if "metrics on" in line).split()[-1]
    worker = net.worker(manager, "--metrics-port", "0", processes=1)
    worker_metrics = next(line for line in worker.printed if "metrics on" in line).split()[-1]
    client = net.client(manager, retries=0)
    net.wait_workers(client, 1)
    assert [client.queue(lambda i: i, [i]) for i in range(5)] == list(range(5))
    with pytest.raises(ZeroDivisionError):
        client.queue(lambda: 1 / 0)
    busy = client.defer(nap, [1, 1.0])
    wait_for(lambda: client.status()["busy"] == 1, what="the worker to be busy")
    rejected = client.defer(nap, [2, 0.0])
    with pytest.raises(Exception, match="queue is full"):
        rejected()
    assert busy() == 1

    text = _scrape(manager_metrics)
    assert _metric(text, "argon_tasks_total", role="manager", outcome="completed") == 6
    assert _metric(text, "argon_tasks_total", role="manager", outcome="failed") == 1
    assert _metric(text, "argon_tasks_total", role="manager", outcome="rejected") == 1
    assert _metric(text, "argon_workers_connected", role="manager") == 1
    assert _metric(text, "argon_capacity_processes", role="manager") == 1
    assert _metric(text, "argon_queue_depth", role="manager") == 0
    assert _metric(text, "argon_prefetched_tasks", role="manager") == 0
    assert _metric(text, "argon_redeliveries_total", role="manager") == 0
    assert _metric(text, "argon_task_latency_seconds_count", role="manager") == 7
    assert _metric(text, "argon_task_latency_seconds_bucket", role="manager", le="0.5") == 6  # the 1 s nap is slower
    assert _metric(text, "argon_task_latency_seconds_sum", role="manager") >= 1.0

    worker_text = _scrape(worker_metrics)
    assert _metric(worker_text, "argon_tasks_total", role="worker", outcome="completed") == 6
    assert _metric(worker_text, "argon_task_latency_seconds_count", role="worker") == 7


def test_map_keeps_order_and_bounds_the_window(net):
    _, _, client = net.cluster(processes=2)
    assert list(client.map(lambda x: x * 3, range(50), window=8)) == [x * 3 for x in range(50)]

    consumed = itertools.count()
    endless = (next(consumed) for _ in itertools.repeat(None))  # a million items or more: never materialized
    results = client.map(lambda x: x + 1, endless, window=100)
    most_in_flight = 0
    for expected, value in enumerate(itertools.islice(results, 3000), start=1):
        assert value == expected
        most_in_flight = max(most_in_flight, len(client._links.pending))
    results.close()
    assert most_in_flight <= 100
    assert next(consumed) <= 3000 + 100 + 1  # the input was read only as far as the window
    wait_for(lambda: not client._links.pending, what="cancelled leftovers to settle")


def test_map_raises_the_first_failure_in_order(net):
    _, _, client = net.cluster()
    results = client.map(lambda x: 10 // (x - 3), range(6), window=4)
    assert [next(results) for _ in range(3)] == [-4, -5, -10]
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_as_completed_yields_in_completion_order(net):
    _, _, client = net.cluster(processes=2)
    slow = client.defer(nap, ["slow", 0.8])
    fast = client.defer(nap, ["fast", 0.05])
    order = [d() for d in client.as_completed([slow, fast], timeout=30)]
    assert order == ["fast", "slow"]


def test_cancel_a_queued_task(net):
    _, _, client = net.cluster(processes=1)
    running = client.defer(nap, [1, 0.8])
    wait_for(lambda: client.status()["busy"] == 1, what="the first task to start")
    queued = client.defer(nap, [2, 0.0])
    wait_for(lambda: client.status()["queued"] == 1, what="the second task to queue")
    assert queued.cancel() is True
    with pytest.raises(TaskCancelled):
        queued(timeout=30)
    assert running.cancel() is False  # already running: it completes anyway
    assert not running.cancelled()
    assert running(timeout=30) == 1
    assert running.cancel() is False  # done already
    assert client.status()["queued"] == 0


def test_progress_bar_on_a_terminal(net, tmp_path):
    pytest.importorskip("tqdm")
    manager, _, _ = net.cluster()
    script = tmp_path / "progress.py"
    script.write_text(textwrap.dedent(f"""
        from argon import Client
        with Client("127.0.0.1", {manager.port}) as client:
            print(sum(client.map(lambda x: x, range(200), window=20, progress=True)))
    """))
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal needs a size
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=side, env=child_env())
    os.close(side)
    out, _ = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert proc.returncode == 0
    assert out.decode().strip() == str(sum(range(200)))
    assert b"200/200" in shown and b"task" in shown  # tqdm drew its bar on the terminal

    plain = subprocess.run([sys.executable, str(script)], capture_output=True, env=child_env(), timeout=60)
    assert plain.returncode == 0 and b"200/200" not in plain.stderr  # no bar when stderr is not a terminal


def _descendants():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_local_cluster_starts_and_stops_everything():
    before = _descendants()
    with LocalCluster(nodes=2, workers=2) as cluster, cluster.client() as client:
        started = _descendants() - before
        assert len(started) >= 2 + 4  # two workers and their four pool processes, plus the manager
        status = client.status()
        assert len(status["workers"]) == 2 and status["capacity"] == 4
        assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    wait_for(lambda: not (started & {p.pid for p in psutil.process_iter() if p.status() != psutil.STATUS_ZOMBIE}),
             timeout=30, what="every LocalCluster process to exit")


def test_argon_local_runs_until_interrupted(net):
    proc = gevent.subprocess.Popen([sys.executable, str(ARGON), "local", "--nodes", "2", "--workers", "1"],
                                   stdout=gevent.subprocess.PIPE, env=child_env(), start_new_session=True)
    try:
        role, host, port = read_ready(proc.stdout, 60, "argon local")
        assert role == "local"
        status = json.loads(argon("status", f"{host}:{port}", "--json").stdout)
        assert len(status["workers"]) == 2
        family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read().decode()
        wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                 for pid in family), timeout=30, what="the local network to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_json_log_lines(net):
    manager = net.manager("--log-format", "json")
    net.worker(manager, "--log-format", "json", processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)
    lines = [json.loads(line) for line in manager.log().splitlines() if line.strip()]
    assert lines, "no log lines"
    assert all({"time", "level", "component", "pid", "message"} <= set(entry) for entry in lines)
    assert any(e["component"] == "argon.manager" and "registered from 127.0.0.1:" in e["message"] for e in lines)
