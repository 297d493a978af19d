"""The manager's routing and the flow policy, in process: no sockets, no sleeping.

A :class:`~argon.manager.Manager` is driven through the two methods its connections call
(``client_message`` and ``worker_message``) with stand-in links that record what the
manager sends. Simulated workers answer like real ones: they start tasks while they have
free processes, keep the rest waiting, hand back only tasks that have not started, and
finish tasks when the test says so. A fake clock stands in for ``time.monotonic``.

The model test runs hundreds of random event sequences against invariants: a task is held
by at most one live worker, no task sent beyond a worker's credit, ``busy`` never above
capacity, every task answered exactly once, and no task waits in a worker's prefetch
while a process is idle elsewhere once the messages in flight have been handled.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from typing import Any

import gevent
import pytest

from argon import defaults
from argon.connection import Connection
from argon.errors import ConnectionLost, ProtocolError
from argon.flow import Prefetch, Routes, offers
from argon.keepalive import Keepalive
from argon.manager import Manager
from argon.protocol import (
    VERSION,
    Bye,
    Cancel,
    Credit,
    Failure,
    Handback,
    Hello,
    NotCancelled,
    Ping,
    Reclaim,
    Register,
    Result,
    Task,
)
from argon.security import Session
from argon.server import ClientLink, ServerConfig
from argon.states import InvalidTransition, LinkState, ProcessState, WorkerState, advance
from argon.worker_link import WorkerLink

pytestmark = pytest.mark.timeout(10)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Link:
    """A connection stand-in: records what is sent, closes on demand."""

    def __init__(self, peer: str, role: str) -> None:
        self.peer = peer
        self.hello = Hello(VERSION, role, peer)
        self.closed = False
        self.reason = ""
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        if self.closed:
            raise ConnectionLost(f"{self.peer} is closed")
        self.sent.append(msg)

    reply = send

    def close(self, reason: str = "closed") -> None:
        self.closed, self.reason = True, reason

    def drain(self) -> list[Any]:
        sent, self.sent = self.sent, []
        return sent


class SimWorker:
    """A worker as the manager sees it from the wire, with processes that finish on demand."""

    def __init__(self, manager: Manager, name: str, capacity: int, prefetch: int = 0, free: int | None = None):
        self.manager = manager
        self.name = name
        self.capacity = capacity
        self.conn = Link(name, "worker")
        self.link = WorkerLink(self.conn)  # type: ignore[arg-type]
        self.running: list[int] = []
        self.waiting: deque[int] = deque()
        self.started: list[int] = []
        self.alive = True
        free = capacity if free is None else free
        manager.worker_message(self.link, Register(name, "127.0.0.1", 1, capacity, free, 1))
        if prefetch:
            self.credit(capacity + prefetch, capacity)

    def credit(self, window: int, processes: int) -> None:
        self.manager.worker_message(self.link, Credit(window, processes))

    def inbox(self) -> int:
        """Handle what the manager sent; return how many messages there were."""
        msgs = self.conn.drain()
        for msg in msgs:
            if type(msg) is Task:
                assert len(self.holds()) < self.link.window, f"{self.link} sent a task beyond its credit"
                self.waiting.append(msg.id)
            elif type(msg) is Reclaim:
                back = [self.waiting.pop() for _ in range(min(msg.limit, len(self.waiting)))][::-1]
                self.manager.worker_message(self.link, Handback(back, "reclaimed"))
            elif type(msg) is Cancel:  # dropped only if it has not started
                if msg.id in self.waiting:
                    self.waiting.remove(msg.id)
                    self.manager.worker_message(self.link, Handback([msg.id], "cancelled"))
                else:
                    self.manager.worker_message(self.link, NotCancelled(msg.id))
        self._start()
        return len(msgs)

    def _start(self) -> None:
        while self.waiting and len(self.running) < self.capacity:
            task_id = self.waiting.popleft()
            self.running.append(task_id)
            self.started.append(task_id)

    def finish(self, index: int = 0, fail: bool = False) -> int:
        task_id = self.running.pop(index)
        reply = Failure(task_id, "TaskError", "boom") if fail else Result(task_id, b"v%d" % task_id)
        self.manager.worker_message(self.link, reply)
        self._start()
        return task_id

    def hand_back_waiting(self) -> list[int]:
        back, self.waiting = list(self.waiting), deque()
        self.manager.worker_message(self.link, Handback(back, "waiting behind long tasks"))
        return back

    def lose(self) -> None:
        self.alive = False
        self.conn.close("lost")
        self.manager.drop_worker(self.link, "lost")

    def holds(self) -> list[int]:
        return [*self.running, *self.waiting]


class Sim:
    """A manager, its simulated workers and clients."""

    def __init__(self, queue_size: int | None = None, latency: Any = None, worker_wait: float = 60.0) -> None:
        self.clock = Clock()
        config = ServerConfig(queue_size=queue_size, worker_wait=worker_wait)
        self.manager = Manager(config, clock=self.clock, latency=latency)
        self.workers: list[SimWorker] = []
        self.clients: list[tuple[ClientLink, Link]] = []
        self.next_id = 0

    def worker(self, capacity: int, prefetch: int = 0, free: int | None = None) -> SimWorker:
        sim = SimWorker(self.manager, f"w{len(self.workers)}", capacity, prefetch, free)
        self.workers.append(sim)
        return sim

    def client(self) -> tuple[ClientLink, Link]:
        conn = Link(f"c{len(self.clients)}", "client")
        pair = (ClientLink(conn), conn)  # type: ignore[arg-type]
        self.clients.append(pair)
        return pair

    def submit(self, count: int = 1, client: int = 0) -> list[int]:
        while len(self.clients) <= client:
            self.client()
        link, _ = self.clients[client]
        ids = []
        for _ in range(count):
            self.next_id += 1
            self.manager.client_message(link, Task(self.next_id, b"f", b"a"))
            ids.append(self.next_id)
        return ids

    def settle(self) -> None:
        """Deliver what the manager sent until nothing is in flight."""
        gevent.sleep(0)  # what the manager does once the loop has handled what came in (a Reclaim)
        while sum(w.inbox() for w in self.workers if w.alive):
            gevent.sleep(0)

    def replies(self, client: int = 0) -> list[Any]:
        return [m for m in self.clients[client][1].sent if type(m) in (Result, Failure)]

    def status(self) -> dict[str, Any]:
        return self.manager.status()


# -- routing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacities", [(1,), (2,), (1, 1), (2, 1), (1, 3), (4, 4), (3, 1, 2), (5, 1, 1, 1)])
@pytest.mark.parametrize("tasks", [1, 2, 3, 5, 8, 13])
def test_each_task_goes_to_a_worker_with_the_most_idle_processes(capacities, tasks):
    sim = Sim()
    workers = [sim.worker(c) for c in capacities]
    for _ in range(tasks):
        idle = {w.name: w.capacity - len(w.holds()) for w in workers}
        sim.submit()
        sim.settle()
        got = [w for w in workers if w.conn is not None and w.started and w.started[-1] == sim.next_id]
        if max(idle.values()) > 0:
            assert len(got) == 1 and idle[got[0].name] == max(idle.values()), (idle, got)
        else:
            assert not got  # nobody has room: it waits in the manager
    assert sim.status()["queued"] == max(0, tasks - sum(capacities))


@pytest.mark.parametrize("capacity", [1, 2, 3])
@pytest.mark.parametrize("prefetch", [0, 1, 4])
@pytest.mark.parametrize("tasks", [1, 4, 9])
def test_a_worker_never_holds_more_than_its_credit_and_busy_never_exceeds_capacity(capacity, prefetch, tasks):
    sim = Sim()
    worker = sim.worker(capacity, prefetch)
    sim.submit(tasks)
    sim.settle()
    assert len(worker.holds()) == min(tasks, capacity + prefetch)
    status = sim.status()
    row = status["workers"][0]
    assert row["busy"] == min(tasks, capacity) <= row["capacity"]
    assert row["prefetched"] == len(worker.waiting) == max(0, min(tasks, capacity + prefetch) - capacity)
    assert status["queued"] == max(0, tasks - capacity - prefetch)


def test_prefetch_is_used_only_when_no_process_is_idle_anywhere():
    sim = Sim()
    deep = sim.worker(1, prefetch=8)
    wide = sim.worker(3)
    sim.submit(4)
    sim.settle()
    assert len(deep.running) == 1 and len(wide.running) == 3 and not deep.waiting  # every process first
    sim.submit(2)
    sim.settle()
    assert list(deep.waiting) == [5, 6]  # then the prefetch, since nobody else has room


def test_prefetch_fills_one_worker_s_credit_before_the_next_so_its_tasks_travel_together():
    sim = Sim()
    a, b = sim.worker(1, prefetch=4), sim.worker(1, prefetch=4)
    sim.submit(10)
    sim.settle()
    assert sorted(a.running + b.running) == [1, 2]  # every idle process first, one task each
    assert sorted([list(a.waiting), list(b.waiting)]) == [[3, 4, 5, 6], [7, 8, 9, 10]]  # not 3, 5, 7, 9
    a.finish()
    sim.submit(2)
    sim.settle()
    assert sorted(a.running + b.running) == [2, 3] and len(a.holds()) + len(b.holds()) == 10


@pytest.mark.parametrize("limit", [0, 1, 2, 5])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_queue_size_counts_tasks_waiting_in_the_manager_and_in_prefetch(limit, prefetch):
    sim = Sim(queue_size=limit)
    sim.worker(2, prefetch)
    sim.submit(2 + limit + 3)
    sim.settle()
    rejected = [m for m in sim.replies() if type(m) is Failure and m.error == "TaskRejected"]
    assert len(rejected) == 3
    status = sim.status()
    assert status["queued"] + status["prefetched"] == limit and status["busy"] == 2


def test_credit_changes_take_effect_at_once():
    sim = Sim()
    worker = sim.worker(2)
    sim.submit(6)
    sim.settle()
    assert len(worker.holds()) == 2 and sim.status()["queued"] == 4
    worker.credit(5, 2)  # more prefetch: the manager sends what fits straight away
    sim.settle()
    assert len(worker.holds()) == 5 and sim.status()["queued"] == 1
    worker.credit(2, 2)  # less: nothing is taken back, nothing more is sent until below it
    for _ in range(3):
        worker.finish()
        sim.settle()
    assert len(worker.holds()) == 2 and sim.status()["queued"] == 1
    worker.finish()
    sim.settle()
    assert len(worker.holds()) == 2 and sim.status()["queued"] == 0


@pytest.mark.parametrize(
    ("window", "processes"),
    [(3, 4), (-1, 0), (2, -1), (2, 3), (5, 5), (4 + defaults.MAX_PREFETCH + 1, 4), (1, 2)],
    ids=repr,
)
def test_a_credit_out_of_range_is_a_protocol_error(window, processes):
    sim = Sim()
    worker = sim.worker(4 if processes != 2 else 1)
    with pytest.raises(ProtocolError):
        worker.credit(window, processes)


@pytest.mark.parametrize("msg", [Result(1, b"v"), Credit(1, 1), Handback([1]), Bye("x"), Ping()], ids=repr)
def test_a_worker_must_register_first(msg):
    sim = Sim()
    link = WorkerLink(Link("raw", "worker"))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="before Register"):
        sim.manager.worker_message(link, msg)


@pytest.mark.parametrize(("capacity", "free"), [(0, 0), (2, 3), (2, -1), (-1, 0)])
def test_a_registration_out_of_range_is_a_protocol_error(capacity, free):
    sim = Sim()
    with pytest.raises(ProtocolError, match="bad registration"):
        sim.worker(capacity, free=free)


def test_registering_twice_on_one_link_is_a_protocol_error():
    sim = Sim()
    worker = sim.worker(1)
    with pytest.raises(ProtocolError, match="twice"):
        sim.manager.worker_message(worker.link, Register("other", "h", 1, 1, 1))


def test_a_worker_that_registers_again_replaces_its_old_link_and_its_tasks_are_resent():
    sim = Sim()
    old = sim.worker(1)
    sim.submit(1)
    sim.settle()
    assert old.running == [1]
    new = SimWorker(sim.manager, old.name, 1)  # the same id, on a new connection
    sim.workers.append(new)
    old.alive = False
    assert old.conn.closed and old.link.state is WorkerState.GONE
    sim.settle()
    assert new.running == [1]


# -- redelivery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("held", [1, 2, 5])
def test_tasks_of_a_lost_worker_go_back_to_the_front_of_the_queue(held):
    sim = Sim()
    doomed = sim.worker(held)
    sim.submit(held + 2)
    sim.settle()
    survivor = sim.worker(2)
    sim.settle()
    assert survivor.running == [held + 1, held + 2]
    doomed.lose()
    sim.settle()
    assert survivor.holds() == [held + 1, held + 2]  # still full: the lost ones wait first in line
    assert sim.status()["redelivered"] == held
    survivor.finish()
    sim.settle()
    assert survivor.running[-1] == 1  # the oldest lost task comes first


def test_a_task_lost_max_attempts_times_fails_with_worker_lost():
    sim = Sim()
    sim.submit(1)
    for _ in range(defaults.MAX_ATTEMPTS):
        worker = sim.worker(1)
        sim.settle()
        assert worker.running == [1]
        worker.lose()
    failures = [m for m in sim.replies() if type(m) is Failure]
    assert [f.error for f in failures] == ["WorkerLost"] and "lost 3 times" in failures[0].message


def test_tasks_a_lost_worker_held_unstarted_do_not_count_as_attempts():
    sim = Sim()
    sim.submit(3)
    for _ in range(defaults.MAX_ATTEMPTS + 2):  # lost again and again while tasks 2 and 3 wait in its prefetch
        worker = sim.worker(1, prefetch=4)
        sim.settle()
        assert worker.running == [1] and list(worker.waiting) == [2, 3]
        worker.lose()
        if [m for m in sim.replies() if type(m) is Failure]:
            break
    failures = [m for m in sim.replies() if type(m) is Failure]
    assert [(f.id, f.error) for f in failures] == [(1, "WorkerLost")]  # only the task that ran each time
    survivor = sim.worker(2)
    sim.settle()
    assert survivor.running == [2, 3]


def test_a_draining_worker_gets_nothing_new_and_its_returned_tasks_go_elsewhere():
    sim = Sim()
    leaving = sim.worker(1, prefetch=4)
    sim.submit(5)
    sim.settle()
    sim.manager.worker_message(leaving.link, Bye("draining"))
    staying = sim.worker(2)
    sim.settle()
    assert not staying.holds()  # the manager does not take tasks a draining worker holds
    leaving.hand_back_waiting()
    sim.settle()
    assert staying.running == [2, 3] and sim.status()["queued"] == 2
    status = sim.status()
    # Of a draining worker's processes only the one still running a task counts: busy
    # (2 here, 1 there) never exceeds capacity.
    assert (status["capacity"], status["busy"]) == (3, 3)
    leaving.finish()
    sim.settle()
    status = sim.status()
    assert (status["capacity"], status["busy"]) == (2, 2)  # its process is free: it counts no more


# -- steal-back ----------------------------------------------------------------------------------


def test_an_idle_process_takes_back_a_task_waiting_behind_a_long_one():
    sim = Sim()
    slow, fast = sim.worker(1, prefetch=8), sim.worker(1, prefetch=8)
    sim.submit(11)  # a long task, then ten short ones
    sim.settle()
    assert slow.running == [1] and fast.running == [2]
    assert len(slow.waiting) + len(fast.waiting) == 9 and slow.waiting
    while fast.running:  # the long task never finishes while the short ones run
        fast.finish()
        sim.settle()
    assert slow.running == [1] and not slow.waiting  # everything it held unstarted was taken back
    assert sorted(fast.started) == list(range(2, 12))
    assert sim.status()["handed_back"] >= 1


def test_a_returned_task_never_runs_twice_even_when_the_reclaim_comes_late():
    sim = Sim()
    a, b = sim.worker(1, prefetch=2), sim.worker(1)
    sim.submit(4)
    sim.settle()
    assert a.holds() == [1, 3, 4] and b.running == [2]
    b.finish()  # b is idle: the manager asks a for one of its two waiting tasks...
    gevent.sleep(0)  # (once the loop has handled what came in with b's result)
    reclaim = [m for m in a.conn.drain() if type(m) is Reclaim]
    assert reclaim == [Reclaim(1)]
    a.finish()  # ...but a finishes its task and starts task 3 before the request arrives
    a.conn.sent.extend(reclaim)
    a.inbox()  # so it hands back task 4, the one still waiting
    sim.settle()
    assert a.running == [3] and b.running == [4]
    a.finish()
    b.finish()
    assert sorted(a.started + b.started) == [1, 2, 3, 4]  # each ran exactly once
    assert sorted(r.id for r in sim.replies()) == [1, 2, 3, 4]


def test_processes_freed_in_one_loop_turn_share_one_reclaim():
    sim = Sim()
    deep = sim.worker(1, prefetch=8)
    others = [sim.worker(1) for _ in range(3)]
    sim.submit(12)
    sim.settle()
    assert deep.running == [1] and list(deep.waiting) == list(range(5, 13))
    for worker in others:  # their results arrive together
        worker.finish()
    gevent.sleep(0)
    reclaim = [m for m in deep.conn.drain() if type(m) is Reclaim]
    assert reclaim == [Reclaim(3)]  # one request for all three idle processes, not three
    deep.conn.sent.extend(reclaim)
    sim.settle()
    assert sorted(w.running[0] for w in others) == [10, 11, 12] and list(deep.waiting) == list(range(5, 10))


def test_no_reclaim_when_new_tasks_take_the_freed_processes_in_the_same_turn():
    sim = Sim()
    deep = sim.worker(1, prefetch=8)
    other = sim.worker(1)
    sim.submit(6)
    sim.settle()
    other.finish()
    sim.submit(1)  # arrives with the result: it takes the idle process
    sim.settle()
    assert other.running == [7] and not [m for m in deep.conn.sent if type(m) is Reclaim]
    assert sim.status()["handed_back"] == 0


def test_returned_tasks_do_not_count_as_attempts():
    sim = Sim()
    a = sim.worker(1, prefetch=4)
    sim.submit(3)
    sim.settle()
    for _ in range(defaults.MAX_ATTEMPTS + 2):
        a.hand_back_waiting()  # handed back again and again: never WorkerLost
        sim.settle()
    a.lose()
    b = sim.worker(3)
    sim.settle()
    assert sorted(b.running) == [1, 2, 3]
    assert not [m for m in sim.replies() if type(m) is Failure]


def test_a_returned_task_whose_client_left_is_forgotten():
    sim = Sim()
    a = sim.worker(1, prefetch=2)
    sim.submit(3)
    sim.settle()
    client, _ = sim.clients[0]
    sim.manager.client_gone(client)
    a.hand_back_waiting()
    sim.settle()
    assert sim.status()["queued"] == 0 and a.running == [1]


def test_cancel_drops_a_queued_or_prefetched_task_but_not_a_running_one():
    sim = Sim()
    worker = sim.worker(1, prefetch=2)  # holds 3: one running, two waiting behind it
    sim.submit(4)
    sim.settle()
    client, conn = sim.clients[0]
    assert len(worker.running) == 1 and len(worker.waiting) == 2 and sim.status()["queued"] == 1
    assert sim.manager.cancel(client, 4) is True  # queued in the manager: dropped at once
    assert sim.manager.cancel(client, 2) is None  # prefetched: the worker is asked
    assert sim.manager.cancel(client, 1) is None  # running: the worker is asked too
    assert sim.manager.cancel(client, 99) is False  # unknown
    sim.settle()
    cancelled = [(m.id, m.error) for m in sim.replies() if type(m) is Failure]
    assert cancelled == [(4, "TaskCancelled"), (2, "TaskCancelled")]
    assert [m.id for m in conn.sent if type(m) is NotCancelled] == [1]
    assert len(worker.waiting) == 1 and sim.status()["handed_back"] == 0  # dropped, not sent elsewhere
    worker.finish()
    sim.settle()
    worker.finish()
    assert sorted(m.id for m in sim.replies() if type(m) is Result) == [1, 3]
    assert len(worker.started) == 2  # the cancelled tasks never ran


@pytest.mark.parametrize("how", ["lost", "drained"])
def test_tasks_a_last_worker_gives_back_fail_with_no_workers_after_the_worker_wait(how):
    sim = Sim(worker_wait=0.05)
    worker = sim.worker(1, prefetch=1)  # one task running, one waiting behind it
    sim.submit(2)
    sim.settle()
    assert sim.status()["queued"] == 0
    if how == "lost":
        worker.lose()  # both go back to the queue, with no worker left
    else:
        sim.manager.worker_message(worker.link, Bye("draining"))
        worker.hand_back_waiting()
    sim.clock.now += 1.0  # --worker-wait has passed by the manager's clock
    gevent.sleep(0.2)  # (its timer counts real seconds: 0.05)
    failed = [m.id for m in sim.replies() if type(m) is Failure and m.error == "NoWorkers"]
    assert failed == ([1, 2] if how == "lost" else [2]) and sim.status()["queued"] == 0


def test_cancel_answered_by_a_worker_that_is_lost_first():
    sim = Sim()
    lost = sim.worker(1, prefetch=1)  # task 1 running, task 2 waiting behind it
    sim.submit(2)
    sim.settle()
    client, conn = sim.clients[0]
    assert sim.manager.cancel(client, 1) is None and sim.manager.cancel(client, 2) is None
    lost.conn.drain()  # the Cancels never arrive: the worker is lost
    lost.lose()
    # Task 2 never started: cancelled. Task 1 may have: too late to cancel, it runs again.
    assert [(m.id, m.error) for m in sim.replies() if type(m) is Failure] == [(2, "TaskCancelled")]
    assert [m.id for m in conn.sent if type(m) is NotCancelled] == [1]
    other = sim.worker(1)
    sim.settle()
    other.finish()
    assert [m.id for m in sim.replies() if type(m) is Result] == [1]


def test_latency_is_measured_with_the_injected_clock():
    class Histogram:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, seconds: float) -> None:
            self.seen.append(seconds)

    histogram = Histogram()
    sim = Sim(latency=histogram)
    worker = sim.worker(1)
    sim.submit(1)
    sim.settle()
    sim.clock.now += 2.5
    worker.finish()
    assert histogram.seen == [2.5]


# -- the model: random event sequences against the invariants ------------------------------------


def _check(sim: Sim) -> None:
    live = [w for w in sim.workers if w.alive]
    held = [task for w in live for task in w.holds()]
    assert len(held) == len(set(held)), "a task is held by two live workers"
    for w in live:
        row = w.link.row()
        assert 0 <= row.busy <= row.capacity and row.busy + row.prefetched == len(w.holds())
    routes = sim.manager._routes
    assert not (routes.idle and routes.waiting), "a task waits in a prefetch while a process is idle"


@pytest.mark.parametrize("seed", range(150))
def test_model_random_events(seed):
    rng = random.Random(seed)
    sim = Sim(queue_size=rng.choice([None, None, 3, 20]))
    for _ in range(rng.randint(1, 3)):
        sim.worker(rng.randint(1, 3), rng.choice([0, 0, 1, 4]))
    submitted: list[int] = []
    for _ in range(40):
        event = rng.random()
        live = [w for w in sim.workers if w.alive]
        if event < 0.35:
            submitted += sim.submit(rng.randint(1, 4))
        elif event < 0.75 and any(w.running for w in live):
            worker = rng.choice([w for w in live if w.running])
            worker.finish(rng.randrange(len(worker.running)), fail=rng.random() < 0.1)
        elif event < 0.82 and live:
            worker = rng.choice(live)
            worker.credit(worker.capacity + rng.choice([0, 1, 2, 8]), worker.capacity)
        elif event < 0.87 and live:
            rng.choice(live).hand_back_waiting()
        elif event < 0.91 and len(live) > 1:
            rng.choice(live).lose()
        elif event < 0.96:
            sim.worker(rng.randint(1, 3), rng.choice([0, 1, 4]))
        sim.settle()
        _check(sim)
    if not [w for w in sim.workers if w.alive]:
        sim.worker(2)
    while (busy := [w for w in sim.workers if w.alive and w.running]) or sim.status()["queued"]:
        if not busy:
            sim.worker(1)
        for worker in busy:
            worker.finish()
        sim.settle()
        _check(sim)
    answered = [m.id for m in sim.replies()]
    assert sorted(answered) == sorted(submitted), "every task is answered exactly once"


# -- the parts: routes, prefetch, states, heartbeats ------------------------------------------------


class Slot:
    def __init__(self, window: int, processes: int) -> None:
        self.inflight: dict[int, Any] = {}
        self.window, self.processes = window, processes
        self.routable = True
        self.idle = self.spare = self.waiting = self.reclaiming = 0


@pytest.mark.parametrize("workers", [1, 10, 1000])
def test_routes_pick_the_most_idle_then_the_most_spare_and_count_what_waits(workers):
    routes: Routes[Slot] = Routes()
    slots = [Slot(3, 2) for _ in range(workers)]
    for slot in slots:
        routes.update(slot)
    assert routes.idle == 2 * workers
    for n in range(3 * workers):
        slot = routes.take()
        assert slot is not None
        slot.inflight[n] = None
        routes.update(slot)
        if n < 2 * workers and workers <= 10:
            assert slot.idle + 1 >= max(s.idle for s in slots)
    assert routes.take() is None and routes.idle == 0 and routes.waiting == workers
    assert len(routes.prefetching) == workers
    slots[0].routable = False
    routes.update(slots[0])
    assert routes.waiting == workers - 1 and slots[0] not in routes.prefetching


@pytest.mark.parametrize(
    ("run_time", "processes", "depth"),
    [(None, 2, 0), (0.00005, 2, 64), (0.0005, 2, 8), (0.001, 2, 4), (0.0015, 2, 2), (0.003, 2, 1), (0.01, 2, 0),
     (0.05, 4, 0), (0.0005, 1, 4), (0.0001, 0, 0)],
)
def test_prefetch_depth_follows_how_long_tasks_take(run_time, processes, depth):
    prefetch = Prefetch(horizon=0.002, limit=64)
    for _ in range(40 if run_time is not None else 0):
        prefetch.observe(run_time)
    assert prefetch.depth(processes) == depth


@pytest.mark.parametrize("prefetch", [0, 3])
def test_one_manager_gets_a_steady_credit_however_busy_the_worker_is(prefetch):
    for running in range(5):
        assert offers(4, 4 - running, [running], prefetch) == [(4 + prefetch, 4)]


def test_every_idle_process_is_offered_to_every_manager():
    # 4 processes: manager 0 runs 2 tasks, manager 1 none, 2 processes idle: each may fill both.
    assert offers(4, 2, [2, 0], 0) == [(4, 4), (2, 2)]
    # No process idle: each manager may fill only what its own tasks hold.
    assert offers(4, 0, [3, 1], 0) == [(3, 3), (1, 1)]


@pytest.mark.parametrize(("prefetch", "managers"), [(1, 2), (2, 3), (5, 2), (64, 3)])
def test_the_prefetch_is_shared_and_every_manager_keeps_room_for_a_waiting_task(prefetch, managers):
    credits = offers(2, 0, [1, 1, 0][:managers], prefetch)
    extra = [window - processes for window, processes in credits]
    assert min(extra) >= 1, "a quiet manager needs room for one task in the worker's queue"
    assert sum(extra) == max(prefetch, managers)


@pytest.mark.parametrize("seed", range(20))
def test_offers_are_credits_a_manager_accepts(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 8)
    managers = rng.randint(1, 4)
    running = [0] * managers
    for _ in range(rng.randint(0, size)):
        running[rng.randrange(managers)] += 1
    free = size - sum(running)
    for window, processes in offers(size, free, running, rng.choice([0, 1, 4, defaults.MAX_PREFETCH])):
        sim = SimWorker(Manager(ServerConfig()), "w", size)
        sim.credit(window, processes)  # a ProtocolError here would close the worker's link
        assert sim.link.processes == processes <= size


@pytest.mark.parametrize(
    ("trip", "run_time", "depth"),
    [(None, 0.001, 4), (0.0005, 0.001, 4), (0.005, 0.001, 16), (0.005, 0.005, 4), (1.0, 0.001, 32),
     (1.0, 0.01, 4), (1.0, 0.05, 0), (0.005, 0.05, 0)],
)
def test_prefetch_covers_twice_the_round_trip_within_its_bounds(trip, run_time, depth):
    prefetch = Prefetch(horizon=0.002, max_horizon=0.02, limit=64)
    for _ in range(20):
        prefetch.observe(run_time)
        if trip is not None:
            prefetch.observe_round_trip(trip)
    assert prefetch.depth(2) == depth


def test_one_long_task_does_not_wipe_out_what_short_ones_taught():
    prefetch = Prefetch(horizon=0.002, limit=64)
    for _ in range(50):
        prefetch.observe(0.0001)
    prefetch.observe(30.0)
    assert prefetch.depth(2) == 32
    for _ in range(20):
        prefetch.observe(1.0)
    assert prefetch.depth(2) == 0  # long tasks now: no prefetch
    for _ in range(8):
        prefetch.observe(0.0001)
    assert prefetch.depth(2) == 32  # short again as soon as most recent ones are


@pytest.mark.parametrize(("usual", "youngest", "stuck"), [(None, 0.01, False), (None, 0.03, True),
                                                          (0.0001, 0.019, False), (0.005, 0.03, False),
                                                          (0.005, 0.05, True)])
def test_processes_count_as_stuck_when_even_the_newest_task_ran_far_longer_than_usual(usual, youngest, stuck):
    prefetch = Prefetch(stall_after=0.02)
    if usual is not None:
        for _ in range(40):
            prefetch.observe(usual)
    assert prefetch.stalled(youngest) is stuck


@pytest.mark.parametrize(
    ("state", "new", "ok"),
    [(ProcessState.STARTING, ProcessState.IDLE, True), (ProcessState.IDLE, ProcessState.BUSY, True),
     (ProcessState.BUSY, ProcessState.OVERDUE, True), (ProcessState.OVERDUE, ProcessState.IDLE, False),
     (ProcessState.DEAD, ProcessState.IDLE, False), (ProcessState.STARTING, ProcessState.BUSY, False),
     (WorkerState.CONNECTED, WorkerState.ACTIVE, True), (WorkerState.ACTIVE, WorkerState.CONNECTED, False),
     (WorkerState.DRAINING, WorkerState.ACTIVE, False), (WorkerState.DRAINING, WorkerState.GONE, True),
     (LinkState.SERVING, LinkState.LOST, True), (LinkState.LOST, LinkState.SERVING, False),
     (LinkState.DRAINING, LinkState.LOST, False), (WorkerState.ACTIVE, LinkState.DRAINING, False)],
    ids=repr,
)
def test_state_moves_follow_the_tables(state, new, ok):
    if ok:
        assert advance(state, new, "thing") is new
    else:
        with pytest.raises(InvalidTransition, match="thing"):
            advance(state, new, "thing")


def test_reprs_show_the_state():
    sim = Sim()
    worker = sim.worker(2, prefetch=3)
    assert "active" in repr(worker.link) and "0/5" in repr(worker.link)
    assert repr(WorkerState.DRAINING) == "WorkerState.DRAINING"


@pytest.fixture
def conn():
    ours, theirs = socket.socketpair()
    connection = Connection(theirs, "peer", Session(None, None, b""), heartbeat=1.0)
    connection.hello = Hello(VERSION, "worker", "peer", heartbeat=1.0)
    yield connection
    connection.close()
    ours.close()


def test_heartbeat_pings_an_idle_link_and_closes_a_silent_one(conn):
    conn.keepalive.configure(4, conn.hello.heartbeat, now=100.0)
    conn.reader.last_recv = conn.outbox.last_send = 100.0
    conn.keepalive.beat(now=100.5)
    assert conn.outbox.empty and not conn.closed  # not idle long enough for a ping
    conn.keepalive.beat(now=101.0)
    assert not conn.outbox.empty  # a ping is queued
    for now in (102.0, 103.0, 104.0):
        conn.keepalive.beat(now=now)
        assert not conn.closed
    conn.keepalive.beat(now=104.5)
    assert conn.closed and "no heartbeat" in conn.reason


def test_a_process_that_was_frozen_gives_its_peer_a_fresh_allowance(conn):
    conn.keepalive.configure(4, conn.hello.heartbeat, now=100.0)
    conn.reader.last_recv = conn.outbox.last_send = 100.0
    conn.keepalive.beat(now=110.0)  # ten seconds without a tick: this side was stopped, not the peer
    assert not conn.closed
    conn.keepalive.beat(now=111.0)
    assert not conn.closed


class _Half:
    """A stand-in for a reader or an outbox: just the fields a :class:`Keepalive` reads."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _keepalive(heartbeat=1.0):
    reader = _Half(peer="peer", last_recv=0.0, paused=False)
    outbox = _Half(queued=0, last_send=0.0, empty=True)
    sent, closed = [], []
    keepalive = Keepalive(reader, outbox, heartbeat, sent.append, closed.append)  # type: ignore[arg-type]
    return keepalive, reader, outbox, sent, closed


