"""argon.Pool against multiprocessing.Pool: the same calls give the same results.

The behaviours are the generic ones CPython's Lib/test/_test_multiprocessing.py checks for
``Pool`` (apply, map, starmap, imap, callbacks, timeouts, chunksize, close/join/terminate,
the context manager), restated for a pool whose processes live on an Argon network.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import pytest

import argon


def _tasks():
    import os as _os
    import time as _time

    def sqr(x, wait=0.0):
        _time.sleep(wait)
        return x * x

    def mul(x, y):
        return x * y

    def raising(x):
        if x == 3:
            raise KeyError(x)
        return x

    def set_tag(value):
        _os.environ["ARGON_POOL_TAG"] = value

    def get_tag(_):
        return _os.environ.get("ARGON_POOL_TAG"), _os.getpid()

    return sqr, mul, raising, set_tag, get_tag


sqr, mul, raising, set_tag, get_tag = _tasks()


def local_sqr(x):  # importable (for multiprocessing), and equal to sqr
    return x * x


def local_mul(x, y):
    return x * y


@pytest.fixture(scope="module")
def address(shared_address: str) -> str:
    return shared_address


@pytest.fixture
def pool(address: str) -> Iterator[argon.Pool]:
    with argon.Pool(address=address) as p:
        yield p


@pytest.fixture(scope="module")
def mp_pool() -> Iterator[multiprocessing.pool.Pool]:
    with multiprocessing.get_context("spawn").Pool(2) as p:
        yield p


@pytest.mark.timeout(120)
def test_results_equal_multiprocessing(pool, mp_pool):
    data = list(range(-7, 40))
    pairs = [(i, i + 1) for i in range(20)]
    assert pool.apply(sqr, (5,)) == mp_pool.apply(local_sqr, (5,)) == 25
    assert pool.apply(sqr, (), {"x": 6}) == mp_pool.apply(local_sqr, (), {"x": 6})
    assert pool.apply_async(sqr, (7,)).get(10) == mp_pool.apply_async(local_sqr, (7,)).get(10)
    for chunksize in (None, 1, 5, 100):
        assert pool.map(sqr, data, chunksize) == mp_pool.map(local_sqr, data, chunksize)
        assert pool.map_async(sqr, data, chunksize).get(10) == mp_pool.map_async(local_sqr, data, chunksize).get(10)
        assert pool.starmap(mul, pairs, chunksize) == mp_pool.starmap(local_mul, pairs, chunksize)
        assert pool.starmap_async(mul, pairs, chunksize).get(10) == mp_pool.starmap_async(local_mul, pairs).get(10)
    for chunksize in (1, 3):
        assert list(pool.imap(sqr, data, chunksize)) == list(mp_pool.imap(local_sqr, data, chunksize))
        assert sorted(pool.imap_unordered(sqr, data, chunksize)) == sorted(
            mp_pool.imap_unordered(local_sqr, data, chunksize)
        )
    assert pool.map(sqr, []) == mp_pool.map(local_sqr, []) == []
    assert list(pool.imap(sqr, [])) == []
    assert pool.starmap(mul, iter(pairs)) == mp_pool.starmap(local_mul, iter(pairs))


@pytest.mark.timeout(60)
def test_async_result_api(pool):
    result = pool.apply_async(sqr, (4, 0.5))
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    result.wait(10)
    assert result.ready() and result.successful() and result.get() == 16
    failing = pool.apply_async(raising, (3,))
    failing.wait(10)
    assert failing.ready() and not failing.successful()
    with pytest.raises(KeyError):
        failing.get()


@pytest.mark.timeout(60)
def test_callbacks(pool):
    got, errors = [], []
    pool.map_async(sqr, range(5), callback=got.append).wait(10)
    pool.apply_async(sqr, (3,), callback=got.append).wait(10)
    pool.map_async(raising, range(6), error_callback=errors.append).wait(10)
    pool.apply_async(raising, (3,), error_callback=errors.append).wait(10)
    deadline = time.monotonic() + 5
    while (len(got) < 2 or len(errors) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [[0, 1, 4, 9, 16], 9]
    assert [type(e) for e in errors] == [KeyError, KeyError]


@pytest.mark.timeout(60)
def test_errors_reach_the_caller(pool):
    with pytest.raises(KeyError):
        pool.map(raising, range(10))
    with pytest.raises(KeyError):
        pool.apply(raising, (3,))
    iterator = pool.imap(raising, range(6))
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        next(iterator)


@pytest.mark.timeout(60)
def test_imap_next_timeout(pool):
    iterator = pool.imap(sqr, [(2)], 1)
    slow = pool.imap(lambda x: sqr(x, 1.0), [3])
    with pytest.raises(multiprocessing.TimeoutError):
        slow.next(timeout=0.05)
    assert slow.next(timeout=10) == 9
    with pytest.raises(StopIteration):
        slow.next()
    assert list(iterator) == [4]


@pytest.mark.timeout(60)
def test_bad_input(pool):
    with pytest.raises(ValueError, match="Chunksize"):
        pool.map(sqr, range(4), chunksize=0)
    with pytest.raises(ValueError, match="Chunksize"):
        pool.imap(sqr, range(4), chunksize=0)
    with pytest.raises(ValueError, match="processes"):
        argon.Pool(0)
    with pytest.raises(TypeError, match="initializer"):
        argon.Pool(address="127.0.0.1:1", initializer=3)
    with pytest.raises(ValueError, match="--max-requests"):
        argon.Pool(address="127.0.0.1:1", maxtasksperchild=2)
    with pytest.raises(ValueError, match="key_file"):  # not ignored: the embedded network has no key=
        argon.Pool(2, key=b"secret")
    with pytest.raises(Exception, match="generator"):
        pool.apply(sqr, ((i for i in range(2)),))
    assert pool.apply(sqr, (3,)) == 9  # nothing else disturbed


@pytest.mark.timeout(60)
def test_close_join_terminate(address):
    pool = argon.Pool(address=address)
    results = [pool.apply_async(sqr, (i, 0.2)) for i in range(4)]
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.apply(sqr, (1,))
    pool.join()
    assert [r.get(0) for r in results] == [0, 1, 4, 9]

    pool = argon.Pool(address=address)
    started = time.monotonic()
    slow = [pool.apply_async(sqr, (i, 5.0)) for i in range(6)]
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 5  # terminate does not wait for the tasks
    assert not all(r.ready() and r.successful() for r in slow)
    with pytest.raises(ValueError), pool:
        pass


@pytest.mark.timeout(120)
def test_initializer_runs_once_per_process_and_maxtasksperchild():
    with argon.Pool(2, initializer=set_tag, initargs=("ready",), maxtasksperchild=3) as pool:
        seen = pool.map(get_tag, range(30), chunksize=1)
    assert {tag for tag, _ in seen} == {"ready"}
    # 30 tasks, at most 3 per process: the processes were replaced along the way.
    assert len({pid for _, pid in seen}) >= 10
