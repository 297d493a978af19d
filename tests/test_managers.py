"""Several managers: clients spread tasks over them and survive losing one; status shows them all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from argon import Client

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


@pytest.mark.timeout(120)
def test_client_spreads_tasks_over_both_managers(net):
    managers, _ = two_managers(net)
    with Client(",".join(m.address for m in managers)) as client:
        deferreds = [client.defer(nap, [i, 0.001]) for i in range(2000)]
        assert [d(timeout=60) for d in deferreds] == list(range(2000))
    for manager in managers:
        with Client(manager.address) as c:
            assert c.status()["completed"] > 200, "both managers should have routed a fair share"


@pytest.mark.timeout(120)
def test_losing_a_manager_mid_run_loses_no_task(net):
    managers, _ = two_managers(net)
    with Client([m.address for m in managers], reconnect_deadline=60) as client:
        deferreds = [client.defer(nap, [i, 0.005]) for i in range(2000)]
        wait_for(lambda: sum(d.done() for d in deferreds) >= 500, 60, what="a quarter of the results")
        managers[0].signal(signal.SIGKILL)
        assert [d(timeout=90) for d in deferreds] == list(range(2000))
        assert not client._links[0].up
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
