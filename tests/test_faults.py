"""Failures of processes, workers, managers and links: nothing lost, nothing hangs."""

from __future__ import annotations

import os
import signal
import time

import pytest

from argon import Client, ConnectionLost, ProcessDied, TaskTimeout, WorkerLost

from conftest import wait_for

HEARTBEAT = 0.2  # seconds; a silent peer is dropped after 4 heartbeats
DETECTION_BOUND = HEARTBEAT * 4 + HEARTBEAT * 2  # misses, plus one check interval and a ping's slack


def _make_tasks():
    # Nested, so they travel by value (the workers cannot import this test module).
    def slow_echo(i, seconds):
        time.sleep(seconds)
        return i

    def record(path, i, seconds):
        with open(path, "a") as out:
            out.write(f"{i} {os.getpid()}\n")
        time.sleep(seconds)
        return i

    def kill_my_worker():
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)

    return slow_echo, record, kill_my_worker


slow_echo, record, kill_my_worker = _make_tasks()


def _busy(client, worker_port):
    rows = [w for w in client.status()["workers"] if w["port"] == worker_port]
    return rows[0]["busy"] if rows else 0


def test_kill_9_worker_with_tasks_in_flight(net):
    manager, (victim, _), client = net.cluster(workers=2, processes=2)
    deferreds = [client.defer(slow_echo, [i, 0.4]) for i in range(16)]
    wait_for(lambda: _busy(client, victim.port) == 2, what="the victim to run tasks")
    victim.signal(signal.SIGKILL)
    assert [d(timeout=60) for d in deferreds] == list(range(16))
    status = client.status()
    assert len(status["workers"]) == 1
    assert status["redelivered"] >= 2

    replacement = net.worker(manager, processes=2)
    net.wait_workers(client, 2)
    assert [d(timeout=60) for d in [client.defer(slow_echo, [i, 0.2]) for i in range(8)]] == list(range(8))
    rows = {w["port"]: w for w in client.status()["workers"]}
    assert rows[replacement.port]["completed"] > 0  # the returning worker takes tasks again


def test_sigstopped_worker_is_dropped_within_the_heartbeat_bound(net):
    hb = ("--heartbeat", str(HEARTBEAT))
    manager = net.manager(*hb)
    frozen = net.worker(manager, *hb, processes=2)
    net.worker(manager, *hb, processes=2)
    client = net.client(manager)
    net.wait_workers(client, 2)
    deferreds = [client.defer(slow_echo, [i, 0.3]) for i in range(12)]
    wait_for(lambda: _busy(client, frozen.port) == 2, what="the worker to be busy")
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: len(client.status()["workers"]) == 1, timeout=DETECTION_BOUND + 2, interval=0.02,
                 what="the frozen worker to be dropped")
        detected = time.monotonic() - stopped_at
        assert detected <= DETECTION_BOUND + 1.0, f"detected after {detected:.2f}s"
        assert [d(timeout=60) for d in deferreds] == list(range(12))  # its tasks completed elsewhere
    finally:
        frozen.signal(signal.SIGCONT)
    # Thawed, it notices the manager dropped it, reconnects and registers again.
    net.wait_workers(client, 2)
    assert [d(timeout=60) for d in [client.defer(slow_echo, [i, 0.1]) for i in range(8)]] == list(range(8))
    assert frozen.alive()


def test_manager_restart_on_the_same_port(net):
    manager, workers, client = net.cluster(workers=2, processes=2)
    port = manager.port
    deferreds = [client.defer(slow_echo, [i, 0.5]) for i in range(8)]
    wait_for(lambda: client.status()["busy"] == 4, what="tasks to be running")
    manager.signal(signal.SIGKILL)
    manager.wait()
    restarted = net.manager(port=port)
    # Workers re-register with the new manager on their own; the client re-sends its tasks.
    assert [d(timeout=60) for d in deferreds] == list(range(8))
    status = net.wait_workers(client, 2)
    assert {w["port"] for w in status["workers"]} == {w.port for w in workers}
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    assert restarted.alive()


