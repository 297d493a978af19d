"""Argon across separate network hosts: Linux network namespaces joined by a bridge.

The manager and two workers each run in their own namespace (their own address,
routes and loopback), plugged by veth pairs into a bridge that lives in a fourth
namespace; see :mod:`netns` for the picture. This test process is the client host: it
gets its own veth into the same bridge (one interface and one connected /24 route in
the root namespace, removed afterwards), so tests use :class:`argon.Client`
in-process, poll ``status()`` every 20 ms to time failure detection, and see the
exact exception types. A few checks also run a short script on a host namespace, to
show the same behaviour from a peer inside a namespace the test created.

The subnet is a 10.251.N.0/24 that overlaps nothing routed on this machine, and no
namespace has a default route, so no test traffic leaves the bridge or loopback.

Because no peer is on loopback, servers are started with a key made by ``argon keygen``
(the protected-mode tests start them without one on purpose).

These tests need root and iproute2; elsewhere they skip with the reason. The delay and
loss test uses ``tc netem`` where the kernel has it, and (as its second variant) a
user-space relay that delays and drops frames the same way, so that it also runs on
kernels built without ``sch_netem``.
"""

from __future__ import annotations

import ast
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.subprocess
import netns
import pytest

from argon import ArgonError, AuthenticationError, Client, defaults

from conftest import child_env, make_key, wait_for

pytestmark = pytest.mark.netns

HEARTBEAT = 0.25  # seconds, for the manager and every worker
MISSES = defaults.HEARTBEAT_MISSES
# Silent for MISSES heartbeats, noticed at the next keepalive check (one interval later),
# plus slack for scheduling and our 20 ms status polling.
DETECTION_BOUND = HEARTBEAT * MISSES + HEARTBEAT + 0.5
# After the link returns: a connect attempt already in flight may run out its timeout,
# then the worker waits at most the capped, jittered reconnect delay; plus slack.
REJOIN_BOUND = defaults.CONNECT_TIMEOUT + defaults.RECONNECT_MAX_DELAY * 1.2 + 3.0
DELAY = 0.2  # seconds added to each direction of the impaired link
LOSS = 0.05  # fraction of frames dropped in each direction


def _make_tasks():
    # Nested, so they travel by value (the workers cannot import this test module).
    def add(x, y):
        return x + y

    def slow_square(i, seconds):
        time.sleep(seconds)
        return i * i

    return add, slow_square


add, slow_square = _make_tasks()


class Lan:
    """The testbed plus the Argon key, processes and clients one test uses."""

    def __init__(self, bed: netns.Testbed, key: Path) -> None:
        self.bed = bed
        self.key = key
        self.clients: list[Client] = []

    def ip(self, host: str) -> str:
        return self.bed.hosts[host].ip

    def manager(self, *args: str, keyed: bool = True, heartbeat: float = HEARTBEAT) -> netns.ArgonNode:
        key = ("--key", str(self.key)) if keyed else ()
        return self.bed.argon("manager", "manager", "--host", self.ip("manager"), "--port", "0",
                              "--heartbeat", str(heartbeat), *key, *args)

    def worker(self, host: str, manager: netns.ArgonNode, *args: str, keyed: bool = True,
               heartbeat: float = HEARTBEAT, wait: bool = True) -> netns.ArgonNode:
        key = ("--key", str(self.key)) if keyed else ()
        return self.bed.argon(host, "worker", "--host", self.ip(host), "--port", "0", "--manager", manager.address,
                              "--workers", "2", "--heartbeat", str(heartbeat), *key, *args, wait=wait)

    def client(self, node: netns.ArgonNode, keyed: bool = True, **kw: Any) -> Client:
        client = Client(node.ip, node.port, key_file=str(self.key) if keyed else None, **kw)
        self.clients.append(client)
        return client

    def cluster(self, heartbeat: float = HEARTBEAT) -> tuple[netns.ArgonNode, dict[str, netns.ArgonNode], Client]:
        """A keyed manager on its host, a worker on each worker host, and a client here."""
        manager = self.manager(heartbeat=heartbeat)
        workers = {h: self.worker(h, manager, heartbeat=heartbeat) for h in ("worker1", "worker2")}
        client = self.client(manager)
        wait_workers(client, {self.ip("worker1"), self.ip("worker2")})
        return manager, workers, client

    def close(self) -> None:
        clients, self.clients = self.clients, []
        for client in clients:
            client.close()
        self.bed.close()


def worker_hosts(client: Client) -> set[str]:
    """The addresses the manager's registered workers connect from."""
    return {w["address"].rsplit(":", 1)[0] for w in client.status()["workers"]}


