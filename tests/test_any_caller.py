"""One Client for every caller: OS threads, greenlets, asyncio, concurrent.futures.

The test process is not monkey-patched, so the client runs its network loop in a thread
of its own; one test runs a monkey-patched program in a subprocess for the other mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import gevent
import pytest

from argon import Client, Deferred, ShuttingDown, TaskCancelled, TaskTimeout, defaults
from argon.client import parse_addresses

from conftest import Network, child_env, wait_for


def _tasks():
    import time as _time

    def nap(value, seconds):
        _time.sleep(seconds)
        return value

    def square(x):
        return x * x

    def boom(message):
        raise ValueError(message)

    return nap, square, boom


nap, square, boom = _tasks()


@pytest.fixture
def client(shared_address: str) -> Iterator[Client]:
    with Client(shared_address) as c:
        yield c


@pytest.mark.timeout(60)
def test_sixteen_threads_share_one_client(client):
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            results[n] = [client.queue(square, [n * 100 + i]) for i in range(50)]
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert results == {n: [(n * 100 + i) ** 2 for i in range(50)] for n in range(16)}
    assert time.monotonic() - started < 20  # 800 round trips: seconds, not a hang


@pytest.mark.timeout(60)
def test_thread_pool_executor_submitting_queue(client):
    # The 0.1.0 failure: LoopExit from a plain ThreadPoolExecutor.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.queue, square, [i]) for i in range(200)]
        assert [f.result(30) for f in futures] == [i * i for i in range(200)]


@pytest.mark.timeout(60)
def test_defer_overlaps_local_cpu_work(client):
    started = time.monotonic()
    deferred = client.defer(nap, [7, 1.0])
    spin_until = time.monotonic() + 1.1
    count = 0
    while time.monotonic() < spin_until:  # local CPU work, never yielding to gevent
        count += 1
    assert deferred(timeout=10) == 7
    elapsed = time.monotonic() - started
    assert elapsed < 1.8, f"the remote second did not overlap the local one: {elapsed:.2f}s"


@pytest.mark.timeout(60)
def test_greenlets_block_only_themselves(client):
    ticks = []

    def ticker() -> None:
        while len(ticks) < 1000:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    tick = gevent.spawn(ticker)
    try:
        waiters = [gevent.spawn(client.queue, nap, [i, 0.5]) for i in range(4)]
        gevent.joinall(waiters, timeout=20, raise_error=True)
        assert [g.value for g in waiters] == [0, 1, 2, 3]
        assert len(ticks) >= 20, "the other greenlet was blocked while the calls waited"
    finally:
        tick.kill()


@pytest.mark.timeout(60)
def test_asyncio_gather_keeps_the_loop_running(client):
    async def main() -> tuple[list[int], float]:
        stalls = []

        async def ticker(stop: asyncio.Event) -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                stalls.append(now - last)
                last = now

        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        results = await asyncio.gather(*(client.submit(nap, i, 0.01) for i in range(200)))
        stop.set()
        await tick
        return results, max(stalls)

    results, worst = asyncio.run(main())
    assert results == list(range(200))
    assert worst < 0.25, f"the event loop stalled for {worst:.3f}s"


@pytest.mark.timeout(60)
def test_deferred_is_a_future(client):
    deferred = client.submit(square, 12)
    assert isinstance(deferred, concurrent.futures.Future)
    assert isinstance(deferred, Deferred)
    seen = []
    deferred.add_done_callback(lambda f: seen.append(f.result()))
    assert deferred.result(timeout=10) == 144
    assert deferred() == 144 and deferred.done() and not deferred.running() and not deferred.cancelled()
    assert deferred.exception() is None
    wait_for(lambda: seen == [144], what="the done callback")
    late = []
    deferred.add_done_callback(lambda f: late.append(f.result()))  # already done: called at once
    assert late == [144]

    failing = client.submit(boom, "no")
    assert isinstance(failing.exception(timeout=10), ValueError)
    with pytest.raises(ValueError, match="no"):
        failing.result()

    batch = [client.submit(nap, i, 0.3 - i * 0.1) for i in range(3)]
    order = [f.result() for f in concurrent.futures.as_completed(batch, timeout=10)]
    assert sorted(order) == [0, 1, 2]
    done, not_done = concurrent.futures.wait(batch, timeout=10)
    assert done == set(batch) and not not_done


@pytest.mark.timeout(60)
def test_wait_timeout_is_a_timeout_error_and_the_task_goes_on(client):
    deferred = client.defer(nap, [5, 1.0])
    with pytest.raises(TimeoutError):
        deferred.result(timeout=0.05)
    with pytest.raises(concurrent.futures.TimeoutError):
        deferred(timeout=0.05)
    assert deferred.running()
    assert deferred(timeout=10) == 5


@pytest.mark.timeout(60)
def test_cancel_before_start_and_after(client):
    blockers = [client.defer(nap, [i, 1.5]) for i in range(2)]  # both processes busy
    wait_for(lambda: client.status()["busy"] == 2, what="both processes to be busy")
    queued = client.defer(nap, ["never", 0.0])
    wait_for(lambda: client.status()["queued"] == 1, what="the third task to queue")
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    with pytest.raises(TaskCancelled):
        queued()
    assert blockers[0].cancel() is False  # running: it finishes anyway
    assert [b(timeout=10) for b in blockers] == [0, 1]
    assert blockers[0].cancel() is False  # done


@pytest.mark.timeout(60)
def test_cancel_in_concurrent_futures_wait(client):
    blockers = [client.defer(nap, [i, 1.0]) for i in range(2)]
    wait_for(lambda: client.status()["busy"] == 2, what="both processes to be busy")
    queued = client.defer(nap, [9, 0.0])
    wait_for(lambda: client.status()["queued"] == 1, what="the task to queue")
    assert queued.cancel()
    done, _ = concurrent.futures.wait([queued], timeout=5)
    assert done == {queued}  # a cancelled Deferred counts as done for wait()
    assert [b(timeout=10) for b in blockers] == [0, 1]


@pytest.mark.timeout(60)
def test_as_completed_leaves_no_callbacks_behind(client):
    deferreds = [client.defer(nap, [i, 0.05 * i]) for i in range(6)]
    for first in client.as_completed(deferreds, timeout=10):
        assert first.done()
        break
    for deferred in deferreds:
        assert not deferred._done_callbacks
    assert [d(timeout=10) for d in deferreds] == list(range(6))


@pytest.mark.timeout(60)
def test_time_limit_and_the_deprecated_timeout(client):
    with pytest.raises(TaskTimeout, match=r"time limit|killed|exceeded|limit"):
        client.queue(nap, [1, 30.0], time_limit=0.5)
    with pytest.warns(DeprecationWarning, match="time_limit"):
        assert client.queue(nap, [2, 0.0], timeout=5) == 2
    assert client.defer(nap, [3, 0.0], time_limit=5)(timeout=10) == 3


@pytest.mark.timeout(60)
def test_bad_input_is_refused_cleanly(client):
    with pytest.raises(Exception) as info:
        client.defer(square, [(i for i in range(3))])  # neither pickle nor dill takes a generator
    assert "generator" in str(info.value).lower()
    assert client.queue(square, [3]) == 9  # nothing else disturbed


@pytest.mark.timeout(60)
def test_calls_after_close_fail_clearly(shared_address):
    client = Client(shared_address)
    client.close()
    with pytest.raises(ConnectionError, match="closed"):
        client.defer(square, [1])
    with pytest.raises(ConnectionError, match="closed"):
        client.status()


@pytest.mark.timeout(60)
def test_client_address_forms(shared_address):
    host, port = shared_address.rsplit(":", 1)
    for form in (shared_address, [shared_address], {"host": host, "port": int(port)}):
        with Client(**form) if isinstance(form, dict) else Client(form) as c:
            assert c.queue(square, [4]) == 16
    assert parse_addresses("a:1,b:2") == [("a", 1), ("b", 2)]
    assert parse_addresses("[::1]:9", 5) == [("::1", 9)]
    assert parse_addresses("h", 7) == [("h", 7)]
    with pytest.raises(ValueError):
        parse_addresses("a:x")
    # The contract's signature: Client(host="127.0.0.1", port=8000, key=None, key_file=None, retries=10)
    params = list(inspect.signature(Client).parameters.values())[:5]
    assert [(p.name, p.default) for p in params] == [
        ("host", "127.0.0.1"), ("port", 8000), ("key", None), ("key_file", None), ("retries", 10)]


@pytest.mark.timeout(90)
def test_a_monkey_patched_program_keeps_the_client_on_its_hub(shared_address, tmp_path):
    script = tmp_path / "patched.py"
    script.write_text(textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import threading, concurrent.futures
        from argon import Client
        with Client({shared_address!r}) as client:
            assert client._loop.thread is None, "patched: no thread of its own"
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                out = list(pool.map(lambda i: client.queue(lambda x: x + 1, [i]), range(40)))
            print(sum(out), threading.active_count())
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == str(sum(range(1, 41)))


@pytest.mark.timeout(60)
def test_unpatched_client_runs_its_loop_in_a_thread_and_stops_it(shared_address):
    before = threading.active_count()
    client = Client(shared_address)
    assert client._loop.thread is not None and client._loop.thread.daemon
    assert client.queue(square, [5]) == 25
    client.close()
    assert not client._loop.thread.is_alive()
    assert threading.active_count() == before


# -- the client's side of hardening (issue "Hardening": refusals and silent waits) --------------


@pytest.mark.timeout(60)
def test_status_after_the_servers_goodbye_fails_at_once(tmp_path):
    net = Network(tmp_path)
    try:
        manager = net.manager("--grace", "20")
        net.worker(manager, processes=1)
        client = net.client(manager)
        net.wait_workers(client, 1)
        running = client.defer(nap, [1, 3.0])  # keeps the manager draining after SIGTERM
        wait_for(lambda: client.status()["busy"] == 1, what="the task to start")
        manager.signal(signal.SIGTERM)
        wait_for(lambda: not client._links[0].up, 10, what="the manager's goodbye")
        started = time.monotonic()
        with pytest.raises(ShuttingDown):
            client.status()
        assert time.monotonic() - started < 1.0
        assert running(timeout=20) == 1  # a draining manager still delivers what it holds
    finally:
        net.close()


@pytest.mark.timeout(60)
def test_client_warns_when_tasks_wait_at_a_server_without_workers(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(defaults, "WAIT_CHECK", 0.2)
    monkeypatch.setattr(defaults, "WAIT_WARNING", 0.5)
    net = Network(tmp_path)
    try:
        manager = net.manager()
        client = net.client(manager)
        with caplog.at_level(logging.WARNING, logger="argon.client"):
            deferred = client.defer(square, [3])
            wait_for(lambda: "no workers registered" in caplog.text, 10, what="the client's warning")
        assert "1 tasks have waited" in caplog.text and manager.address in caplog.text
        net.worker(manager, processes=1)
        assert deferred(timeout=20) == 9  # the task was waiting, not lost
    finally:
        net.close()


def test_a_cancel_that_cannot_be_sent_leaves_the_task_to_finish_normally():
    """The connection closed under the Cancel: cancel() says False and the re-sent task's result still arrives."""
    from argon.errors import ConnectionLost
    from argon.links import Link, Links
    from argon.protocol import Result, Task
    from argon.serialize import dumps

    class Closed:
        def send(self, msg):
            raise ConnectionLost("closed")

    deferred = Deferred(None, Task(1, b"f", b"a"), 0)
    deferred.sent(time.monotonic())
    deferred.link = Link("127.0.0.1", 1)
    deferred.link.conn = Closed()
    verdict: concurrent.futures.Future = concurrent.futures.Future()
    Links.cancel(Links.__new__(Links), [deferred], [verdict])  # (touches nothing else of Links)
    assert verdict.result(0) is False
    deferred.deliver(Result(1, dumps(5)))  # its answer, after the client sent it again
    assert deferred.done() and deferred.result(0) == 5