def test_pending_tasks_fail_with_connection_lost_when_the_manager_stays_away(net):
    manager, _, client = net.cluster(reconnect_deadline=1.0)
    deferred = client.defer(slow_echo, [1, 5.0])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    manager.signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="no connection"):
        deferred(timeout=30)
    assert time.monotonic() - started < 10
    with pytest.raises(ConnectionLost):
        client.queue(lambda: 1)  # new work fails too, after the same deadline


def test_client_cannot_connect_gives_connection_lost():
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Client("127.0.0.1", 1, connect_timeout=2)


@pytest.mark.parametrize("fault, expected", [
    ("os._exit(7)", "exited with code 7"),
    ("__import__('ctypes').string_at(0)", "signal 11 (SIGSEGV)"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "signal 9 (SIGKILL)"),
])
def test_pool_process_faults_fail_one_task(net, fault, expected):
    _, _, client = net.cluster(processes=1)
    before = client.queue(os.getpid)
    code = compile(fault, "<fault>", "eval")
    with pytest.raises(ProcessDied, match=expected.replace("(", r"\(").replace(")", r"\)")):
        client.queue(lambda: eval(code, {"os": os, "signal": signal}))
    after = client.queue(os.getpid)  # the pool healed: a new process runs the next task
    assert after != before
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11


def test_pool_process_killed_from_outside(net):
    _, _, client = net.cluster(processes=1)
    pid = client.queue(os.getpid)
    deferred = client.defer(slow_echo, [1, 10.0])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ProcessDied, match=f"pool process {pid} was killed by signal 9"):
        deferred(timeout=30)
    assert client.queue(os.getpid) != pid


def test_wait_timeout_and_default_timeout(net):
    manager, _, client = net.cluster(processes=1)
    deferred = client.defer(slow_echo, [5, 1.0])
    with pytest.raises(TaskTimeout, match=r"within 0\.2s"):
        deferred(timeout=0.2)
    assert deferred(timeout=30) == 5  # the task went on; waiting again gets the value
    impatient = net.client(manager, timeout=0.2)
    with pytest.raises(TaskTimeout):
        impatient.queue(slow_echo, [1, 1.0])
    assert isinstance(TaskTimeout("x"), TimeoutError)


def test_task_time_limit_kills_the_process(net):
    _, _, client = net.cluster(processes=1)
    pid = client.queue(os.getpid)
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match="time limit"):
        client.queue(slow_echo, [1, 30.0], time_limit=0.5)
    assert time.monotonic() - started < 15
    assert client.queue(os.getpid) != pid  # the overdue process was replaced
    assert client.queue(slow_echo, [3, 0.1], time_limit=5) == 3


def test_max_requests_recycles_without_losing_tasks(net, tmp_path):
    manager = net.manager()
    worker = net.worker(manager, "--max-requests", "5", processes=2)
    client = net.client(manager)
    net.wait_workers(client, 1)
    log = tmp_path / "runs.txt"
    results = [d(timeout=60) for d in [client.defer(record, [str(log), i, 0.0]) for i in range(60)]]
    assert results == list(range(60))
    runs = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for i, _ in runs) == list(range(60))  # each ran exactly once
    pids = {pid for _, pid in runs}
    assert len(pids) >= 12  # 60 tasks / 5 per process
    assert net.client(worker).status()["workers"][0]["replaced"] >= 11