def wait_workers(client: Client, hosts: set[str], timeout: float = 30.0) -> float:
    """Wait until exactly ``hosts`` are registered; return how long it took."""
    started = time.monotonic()
    wait_for(lambda: worker_hosts(client) == hosts, timeout, 0.02, f"workers on exactly {sorted(hosts)}")
    return time.monotonic() - started


def rows_by_host(client: Client) -> dict[str, dict[str, Any]]:
    return {w["address"].rsplit(":", 1)[0]: w for w in client.status()["workers"]}


@contextlib.contextmanager
def hosts_on_a_bridge(
    tmp_path: Path, request: pytest.FixtureRequest, **hosts: Any
) -> Iterator[tuple[netns.Testbed, Path]]:
    """Host namespaces on a bridge and a key file; all removed afterwards (and checked to be)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    key = make_key(tmp_path / "argon.key")
    bed = netns.Testbed(tmp_path, child_env(), **hosts)
    try:
        yield bed, key
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(bed.logs())
        bed.close()
        assert bed.leftovers() == [], "namespaces or links survived the teardown"
        assert netns.ip("-4", "-o", "addr", "show", "to", str(bed.subnet)) == ""


@pytest.fixture
def lan(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lan]:
    """Three host namespaces (a manager, two workers) on a bridge, and a key file."""
    with hosts_on_a_bridge(tmp_path, request) as (bed, key):
        network = Lan(bed, key)
        try:
            yield network
        finally:
            network.close()


# -- tasks across hosts ---------------------------------------------------------------------


def test_tasks_run_across_separate_hosts(lan):
    manager, workers, client = lan.cluster()
    assert manager.ip == lan.ip("manager") and manager.ip != "127.0.0.1"
    deferreds = [client.defer(slow_square, [i, 0.02]) for i in range(60)]
    assert [d(timeout=60) for d in deferreds] == [i * i for i in range(60)]
    assert client.queue(add, [4, 7]) == 11
    rows = rows_by_host(client)
    assert set(rows) == {lan.ip("worker1"), lan.ip("worker2")}
    assert all(row["completed"] > 0 for row in rows.values()), rows  # both hosts did work
    assert {row["host"] for row in rows.values()} == {w.ip for w in workers.values()}


# -- cutting a link ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side", ["switch", "host"], ids=["switch-port-down", "host-nic-down"])
def test_cut_worker_is_dropped_within_heartbeat_bound_and_rejoins(lan, side):
    _, _, client = lan.cluster()
    w1, w2 = lan.ip("worker1"), lan.ip("worker2")
    assert client.queue(add, [1, 2]) == 3
    deferreds = [client.defer(slow_square, [i, 0.3]) for i in range(24)]
    wait_for(lambda: rows_by_host(client).get(w1, {}).get("busy") == 2, what="worker1 to run tasks")

    lan.bed.cut("worker1", side)
    cut_at = time.monotonic()
    wait_for(lambda: worker_hosts(client) == {w2}, DETECTION_BOUND + 5, 0.02, "the cut worker to be dropped")
    detected = time.monotonic() - cut_at
    print(f"[{side}] cut worker dropped after {detected:.2f}s (bound {DETECTION_BOUND:.2f}s)")
    assert detected <= DETECTION_BOUND, f"dropped after {detected:.2f}s; bound {DETECTION_BOUND:.2f}s"
    # Everything, including what worker1 was running when cut, completes on worker2.
    assert [d(timeout=60) for d in deferreds] == [i * i for i in range(24)]
    assert client.status()["redelivered"] >= 2
    # The network goes on with one worker; meanwhile worker1's reconnect delay grows to its cap.
    status = client.status()
    assert status["capacity"] == 2 and worker_hosts(client) == {w2}
    deferreds = [client.defer(slow_square, [i, 0.2]) for i in range(30)]
    assert [d(timeout=60) for d in deferreds] == [i * i for i in range(30)]
    print(f"[{side}] link down for {time.monotonic() - cut_at:.1f}s")

    lan.bed.mend("worker1", side)
    rejoined = wait_workers(client, {w1, w2}, REJOIN_BOUND + 10)
    print(f"[{side}] worker rejoined {rejoined:.2f}s after the link came back (bound {REJOIN_BOUND:.1f}s)")
    assert rejoined <= REJOIN_BOUND
    deferreds = [client.defer(slow_square, [i, 0.05]) for i in range(40)]
    assert [d(timeout=60) for d in deferreds] == [i * i for i in range(40)]
    assert rows_by_host(client)[w1]["completed"] > 0  # the rejoined worker takes tasks again


# -- delay and loss ------------------------------------------------------------------------------


def _round_trip(client: Client) -> float:
    started = time.monotonic()
    assert client.queue(add, [20, 22]) == 42
    return time.monotonic() - started


@pytest.fixture(params=["netem", "relay"], ids=["tc-netem", "userspace-relay"])
def impairment(request: pytest.FixtureRequest) -> str:
    """How to add delay and loss; skips (before building the testbed) where it cannot."""
    how = request.param
    reason = netns.netem_unavailable_reason() if how == "netem" else netns.packet_relay_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return how


@pytest.mark.timeout(180)
def test_tasks_complete_over_a_delayed_lossy_link(impairment, lan):
    how = impairment
    _, _, client = lan.cluster()
    w1, w2 = lan.ip("worker1"), lan.ip("worker2")
    baseline = min(_round_trip(client) for _ in range(5))

    # Every message crosses the manager's link: client -> manager -> worker -> manager -> client.
    lan.bed.impair("manager", DELAY, LOSS, how)
    try:
        impaired = min(_round_trip(client) for _ in range(3))
        print(f"[{how}] queue() round trip {baseline * 1000:.1f} ms -> {impaired * 1000:.0f} ms"
              f" with {DELAY * 1000:.0f} ms and {LOSS:.0%} loss each way on the manager's link")
        assert impaired >= 4 * DELAY, f"round trip {impaired:.3f}s crosses the delayed link four times"
        started = time.monotonic()
        deferreds = [client.defer(slow_square, [i, 0.05]) for i in range(60)]
        assert [d(timeout=120) for d in deferreds] == [i * i for i in range(60)]
        elapsed = time.monotonic() - started
        status = client.status()
        print(f"[{how}] 60 tasks in {elapsed:.1f}s; redelivered {status['redelivered']},"
              f" workers {sorted(worker_hosts(client))}")
    finally:
        stats = lan.bed.unimpair("manager")
        if stats:
            print(f"[{how}] {stats}")
    wait_workers(client, {w1, w2})
    # Frames the impairment held when it was removed are retransmitted; then LAN speed again.
    wait_for(lambda: _round_trip(client) < DELAY, 15, 0, "round trips to lose the added delay")


# -- protected mode: no key, non-loopback peers -----------------------------------------------------


def _read_all(sock: Any, limit: int = 4096) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(limit)
        if not chunk:
            return data
        data += chunk
    return data


REFUSAL_SCRIPT = """
import socket
sock = socket.create_connection(({host!r}, {port}), timeout=10)
data = b""
while chunk := sock.recv(4096):
    data += chunk
