"""The core network end to end: real manager and worker processes on loopback."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import time

import gevent
import pytest

from argon import ProtocolError, RemoteError, TaskRejected
from argon.errors import RemoteTraceback
from argon.pool import default_size

from conftest import child_env, wait_for


def test_queue_canonical_example(net):
    _, _, client = net.cluster()
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11


def test_defer_canonical_example(net):
    _, _, client = net.cluster()
    deferred = client.defer(lambda x, y: x + y, [4, 7])
    assert callable(deferred)
    assert deferred() == 11
    assert deferred() == 11  # a second call returns the same value


def test_kwargs_and_none_result(net):
    _, _, client = net.cluster()
    assert client.queue(lambda a, b=1: a * b, [3], {"b": 5}) == 15
    assert client.queue(lambda: None) is None


def test_queue_reraises_task_error_with_remote_traceback(net):
    _, _, client = net.cluster()

    def fails(x):
        raise ValueError(f"bad value {x}")

    with pytest.raises(ValueError, match="bad value 3") as info:
        client.queue(fails, [3])
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fails" in cause.text and "ValueError" in cause.text


def test_deferred_raises_only_when_called(net):
    _, _, client = net.cluster()
    deferred = client.defer(lambda: 1 / 0)
    wait_until = time.monotonic() + 10
    while not deferred.done() and time.monotonic() < wait_until:
        gevent.sleep(0.01)
    assert deferred.done()  # the failure has arrived, and defer() did not raise it
    with pytest.raises(ZeroDivisionError):
        deferred()
    with pytest.raises(ZeroDivisionError):
        deferred()


def test_unrebuildable_exception_becomes_remote_error(net):
    _, _, client = net.cluster()

    def fails():
        class Strict(Exception):
            def __init__(self, message, code):  # pickle cannot call this with args alone
                super().__init__(message)
                self.code = code

        raise Strict("cannot be rebuilt from its args", 7)

    with pytest.raises(RemoteError, match="cannot be rebuilt") as info:
        client.queue(fails)
    assert "Strict" in info.value.type_name
    assert "fails" in info.value.remote_traceback


def test_code_from_a_module_the_worker_cannot_import(net, tmp_path):
    source = tmp_path / "private_mod" / "unimportable_tasks.py"
    source.parent.mkdir()
    source.write_text(textwrap.dedent("""
        import math
        FACTOR = 3

        def make_closure(n):
            def add_n(x):
                return x + n + FACTOR
            return add_n

        def make_nested():
            def outer(x):
                def inner(y):
                    return math.sqrt(y) * FACTOR
                return inner(x)
            return outer

        scaled = lambda x: x * FACTOR

        def by_reference(x):
            return x
    """))
    sys.path.insert(0, str(source.parent))
    try:
        module = importlib.import_module("unimportable_tasks")
        _, _, client = net.cluster()
        assert client.queue(module.scaled, [7]) == 21
        assert client.queue(module.make_closure(10), [1]) == 14
        assert client.queue(module.make_nested(), [16]) == 12.0
        # A top-level function of an importable module travels by reference: the worker
        # must be able to import it, and says so clearly when it cannot.
        with pytest.raises(ModuleNotFoundError, match="unimportable_tasks"):
            client.queue(module.by_reference, [1])
    finally:
        sys.path.remove(str(source.parent))
        sys.modules.pop("unimportable_tasks", None)


def test_one_mebibyte_arguments_and_results(net):
    _, _, client = net.cluster()
    blob = os.urandom(1 << 20)
    result = client.queue(lambda b: b[::-1] + b"!", [blob])
    assert len(result) == (1 << 20) + 1
    assert result == blob[::-1] + b"!"


def test_stand_alone_worker_serves_clients(net):
    worker = net.worker(None, processes=2)
    client = net.client(worker)
    assert client.queue(lambda x, y: x + y, [4, 7]) == 11
    status = client.status()
    assert status["role"] == "worker"
    assert len(status["workers"]) == 1
    assert status["workers"][0]["port"] == worker.port
    assert status["capacity"] == 2
    assert status["completed"] == 1


def test_managed_worker_refuses_direct_tasks(net):
    _manager, (worker,), _ = net.cluster()
    direct = net.client(worker)
    with pytest.raises(ProtocolError, match="only from its manager"):
        direct.queue(lambda: 1)
    assert direct.status()["manager_connected"] is True


def _make_span():
    # Nested, so it travels by value: the workers cannot import this test module.
    def span(seconds):
        start = time.time()
        time.sleep(seconds)
        return os.getpid(), start, time.time()

    return span


_span = _make_span()


def _max_overlap(spans):
    """Most tasks that were running at the same instant."""
    events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def test_queue_blocks_only_the_calling_greenlet(net):
    _, _, client = net.cluster(processes=2)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(time.time()) or gevent.sleep(0.01) for _ in range(1000)])
    # Two greenlets each queue a task; two processes run them at the same time.
    callers = [gevent.spawn(client.queue, _span, [0.5]) for _ in range(2)]
    gevent.joinall(callers, timeout=30, raise_error=True)
    ticker.kill()
    spans = [g.value for g in callers]
    assert len({pid for pid, _, _ in spans}) == 2
    assert _max_overlap(spans) == 2
    first_start = min(s for _, s, _ in spans)
    last_end = max(e for _, _, e in spans)
    # The sibling greenlet kept running while both callers were blocked.
    assert sum(1 for t in ticks if first_start < t < last_end) > 10


def test_two_thousand_deferred_tasks_in_flight(net):
    _, _, client = net.cluster(processes=2)
    deferreds = [client.defer(lambda i: i * i, [i]) for i in range(2000)]
    assert not all(d.done() for d in deferreds)  # all were sent before any was awaited
    assert [d() for d in deferreds] == [i * i for i in range(2000)]
    assert client.status()["completed"] == 2000


def test_default_pool_size_is_the_cpu_count(net):
    manager = net.manager()
    net.worker(manager, processes=0)
    client = net.client(manager)
    status = net.wait_workers(client, 1)
    assert status["workers"][0]["capacity"] == default_size() == len(os.sched_getaffinity(0))


def test_second_worker_doubles_throughput(net):
    manager, _, client = net.cluster(workers=1, processes=2)

    def run_batch():
        start = time.monotonic()
        spans = [d() for d in [client.defer(_span, [0.3]) for _ in range(8)]]
        return time.monotonic() - start, spans

    one_elapsed, one_spans = run_batch()
    net.worker(manager, processes=2)
    net.wait_workers(client, 2)
    two_elapsed, two_spans = run_batch()
    assert _max_overlap(one_spans) == 2
    assert len({pid for pid, _, _ in one_spans}) == 2
    assert _max_overlap(two_spans) == 4  # both workers' processes ran at once
    assert len({pid for pid, _, _ in two_spans}) == 4
    assert two_elapsed < one_elapsed * 0.75  # 8 tasks: four rounds of 0.3s, then two


def test_work_is_balanced_across_workers(net):
    _, _, client = net.cluster(workers=2, processes=2)
    spans = [d() for d in [client.defer(_span, [0.2]) for _ in range(8)]]
    status = client.status()
    done = sorted(w["completed"] for w in status["workers"])
    assert done == [4, 4]
    assert len({pid for pid, _, _ in spans}) == 4


def test_queue_size_rejects_without_retries(net):
    _, _, client = net.cluster(workers=1, processes=1, manager_args=("--queue-size", "1"), retries=0)
    running = client.defer(time.sleep, [1.0])
    queued = client.defer(time.sleep, [0.01])
    rejected = client.defer(time.sleep, [0.01])
    with pytest.raises(TaskRejected, match="queue is full"):
        rejected()
    assert running() is None and queued() is None
    assert client.status()["rejected"] == 1


def test_a_stand_alone_worker_bounds_its_queue_and_the_client_gives_up_after_its_retries(net):
    worker = net.worker(None, "--queue-size", "1", processes=1)
    client = net.client(worker, retries=2)
    running = client.defer(time.sleep, [3.0])
    queued = client.defer(time.sleep, [0.01])
    wait_for(lambda: client.status()["queued"] == 1, what="the second task to wait for the process")
    started = time.monotonic()
    rejected = client.defer(time.sleep, [0.01])
    with pytest.raises(TaskRejected, match="queue is full"):
        rejected(timeout=30)
    assert rejected.tries == 3 and client.status()["rejected"] == 3  # the first send and two retries
    assert 0.05 < time.monotonic() - started < 2.5  # two short, growing delays (0.06 s, then about 0.1 s)
    assert running(timeout=30) is None and queued(timeout=30) is None


def test_queue_size_rejections_are_retried_transparently(net):
    _, _, client = net.cluster(workers=1, processes=1, manager_args=("--queue-size", "1"))
    started = time.monotonic()
    deferreds = [client.defer(_span, [0.2]) for _ in range(5)]
    spans = [d() for d in deferreds]
    assert len(spans) == 5
    status = client.status()
    assert status["rejected"] >= 1  # the manager did reject some ...
    assert status["completed"] == 5  # ... and the client's retries got every one through
    assert sum(d.tries for d in deferreds) == 5 + status["rejected"]  # each rejection cost one more send
    retried = [d for d in deferreds if d.tries > 1]
    assert retried and all(d.sent_at is not None and d.sent_at > started for d in deferreds)


def test_monkey_patched_script_with_threads(net, tmp_path):
    manager, _, _ = net.cluster()
    script = tmp_path / "patched.py"
    script.write_text(textwrap.dedent(f"""
        from gevent import monkey
        monkey.patch_all()
        import threading
        from argon import Client

        client = Client("127.0.0.1", {manager.port})
        results = {{}}

        def work(n):
            results[n] = client.queue(lambda x: x * 10, [n])

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        print(sorted(results.items()))
    """))
    proc = gevent.subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == str([(n, n * 10) for n in range(8)])
