"""Flow end to end: credits, prefetch and steal-back keep short tasks from waiting behind long ones.

Each test first runs a burst of trivial tasks, so that every worker has learnt that its
tasks are short and prefetches deeply (checked in ``status()``): the case where a long
task, arriving next, could trap short ones behind it. The short tasks record when they
started (``time.time()``) and append their id to a file, so the tests can tell how long
each waited and that none ran twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from argon import TaskCancelled

from conftest import wait_for

pytestmark = pytest.mark.timeout(90)


def _tasks(log: Path):
    def short(i, seconds):
        started = time.time()
        with open(log, "a") as out:
            out.write(f"{i}\n")
        time.sleep(seconds)
        return started

    def long(seconds):
        time.sleep(seconds)
        return seconds

    return short, long


def _warm_up(client, workers: int) -> None:
    """Trivial tasks until every worker prefetches (its credit exceeds its processes)."""

    def deep():
        for d in [client.defer(lambda i: i, [i]) for i in range(400)]:
            d(timeout=60)
        rows = client.status()["workers"]
        return len(rows) == workers and all(row["credit"] > row["capacity"] for row in rows)

    wait_for(deep, timeout=60, interval=0.1, what="every worker to prefetch")


def _ran_once(log: Path, ids: list[int]) -> None:
    ran = [int(line) for line in log.read_text().split()]
    assert sorted(ran) == sorted(ids), "every short task ran exactly once"


def _run_shorts(client, short, log, count, seconds):
    """Defer ``count`` short tasks; return (id, submitted, deferred) triples."""
    out = []
    for i in range(count):
        deferred = client.defer(short, [i, seconds])
        out.append((i, time.time(), deferred))
    return out


@pytest.mark.parametrize(("workers", "processes"), [(2, 1), (1, 2)],
                         ids=["two-1-process-workers", "one-2-process-worker"])
def test_short_tasks_do_not_wait_behind_a_long_one(net, tmp_path, workers, processes):
    _, _, client = net.cluster(workers=workers, processes=processes)
    _warm_up(client, workers)
    short, long = _tasks(tmp_path / "ran")
    slow = client.defer(long, [3.0])
    shorts = _run_shorts(client, short, tmp_path / "ran", 10, 0.05)
    for i, submitted, deferred in shorts:
        deferred(timeout=30)
        assert time.time() - submitted < 2.0, f"short task {i} took {time.time() - submitted:.2f}s"
    assert not slow.done()  # they did not wait for it
    assert slow(timeout=30) == 3.0
    _ran_once(tmp_path / "ran", list(range(10)))
    if workers > 1:  # some had been prefetched behind the long one, and were taken back
        assert client.status()["handed_back"] >= 1


def test_four_long_and_200_short_tasks_on_two_workers_no_short_task_waits_long(net, tmp_path):
    _, _, client = net.cluster(workers=2, processes=2)
    _warm_up(client, 2)
    short, long = _tasks(tmp_path / "ran")
    # Routed to the processes with the most idle ones in turn, the 3 s tasks land on one
    # worker and the 1 s tasks on the other: the 3 s worker must not keep short tasks.
    longs = [client.defer(long, [seconds]) for seconds in (3.0, 1.0, 3.0, 1.0)]
    shorts = _run_shorts(client, short, tmp_path / "ran", 200, 0.005)
    waits = [deferred(timeout=60) - submitted for _, submitted, deferred in shorts]
    assert max(waits) < 2.5, f"a short task waited {max(waits):.2f}s to start"
    assert [d(timeout=30) for d in longs] == [3.0, 1.0, 3.0, 1.0]
    _ran_once(tmp_path / "ran", list(range(200)))
    status = client.status()
    assert status["busy"] == 0 and status["prefetched"] == 0 and status["queued"] == 0


def test_cancelled_tasks_never_run_and_the_others_run_once(net, tmp_path):
    """Cancel races with prefetch: each task is either dropped unstarted or runs exactly once."""
    _, _, client = net.cluster(workers=1, processes=1)
    _warm_up(client, 1)
    short, _ = _tasks(tmp_path / "ran")
    shorts = _run_shorts(client, short, tmp_path / "ran", 60, 0.01)
    verdicts = [deferred.cancel() for _, _, deferred in reversed(shorts)][::-1]
    ran = []
    for (i, _, deferred), cancelled in zip(shorts, verdicts, strict=True):
        if cancelled:
            with pytest.raises(TaskCancelled):
                deferred(timeout=30)
        else:
            deferred(timeout=30)
            ran.append(i)
    assert any(verdicts) and ran, "some were cancelled, some had started"
    _ran_once(tmp_path / "ran", ran)
    status = client.status()
    assert status["busy"] == 0 and status["prefetched"] == 0 and status["queued"] == 0