print(repr(data))
"""


GREETING_SCRIPT = """
import socket
sock = socket.create_connection(({host!r}, {port}), timeout=10)
print(sock.makefile("rb").readline().decode(), end="")
"""


def _check_refusal(data: bytes, peer_ip: str) -> None:
    assert data.startswith(b"ARGON 1 refused "), data
    assert data.endswith(b"\n") and data.count(b"\n") == 1, f"not one line: {data!r}"
    text = data.decode()
    assert "argon keygen" in text and "--key" in text and "--insecure" in text, text
    assert peer_ip in text, text


def test_protected_mode_refuses_peers_from_other_hosts(lan):
    manager = lan.manager(keyed=False)
    warning = wait_for(
        lambda: [line for line in manager.log().splitlines() if "without a key" in line],
        10, what="the manager's warning about having no key",
    )[0]
    assert "WARNING" in warning and manager.ip in warning and "argon keygen" in warning, warning

    # A client on another host (this test process, at the client address).
    with pytest.raises(AuthenticationError) as info:
        lan.client(manager, keyed=False, connect_timeout=10)
    message = str(info.value)
    assert "argon keygen" in message and "--key" in message, message

    # The refusal on the wire, read with a plain socket from here...
    with gevent.socket.create_connection((manager.ip, manager.port), timeout=10) as sock:
        _check_refusal(_read_all(sock), lan.bed.client_ip)
    # ...and from a peer inside one of the test's namespaces.
    out = lan.bed.python("worker2", REFUSAL_SCRIPT.format(host=manager.ip, port=manager.port))
    _check_refusal(ast.literal_eval(out), lan.ip("worker2"))

    # A keyless worker on another host is refused too, and says why in its log.
    worker = lan.worker("worker1", manager, keyed=False)
    complaint = wait_for(
        lambda: [line for line in worker.log().splitlines() if "cannot reach manager" in line and "refused" in line],
        15, what="the worker to report the refusal",
    )[0]
    assert "argon keygen" in complaint and "--key" in complaint, complaint
    wait_for(lambda: "refused a non-loopback peer" in manager.log(), 10, what="the manager to log the refusals")
    assert " registered " not in manager.log()
    assert manager.alive() and worker.alive()


def test_insecure_manager_admits_peers_from_other_hosts(lan):
    manager = lan.manager("--insecure", keyed=False)
    lan.worker("worker1", manager, keyed=False)
    client = lan.client(manager, keyed=False, connect_timeout=10)
    wait_workers(client, {lan.ip("worker1")})
    assert client.queue(add, [4, 7]) == 11
    assert "only loopback peers will be admitted" not in manager.log()
    out = lan.bed.python("worker2", GREETING_SCRIPT.format(host=manager.ip, port=manager.port))
    assert out == "ARGON 1 open\n"  # the server's first line: no key needed, no refusal


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (orphans wait for init to reap them)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_teardown_removes_every_namespace_and_process(lan):
    bed = lan.bed
    names = [h.ns for h in bed.hosts.values()] + [bed.switch]
    listed = netns.ip("netns", "list")
    assert all(name in listed for name in names)
    manager = lan.manager()
    worker = lan.worker("worker1", manager)
    client = lan.client(manager)
    wait_workers(client, {lan.ip("worker1")})
    pids = [int(pid) for ns in names for pid in netns.ip("netns", "pids", ns).split()]
    assert len(pids) >= 4  # manager, worker and the worker's pool processes
    lan.close()
    assert bed.leftovers() == []
    assert not manager.alive() and not worker.alive()
    assert not [pid for pid in pids if _running(pid)], "processes survived the teardown"
    listed = netns.ip("netns", "list")
    assert not any(name in listed for name in names)
    assert netns.ip("-4", "-o", "addr", "show", "to", str(bed.subnet)) == ""


# -- several managers on several hosts -----------------------------------------------------------

MANAGER_HOSTS = ("manager1", "manager2", "manager3")


@pytest.fixture
def three_managers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[netns.Testbed, Path]]:
    """Three manager hosts and two worker hosts on a bridge, and a key file."""
    with hosts_on_a_bridge(tmp_path, request, hosts=(*MANAGER_HOSTS, "worker1", "worker2")) as made:
        yield made


@pytest.mark.timeout(180)
def test_three_managers_a_partition_cuts_one_off_the_rest_carry_on_and_it_rejoins(three_managers):
    bed, key = three_managers
    common = ("--port", "0", "--heartbeat", str(HEARTBEAT), "--key", str(key))
    managers = [bed.argon(host, "manager", "--host", bed.hosts[host].ip, *common) for host in MANAGER_HOSTS]
    every = ",".join(m.address for m in managers)
    for host in ("worker1", "worker2"):
        bed.argon(host, "worker", "--host", bed.hosts[host].ip, "--manager", every, "--workers", "2", *common)
    alone = [Client(m.ip, m.port, key_file=str(key)) for m in managers]  # each manager's own view
    client = Client(every, key_file=str(key), reconnect_deadline=60)
    workers = {bed.hosts["worker1"].ip, bed.hosts["worker2"].ip}
    try:
        for one in alone:
            wait_workers(one, workers)
        deferreds = [client.defer(slow_square, [i, 0.1]) for i in range(120)]
        wait_for(lambda: alone[2].status()["busy"] > 0, 30, 0.02, "manager3 to have tasks running")

        bed.cut("manager3")  # manager3's host is cut off from the clients and the workers
        cut_at = time.monotonic()
        # The client resends what manager3 held through the other two: every task completes.
        assert [d(timeout=90) for d in deferreds] == [i * i for i in range(120)]
        print(f"120 tasks done {time.monotonic() - cut_at:.2f}s after the cut")
        assert not client._links[2].up
        # On this side of the partition both workers serve managers 1 and 2 as before.
        for one in alone[:2]:
            assert worker_hosts(one) == workers
        before = [one.status()["completed"] for one in alone[:2]]
        deferreds = [client.defer(slow_square, [i, 0.01]) for i in range(100)]
        assert [d(timeout=60) for d in deferreds] == [i * i for i in range(100)]
        after = [one.status()["completed"] for one in alone[:2]]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        bed.mend("manager3")
        mended_at = time.monotonic()
        # It rejoins: both workers register with it again and the client sends it tasks again.
        wait_for(lambda: _quietly(lambda: worker_hosts(alone[2])) == workers, REJOIN_BOUND + 10, 0.05,
                 "the workers to register with manager3 again")
        rejoined = time.monotonic() - mended_at
        print(f"workers registered with manager3 {rejoined:.2f}s after the partition healed")
        assert rejoined <= REJOIN_BOUND
        wait_for(lambda: client._links[2].up, 30, 0.05, "the client to reconnect to manager3")
        start = alone[2].status()["completed"]
        deferreds = [client.defer(slow_square, [i, 0.01]) for i in range(200)]
        assert [d(timeout=60) for d in deferreds] == [i * i for i in range(200)]
        assert alone[2].status()["completed"] > start, "manager3 should take its share again"
    finally:
        client.close()
        for one in alone:
            one.close()


def _quietly(ask: Any) -> Any:
    """``ask()``, or None while the manager cannot answer (its link is still down or reconnecting)."""
    try:
        return ask()
    except ArgonError:
        return None
