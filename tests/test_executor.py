"""argon.Executor against the concurrent.futures semantics (CPython's generic executor tests).

Each behaviour here is one that CPython's Lib/test/test_concurrent_futures checks for every
executor, restated for an executor whose processes live on an Argon network.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
import weakref
from collections.abc import Iterator

import psutil
import pytest

import argon
from argon import Client, TaskTimeout

from conftest import wait_for


def _tasks():
    import time as _time

    def mul(x, y):
        return x * y

    def capture(*args, **kwargs):
        return args, kwargs

    def nap(value, seconds):
        _time.sleep(seconds)
        return value

    class Thing:
        pass

    def make_thing(_):
        return Thing()

    return mul, capture, nap, make_thing


mul, capture, nap, make_thing = _tasks()


@pytest.fixture(scope="module")
def address(shared_address: str) -> str:
    return shared_address


@pytest.fixture
def executor(address: str) -> Iterator[argon.Executor]:
    with argon.Executor(address) as ex:
        yield ex


@pytest.mark.timeout(60)
def test_submit_and_keywords(executor):
    assert executor.submit(pow, 2, 8).result() == 256
    assert executor.submit(mul, 2, y=8).result() == 16
    assert executor.submit(capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)


@pytest.mark.timeout(60)
def test_map_matches_builtin_map(executor):
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10))) == expected
    for chunksize in (1, 3, 64):
        assert list(executor.map(pow, range(10), range(10), chunksize=chunksize)) == expected
    assert list(executor.map(pow, [], [])) == []
    assert list(executor.map(pow, range(5), range(5), buffersize=2)) == expected[:5]


@pytest.mark.timeout(60)
def test_map_sends_one_task_per_chunk(executor):
    before = executor.client.status()["completed"]
    assert sum(executor.map(mul, range(1000), range(1000), chunksize=100)) == sum(i * i for i in range(1000))
    assert executor.client.status()["completed"] - before == 10


@pytest.mark.timeout(60)
def test_map_exception_at_the_right_item(executor):
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.timeout(60)
def test_map_timeout_at_the_right_item(executor):
    results = []
    with pytest.raises(concurrent.futures.TimeoutError) as info:
        for value in executor.map(nap, [0, 1, 2], [0, 0, 6], timeout=2):
            results.append(value)
    assert isinstance(info.value, TaskTimeout)
    assert results == [0, 1]


@pytest.mark.timeout(60)
def test_map_is_lazy_with_a_buffer(executor):
    consumed = []

    def endless():
        n = 0
        while True:
            consumed.append(n)
            yield n
            n += 1

    results = executor.map(mul, endless(), endless(), buffersize=4)
    assert [next(results) for _ in range(10)] == [i * i for i in range(10)]
    assert len(consumed) <= 2 * 16  # read only a bounded way ahead of the consumer


@pytest.mark.timeout(60)
def test_bad_arguments(executor):
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(pow, [1], [1], chunksize=0)
    with pytest.raises(ValueError, match="max_workers"):
        argon.Executor(max_workers=0)
    with pytest.raises(ValueError, match="max_workers"):
        argon.Executor(max_workers=-1)
    with pytest.raises(Exception, match="generator"):
        executor.submit(mul, (i for i in range(2)), 1)
    assert executor.submit(mul, 3, 3).result() == 9  # nothing else disturbed


@pytest.mark.timeout(60)
def test_no_stale_references(executor):
    class Holder:
        def method(self):
            pass

    holder = Holder()
    collected = threading.Event()
    ref = weakref.ref(holder, lambda _: collected.set())
    executor.submit(holder.method).result(10)
    del holder
    gc.collect()
    assert collected.wait(5) and ref() is None


@pytest.mark.timeout(60)
def test_map_iterator_holds_no_result(executor):
    for obj in executor.map(make_thing, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


@pytest.mark.timeout(60)
def test_shutdown_semantics(address):
    ex = argon.Executor(address)
    futures = [ex.submit(nap, i, 0.2) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures) and [f.result() for f in futures] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    ex.shutdown()  # twice is fine


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures(address):
    ex = argon.Executor(address)
    running = [ex.submit(nap, i, 1.0) for i in range(2)]
    wait_for(lambda: ex.client.status()["busy"] == 2, what="both processes busy")
    queued = [ex.submit(nap, i, 0.0) for i in range(5)]
    wait_for(lambda: ex.client.status()["queued"] == 5, what="five queued")
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    assert [f.result() for f in running] == [0, 1]


@pytest.mark.timeout(60)
def test_shutdown_waits_past_the_clients_timeout(address):
    """``shutdown(wait=True)`` waits for every call, like the standard executors, and never raises."""
    ex = argon.Executor(address, timeout=0.3)  # the client's default wait for a result
    future = ex.submit(nap, 7, 1.0)
    started = time.monotonic()
    ex.shutdown(wait=True)
    assert future.done() and future.result() == 7 and time.monotonic() - started > 0.5
    assert ex.client._closed


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_releases_the_client_after_the_last_call(address):
    ex = argon.Executor(address)
    future = ex.submit(nap, 3, 1.0)
    ex.shutdown(wait=False)
    assert not future.done() and not ex.client._closed  # returned at once; the call goes on
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    assert future.result(timeout=30) == 3
    wait_for(lambda: ex.client._closed, 10, what="the client to be released after the last call")


@pytest.mark.timeout(60)
def test_client_executor_leaves_the_client_open(address):
    with Client(address) as client:
        with client.executor() as ex:
            assert ex.submit(mul, 6, 7).result() == 42
        assert client.queue(mul, [2, 3]) == 6


@pytest.mark.timeout(120)
def test_embedded_network_is_started_and_stopped():
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}  # this module's shared network
    with argon.Executor(max_workers=2, retries=3, timeout=0.5) as ex:  # the options are the client's
        assert (ex.client.retries, ex.client.timeout) == (3, 0.5)
        late = ex.submit(nap, 5, 1.5)  # outlives the client's timeout; shutdown still waits for it
        status = ex.client.status()
        assert status["capacity"] == 2
        assert list(ex.map(mul, range(20), range(20), chunksize=4)) == [i * i for i in range(20)]
        children = [c for c in me.children(recursive=True) if c.pid not in before]
        assert len(children) >= 4  # a manager, a worker and its two processes
    assert late.result(0) == 5
    deadline = time.monotonic() + 15
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, "the embedded network outlived shutdown()"
        time.sleep(0.05)
