"""Several managers: clients spread tasks over them and survive losing one; status shows them all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from argon import Client, LocalCluster

from conftest import ARGON, Network, child_env, wait_for


def _tasks():
    import time as _time

    def nap(value, seconds):
        _time.sleep(seconds)
        return value

    return nap


nap = _tasks()


def two_managers(net: Network, processes: int = 2) -> tuple[list, list]:
    """Two managers, each with a worker of its own."""
    managers = [net.manager(), net.manager()]
    workers = [net.worker(m, processes=processes) for m in managers]
    for manager in managers:
        with Client(manager.address) as c:
            net.wait_workers(c, 1)
    return managers, workers


def _kill_the_first_manager_mid_run(managers: list) -> list:
    """Run 2,000 tasks over every manager, SIGKILL the first once a quarter are done.

    Every task must still return its own value, with no exception; returns the client's
    manager links as they were at the end.
    """
    with Client([m.address for m in managers], reconnect_deadline=60) as client:
        deferreds = [client.defer(nap, [i, 0.005]) for i in range(2000)]
        wait_for(lambda: sum(d.done() for d in deferreds) >= 500, 60, what="a quarter of the results")
        managers[0].signal(signal.SIGKILL)
        assert [d(timeout=90) for d in deferreds] == list(range(2000))
        return list(client._links)


def _spread(managers: list) -> list[int]:
    """Run 2,000 short tasks through one client given every manager; each must return its own value.

    Returns how many tasks each manager has completed.
    """
    with Client(",".join(m.address for m in managers)) as client:
        deferreds = [client.defer(nap, [i, 0.001]) for i in range(2000)]
        assert [d(timeout=60) for d in deferreds] == list(range(2000))
    return [completed(m) for m in managers]


def completed(manager) -> int:
    with Client(manager.address) as c:
        return c.status()["completed"]


@pytest.mark.timeout(120)
def test_client_spreads_tasks_over_both_managers(net):
    managers, _ = two_managers(net)
    routed = _spread(managers)
    assert min(routed) > 200, f"both managers should have routed a fair share: {routed}"


@pytest.mark.timeout(120)
def test_losing_a_manager_mid_run_loses_no_task(net):
    managers, _ = two_managers(net)
    client_links = _kill_the_first_manager_mid_run(managers)
    assert not client_links[0].up
    # Restarted on its port, the manager gets its worker back within seconds.
    restarted = net.manager(port=managers[0].port)
    with Client(restarted.address) as c:
        net.wait_workers(c, 1, timeout=20)


@pytest.mark.timeout(120)
def test_status_of_several_managers_shows_a_lost_one_as_down(net):
    managers, _ = two_managers(net)
    both = ",".join(m.address for m in managers)

    def status() -> dict:
        done = subprocess.run([sys.executable, str(ARGON), "status", both, "--json"], capture_output=True,
                              text=True, timeout=60, env=child_env())
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    network = status()
    assert [m["up"] for m in network["managers"]] == [True, True]
    assert network["workers"] == 2 and network["capacity"] == 4
    managers[1].signal(signal.SIGKILL)
    managers[1].wait()
    network = status()
    assert [m["up"] for m in network["managers"]] == [True, False]
    assert network["managers"][1]["address"] == managers[1].address and network["managers"][1]["error"]
    assert network["workers"] == 1 and network["up"] == 1 and network["down"] == 1
    table = subprocess.run([sys.executable, str(ARGON), "status", both], capture_output=True, text=True,
                           timeout=60, env=child_env())
    assert table.returncode == 0, table.stderr
    assert f"manager {managers[1].address}  DOWN" in table.stdout
    assert "network: 1 of 2 managers up, 1 workers, capacity 2" in table.stdout


# -- workers that serve several managers ---------------------------------------------------------


def _make_logged():
    # Nested, so it travels by value: the workers cannot import this test module.
    def logged(path, value, seconds):
        import os as _os
        import time as _time

        start = _time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the host
        _time.sleep(seconds)
        end = _time.monotonic()
        with open(path, "a") as out:
            out.write(f"{start!r} {end!r} {_os.getpid()}\n")
        return value

    return logged


logged = _make_logged()


def shared_workers(net: Network, managers: int = 2, workers: int = 2, processes: int = 2) -> tuple[list, list]:
    """``managers`` managers and ``workers`` workers, each worker registered with every manager."""
    servers = [net.manager() for _ in range(managers)]
    every = ",".join(m.address for m in servers)
    nodes = [net.start("worker", "--manager", every, "--workers", str(processes)) for _ in range(workers)]
    for manager in servers:
        with Client(manager.address) as c:
            net.wait_workers(c, workers)
    return servers, nodes


@pytest.mark.timeout(120)
def test_workers_registered_with_both_managers_run_tasks_from_both(net):
    managers, _ = shared_workers(net)
    routed = _spread(managers)
    assert sum(routed) >= 2000 and min(routed) > 200, f"both managers should route a fair share: {routed}"
    for manager in managers:
        with Client(manager.address) as c:
            status = c.status()
            assert len(status["workers"]) == 2 and status["capacity"] == 4


@pytest.mark.timeout(120)
def test_killing_a_manager_loses_nothing_and_workers_register_again_when_it_returns(net):
    managers, workers = shared_workers(net)
    _kill_the_first_manager_mid_run(managers)
    for worker in workers:
        assert worker.alive()
        with Client(worker.address) as c:
            links = c.status()["managers"]
            assert [m["connected"] for m in links] == [False, True]
    # Restarted on its port, the manager gets both workers back within seconds, and routes again.
    restarted = net.manager(port=managers[0].port)
    with Client(restarted.address) as c:
        net.wait_workers(c, 2, timeout=10)
        assert [c.queue(nap, [i, 0.0]) for i in range(20)] == list(range(20))
    for worker in workers:
        with Client(worker.address) as c:
            assert wait_for(lambda c=c: all(m["connected"] for m in c.status()["managers"]), 10)


@pytest.mark.timeout(120)
def test_a_worker_serves_the_managers_it_reaches_and_joins_a_missing_one_when_it_starts(net):
    up = net.manager()
    with socket.socket() as probe:  # a port with no manager behind it (yet)
        probe.bind(("127.0.0.1", 0))
        missing = probe.getsockname()[1]
    worker = net.start("worker", "--workers", "2",
                       env=child_env(ARGON_MANAGER=f"{up.address},127.0.0.1:{missing}"))
    with Client(up.address) as c:
        net.wait_workers(c, 1)
        assert [c.queue(nap, [i, 0.0]) for i in range(10)] == list(range(10))
    with Client(worker.address) as c:
        assert [m["connected"] for m in c.status()["managers"]] == [True, False]
    late = net.manager(port=missing)
    with Client(late.address) as c:
        net.wait_workers(c, 1, timeout=10)
        assert [c.queue(nap, [i, 0.0]) for i in range(10)] == list(range(10))


@pytest.mark.timeout(120)
def test_two_managers_never_start_more_tasks_on_a_worker_than_it_has_processes(net, tmp_path):
    managers, _ = shared_workers(net, workers=1, processes=2)
    path = str(tmp_path / "spans.txt")
    clients = [net.client(m) for m in managers]
    deferreds = [
        client.defer(logged, [path, i, 0.002 * (i % 7)]) for i in range(300) for client in clients
    ]
    assert [d(timeout=60) for d in deferreds] == [i for i in range(300) for _ in clients]
    assert all(completed(m) == 300 for m in managers)
    events = []
    for line in Path(path).read_text().splitlines():
        start, end, _pid = line.split()
        events += [(float(start), 1), (float(end), -1)]
    assert len(events) == 1200
    running = most = 0
    for _when, step in sorted(events):  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    assert most == 2, f"at most 2 tasks may run at once on a 2-process worker, saw {most}"


@pytest.mark.timeout(120)
def test_a_busy_manager_cannot_starve_a_quiet_one(net):
    managers, _ = shared_workers(net, workers=1, processes=2)
    busy, quiet = (net.client(m) for m in managers)
    backlog = [busy.defer(nap, [i, 0.25]) for i in range(40)]  # 5 s of work for 2 processes
    wait_for(lambda: sum(d.done() for d in backlog) >= 4, 30, what="the busy manager's tasks to run")
    start = time.monotonic()
    assert quiet.queue(nap, ["quiet", 0.0]) == "quiet"
    waited = time.monotonic() - start
    left = sum(not d.done() for d in backlog)
    assert left >= 20, f"the backlog ran out too early to tell ({left} left)"
    assert waited < 1.5, f"the quiet manager's task waited {waited:.2f}s behind the busy one's backlog"
    assert [d(timeout=60) for d in backlog] == list(range(40))


# -- LocalCluster and argon local with several managers --------------------------------------------


@pytest.mark.timeout(120)
def test_local_cluster_with_two_managers_registers_every_node_with_both():
    with LocalCluster(nodes=2, workers=1, managers=2) as cluster:
        addresses = cluster.address.split(",")
        assert len(addresses) == 2 and len(set(addresses)) == 2
        for address in addresses:
            with Client(address) as c:
                assert len(c.status()["workers"]) == 2
        with cluster.client() as client:
            assert len(client.addresses) == 2
            deferreds = [client.defer(nap, [i, 0.001]) for i in range(400)]
            assert [d(timeout=60) for d in deferreds] == list(range(400))
        routed = []
        for address in addresses:
            with Client(address) as c:
                routed.append(c.status()["completed"])
        assert sum(routed) >= 400 and min(routed) > 0, routed
        family = {p.pid for p in cluster.processes}
    wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                             for pid in family), timeout=30, what="the local network to exit")


@pytest.mark.timeout(120)
def test_argon_local_with_two_managers():
    proc = subprocess.Popen([sys.executable, str(ARGON), "local", "--managers", "2", "--nodes", "1", "--workers", "1"],
                            stdout=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"2 managers listening on (\S+) with 1 worker node", line)
        assert found, line
        both = found.group(1)
        assert len(both.split(",")) == 2
        done = subprocess.run([sys.executable, str(ARGON), "status", both, "--json"], capture_output=True,
                              text=True, timeout=60, env=child_env())
        network = json.loads(done.stdout)
        assert [m["up"] for m in network["managers"]] == [True, True]
        assert network["workers"] == 1 and network["capacity"] == 1
        with Client(both) as client:
            assert [client.queue(nap, [i, 0.0]) for i in range(10)] == list(range(10))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


@pytest.mark.timeout(120)
def test_status_counts_a_worker_shared_by_two_managers_once(net):
    managers, _ = shared_workers(net, workers=1, processes=2)
    both = ",".join(m.address for m in managers)
    clients = [net.client(m) for m in managers]
    deferreds = [client.defer(nap, [i, 3.0]) for i in range(2) for client in clients]  # 4 tasks, 2 processes
    wait_for(lambda: all(c.status()["busy"] == 2 for c in clients), 20, what="both processes busy")
    done = subprocess.run([sys.executable, str(ARGON), "status", both, "--json"], capture_output=True,
                          text=True, timeout=60, env=child_env())
    network = json.loads(done.stdout)
    assert network["workers"] == 1 and network["capacity"] == 2
    assert network["busy"] == 2, "two processes run two tasks, whichever managers sent them"
    assert [d(timeout=60) for d in deferreds] == [0, 0, 1, 1]


@pytest.mark.timeout(120)
def test_a_task_refused_for_lack_of_workers_goes_to_a_manager_that_has_them(net):
    empty = net.manager("--worker-wait", "0.5")  # no worker will ever register here
    busy = net.manager()
    net.worker(busy, processes=2)
    with Client(busy.address) as c:
        net.wait_workers(c, 1)
    with Client(empty.address) as c:
        wait_for(lambda: c.status().get("no_workers_for", 0) > 0.6, 10, what="the empty manager's worker wait")
    with Client([empty.address, busy.address]) as client:
        results = [d(timeout=30) for d in [client.defer(nap, [i, 0.0]) for i in range(40)]]
        assert results == list(range(40))  # none failed with NoWorkers
    with Client(empty.address) as c:
        assert c.status()["completed"] == 0


def test_network_status_counts_only_the_busy_processes_of_a_draining_worker():
    """``argon status h1,h2``: busy never exceeds capacity while a shared worker drains."""
    from argon.status import combine

    def view(busy: int) -> dict:
        return {"workers": [{"id": "w1", "capacity": 4, "busy": busy, "draining": True},
                            {"id": "w2", "capacity": 2, "busy": 0, "draining": False}]}

    network = combine([("m1:1", view(1), ""), ("m2:2", view(3), "")])
    assert (network["capacity"], network["busy"]) == (5, 3)  # w1's 3 running processes, and w2's 2