@pytest.mark.parametrize(
    ("peer", "interval"),
    [(0.5, 0.5), (2.0, 1.0), (0.0, 1.0), (0.001, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (float("inf"), 1.0)],
)
def test_heartbeat_runs_at_the_shorter_interval_and_ignores_a_bogus_peer_one(peer, interval):
    keepalive, *_ = _keepalive()
    assert keepalive.configure(4, peer, now=0.0) == interval
    assert keepalive.silence == 4.0  # misses count this side's heartbeats, whatever the interval


def test_heartbeat_with_no_misses_allowed_pings_but_never_closes():
    keepalive, _, outbox, sent, closed = _keepalive()
    keepalive.configure(0, now=0.0)
    for now in range(1, 100):
        keepalive.beat(now=float(now))
        outbox.last_send = float(now)
    assert not closed and len(sent) == 99 and all(type(msg) is Ping for msg in sent)


def test_heartbeat_sends_no_ping_while_something_waits_to_go():
    keepalive, _, outbox, sent, _ = _keepalive()
    keepalive.configure(4, now=0.0)
    outbox.empty, outbox.queued = False, 100
    keepalive.beat(now=1.0)
    assert not sent  # what waits goes first, and says the link is alive
    outbox.empty, outbox.queued = True, 0
    keepalive.beat(now=2.0)
    assert len(sent) == 1


def test_a_peer_we_stopped_reading_is_alive_while_it_takes_our_data():
    keepalive, reader, outbox, sent, closed = _keepalive()
    keepalive.configure(4, now=0.0)
    reader.paused, outbox.empty = True, False  # backpressure: its messages wait unread
    for now, queued in enumerate(range(10_000, 0, -1000), start=1):
        outbox.queued = queued  # ...but it reads ours
        keepalive.beat(now=float(now))
        assert not closed and reader.last_recv == (now if now > 1 else 0.0)  # the first beat sets the mark
    for now in range(11, 16):  # it stops reading ours too: silent
        keepalive.beat(now=float(now))
    assert closed == ["no heartbeat for 5.0s"] and not sent