def test_task_that_keeps_killing_workers_fails_with_worker_lost(net):
    _manager, workers, client = net.cluster(workers=3, processes=1)
    with pytest.raises(WorkerLost, match="lost 3 times"):
        client.queue(kill_my_worker)
    # Each worker was SIGKILLed; this process may reap the last one a moment after the reply.
    wait_for(lambda: not any(w.alive() for w in workers), 10, what="every worker to be dead")
    assert client.status()["redelivered"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_drains_a_worker(net, signum):
    manager, (leaving, staying), client = net.cluster(workers=2, processes=2)
    deferreds = [client.defer(slow_echo, [i, 0.8]) for i in range(4)]
    wait_for(lambda: _busy(client, leaving.port) == 2, what="the worker to be busy")
    leaving.signal(signum)
    assert [d(timeout=60) for d in deferreds] == list(range(4))
    assert leaving.wait(30) == 0
    status = client.status()
    assert status["redelivered"] == 0  # it finished its own tasks
    assert [w["port"] for w in status["workers"]] == [staying.port]
    assert "left after draining" in manager.log()


def test_sigterm_to_the_whole_process_group_still_drains(net):
    # systemd (KillMode=control-group) and `kill -TERM -PGID` signal the pool processes too.
    _, (worker,), client = net.cluster(processes=2)
    deferreds = [client.defer(slow_echo, [i, 0.8]) for i in range(2)]
    wait_for(lambda: client.status()["busy"] == 2, what="both processes to be busy")
    os.killpg(worker.pid, signal.SIGTERM)
    assert [d(timeout=60) for d in deferreds] == [0, 1]  # no ProcessDied: the tasks finished
    assert worker.wait(30) == 0
    assert client.status()["redelivered"] == 0


def test_second_sigterm_forces_exit(net):
    manager, (worker,), client = net.cluster(processes=1)
    deferred = client.defer(slow_echo, [1, 30.0])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in worker.log(), what="the drain to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) != 0
    assert not deferred.done()  # the manager keeps the task for the next worker
    net.worker(manager, processes=1)
    assert deferred(timeout=60) == 1


def test_grace_period_bounds_the_drain(net):
    manager = net.manager()
    worker = net.worker(manager, "--grace", "0.5", processes=1)
    client = net.client(manager)
    net.wait_workers(client, 1)
    deferred = client.defer(slow_echo, [1, 30.0])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert time.monotonic() - started < 10
    assert "abandoning 1 tasks" in worker.log()
    assert not deferred.done()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_stops_a_manager_after_its_tasks(net, signum):
    manager, (worker,), client = net.cluster(processes=2)
    deferreds = [client.defer(slow_echo, [i, 0.5]) for i in range(2)]
    wait_for(lambda: client.status()["busy"] == 2, what="tasks to start")
    manager.signal(signum)
    assert [d(timeout=30) for d in deferreds] == [0, 1]
    assert manager.wait(30) == 0
    wait_for(lambda: "shutting down" in worker.log() or "lost manager" in worker.log(), what="the worker to notice")
    assert worker.alive()  # a worker outlives its manager and keeps trying to reconnect


def test_a_worker_registers_again_with_its_still_busy_processes_counted_busy(net):
    manager, _, client = net.cluster(processes=2)
    port = manager.port
    for i in range(2):
        client.defer(slow_echo, [i, 4.0])
    wait_for(lambda: client.status()["busy"] == 2, what="both processes busy")
    client.close()  # (so that nothing re-sends those two tasks)
    manager.signal(signal.SIGKILL)
    manager.wait()
    back = net.manager(port=port)
    fresh = net.client(back)
    status = net.wait_workers(fresh, 1, timeout=15)
    assert (status["capacity"], status["busy"]) == (2, 2)  # the tasks from before still hold both processes
    started = time.monotonic()
    assert fresh.queue(slow_echo, ["new", 0.0]) == "new"  # waits for one of them to finish
    assert time.monotonic() - started > 1.0


def test_a_result_whose_manager_is_gone_is_discarded_and_counted(net):
    manager, (worker,), client = net.cluster(processes=1)
    client.defer(slow_echo, [1, 1.5])
    wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
    manager.signal(signal.SIGKILL)
    wait_for(lambda: "discarding the result of task" in worker.log(), 15, what="the result to be discarded")
    assert "its connection to manager" in worker.log() and worker.alive()
    with Client(worker.host, worker.port) as direct:  # a managed worker answers status() itself
        assert direct.status()["discarded"] == 1


def test_worker_reconnects_when_the_manager_returns_later(net):
    manager, (worker,), _client = net.cluster(processes=1)
    port = manager.port
    manager.signal(signal.SIGKILL)
    manager.wait()
    wait_for(lambda: "cannot reach manager" in worker.log(), what="reconnection attempts")
    net.manager(port=port)
    fresh = net.client(net.processes[-1])
    status = net.wait_workers(fresh, 1, timeout=10)
    assert status["workers"][0]["port"] == worker.port
    assert fresh.queue(lambda: "back") == "back"
